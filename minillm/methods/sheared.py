"""Sheared-LLaMA (Xia et al. 2023): targeted structured pruning, then continued pre-training with
dynamic batch loading.

Pruning learns hard-concrete masks (Louizos et al. 2018) on layers, key/value head groups, FFN units
and hidden dimensions while the weights keep training. A Lagrangian per mask kind,
lambda1 (s - t) + lambda2 (s - t)^2 on the expected sparsity s and a target t warmed up linearly
from 0, pulls the masks to the target shape; the multipliers are maximised (min over weights and
masks, max over lambdas). The final masks keep exactly the target number per row, and `compact`
removes the rest physically, folding the mask values into the weights: the compact model equals the
masked one. Dynamic batch loading then re-weights the domains of the mixture towards those whose
validation loss is furthest above a reference loss.

How the pieces meet the primitives: `ShearingMasks` is set as `model.mask_source`, so the
trainer's plain `model(x, y)` samples masks inside the forward pass and gets the Lagrangian as an
auxiliary loss; its parameters claim their own optimizer groups (`optimizer_groups`, no weight
decay, a constant lr, `maximize=True` for the lambdas); they are part of the model's state dict, so
checkpoints and exact resume need nothing special. `PruningSchedule` and `DynamicBatchLoading` are
trainer callbacks.
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

# Hard-concrete constants of the paper (stretch interval (l, r), temperature beta) and the initial
# log_alpha: about 5 keeps every unit at first (P(z != 0) = 0.9986).
LIMIT_L, LIMIT_R, BETA = -0.1, 1.1, 2.0 / 3.0
INIT_LOG_ALPHA = 5.0
LOG_ALPHA_RANGE = 10.0  # log_alpha is clamped to +-10 where it is used
KINDS = ("layer", "head", "ffn", "hidden")


# --- hard-concrete masks ----------------------------------------------------------------------------

class HardConcrete(nn.Module):
    """A tensor of hard-concrete gates z in [0, 1], with exact zeros and ones, of a learned
    `log_alpha` of the same shape."""

    def __init__(self, shape: tuple[int, ...], init_log_alpha: float = INIT_LOG_ALPHA,
                 init_std: float = 0.01):
        super().__init__()
        self.log_alpha = nn.Parameter(init_log_alpha + init_std * torch.randn(shape))

    def _log_alpha(self) -> torch.Tensor:
        return self.log_alpha.clamp(-LOG_ALPHA_RANGE, LOG_ALPHA_RANGE)

    def sample(self) -> torch.Tensor:
        """z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) (r - l) + l, 0, 1)."""
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (1 - u).log() + self._log_alpha()) / BETA)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0, 1)

    def deterministic(self) -> torch.Tensor:
        """Louizos et al.'s test-time gate: clamp(sigmoid(log_alpha) (r - l) + l, 0, 1)."""
        return (torch.sigmoid(self._log_alpha()) * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0, 1)

    def prob_nonzero(self) -> torch.Tensor:
        """P(z != 0) = 1 - sigmoid(beta log(-l / r) - log_alpha), in closed form."""
        return 1 - torch.sigmoid(BETA * math.log(-LIMIT_L / LIMIT_R) - self._log_alpha())


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
    `progress` (0 to 1, set by `PruningSchedule`) scales the target sparsity during its warm-up."""

    def __init__(self, source: ModelConfig, target: TargetShape, mask_lr: float = 0.1,
                 lambda_lr: float = 0.1):
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
        groups would decay the (L, G) and (L, F) log_alphas), a constant lr, lambdas maximised."""
        return [{"params": [g.log_alpha for g in self.gates.values()], "lr": self.mask_lr,
                 "weight_decay": 0.0, "own_lr": True},
                {"params": [self.lambda1, self.lambda2], "lr": self.lambda_lr, "weight_decay": 0.0,
                 "own_lr": True, "maximize": True}]

    def expected_sparsity(self) -> torch.Tensor:
        """(4,) expected share of zero gates per kind (layer, head, ffn, hidden), closed form."""
        return torch.stack([1 - self.gates[k].prob_nonzero().mean() for k in KINDS])

    def lagrangian(self) -> torch.Tensor:
        gap = self.expected_sparsity() - self.target_sparsity * self.progress
        return (self.lambda1 * gap + self.lambda2 * gap * gap).sum()

    def _masks(self, z: dict[str, torch.Tensor]) -> Masks:
        return Masks(layer=z["layer"], head=z["head"].repeat_interleave(self.group, dim=1),
                     ffn=z["ffn"], hidden=z["hidden"])

    def forward(self) -> tuple[Masks, dict[str, torch.Tensor]]:
        if not self.training:
            return self._masks({k: g.deterministic() for k, g in self.gates.items()}), {}
        return self._masks({k: g.sample() for k, g in self.gates.items()}), {"lagrangian": self.lagrangian()}

    @torch.no_grad()
    def final_masks(self) -> Masks:
        """Deterministic masks with exactly the target count per row: the gates of highest
        log_alpha are kept (ties to the lower index) at the authors' deterministic score
        sigmoid(0.8 log_alpha / beta), which is never 0, so a kept gate stays kept; hidden
        dimensions at 1 (a hidden mask scales every norm output: only 0 / 1 folds into weights)."""
        z = {}
        for kind, gate in self.gates.items():
            scores = gate._log_alpha().detach()
            keep = keep_top(scores if scores.dim() == 2 else scores[None], self.counts[kind][0])
            keep = keep if scores.dim() == 2 else keep[0]
            z[kind] = keep if kind == "hidden" else keep * torch.sigmoid(0.8 * scores / BETA)
        return self._masks(z)


def keep_top(scores_RC: torch.Tensor, k: int) -> torch.Tensor:
    """(R, C) 0/1 with the k highest scores of each row set (ties to the lower index)."""
    order = torch.argsort(-scores_RC.float(), dim=1, stable=True)[:, :k]
    return torch.zeros_like(scores_RC, dtype=torch.float32).scatter_(1, order, 1.0)


class PruningSchedule:
    """Trainer callback: warms the target up linearly over `warmup_steps` and logs the expected
    sparsity of each mask kind on log steps."""

    def __init__(self, masks: ShearingMasks, warmup_steps: int):
        self.masks, self.warmup_steps = masks, warmup_steps

    def on_step_start(self, trainer) -> None:
        self.masks.progress = min(1.0, trainer.step / max(self.warmup_steps, 1))

    def on_step_end(self, trainer, record) -> None:
        if trainer.step % trainer.cfg.log_interval == 0:
            s = self.masks.expected_sparsity().detach()
            if hasattr(s, "full_tensor"):  # outside the forward pass FSDP keeps the masks sharded
                s = s.full_tensor()
            s = s.tolist()
            record.update({f"sparsity/{k}": v for k, v in zip(KINDS, s)})


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


__all__ = ["HardConcrete", "TargetShape", "ShearingMasks", "PruningSchedule", "keep_top",
           "magnitude_masks", "compact", "check_hf_exportable", "load_reference_losses",
           "dbl_update", "DynamicBatchLoading"]
