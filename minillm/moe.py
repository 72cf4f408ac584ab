"""Mixture-of-Experts: routing plans, dispatch / combine, batched experts, auxiliary losses.

A token-choice top-k MoE layer (Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Switch, Fedus et
al. 2021) in four explicit steps, so that methods can change one step without flags on the layer:

1. `Router`: a linear gate gives scores (softmax or sigmoid); each token picks its top-k experts.
2. `make_plan`: every (token, choice) *entry* gets its expert's next free *slot* in a buffer of
   capacity C = max(ceil(cf * k * T / E), min_capacity) (cf = 0: dropless, C = the largest load).
   Entries past C are dropped (slot -1). Which entries win a full expert: `priority="position"`
   (first come; all first choices before any second choice) or `"score"` (batch-prioritised: higher
   router score first). The plan is plain tensors; Rectify-Router (minillm/methods/rectify_router.py)
   transforms plans.
3. `dispatch` copies token rows into the (E, C, d) buffer; the experts run as one batched matrix
   product over it; `combine` sums each token's expert outputs with the entries' weights.
4. Load-balancing loss E * sum_e f_e P_e (f_e: share of entries routed to e, P_e: mean router
   probability; Switch / GShard) and router z-loss mean(logsumexp(logits)^2), both in fp32, returned
   as auxiliary losses for the trainer to add.

In evaluation the layer routes dropless (`eval_dropless`), so a token's output never depends on the
other tokens of its batch, and cached generation equals uncached generation.

Expert parallelism is a property of the same layer (`MoE(..., ep_group=g)`): the experts are
sharded over the group's ranks and the dispatch buffer crosses ranks with an autograd all-to-all
(minillm/expert_parallel.py), while routing, plan transforms, losses and kernels run unchanged.

Dispatch and combine here are the PyTorch reference; the CUDA kernels (minillm/moe_kernels.py, when
present) implement the same semantics.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from . import expert_parallel, moe_kernels
from .activations import ACTIVATIONS
from .errors import UserError
from .expert_parallel import all_to_all, max_over


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256  # hidden units of each expert FFN
    activation: str = "gelu_tanh"  # gelu_tanh | gelu | relu | swiglu
    capacity_factor: float = 1.25  # 0: dropless
    min_capacity: int = 4
    score_fn: str = "softmax"  # softmax | sigmoid
    renormalize: bool = True  # scale the k weights of a token to sum to 1
    jitter: float = 0.0  # multiplicative input noise in training (Switch)
    priority: str = "score"  # score (batch-prioritised) | position
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    eval_dropless: bool = True
    bias: bool = False  # biases on each expert's up and down projections
    weighted: bool = True  # False: selected experts' outputs are summed unweighted (MoEfication)


DROPPED, OUTSIDE = -1, -2


@dataclass
class RoutingPlan:
    """Flat entries of a routing decision, all of length N (N = T * k before any transform).

    token: row of the token in the flattened (T, d) input; expert: its expert; slot: position in
    that expert's buffer, -1 when dropped, or -2 when the entry is computed outside the buffer
    (Intra-GPU Rectification); weight: combine weight. `probs_TE` are the router
    probabilities (for losses and transforms), `capacity` the buffer size per expert."""
    token: torch.Tensor
    expert: torch.Tensor
    slot: torch.Tensor
    weight: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    capacity: int
    num_experts: int
    top_k: int
    # What the router divided each token's probabilities by to get its weights (the sum of its
    # top-k probabilities when renormalising, else 1); None when weights are all 1 (unweighted).
    weight_norm_T: torch.Tensor | None = None
    # Where tokens and experts live under expert parallelism: the rank of each token (T,) and of
    # each expert (E,). None on one process (a transform may then assume a layout of its own).
    token_device_T: torch.Tensor | None = None
    expert_device_E: torch.Tensor | None = None

    @property
    def kept(self) -> torch.Tensor:
        """Entries that occupy a buffer slot."""
        return self.slot >= 0

    @property
    def computed(self) -> torch.Tensor:
        """Entries whose expert output reaches the token (in the buffer or outside it)."""
        return (self.slot >= 0) | (self.slot == OUTSIDE)


def capacity_for(num_tokens: int, cfg: MoEConfig, loads: torch.Tensor | None = None) -> int:
    """C = max(ceil(cf * k * T / E), min_capacity); dropless (cf = 0) takes the largest load. The
    dropless case syncs with the host once: the buffer's size must be known to allocate it."""
    if cfg.capacity_factor <= 0:
        return max(int(loads.max()) if loads is not None and loads.numel() else 0, 1)
    return max(math.ceil(cfg.capacity_factor * cfg.top_k * num_tokens / cfg.num_experts),
               cfg.min_capacity)


def assign_slots(expert_N: torch.Tensor, priority_N: torch.Tensor, num_experts: int,
                 capacity: int) -> torch.Tensor:
    """Slot of every entry within its expert, in order of increasing `priority_N` (ties: entry
    order); -1 beyond `capacity`. On a GPU with CuPy the routing-metadata kernel does the
    counting (minillm/moe_kernels.py), with the same result."""
    order = torch.argsort(priority_N, stable=True)
    if expert_N.is_cuda and moe_kernels.enabled():
        return moe_kernels.slots(order, expert_N, torch.zeros_like(expert_N), num_experts,
                                 capacity)[0]
    by_expert = torch.argsort(expert_N[order], stable=True)
    sorted_idx = order[by_expert]  # entries grouped by expert, in priority order within a group
    counts_E = torch.bincount(expert_N, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank = torch.arange(len(expert_N), device=expert_N.device) - starts_E[expert_N[sorted_idx]]
    slot = torch.empty_like(expert_N)
    slot[sorted_idx] = rank
    return torch.where(slot < capacity, slot, torch.full_like(slot, -1))


class Router(nn.Module):
    def __init__(self, d: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(d, cfg.num_experts, bias=False)

    def forward(self, x_Td: torch.Tensor, dropless: bool = False) -> RoutingPlan:
        cfg = self.cfg
        if self.training and cfg.jitter > 0:
            x_Td = x_Td * torch.empty_like(x_Td).uniform_(1 - cfg.jitter, 1 + cfg.jitter)
        logits_TE = self.gate(x_Td).float()
        probs_TE = logits_TE.softmax(-1) if cfg.score_fn == "softmax" else logits_TE.sigmoid()
        return plan_from_probs(probs_TE, logits_TE, cfg, dropless)


def plan_from_probs(probs_TE: torch.Tensor, logits_TE: torch.Tensor, cfg: MoEConfig,
                    dropless: bool = False) -> RoutingPlan:
    """Top-k choices, weights and slots from router probabilities."""
    T, E = probs_TE.shape
    k = cfg.top_k
    weight_TK, expert_TK = probs_TE.topk(k, dim=-1)
    norm_T = None
    if not cfg.weighted:
        weight_TK = torch.ones_like(weight_TK)
    else:
        norm_T = (weight_TK.sum(-1).clamp_min(1e-9) if cfg.renormalize
                  else torch.ones(T, device=probs_TE.device))
        weight_TK = weight_TK / norm_T[:, None]
    # entries choice-major: all first choices, then all second choices, ...
    expert_N = expert_TK.t().reshape(-1)
    token_N = torch.arange(T, device=probs_TE.device).repeat(k)
    weight_N = weight_TK.t().reshape(-1)
    choice_N = torch.arange(k, device=probs_TE.device).repeat_interleave(T)
    if cfg.priority == "score":  # within a choice level, higher score first
        score_N = probs_TE.gather(1, expert_TK).t().reshape(-1)
        rank_in_level = torch.argsort(torch.argsort(-score_N.view(k, T), dim=1, stable=True), dim=1)
        priority_N = choice_N * T + rank_in_level.reshape(-1)
    elif cfg.priority == "position":
        priority_N = torch.arange(k * T, device=probs_TE.device)
    else:
        raise ValueError(f"priority must be score or position, got {cfg.priority!r}")
    loads_E = torch.bincount(expert_N, minlength=E)
    capacity = capacity_for(T, cfg, loads_E) if not dropless else max(int(loads_E.max()), 1)
    slot_N = assign_slots(expert_N, priority_N, E, capacity)
    return RoutingPlan(token_N, expert_N, slot_N, weight_N, probs_TE, logits_TE, capacity, E, k,
                       norm_T)


# --- dispatch and combine (PyTorch reference) -------------------------------------------------------

def dispatch(x_Td: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Copy each kept entry's token row into its (expert, slot) of a zero (E, C, d) buffer.
    (Assigning rows to slots: gradients flow back to the tokens through the indexing.)"""
    kept = plan.kept
    buf_ECd = x_Td.new_zeros(plan.num_experts, plan.capacity, x_Td.shape[-1])
    buf_ECd[plan.expert[kept], plan.slot[kept]] = x_Td[plan.token[kept]]
    return buf_ECd


def combine(out_ECd: torch.Tensor, plan: RoutingPlan, num_tokens: int) -> torch.Tensor:
    """y_t = sum over kept entries of t of weight * out[expert, slot]; dropped entries add nothing.
    `index_add_` on the CPU sums in entry order: deterministic."""
    kept = plan.kept
    rows_Nd = out_ECd[plan.expert[kept], plan.slot[kept]] * plan.weight[kept, None].to(out_ECd.dtype)
    y_Td = out_ECd.new_zeros(num_tokens, out_ECd.shape[-1])
    return y_Td.index_add(0, plan.token[kept], rows_Nd)


# --- experts, losses, the layer -------------------------------------------------------------------------

class Experts(nn.Module):
    """E FFNs applied to an (E, C, d) buffer with batched matrix products (no loop over experts)."""

    def __init__(self, d: int, cfg: MoEConfig):
        super().__init__()
        E, F_ = cfg.num_experts, cfg.expert_hidden
        self.activation = cfg.activation
        self.w_up = nn.Parameter(torch.empty(E, d, F_))
        self.w_gate = nn.Parameter(torch.empty(E, d, F_)) if cfg.activation == "swiglu" else None
        self.w_down = nn.Parameter(torch.empty(E, F_, d))
        self.b_up = nn.Parameter(torch.zeros(E, 1, F_)) if cfg.bias else None
        self.b_gate = (nn.Parameter(torch.zeros(E, 1, F_)) if cfg.bias and self.w_gate is not None
                       else None)
        self.b_down = nn.Parameter(torch.zeros(E, 1, d)) if cfg.bias else None
        for w in (self.w_up, self.w_gate, self.w_down):
            if w is not None:
                nn.init.normal_(w, std=0.02)
        # hook here to observe / replace the (E, C, F) activations that feed the down projection
        # (as DenseFFN.activation_point; minillm/methods/modularity.py reads experts through it)
        self.activation_point = nn.Identity()

    def keep(self, experts: slice) -> None:
        """Keep only the given experts (e.g. one rank's share under expert parallelism)."""
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(p.detach()[experts].clone(),
                                             requires_grad=p.requires_grad))

    def forward(self, x_ECd: torch.Tensor) -> torch.Tensor:
        h_ECF = torch.bmm(x_ECd, self.w_up)
        if self.b_up is not None:
            h_ECF = h_ECF + self.b_up
        act = ACTIVATIONS[self.activation]
        if self.w_gate is not None:
            g_ECF = torch.bmm(x_ECd, self.w_gate)
            h_ECF = act(g_ECF if self.b_gate is None else g_ECF + self.b_gate) * h_ECF
        else:
            h_ECF = act(h_ECF)
        out_ECd = torch.bmm(self.activation_point(h_ECF), self.w_down)
        return out_ECd + self.b_down if self.b_down is not None else out_ECd


def load_balancing_loss(plan: RoutingPlan) -> torch.Tensor:
    """E * sum_e f_e * P_e in fp32 (Switch Transformer); 1.0 when perfectly balanced. Counts the
    router's own T * k entries only, not entries a plan transform added."""
    routed = plan.expert[:plan.probs_TE.shape[0] * plan.top_k]
    f_E = torch.bincount(routed, minlength=plan.num_experts).float() / len(routed)
    P_E = plan.probs_TE.float().mean(0)
    return plan.num_experts * (f_E * P_E).sum()


def z_loss(plan: RoutingPlan) -> torch.Tensor:
    """mean(logsumexp(router logits)^2) (ST-MoE): keeps router logits small and stable."""
    return torch.logsumexp(plan.logits_TE.float(), dim=-1).square().mean()


def auxiliary_losses(plan: RoutingPlan, cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """The weighted balance and z-losses, named for the trainer's log."""
    return {"moe_balance": cfg.aux_loss_coef * load_balancing_loss(plan),
            "moe_z": cfg.z_loss_coef * z_loss(plan)}


def routing_stats(plan: RoutingPlan, num_tokens: int) -> dict[str, torch.Tensor]:
    """Tokens per expert (in the buffer); dropped entries (of the first T * k); dropped tokens (no
    expert output reaches them at all); padding share of the buffer's slots."""
    kept = plan.kept
    per_expert = torch.bincount(plan.expert[kept], minlength=plan.num_experts)
    first = plan.slot[:num_tokens * plan.top_k]
    reached = torch.zeros(num_tokens, dtype=torch.bool, device=plan.slot.device)
    reached[plan.token[plan.computed]] = True
    return {"tokens_per_expert": per_expert,
            "dropped_fraction": (first == DROPPED).float().mean(),
            "dropped_tokens_fraction": 1 - reached.float().mean(),
            "padding_fraction": 1 - per_expert.sum().float() / (plan.num_experts * plan.capacity)}


def _dispatch_combine(x_Td: torch.Tensor, plan: RoutingPlan):
    """The CUDA kernels (minillm/moe_kernels.py) when enabled and available, else the reference
    (`available()` logs once why the kernels are missing). The kernels take fp32 and bf16; a
    tensor of another dtype (e.g. fp16 under autocast) takes the reference path, per call."""
    T = x_Td.shape[0]

    def reference_dispatch(x):
        return dispatch(x, plan)

    def reference_combine(out):
        return combine(out, plan, T)
    if not (x_Td.is_cuda and moe_kernels.enabled()):
        return reference_dispatch, reference_combine
    kernel_dispatch, kernel_combine = moe_kernels.dispatch_combine_fns(plan, T)

    def dispatch_fn(x):
        return (kernel_dispatch if x.dtype in moe_kernels.SUPPORTED else reference_dispatch)(x)

    def combine_fn(out):
        return (kernel_combine if out.dtype in moe_kernels.SUPPORTED else reference_combine)(out)
    return dispatch_fn, combine_fn


def outside_output(x_Td: torch.Tensor, plan: RoutingPlan, experts: "Experts",
                   first_expert: int = 0) -> torch.Tensor:
    """Weighted outputs of the entries computed outside the buffer (slot -2), summed per token:
    a second, dropless dispatch of just those entries through the same experts, without any
    exchange between ranks. `experts` holds the experts from `first_expert` on (under expert
    parallelism, this rank's share): an outside entry must name one of them."""
    y_Td = torch.zeros_like(x_Td)
    outside = plan.slot == OUTSIDE
    if not bool(outside.any()):
        return y_Td
    expert_M, token_M = plan.expert[outside] - first_expert, plan.token[outside]
    E = experts.w_up.shape[0]
    if E != plan.num_experts and bool(((expert_M < 0) | (expert_M >= E)).any()):
        raise ValueError("an entry computed outside the buffer names an expert of another rank; "
                         "such entries are computed where their token is")
    loads = torch.bincount(expert_M, minlength=E)
    capacity = max(int(loads.max()), 1)  # host sync: the second buffer's size
    slot_M = assign_slots(expert_M, torch.arange(len(expert_M), device=x_Td.device), E, capacity)
    buf_ECd = x_Td.new_zeros(E, capacity, x_Td.shape[-1])
    buf_ECd[expert_M, slot_M] = x_Td[token_M]
    out_ECd = experts(buf_ECd)
    rows = out_ECd[expert_M, slot_M] * plan.weight[outside, None].to(out_ECd.dtype)
    return y_Td.index_add(0, token_M, rows.to(y_Td.dtype))  # experts may run in bf16 (autocast)


class MoE(nn.Module):
    """Drop-in replacement for a block's dense FFN: (B, T, d) -> ((B, T, d), aux losses).

    `plan_transforms` (callables plan -> plan, e.g. Rectify-Router's steps) run in order between
    routing and dispatch, in training (evaluation routes dropless, where they have nothing to do).
    Entries they mark as computed outside the buffer (slot -2) are run through the experts in a
    second, dropless pass. `output_bias` (d,), when set, is added once to every token (a dense FFN's
    down-projection bias after MoEfication). The last routing statistics are in `self.stats`.

    Expert parallelism (`ep_group`, or `shard_experts` on a built layer): rank r of the group's P
    keeps experts [r * E/P, (r + 1) * E/P) (`first_expert` on). Each rank routes, transforms and
    dispatches its own tokens exactly as on one process (capacity over its own tokens; the plan
    says where tokens and experts live), the group agrees on the buffer size C, and the (E, C, d)
    buffer crosses ranks with one all-to-all each way (equal splits: no sizes to exchange). So a
    rank computes what one process computes for that rank's tokens alone. Entries computed outside
    the buffer stay on their token's rank and must name one of its experts (Intra-GPU
    Rectification chooses them there). Agreeing on C costs an all-reduce (and a host sync) per
    layer per forward; `equal_tokens_across_ranks = True` (the trainer sets it: every rank's
    micro-batch has one shape) skips it in training with a fixed capacity, where C depends on
    the token count alone. `minillm.distributed.cleanup` releases the group (`release_group`)."""

    def __init__(self, d: int, cfg: MoEConfig, plan_transforms=(), ep_group=None):
        super().__init__()
        self.cfg = cfg
        self.router = Router(d, cfg)
        self.experts = Experts(d, cfg)
        self.plan_transforms = list(plan_transforms)
        self.output_bias: nn.Parameter | None = None
        self.stats: dict = {}
        self.ep_group, self.ep_rank, self.ep_size = None, 0, 1
        self.equal_tokens_across_ranks = False
        if ep_group is not None:
            self.shard_experts(ep_group)

    @property
    def first_expert(self) -> int:
        """Global index of this rank's first expert (0 on one process)."""
        return self.ep_rank * self.cfg.num_experts // self.ep_size

    def shard_experts(self, group) -> None:
        """Make the layer expert-parallel over `group`: keep this rank's E/P experts (the others
        are dropped; every rank must hold the same full layer before, e.g. built from one seed)."""
        if self.ep_group is not None:
            raise ValueError("the experts are already sharded")
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if self.cfg.num_experts % size:
            raise ValueError(f"{self.cfg.num_experts} experts do not split over {size} ranks")
        per = self.cfg.num_experts // size
        self.experts.keep(slice(rank * per, (rank + 1) * per))
        self.ep_group, self.ep_rank, self.ep_size = group, rank, size
        expert_parallel.hold(self, "ep_group")  # released by minillm.distributed.cleanup

    def release_group(self) -> None:
        """Drop the reference to the process group (after training): the sharded layer no longer
        runs, and Python never finalises the group after torch.distributed is torn down."""
        self.ep_group = None

    def sharded_parameters(self) -> dict[str, nn.Parameter]:
        """{name: parameter} of the parameters that differ between the ranks of `ep_group` (this
        rank's experts); the rest of the layer is replicated."""
        return {f"experts.{n}": p for n, p in self.experts.named_parameters()}

    def _placed(self, plan: RoutingPlan) -> RoutingPlan:
        """The plan with the real placement: every token on this rank, experts by owner."""
        device = plan.probs_TE.device
        per = self.cfg.num_experts // self.ep_size
        return dataclasses.replace(
            plan, token_device_T=torch.full((plan.probs_TE.shape[0],), self.ep_rank, device=device),
            expert_device_E=torch.arange(self.cfg.num_experts, device=device) // per)

    def _run_experts(self, buf_ECd: torch.Tensor) -> torch.Tensor:
        """The experts' outputs for a dispatch buffer: here, or on their owners' ranks."""
        if self.ep_group is None:
            return self.experts(buf_ECd)
        E, C, d = buf_ECd.shape
        P, L = self.ep_size, E // self.ep_size
        recv_PLCd = all_to_all(buf_ECd.view(P, L, C, d), self.ep_group)  # [s]: rank s's rows
        out_LPCd = self.experts(recv_PLCd.transpose(0, 1).reshape(L, P * C, d)).view(L, P, C, d)
        return all_to_all(out_LPCd.transpose(0, 1), self.ep_group).view(E, C, d)

    def forward(self, x_BTd: torch.Tensor):
        B, T, d = x_BTd.shape
        x_Td = x_BTd.reshape(B * T, d)
        dropless = self.cfg.capacity_factor <= 0 or (not self.training and self.cfg.eval_dropless)
        plan = self.router(x_Td, dropless=dropless)
        if self.ep_group is not None:
            plan = self._placed(plan)
        if not dropless:
            for transform in self.plan_transforms:
                plan = transform(plan)
        if self.ep_size > 1 and self.ep_group is None:
            raise RuntimeError("this MoE layer's experts are sharded, but its process group was "
                               "released (distributed.cleanup): it cannot run any more")
        same_capacity = self.training and not dropless and self.equal_tokens_across_ranks
        if self.ep_group is not None and not same_capacity:  # one buffer size for the group
            plan = dataclasses.replace(plan, capacity=max_over(plan.capacity, self.ep_group,
                                                               x_Td.device))
        dispatch_fn, combine_fn = _dispatch_combine(x_Td, plan)
        out_ECd = self._run_experts(dispatch_fn(x_Td))
        y_Td = combine_fn(out_ECd)
        if self.plan_transforms and not dropless:  # only a transform marks entries outside the
            y_Td = y_Td + outside_output(x_Td, plan, self.experts,  # buffer (a host sync to check)
                                         self.first_expert)
        if self.output_bias is not None:
            y_Td = y_Td + self.output_bias
        self.stats = {k: v.detach() for k, v in routing_stats(plan, B * T).items()}
        return y_Td.view(B, T, d), auxiliary_losses(plan, self.cfg) if self.training else {}


def replace_ffns_with_moe(model: nn.Module, cfg: MoEConfig, layers=None, **moe_kwargs) -> nn.Module:
    """Replace the FFN of the given layers (default: every other layer, starting at 1) with a freshly
    initialised `MoE` (random experts; to split a trained dense FFN instead, see minillm/moefy.py).
    Expert down projections are scaled by 1/sqrt(2 n_layer) like the dense FFN's (GPT-2's residual
    projections, minillm.model.GPT._init_weights), so that dense and MoE models start alike."""
    d, n_layer = model.config.n_embd, model.config.n_layer
    layers = list(range(1, n_layer, 2) if layers is None else layers)
    if not layers or not all(0 <= i < n_layer for i in layers):
        raise UserError(f"MoE layers {layers} (--moe-layers): the model has layers 0 to {n_layer - 1}")
    for i in layers:
        device = next(model.blocks[i].parameters()).device
        moe = MoE(d, cfg, **moe_kwargs).to(device)
        with torch.no_grad():
            moe.experts.w_down.mul_(1 / math.sqrt(2 * model.config.n_layer))
        model.blocks[i].ffn = moe
    return model


# --- self-describing MoE layers (checkpoints rebuild the module tree from data) ----------------------

def moe_spec(moe: MoE) -> dict:
    """Plain data that `moe_from_spec` turns back into the same module tree: the config, which
    optional tensors exist, and each plan transform as {"type": "minillm.module.Class", **kwargs}
    (a transform must offer `spec()`; checkpoints never hold pickled code)."""
    transforms = []
    for t in moe.plan_transforms:
        if not hasattr(t, "spec"):
            raise TypeError(f"plan transform {type(t).__name__} has no spec(): an MoE checkpoint "
                            "rebuilds its transforms from data, so give it one")
        transforms.append({"type": f"{type(t).__module__}.{type(t).__qualname__}", **t.spec()})
    return {"config": asdict(moe.cfg), "plan_transforms": transforms,
            "expert_down_bias": moe.experts.b_down is not None,
            "output_bias": moe.output_bias is not None,
            "unit_permutation": hasattr(moe, "unit_permutation")}


# Class paths that checkpoints written before a module moved still name: old path -> new path.
# (The paper methods moved from minillm/ to minillm/methods/.)
MOVED_CLASSES = {
    "minillm.rectify_router.IntraGPURectification":
        "minillm.methods.rectify_router.IntraGPURectification",
    "minillm.rectify_router.FillInRectification":
        "minillm.methods.rectify_router.FillInRectification",
}


def moe_from_spec(d: int, spec: dict) -> MoE:
    """The MoE layer described by `moe_spec` (weights uninitialised until a state dict loads)."""
    transforms = []
    for t in spec.get("plan_transforms", []):
        kind = MOVED_CLASSES.get(t["type"], t["type"])
        module, _, name = kind.rpartition(".")
        if not module.startswith("minillm."):
            raise ValueError(f"plan transform {kind!r}: only minillm's own transforms are rebuilt")
        transforms.append(getattr(importlib.import_module(module), name)(
            **{k: v for k, v in t.items() if k != "type"}))
    moe = MoE(d, MoEConfig(**spec["config"]), plan_transforms=transforms)
    if not spec.get("expert_down_bias", moe.experts.b_down is not None):
        moe.experts.b_down = None
    if spec.get("output_bias"):
        moe.output_bias = nn.Parameter(torch.zeros(d))
    if spec.get("unit_permutation"):
        moe.register_buffer("unit_permutation",
                            torch.arange(moe.cfg.num_experts * moe.cfg.expert_hidden))
    return moe


def active_matmul_params(moe: MoE) -> int:
    """Weights one token multiplies in this layer: the router and top_k experts."""
    per_expert = sum(p[0].numel() for p in (moe.experts.w_up, moe.experts.w_gate, moe.experts.w_down)
                     if p is not None)
    return moe.router.gate.weight.numel() + moe.cfg.top_k * per_expert
