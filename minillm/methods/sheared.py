"""Sheared-LLaMA (Xia et al. 2023): targeted structured pruning, then continued pre-training with
dynamic batch loading.

Pruning learns hard-concrete masks (Louizos et al. 2018) on layers, key/value head groups, FFN units
and hidden dimensions while the weights keep training. The masks are pulled to the target shape by
a Lagrangian on the expected sparsity of every *row* of a mask (per layer for heads and FFN units;
one row for layers, one for hidden dimensions), averaged over the rows of a kind:

    L_kind = mean_rows( lambda1 (s_row - t) + lambda2 (s_row - t)^2 ),   t warmed up linearly from 0,

minimised over weights and masks and maximised over the lambdas (one pair per kind), as in the
authors' `l0_module.py`. The final masks keep exactly the target number per row, and `compact`
removes the rest physically, folding the mask values into the weights: the compact model equals the
masked one. Dynamic batch loading then re-weights the domains of the mixture towards those whose
validation loss is furthest above a reference loss.

How the pieces meet the primitives: `ShearingMasks` is set as `model.mask_source`, so the
trainer's plain `model(x, y)` samples masks inside the forward pass and gets the Lagrangian as an
auxiliary loss; its parameters claim their own optimizer groups (`optimizer_groups`, no weight
decay, `maximize=True` for the lambdas); they are part of the model's state dict, so checkpoints
and exact resume need nothing special. `PruningSchedule` (the target's warm-up, the masks' lr, the
clamp of log_alpha, the sparsity log) and `DynamicBatchLoading` are trainer callbacks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from ..model import GPT, PRESETS, Masks, ModelConfig
from ..train import lr_at

# Hard-concrete constants of the paper (stretch interval (l, r), temperature beta). log_alpha starts
# near 5 and is kept in [log 1e-2, log 1e2] (about +-4.6) by clamping the *parameter* after every
# optimizer step, as the authors' `constrain_parameters` does before every forward pass; a clamp
# inside the forward pass would zero its gradient outside the range and freeze it there.
LIMIT_L, LIMIT_R, BETA = -0.1, 1.1, 2.0 / 3.0
INIT_LOG_ALPHA = 5.0
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)
SCORE_SCALE = 0.8  # the authors' deterministic score is sigmoid(0.8 log_alpha / beta)
KINDS = ("layer", "head", "ffn", "hidden")


# --- hard-concrete masks ----------------------------------------------------------------------------

class HardConcrete(nn.Module):
    """A tensor of hard-concrete gates z in [0, 1], with exact zeros and ones, of a learned
    `log_alpha` of the same shape: (C,) is one row of C gates, (R, C) is R rows."""

    def __init__(self, shape: tuple[int, ...], init_log_alpha: float = INIT_LOG_ALPHA,
                 init_std: float = 0.01):
        super().__init__()
        self.log_alpha = nn.Parameter(init_log_alpha + init_std * torch.randn(shape))
        self.constrain_()

    @torch.no_grad()
    def constrain_(self) -> None:
        """Clamp log_alpha into [log 1e-2, log 1e2] in place (its gradient is untouched)."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def sample(self) -> torch.Tensor:
        """z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) (r - l) + l, 0, 1)."""
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / BETA)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0, 1)

    def prob_nonzero(self) -> torch.Tensor:
        """P(z != 0) = 1 - sigmoid(beta log(-l / r) - log_alpha), in closed form."""
        return prob_nonzero(self.log_alpha)

    def row_sparsity(self) -> torch.Tensor:
        """(R,) expected share of zero gates in each row ((1,) for a one-row mask)."""
        return row_sparsity(self.log_alpha)

    @torch.no_grad()
    def deterministic(self, keep_per_row: int | None = None) -> torch.Tensor:
        """The authors' deterministic gates: the score sigmoid(0.8 log_alpha / beta), with the
        lowest scores of each row set to 0 so that `keep_per_row` stay (default: the expected
        number of non-zero gates of the row, rounded). A kept score is never 0."""
        la_RC = self.log_alpha.detach().reshape(-1, self.log_alpha.shape[-1])
        if keep_per_row is None:
            keep_R = self.prob_nonzero().detach().reshape(la_RC.shape).sum(-1).round().long()
        else:
            keep_R = torch.full((la_RC.shape[0],), keep_per_row)
        keep_RC = torch.stack([keep_top(row[None], int(k))[0] for row, k in zip(la_RC, keep_R)])
        return (keep_RC * torch.sigmoid(SCORE_SCALE * la_RC / BETA)).reshape(self.log_alpha.shape)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    return 1 - torch.sigmoid(BETA * math.log(-LIMIT_L / LIMIT_R) - log_alpha)


def row_sparsity(log_alpha: torch.Tensor) -> torch.Tensor:
    """(R,) expected share of zero gates per row of a (C,) or (R, C) log_alpha."""
    return 1 - prob_nonzero(log_alpha).reshape(-1, log_alpha.shape[-1]).mean(-1)


# --- the target shape -------------------------------------------------------------------------------

@dataclass
class TargetShape:
    """The shape to prune to. Head counts are query heads; with grouped-query attention whole
    key/value groups are pruned, so `n_head` must be a multiple of the source's group size."""
    n_layer: int
    n_head: int
    n_embd: int
    ffn_hidden: int
    n_kv_head: int | None = None

    @classmethod
    def from_preset(cls, name: str) -> "TargetShape":
        if name not in PRESETS:
            raise UserError(f"unknown target preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
        cfg = ModelConfig(**PRESETS[name])
        return cls(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.ffn_hidden, cfg.n_kv_head)

    def counts(self, source: ModelConfig) -> dict[str, tuple[int, int]]:
        """(kept, of) per mask kind, checked against `source`: heads are counted in key/value
        groups. A shape that does not fit the source is a `UserError` naming the field."""
        group = source.n_head // source.n_kv_head
        for name, mine, theirs in (("n_layer", self.n_layer, source.n_layer),
                                   ("n_head", self.n_head, source.n_head),
                                   ("n_embd", self.n_embd, source.n_embd),
                                   ("ffn_hidden", self.ffn_hidden, source.ffn_hidden)):
            if not 1 <= mine <= theirs:
                raise UserError(f"target {name} {mine} does not fit the source model's {theirs} "
                                f"(expected 1 to {theirs})")
        if self.n_head % group:
            raise UserError(f"target n_head {self.n_head} is not a multiple of the source's "
                            f"{group} query heads per key/value head: grouped-query attention is "
                            "pruned in whole groups")
        if self.n_kv_head is not None and self.n_kv_head * group != self.n_head:
            raise UserError(f"target n_kv_head {self.n_kv_head} with n_head {self.n_head} changes "
                            f"the source's group size {group}; pruning keeps groups whole "
                            f"(expected n_kv_head {self.n_head // group})")
        return {"layer": (self.n_layer, source.n_layer),
                "head": (self.n_head // group, source.n_kv_head),
                "ffn": (self.ffn_hidden, source.ffn_hidden),
                "hidden": (self.n_embd, source.n_embd)}


# --- the learned masks -------------------------------------------------------------------------------

class ShearingMasks(nn.Module):
    """Hard-concrete masks on layers (L,), key/value head groups (L, G), FFN units (L, F) and hidden
    dimensions (d,), with one pair of Lagrange multipliers per kind. Set as `model.mask_source`:
    in training it returns sampled masks and {"lagrangian": ...}; in eval, deterministic masks.
    `progress` (0 to 1, set by `PruningSchedule`) scales the target sparsity during its warm-up.
    `mask_lr` and `lambda_lr` are peak learning rates (the authors' `lag_lr`, 1.0 for both);
    `PruningSchedule` scales them by the trainer's schedule, as the authors' scheduler scales
    every parameter group."""

    def __init__(self, source: ModelConfig, target: TargetShape, mask_lr: float = 1.0,
                 lambda_lr: float = 1.0):
        super().__init__()
        self.counts = target.counts(source)
        self.group = source.n_head // source.n_kv_head
        L, G, F, d = source.n_layer, source.n_kv_head, source.ffn_hidden, source.n_embd
        self.gates = nn.ModuleDict({"layer": HardConcrete((L,)), "head": HardConcrete((L, G)),
                                    "ffn": HardConcrete((L, F)), "hidden": HardConcrete((d,))})
        self.lambda1 = nn.Parameter(torch.zeros(len(KINDS)))
        self.lambda2 = nn.Parameter(torch.zeros(len(KINDS)))
        self.register_buffer("target_sparsity", torch.tensor(
            [1 - kept / of for kept, of in (self.counts[k] for k in KINDS)]), persistent=False)
        self.mask_lr, self.lambda_lr = mask_lr, lambda_lr
        self.progress = 1.0

    def optimizer_groups(self, cfg) -> list[dict]:
        """Masks and multipliers in groups of their own: no weight decay (the trainer's default
        groups would decay the (L, G) and (L, F) log_alphas), lambdas maximised. `own_lr`: the
        trainer leaves their lr alone; `PruningSchedule` sets it to `peak_lr` x the schedule."""
        return [{"params": [g.log_alpha for g in self.gates.values()], "lr": self.mask_lr,
                 "peak_lr": self.mask_lr, "weight_decay": 0.0, "own_lr": True},
                {"params": [self.lambda1, self.lambda2], "lr": self.lambda_lr,
                 "peak_lr": self.lambda_lr, "weight_decay": 0.0, "own_lr": True, "maximize": True}]

    def row_sparsity(self) -> dict[str, torch.Tensor]:
        """{kind: (R,) expected sparsity of each row}: layers and hidden one row, heads and FFN
        units one row per layer."""
        return {k: self.gates[k].row_sparsity() for k in KINDS}

    def expected_sparsity(self) -> torch.Tensor:
        """(4,) mean expected share of zero gates per kind (layer, head, ffn, hidden)."""
        return torch.stack([s.mean() for s in self.row_sparsity().values()])

    def lagrangian(self) -> torch.Tensor:
        """sum over kinds of mean over rows of lambda1 (s - t) + lambda2 (s - t)^2."""
        total = 0.0
        for i, sparsity_R in enumerate(self.row_sparsity().values()):
            gap_R = sparsity_R - self.target_sparsity[i] * self.progress
            total = total + (self.lambda1[i] * gap_R + self.lambda2[i] * gap_R * gap_R).mean()
        return total

    def constrain_(self) -> None:
        for gate in self.gates.values():
            gate.constrain_()

    def _masks(self, z: dict[str, torch.Tensor]) -> Masks:
        return Masks(layer=z["layer"], head=z["head"].repeat_interleave(self.group, dim=1),
                     ffn=z["ffn"], hidden=z["hidden"])

    def forward(self) -> tuple[Masks, dict[str, torch.Tensor]]:
        if not self.training:
            return self._masks({k: g.deterministic() for k, g in self.gates.items()}), {}
        return self._masks({k: g.sample() for k, g in self.gates.items()}), {"lagrangian": self.lagrangian()}

    @torch.no_grad()
    def final_masks(self) -> Masks:
        """The authors' deterministic masks with exactly the target count per row (the highest
        log_alphas, ties to the lower index, at their score sigmoid(0.8 log_alpha / beta));
        hidden dimensions at 1 (a hidden mask scales every norm output: only 0 / 1 folds into
        the weights)."""
        z = {kind: gate.deterministic(self.counts[kind][0]) for kind, gate in self.gates.items()}
        z["hidden"] = (z["hidden"] != 0).float()
        return self._masks(z)

    @torch.no_grad()
    def off_target(self, tolerance: float = 0.02) -> dict[str, float]:
        """{kind: worst |row sparsity - full target|} of the kinds with a row further than
        `tolerance` from its target; empty when pruning ended on target."""
        worst = {k: float((s - self.target_sparsity[i]).abs().max())
                 for i, (k, s) in enumerate(self.row_sparsity().items())}
        return {k: v for k, v in worst.items() if v > tolerance}


def keep_top(scores_RC: torch.Tensor, k: int) -> torch.Tensor:
    """(R, C) 0/1 with the k highest scores of each row set (ties to the lower index)."""
    order = torch.argsort(-scores_RC.float(), dim=1, stable=True)[:, :k]
    return torch.zeros_like(scores_RC, dtype=torch.float32).scatter_(1, order, 1.0)


class PruningSchedule:
    """Trainer callback of a pruning run, as the authors' pruning callback, scheduler and
    `constrain_parameters`: before a step, the target sparsity is warmed up linearly over
    `warmup_steps` and the masks' and lambdas' lr follow the trainer's schedule (warmup, cosine);
    after it, log_alpha is clamped back into range and, on log steps, each kind's mean and worst
    row's expected sparsity are logged against the current target."""

    def __init__(self, masks: ShearingMasks, warmup_steps: int):
        self.masks, self.warmup_steps = masks, warmup_steps

    def on_step_start(self, trainer) -> None:
        self.masks.progress = min(1.0, trainer.step / max(self.warmup_steps, 1))
        scale = lr_at(trainer.step, trainer.cfg) / trainer.cfg.lr
        for group in trainer.optimizer.param_groups:
            if "peak_lr" in group:
                group["lr"] = group["peak_lr"] * scale

    def on_step_end(self, trainer, record) -> None:
        self.masks.constrain_()
        if trainer.step % trainer.cfg.log_interval == 0 or trainer.step == trainer.cfg.max_steps:
            target = (self.masks.target_sparsity * self.masks.progress).tolist()
            for i, (kind, gate) in enumerate(self.masks.gates.items()):
                log_alpha = gate.log_alpha.detach()
                if hasattr(log_alpha, "full_tensor"):  # outside the forward pass FSDP keeps it sharded
                    log_alpha = log_alpha.full_tensor()
                s = row_sparsity(log_alpha)
                record.update({f"sparsity/{kind}": float(s.mean()), f"target/{kind}": target[i],
                               f"worst_gap/{kind}": float((s - target[i]).abs().max())})


# --- naive structured pruning (a baseline) ---------------------------------------------------------

@torch.no_grad()
def magnitude_masks(model: GPT, target: TargetShape) -> Masks:
    """0/1 masks of the target shape chosen by weight magnitude, with no training: layers by the
    norm of their output projections, head groups by their query / key / value / output weights,
    FFN units by their up and down weights, hidden dimensions by their embedding column."""
    cfg = model.config
    counts = target.counts(cfg)
    group, hd = cfg.n_head // cfg.n_kv_head, cfg.head_dim
    layer, head, ffn = [], [], []
    for block in model.blocks:
        a, f = block.attn, block.ffn
        layer.append(a.wo.weight.norm() + f.down.weight.norm())
        q = a.wq.weight.view(cfg.n_kv_head, group * hd, -1).flatten(1).norm(dim=1)
        kv = (a.wk.weight.view(cfg.n_kv_head, -1).norm(dim=1)
              + a.wv.weight.view(cfg.n_kv_head, -1).norm(dim=1))
        o = a.wo.weight.view(cfg.n_embd, cfg.n_kv_head, group * hd).transpose(0, 1).flatten(1).norm(dim=1)
        head.append(q + kv + o)
        ffn.append(f.up.weight.norm(dim=1) * f.down.weight.norm(dim=0))
    hidden = model.wte.weight.norm(dim=0)
    z = {"layer": keep_top(torch.stack(layer)[None], counts["layer"][0])[0],
         "head": keep_top(torch.stack(head), counts["head"][0]),
         "ffn": keep_top(torch.stack(ffn), counts["ffn"][0]),
         "hidden": keep_top(hidden[None], counts["hidden"][0])[0]}
    return Masks(layer=z["layer"], head=z["head"].repeat_interleave(group, dim=1), ffn=z["ffn"],
                 hidden=z["hidden"])


# --- compaction ---------------------------------------------------------------------------------------

def _kept(mask: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.arange(n) if mask is None else torch.nonzero(mask.detach().cpu() != 0).flatten()


@torch.no_grad()
def compact(model: GPT, masks: Masks) -> GPT:
    """The physically smaller model that computes what `model` computes under `masks`: pruned
    layers, heads, units and dimensions removed, mask values folded into the output projections.
    Needs the same number of kept heads (in whole key/value groups) and units in every kept layer,
    and a 0/1 hidden mask; anything else is a `UserError`."""
    cfg = model.config
    group, hd = cfg.n_head // cfg.n_kv_head, cfg.head_dim
    layers = _kept(masks.layer, cfg.n_layer)
    hidden = _kept(masks.hidden, cfg.n_embd)
    if masks.hidden is not None and not torch.all((masks.hidden == 0) | (masks.hidden == 1)):
        raise UserError("compact: the hidden mask must be 0 / 1 (use ShearingMasks.final_masks)")
    if len(layers) == 0:
        raise UserError("compact: the layer mask prunes every layer")
    head_mask = masks.head if masks.head is not None else torch.ones(cfg.n_layer, cfg.n_head)
    ffn_mask = masks.ffn if masks.ffn is not None else torch.ones(cfg.n_layer, cfg.ffn_hidden)
    head_mask, ffn_mask = head_mask.detach().cpu().float(), ffn_mask.detach().cpu().float()
    groups_per_layer = {int((head_mask[i].view(cfg.n_kv_head, group) != 0).any(1).sum()) for i in layers}
    units_per_layer = {int((ffn_mask[i] != 0).sum()) for i in layers}
    if len(groups_per_layer) != 1 or len(units_per_layer) != 1:
        raise UserError(f"compact: kept layers differ in kept head groups {sorted(groups_per_layer)} "
                        f"or FFN units {sorted(units_per_layer)}; a model has one shape per layer")
    n_groups, n_units = groups_per_layer.pop(), units_per_layer.pop()
    if n_groups == 0 or n_units == 0:
        raise UserError("compact: a kept layer keeps no attention head or no FFN unit")
    new_cfg = replace(cfg, n_layer=len(layers), n_head=n_groups * group, n_kv_head=n_groups,
                      n_embd=len(hidden), head_dim=hd, ffn_hidden=n_units)
    small = GPT(new_cfg).to(model.wte.weight.device, model.wte.weight.dtype)
    dev = model.wte.weight.device
    h = hidden.to(dev)

    def copy(dst: nn.Linear, src: nn.Linear, rows, cols, col_scale=None, out_scale=1.0):
        w = src.weight[rows][:, cols]
        if col_scale is not None:
            w = w * col_scale
        dst.weight.copy_(w * out_scale)
        if src.bias is not None:
            dst.bias.copy_(src.bias[rows] * out_scale)

    small.wte.weight.copy_(model.wte.weight[:, h])
    if model.wpe is not None:
        small.wpe.weight.copy_(model.wpe.weight[:, h])
    if not cfg.tie_embeddings:
        small.lm_head.weight.copy_(model.lm_head.weight[:, h])
    _copy_norm(small.norm_f, model.norm_f, h)
    for j, i in enumerate(layers.tolist()):
        src, dst = model.blocks[i], small.blocks[j]
        scale = float(masks.layer[i]) if masks.layer is not None else 1.0
        _copy_norm(dst.norm1, src.norm1, h)
        _copy_norm(dst.norm2, src.norm2, h)
        kept_groups = torch.nonzero(head_mask[i].view(cfg.n_kv_head, group).ne(0).any(1)).flatten()
        q_heads = (kept_groups[:, None] * group + torch.arange(group)).flatten()
        q_rows = (q_heads[:, None] * hd + torch.arange(hd)).flatten().to(dev)
        kv_rows = (kept_groups[:, None] * hd + torch.arange(hd)).flatten().to(dev)
        copy(dst.attn.wq, src.attn.wq, q_rows, h)
        copy(dst.attn.wk, src.attn.wk, kv_rows, h)
        copy(dst.attn.wv, src.attn.wv, kv_rows, h)
        head_scale = head_mask[i][q_heads].repeat_interleave(hd).to(dev, model.wte.weight.dtype)
        copy(dst.attn.wo, src.attn.wo, h, q_rows, head_scale, scale)
        units = torch.nonzero(ffn_mask[i] != 0).flatten().to(dev)
        copy(dst.ffn.up, src.ffn.up, units, h)
        if src.ffn.gate is not None:
            copy(dst.ffn.gate, src.ffn.gate, units, h)
        unit_scale = ffn_mask[i][units.cpu()].to(dev, model.wte.weight.dtype)
        copy(dst.ffn.down, src.ffn.down, h, units, unit_scale, scale)
    return small


def _copy_norm(dst, src, kept: torch.Tensor) -> None:
    dst.weight.copy_(src.weight[kept])
    if src.bias is not None:
        dst.bias.copy_(src.bias[kept])


def check_hf_exportable(cfg: ModelConfig) -> None:
    """A compact GPT-2 whose n_head x head_dim differs from n_embd has no Hugging Face GPT-2 layout
    (GPT2Attention derives head_dim from n_embd / n_head): a named refusal."""
    if cfg.norm == "layernorm" and cfg.n_head * cfg.head_dim != cfg.n_embd:
        raise UserError(f"a GPT-2 model with n_head {cfg.n_head} x head_dim {cfg.head_dim} != n_embd "
                        f"{cfg.n_embd} cannot be saved as a Hugging Face GPT-2 model; prune heads and "
                        "hidden dimensions together (n_embd = n_head x head_dim) or keep minillm's format")


# --- dynamic batch loading -------------------------------------------------------------------------------

def load_reference_losses(path: str | Path, domains: list[str]) -> dict[str, float]:
    """Reference losses from a JSON object {domain: loss}; every domain of the mixture needed."""
    path = Path(path)
    try:
        ref = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read reference losses ({e}); expected a JSON object "
                        '{"domain": loss, ...}') from None
    if not isinstance(ref, dict):
        raise UserError(f"{path}: expected a JSON object {{domain: loss}}, got {type(ref).__name__}")
    missing = [d for d in domains if d not in ref]
    if missing:
        raise UserError(f"{path}: no reference loss for domain(s) {', '.join(missing)}")
    bad = [d for d in domains if not isinstance(ref[d], (int, float)) or not math.isfinite(ref[d])]
    if bad:
        raise UserError(f"{path}: reference loss of {', '.join(bad)} is not a finite number")
    return {d: float(ref[d]) for d in domains}


def dbl_update(weights: np.ndarray, losses: np.ndarray, reference: np.ndarray, eta: float = 1.0,
               smoothing: float = 1e-4, clip: bool = True) -> np.ndarray:
    """w <- softmax(log w + eta * max(l - r, 0)), then (1 - c) w + c / k. `clip=False` gives the
    unclipped form of the authors' code (a domain below its reference is down-weighted)."""
    excess = losses - reference
    if clip:
        excess = np.maximum(excess, 0.0)
    logits = np.log(weights) + eta * excess
    w = np.exp(logits - logits.max())
    w /= w.sum()
    return (1 - smoothing) * w + smoothing / len(w)


class DynamicBatchLoading:
    """Trainer callback: after every evaluation (so every `eval_interval` steps) moves the
    mixture's weights towards the domains furthest above their reference loss, and logs weights and
    excess losses. The weights are the loader's state, so a resumed run continues them exactly."""

    def __init__(self, reference: dict[str, float], eta: float = 1.0, smoothing: float = 1e-4,
                 clip: bool = True):
        self.reference, self.eta, self.smoothing, self.clip = reference, eta, smoothing, clip

    def on_eval(self, trainer, result: dict) -> None:
        names = trainer.loader.names
        losses = np.array([result[f"val_loss/{n}"] for n in names])
        ref = np.array([self.reference[n] for n in names])
        w = dbl_update(trainer.loader.weights, losses, ref, self.eta, self.smoothing, self.clip)
        trainer.loader.set_weights(dict(zip(names, w.tolist())))
        trainer.log({"step": trainer.step, **{f"dbl_weight/{n}": float(x) for n, x in zip(names, w)},
                     **{f"excess_loss/{n}": float(x) for n, x in zip(names, losses - ref)}})


__all__ = ["HardConcrete", "prob_nonzero", "row_sparsity", "TargetShape", "ShearingMasks",
           "PruningSchedule", "keep_top",
           "magnitude_masks", "compact", "check_hf_exportable", "load_reference_losses",
           "dbl_update", "DynamicBatchLoading"]
