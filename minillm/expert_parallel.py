"""Expert parallelism: the collectives behind an MoE layer whose experts are sharded over ranks.

The layer is `minillm.moe.MoE` itself: given a process group (`MoE(d, cfg, ep_group=g)` or
`moe.shard_experts(g)`), rank r of P keeps experts [r * E/P, (r + 1) * E/P), routes its own tokens
with the replicated router (capacity over its own tokens), runs the same plan transforms, and sends
its (E, C, d) dispatch buffer to the experts' owners with `all_to_all` below. This file holds what
the layer and the trainer need from torch.distributed, and imports nothing from minillm but its
error type:

- `all_to_all`: an autograd all-to-all with equal splits (its backward is the same exchange);
- `make_groups`: expert-parallel groups of N consecutive ranks, and the data-parallel groups that
  hold the same experts (ranks r, r + N, r + 2N, ...);
- `reduce_expert_gradients` and `global_grad_norm`: expert gradients are not averaged by DDP (each
  rank holds different experts); they are summed over the ranks holding the same experts and
  scaled so that every gradient is that of the loss averaged over all ranks, and the clipping norm
  counts every shard once;
- `gather_experts` / `shard_experts` (and `*_optimizer_experts` for AdamW's moments): checkpoints
  hold experts under their global index (a single-process model's state), whatever the layout
  that saved or loads them.

Sharded parameters are found by duck typing: a module with an `ep_group` (not None) offers them
through `sharded_parameters()` ({name: parameter}).
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import UserError


class _AllToAll(torch.autograd.Function):
    """Chunk i of dim 0 goes to rank i of `group`; chunk j of the result came from rank j.
    The backward sends each chunk's gradient back the same way (equal splits: the same call)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = torch.empty_like(grad_out, memory_format=torch.contiguous_format)
        dist.all_to_all_single(grad_in, grad_out.contiguous(), group=ctx.group)
        return grad_in, None


def all_to_all(x_P: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of `x_P` (first dim = the group's size) with autograd."""
    return _AllToAll.apply(x_P, group)


def max_over(value: int, group, device: torch.device) -> int:
    """The largest `value` of the group's ranks (one all-reduce; waits for the device)."""
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t)


# --- groups -----------------------------------------------------------------------------------------

# Objects holding a process group made here, as (object, attribute) pairs, weakly: `release_groups`
# (called by minillm.distributed.cleanup) drops those references before the groups are destroyed,
# so that Python never finalises a gloo group at interpreter exit, after torch.distributed is gone
# (which can abort the process after a finished run).
_HOLDERS: list[tuple[weakref.ref, str]] = []


def hold(obj, attribute: str) -> None:
    """Remember that `obj.<attribute>` holds a process group (released by `release_groups`)."""
    _HOLDERS[:] = [(ref, a) for ref, a in _HOLDERS if ref() is not None]  # forget the collected
    _HOLDERS.append((weakref.ref(obj), attribute))


def release_groups() -> None:
    """Drop every held reference to a process group (`release_group()` where the object has one)."""
    for ref, attribute in _HOLDERS:
        obj = ref()
        if obj is not None:
            if hasattr(obj, "release_group"):
                obj.release_group()
            else:
                setattr(obj, attribute, None)
    _HOLDERS.clear()


def make_groups(ep_size: int):
    """(expert-parallel group, expert data-parallel group) of this rank. World = ep_size * D:
    ranks [g * ep_size, (g + 1) * ep_size) shard the experts between them; ranks r, r + ep_size, ...
    hold the same experts (None when D = 1). Collective: every rank creates every group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"{world} ranks do not split into expert-parallel groups of {ep_size}")
    ep_group = dp_group = None
    for start in range(0, world, ep_size):
        group = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            ep_group = group
    if world > ep_size:
        for first in range(ep_size):
            ranks = list(range(first, world, ep_size))
            group = dist.new_group(ranks)
            if rank in ranks:
                dp_group = group
    return ep_group, dp_group


def shard_model(model: nn.Module, ep_size: int, world_size: int):
    """(sharded parameters {name: parameter}, expert-parallel group, expert data-parallel group)
    after sharding every MoE layer of `model` over groups of `ep_size` consecutive ranks (ranks
    r, r + ep_size, ... hold the same experts and average their gradients); ({}, None, None) when
    `ep_size` is 1. MoE layers are found by duck typing (`shard_experts`), so this module needs
    no import of minillm.moe."""
    if ep_size == 1:
        return {}, None, None
    if world_size % ep_size or world_size < ep_size:
        raise UserError(f"--expert-parallel {ep_size}: the {world_size} process(es) do not split "
                        f"into groups of {ep_size} (launch with torchrun --nproc_per_node)")
    layers = [m for m in model.modules() if hasattr(m, "shard_experts")]
    if not layers:
        raise UserError(f"--expert-parallel {ep_size}: the model has no MoE layer (pass --moe-experts)")
    for moe in layers:
        if moe.cfg.num_experts % ep_size:
            raise UserError(f"--expert-parallel {ep_size}: an MoE layer has {moe.cfg.num_experts} "
                            "experts, which do not split over the group")
    ep_group, dp_group = make_groups(ep_size)
    for moe in layers:
        moe.shard_experts(ep_group)
        moe.equal_tokens_across_ranks = True  # the trainer's micro-batches have one shape
    return sharded_parameters(model), ep_group, dp_group


# --- gradients --------------------------------------------------------------------------------------

def sharded_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{full name in `model`: parameter} of every expert-parallel layer's sharded experts."""
    found = {}
    for name, module in model.named_modules():
        if getattr(module, "ep_group", None) is not None:
            for pname, p in module.sharded_parameters().items():
                found[f"{name}.{pname}" if name else pname] = p
    return found


def reduce_expert_gradients(params, world_size: int, dp_group) -> None:
    """Make each sharded expert gradient that of the loss averaged over all `world_size` ranks.

    After backward, a shard's gradient already sums the contributions of every rank of its
    expert-parallel group (their tokens reached it through the all-to-all), each from a loss that
    is that rank's own mean. Summing over `dp_group` (the ranks with the same experts; None: no
    other) adds the other groups' tokens; dividing by the world size gives the average, which is
    what DDP computes for a replicated parameter (Megatron-LM scales expert gradients alike)."""
    grads = [p.grad for p in params if p.grad is not None]
    if dp_group is not None:
        for g in grads:
            dist.all_reduce(g, group=dp_group)
    for g in grads:
        g.div_(world_size)


def global_grad_norm(replicated, sharded, ep_group, device: torch.device) -> torch.Tensor:
    """L2 norm of the whole model's gradient: replicated gradients (the same on every rank) once,
    plus every expert shard of the expert-parallel group once (an all-reduce of squared norms)."""
    def squared(params):
        return sum((torch.linalg.vector_norm(p.grad.float()).square() for p in params
                    if p.grad is not None), torch.zeros((), device=device))
    sharded_sq = squared(sharded)
    dist.all_reduce(sharded_sq, group=ep_group)
    return (squared(replicated) + sharded_sq).sqrt()


# --- checkpoints under global expert indices ---------------------------------------------------------

def gather_experts(tensors: dict, names: set[str], group) -> dict:
    """`tensors` with every entry named in `names` (a rank's shard of E/P experts along dim 0)
    replaced by all shards of `group` concatenated in rank order, i.e. all E experts under their
    global index, on the CPU. Collective: every rank of the group calls it with the same names."""
    size = dist.get_world_size(group)
    out = dict(tensors)
    for name in sorted(names & tensors.keys()):  # the same order on every rank
        t = tensors[name].contiguous()
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t, group=group)
        out[name] = torch.cat(parts).cpu()
    return out


def gather_optimizer_experts(state: dict, names: set[str], group) -> dict:
    """An optimizer's per-parameter state ({name: {"exp_avg": ..., "step": ...}}) with the
    moments of the parameters in `names` gathered as `gather_experts` does (0-dim entries such as
    the step count are the same on every rank and stay). Collective."""
    out = dict(state)
    for name in sorted(names & state.keys()):
        moments = {k for k, v in state[name].items() if torch.is_tensor(v) and v.dim() > 0}
        out[name] = gather_experts(state[name], moments, group)
    return out


def shard_optimizer_experts(state: dict, names: set[str], rank: int, size: int) -> dict:
    """The inverse of `gather_optimizer_experts` for one rank."""
    return {name: (shard_experts(s, {k for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0},
                                 rank, size) if name in names else s)
            for name, s in state.items()}


def shard_experts(tensors: dict, names: set[str], rank: int, size: int) -> dict:
    """The inverse of `gather_experts` for one rank: entries in `names` (all E experts along dim 0)
    cut to experts [rank * E/size, (rank + 1) * E/size)."""
    out = dict(tensors)
    for name in names & tensors.keys():
        per = tensors[name].shape[0] // size
        out[name] = tensors[name][rank * per:(rank + 1) * per]
    return out
