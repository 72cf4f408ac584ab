"""SSD: Switchable Sparse-Dense learning (Zhang et al. 2024, "Exploring the Benefit of Activation
Sparsity in Pre-training"), on MoEfication (minillm/moefy.py).

Pre-training alternates between dense steps and sparse steps in which every FFN is an unweighted
top-k MoE of its own units (only the selected experts are computed and updated):

1. Dense phase. Every `check_interval` steps the monitor clusters each FFN's units (balanced k-means
   on the normalised rows of W_in, the MoEfication clustering: units whose input weights point the
   same way fire together) and compares the clustering with the previous one by the adjusted Rand
   index (ARI: 1 = the same partition, about 0 = unrelated). It also logs the activation sparsity
   (share of zero ReLU outputs in the training batch). When the ARI of consecutive clusterings is at
   least `stable_ari` (the co-activation structure has settled), every FFN is MoEfied.
2. Sparse phase, `sparse_steps` long, or shorter when the structure drifts: at each check the
   experts' units are re-clustered, and an ARI below `drift_ari` against the experts in use sends
   the model back to dense so that the structure can evolve.
3. Back to dense for at least `redense_steps`, then sparse again when stable; each clustering is
   warm-started from the previous one and a fresh one is computed beside it: the better of the two
   (by the k-means objective) is kept. The last `final_dense_steps` are dense, so the final model
   runs both dense and as an MoE from the same weights (`to_moe`).

The router is rebuilt from the clustering at every switch (centroid scores, MoEfication): expert e
scores x . c_e. The MoE is unweighted, so the LM loss gives the router no gradient, and the balance
and z-losses are off (coefficients 0): trained by them alone it would drift towards uniform routing.
Its weights stay in the optimizer (zero gradients: AdamW's moments stay 0, and decoupled weight
decay only rescales all scores alike, which changes no top-k choice).

ReLU FFNs only: the dense <-> sparse equivalence needs units that are exactly zero when inactive
(`top_k = num_experts` is exact for any activation, but skipping experts is only cheap where their
output is mostly zero). Another activation is refused by name.

FLOPs are counted as executed (`FlopMeter`): forward hooks add the matmul FLOPs of the shapes each
module actually ran on (the MoE's dropless buffer with its padding slots, the router), times 3 for
forward + backward; a "useful" column leaves out the padding slots. Dense and sparse steps are
counted separately.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from ..errors import UserError
from ..train import make_optimizer
from ..model import GPT, Attention, DenseFFN
from ..moe import MoE, Experts
from ..moefy import (balanced_kmeans, clustering_score, dense_to_experts, experts_to_dense,
                     merge_moe, moefy_ffn)


@dataclass
class SSDConfig:
    num_experts: int = 8
    top_k: int = 2
    check_interval: int = 20  # steps between two checks of the monitor
    stable_ari: float = 0.8  # switch to sparse when consecutive clusterings agree this much
    drift_ari: float = 0.5  # back to dense early when the experts' units re-cluster below this
    min_dense_steps: int = 40  # the first dense phase lasts at least this long
    redense_steps: int = 20  # later dense phases last at least this long
    sparse_steps: int = 100  # longest sparse phase
    final_dense_steps: int = 40  # the last steps of the run are dense
    kmeans_iters: int = 20
    seed: int = 0


def check_ssd(model: GPT, cfg: SSDConfig) -> None:
    """A `UserError` naming what does not fit: SSD needs ReLU FFNs whose units split into
    `num_experts` equal experts, and 1 <= top_k <= num_experts."""
    mc = model.config
    if mc.activation != "relu":
        raise UserError(f"SSD needs ReLU FFNs (activation 'relu'); this model's activation is "
                        f"{mc.activation!r}: sparse steps skip experts whose units are zero, which "
                        "only ReLU makes exact")
    if not 1 <= cfg.num_experts <= mc.ffn_hidden or mc.ffn_hidden % cfg.num_experts:
        raise UserError(f"--num-experts {cfg.num_experts}: the FFN's {mc.ffn_hidden} units must "
                        "split into that many equal experts")
    if not 1 <= cfg.top_k <= cfg.num_experts:
        raise UserError(f"--top-k {cfg.top_k} with --num-experts {cfg.num_experts}: expected "
                        "1 <= top-k <= experts")
    if cfg.check_interval < 1:
        raise UserError(f"--check-interval must be at least 1, got {cfg.check_interval}")


# --- the schedule -------------------------------------------------------------------------------------

class SSD:
    """The SSD schedule as a `Trainer` callback (see the module docstring). Switches happen at the
    start of a step through `swap_modules`, carrying AdamW's moments along the unit
    permutation. Its state (phase, clustering, schedule position, counters) is in the trainer's
    checkpoint, so a run killed in either phase resumes exactly."""

    state_key = "ssd"

    def __init__(self, cfg: SSDConfig):
        self.cfg = cfg
        self.phase, self.phase_start, self.dense_phases = "dense", 0, 1
        self.labels: dict[int, torch.Tensor] = {}  # the latest clustering of every layer
        self.events: list[dict] = []  # checks and switches, for the log
        self.flops = {"dense": {}, "sparse": {}}
        self.seconds = {"dense": 0.0, "sparse": 0.0, "monitor": 0.0, "switch": 0.0}
        self.steps = {"dense": 0, "sparse": 0}
        self.meter = FlopMeter()
        self._attached_to = None
        self._sparsity: dict[int, torch.Tensor] = {}
        self._sparsity_handles = []
        self._t_step = None

    # --- state in the checkpoint ---
    def state_dict(self) -> dict:
        return {"config": asdict(self.cfg), "phase": self.phase, "phase_start": self.phase_start,
                "dense_phases": self.dense_phases,
                "labels": {str(i): v.clone() for i, v in self.labels.items()},
                "events": self.events, "flops": self.flops, "seconds": self.seconds,
                "steps": self.steps}

    def load_state_dict(self, state: dict, trainer=None) -> None:
        if state["config"] != asdict(self.cfg):
            raise UserError(f"the SSD settings differ from the run being resumed ({state['config']});"
                            " resume with the same settings")
        self.phase, self.phase_start = state["phase"], state["phase_start"]
        self.dense_phases = state["dense_phases"]
        self.labels = {int(i): v.clone() for i, v in state["labels"].items()}
        self.events, self.flops = list(state["events"]), {k: dict(v) for k, v in state["flops"].items()}
        self.seconds, self.steps = dict(state["seconds"]), dict(state["steps"])

    # --- callbacks ---
    def on_step_start(self, trainer) -> None:
        if self._attached_to is not trainer.model:
            check_ssd(trainer.model, self.cfg)
            self._attach(trainer.model)
        cfg, step = self.cfg, trainer.step
        in_phase = step - self.phase_start
        final = step >= trainer.cfg.max_steps - cfg.final_dense_steps
        check = in_phase > 0 and in_phase % cfg.check_interval == 0
        if self.phase == "sparse":
            if final or in_phase >= cfg.sparse_steps:
                self._switch(trainer, "dense", "final" if final else "schedule")
            elif check and self._drifted(trainer):
                self._switch(trainer, "dense", "drift")
        elif check and not final:
            ari = self._monitor(trainer)
            shortest = cfg.min_dense_steps if self.dense_phases == 1 else cfg.redense_steps
            if ari is not None and ari >= cfg.stable_ari and in_phase >= shortest:
                self._switch(trainer, "sparse", "stable")
        self._t_step = time.perf_counter()

    def on_step_end(self, trainer, record: dict) -> None:
        self.seconds[self.phase] += time.perf_counter() - self._t_step
        self.steps[self.phase] += 1
        totals = self.flops[self.phase]
        for kind, flops in self.meter.take_step().items():
            totals[kind] = totals.get(kind, 0) + flops
        record["ssd_sparse"] = float(self.phase == "sparse")

    # --- the pieces ---
    def _attach(self, model: GPT) -> None:
        self.meter.attach(model)
        for h in self._sparsity_handles:
            h.remove()
        self._sparsity_handles = []
        for i, block in enumerate(model.blocks):
            if isinstance(block.ffn, DenseFFN):
                def record(module, inputs, output, i=i):
                    if module.training:
                        self._sparsity[i] = (output.detach() == 0).float().mean()
                self._sparsity_handles.append(block.ffn.activation_point.register_forward_hook(record))
        self._attached_to = model

    def _monitor(self, trainer) -> float | None:
        """Re-cluster every layer (warm and fresh, the better kept); the mean ARI against the
        previous clustering (None at the first check); logs sparsity and ARI."""
        t0 = time.perf_counter()
        aris, chosen = [], []
        for i, block in enumerate(trainer.model.blocks):
            previous = self.labels.get(i)
            labels, info = cluster_units(ffn_input_weights(block.ffn), self.cfg.num_experts, previous,
                                         self.cfg.kmeans_iters, self.cfg.seed)
            if previous is not None:
                aris.append(adjusted_rand_index(previous, labels))
            chosen.append(info["chosen"])
            self.labels[i] = labels
        ari = sum(aris) / len(aris) if aris else None
        sparsity = ([float(v) for _, v in sorted(self._sparsity.items())] if self._sparsity else [])
        self.events.append({"step": trainer.step, "event": "check", "ari": ari, "kept": chosen,
                            "sparsity": sum(sparsity) / len(sparsity) if sparsity else None})
        self.seconds["monitor"] += time.perf_counter() - t0
        return ari

    def _drifted(self, trainer) -> bool:
        t0 = time.perf_counter()
        aris = []
        for i, block in enumerate(trainer.model.blocks):
            current = expert_labels(block.ffn)
            labels, _ = cluster_units(ffn_input_weights(block.ffn), self.cfg.num_experts, current,
                                      self.cfg.kmeans_iters, self.cfg.seed)
            aris.append(adjusted_rand_index(current, labels))
        ari = sum(aris) / len(aris)
        self.events.append({"step": trainer.step, "event": "drift check", "ari": ari})
        self.seconds["monitor"] += time.perf_counter() - t0
        return ari < self.cfg.drift_ari

    def _switch(self, trainer, to: str, reason: str) -> None:
        t0 = time.perf_counter()
        cfg, swaps = self.cfg, {}
        for i, block in enumerate(trainer.model.blocks):
            if to == "sparse":
                labels = self.labels[i]
                perm = torch.argsort(labels, stable=True).to(trainer.device)
                swaps[f"blocks.{i}.ffn"] = (
                    sparse_ffn(block.ffn, labels, cfg.num_experts, cfg.top_k),
                    lambda t, perm=perm: dense_to_experts(t, perm, cfg.num_experts))
            else:
                self.labels[i] = expert_labels(block.ffn)  # the next clustering starts from these
                swaps[f"blocks.{i}.ffn"] = (
                    merge_moe(block.ffn, "relu"),
                    lambda t, perm=block.ffn.unit_permutation: experts_to_dense(t, perm))
        swap_modules(trainer, swaps)
        self._attach(trainer.model)
        self._sparsity = {}
        self.phase, self.phase_start = to, trainer.step
        self.dense_phases += to == "dense"
        self.events.append({"step": trainer.step, "event": f"to {to}", "reason": reason})
        self.seconds["switch"] += time.perf_counter() - t0
        if trainer.dist.is_main and trainer.cfg.progress:
            print(f"step {trainer.step:>6} | ssd: {reason}, switching to {to}")

    # --- report ---
    def summary(self, trainer=None) -> dict:
        """Executed training FLOPs per phase (summed over processes when `trainer` runs
        distributed), useful FLOPs (padding left out), steps and seconds per phase."""
        kinds = sorted({k for phase in self.flops.values() for k in phase})
        table = torch.tensor([[float(self.flops[p].get(k, 0)) for k in kinds]
                              for p in ("dense", "sparse")], dtype=torch.float64)
        if trainer is not None and trainer.dist.enabled:
            table = table.to(trainer.device)
            torch_dist.all_reduce(table)
        out = {"steps": dict(self.steps), "seconds": dict(self.seconds), "flops": {}}
        for p, row in zip(("dense", "sparse"), table.tolist()):
            by_kind = dict(zip(kinds, row))
            executed = sum(v for k, v in by_kind.items() if k != "padding")
            out["flops"][p] = {"executed": executed, "useful": executed - by_kind.get("padding", 0),
                               **by_kind}
        out["flops"]["executed"] = out["flops"]["dense"]["executed"] + out["flops"]["sparse"]["executed"]
        out["flops"]["useful"] = out["flops"]["dense"]["useful"] + out["flops"]["sparse"]["useful"]
        out["switches"] = [e for e in self.events if e["event"].startswith("to ")]
        return out


# --- clustering and the monitor ----------------------------------------------------------------------

def adjusted_rand_index(a: torch.Tensor, b: torch.Tensor) -> float:
    """Adjusted Rand index of two labelings of the same points (Hubert & Arabie 1985): 1 for the
    same partition (whatever the label names), about 0 for independent ones."""
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    table = torch.bincount(a * kb + b, minlength=ka * kb).view(ka, kb).double()

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    n = table.sum()
    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / (n * (n - 1) / 2)
    top = (rows + cols) / 2
    return 1.0 if top == expected else float((index - expected) / (top - expected))


def ffn_input_weights(ffn: nn.Module) -> torch.Tensor:
    """W_in (F, d) in the dense unit order, of a `DenseFFN` or of an MoE made by `moefy_ffn`."""
    if isinstance(ffn, DenseFFN):
        return ffn.up.weight.detach()
    tensors = {"experts.w_up": ffn.experts.w_up.detach(), "experts.w_down": ffn.experts.w_down.detach()}
    return experts_to_dense(tensors, ffn.unit_permutation)["up.weight"]


def expert_labels(moe: MoE) -> torch.Tensor:
    """(F,) expert of each dense unit, from an MoE made by `moefy_ffn`."""
    per = moe.cfg.expert_hidden
    labels = torch.empty_like(moe.unit_permutation)
    labels[moe.unit_permutation] = torch.arange(len(labels), device=labels.device) // per
    return labels.cpu()


def cluster_units(w_in_FD: torch.Tensor, num_experts: int, previous: torch.Tensor | None,
                  iters: int = 20, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Balanced k-means of the units, warm-started from `previous` labels when given and fresh;
    the better of the two by the k-means objective. Returns (labels, {warm, fresh, chosen})."""
    w = w_in_FD.detach().float().cpu()
    fresh = balanced_kmeans(w, num_experts, iters=iters, seed=seed)
    info = {"fresh": clustering_score(w, fresh, num_experts), "warm": None, "chosen": "fresh"}
    if previous is None:
        return fresh, info
    warm = balanced_kmeans(w, num_experts, iters=iters, init_labels=previous.cpu())
    info["warm"] = clustering_score(w, warm, num_experts)
    if info["warm"] >= info["fresh"]:
        info["chosen"] = "warm"
        return warm, info
    return fresh, info


def router_recall(ffn: DenseFFN, moe: MoE, x_Td: torch.Tensor) -> float:
    """Share of each token's k truly most active experts (largest sum of the dense FFN's ReLU
    activations over the expert's units) that the router's top-k picks. Random routing: k / E."""
    E, k = moe.cfg.num_experts, moe.cfg.top_k
    with torch.no_grad():
        h_TF = torch.relu(ffn.up(x_Td))
        mass_TE = torch.zeros(len(x_Td), E, device=x_Td.device).index_add_(
            1, expert_labels(moe).to(x_Td.device), h_TF.float())
        true_TK = mass_TE.topk(k, dim=-1).indices
        picked_TK = moe.router.gate(x_Td).topk(k, dim=-1).indices
    hits = (true_TK[:, :, None] == picked_TK[:, None, :]).any(-1).float()
    return float(hits.mean())


# --- dense <-> sparse ------------------------------------------------------------------------------------

def sparse_ffn(ffn: DenseFFN, labels: torch.Tensor, num_experts: int, top_k: int) -> MoE:
    """The SSD MoE of a dense FFN: units grouped by `labels`, centroid router, unweighted,
    dropless, auxiliary losses off (the router is rebuilt from the clustering, not learned)."""
    return moefy_ffn(ffn, num_experts, top_k, labels=labels, aux_loss_coef=0.0, z_loss_coef=0.0)


def to_moe(model: GPT, top_k: int, num_experts: int | None = None,
           labels: dict | None = None) -> GPT:
    """Every dense FFN of `model` replaced, in place, by its MoE with `top_k` experts (clustered
    now unless `labels` {layer: (F,) labels} is given); the same weights, for sparse inference."""
    if num_experts is None and labels is None:
        raise UserError("to_moe: pass num_experts, or labels to take the experts from")
    for i, block in enumerate(model.blocks):
        if isinstance(block.ffn, DenseFFN):
            E = num_experts or len(torch.unique(labels[i]))
            layer_labels = labels[i] if labels else cluster_units(block.ffn.up.weight, E, None)[0]
            block.ffn = sparse_ffn(block.ffn, layer_labels, E, top_k)
    return model


def to_dense(model: GPT) -> GPT:
    """Every MoEfied FFN of `model` merged back, in place (exact)."""
    for block in model.blocks:
        if isinstance(block.ffn, MoE):
            block.ffn = merge_moe(block.ffn, "relu")
    return model


# --- swapping modules between steps ---------------------------------------------------------------------
# SSD replaces submodules between steps (dense FFNs by MoE layers and back). The optimizer is rebuilt
# for the new parameters and the wrapper (compile, DDP) around the model; AdamW's moments follow the
# weights through the same `carry` map that moved the weights, so that a swap and its inverse with
# no step between leave weights and moments bit-identical.

def swap_modules(trainer, swaps: dict) -> None:
    """Replace submodules of `trainer.model`: {path ("blocks.1.ffn"): (new module, carry)}.
    `carry` maps the old module's {parameter name: tensor} to the new module's (e.g.
    `minillm.moefy.dense_to_experts`); it is applied to every per-parameter optimizer tensor
    (exp_avg, exp_avg_sq), and the step count is copied. Parameters of the new module that `carry`
    does not produce start with fresh moments; parameters outside the swapped modules keep theirs.
    Every rank must swap alike at the same step (DDP is rebuilt, which broadcasts rank 0's
    weights)."""
    if trainer.cfg.fsdp:
        raise UserError("swapping modules between steps (SSD's dense <-> sparse switch) is not "
                        "supported under FSDP (--fsdp): the shards would have to be rebuilt; "
                        "run with DDP")
    if trainer.sharded:
        raise UserError("swapping modules between steps (SSD's dense <-> sparse switch) is not "
                        "supported with --expert-parallel: run without it")
    old_state = trainer.optimizer.state
    carried = {}
    for path, (module, carry) in swaps.items():
        parent_path, _, name = path.rpartition(".")
        parent = trainer.model.get_submodule(parent_path)
        old_params = dict(getattr(parent, name).named_parameters())
        states = {n: old_state[p] for n, p in old_params.items() if old_state.get(p)}
        module = module.to(trainer.device)
        new_params = dict(module.named_parameters())
        if states:
            step = next(iter(states.values())).get("step")
            keys = {k for s in states.values() for k, v in s.items()
                    if k != "step" and isinstance(v, torch.Tensor)}
            per_key = {k: carry({n: s[k] for n, s in states.items() if k in s}) for k in keys}
            for k, mapped in per_key.items():
                for n, tensor in mapped.items():
                    entry = carried.setdefault(new_params[n], {})
                    entry[k] = tensor.to(trainer.device)
                    if step is not None:
                        entry["step"] = step.clone()
        setattr(parent, name, module)
    kept = {p: old_state[p] for p in trainer.model.parameters() if p in old_state}
    trainer.optimizer = make_optimizer(trainer.model, trainer.cfg, trainer.device)
    for p in trainer.model.parameters():
        if p in kept:
            trainer.optimizer.state[p] = kept[p]
        elif p in carried:
            trainer.optimizer.state[p] = carried[p]
    trainer.wrap()


# --- executed FLOPs ------------------------------------------------------------------------------------

class FlopMeter:
    """Matmul FLOPs of the forward passes the model executes in training, counted by forward hooks
    from the shapes each module ran on (2 per multiply-add). Categories: attention (projections and
    the two score matmuls, full T x T as the CPU math kernel computes them), ffn (dense FFN), experts
    (every slot of the MoE buffer, padding included), padding (the padded slots' share of experts),
    router, head. Element-wise work (norms, activations, softmax) and embedding lookups are not
    counted. A training step executes 3x its forward FLOPs (backward: input and weight gradients)."""

    def __init__(self):
        self.handles = []
        self.step = {}
        self._kept = []  # (kept-entry count tensor, FLOPs per slot) of this step's MoE calls

    def attach(self, model: nn.Module) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                kind = ("router" if name.endswith("router.gate") else "ffn" if ".ffn." in name
                        else "head" if name == "lm_head" else "attention")
                self.handles.append(m.register_forward_hook(self._linear_hook(kind)))
            elif isinstance(m, Experts):
                self.handles.append(m.register_forward_hook(self._experts_hook))
            elif isinstance(m, MoE):
                self.handles.append(m.register_forward_hook(self._moe_hook))
            elif isinstance(m, Attention):
                self.handles.append(m.register_forward_hook(self._attention_hook))

    def _add(self, kind: str, flops: int) -> None:
        self.step[kind] = self.step.get(kind, 0) + flops

    @staticmethod
    def _counting(module) -> bool:
        return module.training and torch.is_grad_enabled()

    def _linear_hook(self, kind):
        def hook(module, inputs, output):
            if self._counting(module):
                tokens = inputs[0].numel() // module.in_features
                self._add(kind, 2 * tokens * module.in_features * module.out_features)
        return hook

    def _experts_hook(self, module, inputs, output):
        if self._counting(module):
            E, C, d = inputs[0].shape
            per_slot = 2 * d * module.w_up.shape[2] * (3 if module.w_gate is not None else 2)
            self._add("experts", E * C * per_slot)
            self._slots = (E * C, per_slot)

    def _moe_hook(self, module, inputs, output):
        if self._counting(module):
            slots, per_slot = self._slots
            self._kept.append((slots - module.stats["tokens_per_expert"].sum(), per_slot))

    def _attention_hook(self, module, inputs, output):
        if self._counting(module):
            B, T, _ = inputs[0].shape
            cache = inputs[3]
            keys = T + (cache.length if cache is not None else 0)
            cfg = module.cfg
            self._add("attention", 4 * B * cfg.n_head * T * keys * cfg.head_dim)

    def take_step(self) -> dict:
        """This step's training FLOPs by category (3x forward), and reset; reads the device once."""
        step = {k: 3 * v for k, v in self.step.items()}
        if self._kept:
            step["padding"] = 3 * sum(int(padded) * per_slot for padded, per_slot in self._kept)
        self.step, self._kept = {}, []
        return step


def dense_flop_meter(trainer):
    """Count a plain (dense) run's FLOPs the same way: a callback added to `trainer` whose `total`
    holds the executed training FLOPs of this process (`by_kind`: per category)."""
    meter = _MeterCallback()
    meter.meter.attach(trainer.model)
    trainer.callbacks.append(meter)
    return meter


class _MeterCallback:
    def __init__(self):
        self.meter, self.total, self.by_kind = FlopMeter(), 0, {}

    def on_step_end(self, trainer, record):
        for kind, flops in self.meter.take_step().items():
            self.by_kind[kind] = self.by_kind.get(kind, 0) + flops
        self.total = sum(v for k, v in self.by_kind.items() if k != "padding")


__all__ = ["SSDConfig", "SSD", "FlopMeter", "check_ssd", "adjusted_rand_index", "cluster_units",
           "router_recall", "sparse_ffn", "to_moe", "to_dense", "expert_labels", "dense_flop_meter"]
