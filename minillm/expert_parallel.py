"""Expert parallelism: the experts of an MoE layer sharded over the ranks of a process group.

Rank r of P holds experts [r * E/P, (r + 1) * E/P) and routes its own tokens with a replicated
router (capacity computed over its own tokens, as in minillm.moe). A forward pass:

1. route locally; sort the kept (token, choice) entries by global expert, which groups them by the
   rank that owns the expert;
2. exchange the per-expert counts (`all_to_all_single` on E integers), then the token rows with
   `all_to_all_single` and those split sizes (the sizes must be on the host: one synchronisation);
3. regroup the received rows expert-major into an (E/P, M, d) buffer, run the local experts as one
   batched matrix product, and send the results back the same way;
4. combine each token's returned rows with its weights.

The exchange is an autograd Function (its backward is the reverse exchange), so gradients reach the
tokens, the router and the experts. Every rank takes part in every collective, with zero rows if it
has none to send. Expert parameters belong to one rank each and must not be averaged with other
ranks' experts: `expert_parameters()` and `replicated_parameters()` let the trainer reduce the
router (and the rest of the model) over the data-parallel group only; `allreduce_gradients` does
it with Megatron's scaling (expert gradients / data-parallel size). `full_state_dict()` gathers
the experts under their global index, so a checkpoint saved with P ranks loads into a single-process
`minillm.moe.MoE` and back (`load_full_state_dict`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn

from .moe import Experts, MoEConfig, Router, auxiliary_losses, routing_stats


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with split sizes; backward exchanges gradients the other way."""

    @staticmethod
    def forward(ctx, x_Md, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x_Md.new_empty(sum(recv_splits), x_Md.shape[-1])
        dist.all_to_all_single(out, x_Md.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty(sum(ctx.send_splits), grad_out.shape[-1])
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.send_splits, ctx.recv_splits,
                               group=ctx.group)
        return grad_in, None, None, None


class ExpertParallelMoE(nn.Module):
    def __init__(self, d: int, cfg: MoEConfig, group=None):
        super().__init__()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if cfg.num_experts % self.world:
            raise ValueError(f"{cfg.num_experts} experts do not split over {self.world} ranks")
        self.cfg = cfg
        self.local_experts = cfg.num_experts // self.world
        self.first_expert = self.rank * self.local_experts
        self.router = Router(d, cfg)
        self.experts = Experts(d, dataclasses.replace(cfg, num_experts=self.local_experts))
        self.stats: dict = {}

    def expert_parameters(self):
        return list(self.experts.parameters())

    def replicated_parameters(self):
        return list(self.router.parameters())

    def forward(self, x_BTd: torch.Tensor):
        B, T, d = x_BTd.shape
        x_Td = x_BTd.reshape(B * T, d)
        dropless = self.cfg.capacity_factor <= 0 or (not self.training and self.cfg.eval_dropless)
        plan = self.router(x_Td, dropless=dropless)
        kept = plan.kept
        expert_M, token_M, weight_M = plan.expert[kept], plan.token[kept], plan.weight[kept]
        order = torch.argsort(expert_M, stable=True)  # grouped by owning rank, then by expert
        expert_M, token_M, weight_M = expert_M[order], token_M[order], weight_M[order]
        E, L = self.cfg.num_experts, self.local_experts
        send_counts_E = torch.bincount(expert_M, minlength=E)
        recv_counts_PL = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts_PL, send_counts_E, group=self.group)  # L per rank
        # host synchronisation: all_to_all needs its split sizes as Python integers
        send_splits = send_counts_E.view(self.world, L).sum(1).tolist()
        recv_counts_PL = recv_counts_PL.view(self.world, L)
        recv_splits = recv_counts_PL.sum(1).tolist()
        rows_Rd = _AllToAll.apply(x_Td[token_M], send_splits, recv_splits, self.group)

        # received rows are ordered (source rank, local expert, entry); regroup expert-major
        local_expert_R = torch.repeat_interleave(
            torch.arange(L, device=x_Td.device).repeat(self.world), recv_counts_PL.reshape(-1))
        by_expert = torch.argsort(local_expert_R, stable=True)
        per_expert_L = torch.bincount(local_expert_R, minlength=L)
        M = max(int(per_expert_L.max()) if len(local_expert_R) else 0, 1)  # host sync: buffer size
        starts_L = torch.cumsum(per_expert_L, 0) - per_expert_L
        sorted_expert = local_expert_R[by_expert]
        slot = torch.arange(len(by_expert), device=x_Td.device) - starts_L[sorted_expert]
        buf_LMd = rows_Rd.new_zeros(L, M, d)
        buf_LMd = buf_LMd.index_put((sorted_expert, slot), rows_Rd[by_expert])
        out_LMd = self.experts(buf_LMd)
        out_Rd = out_LMd.new_empty(rows_Rd.shape)  # in the experts' dtype (bf16 under autocast)
        out_Rd = out_Rd.index_put((by_expert,), out_LMd[sorted_expert, slot])

        back_Md = _AllToAll.apply(out_Rd, recv_splits, send_splits, self.group)
        y_Td = x_Td.new_zeros(B * T, d).index_add(
            0, token_M, (back_Md * weight_M[:, None].to(back_Md.dtype)).to(x_Td.dtype))
        self.stats = {k: v.detach() for k, v in routing_stats(plan, B * T).items()}
        return y_Td.view(B, T, d), auxiliary_losses(plan, self.cfg) if self.training else {}

    # --- checkpoints under global expert indices ---
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The state of an equivalent single-process `MoE` (experts gathered from every rank, along
        dim 0 in global order). Collective: every rank calls it; every rank gets the result."""
        out = {}
        for name, t in self.state_dict().items():
            if name.startswith("experts."):
                parts = [torch.empty_like(t) for _ in range(self.world)]
                dist.all_gather(parts, t.contiguous(), group=self.group)
                out[name] = torch.cat(parts, dim=0)
            else:
                out[name] = t.clone()
        return out

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a single-process `MoE` state, keeping this rank's experts."""
        sl = slice(self.first_expert, self.first_expert + self.local_experts)
        self.load_state_dict({k: (v[sl] if k.startswith("experts.") else v) for k, v in state.items()})


def allreduce_gradients(model: nn.Module, group=None, expert_group=None) -> None:
    """Data-parallel gradient reduction when some layers are expert-parallel, scaled as Megatron-LM
    does, so that every gradient is that of the loss averaged over the data-parallel ranks (what
    DDP computes for a dense model). Call after backward, instead of wrapping the model in DDP.

    A replicated parameter (router, attention, ...) is averaged over `group` (default: all ranks;
    its size is the data-parallel size D). An expert's gradient already sums the contributions of
    every rank whose tokens reached it through the all-to-all, so it is divided by D, then summed
    over `expert_group` (the ranks holding the same experts; None: no other rank does)."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, ExpertParallelMoE)
                  for p in m.expert_parameters()}
    data_parallel = dist.get_world_size(group)
    for p in model.parameters():
        if p.grad is None:
            continue
        if id(p) in expert_ids:
            p.grad.div_(data_parallel)
            if expert_group is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=expert_group)
        else:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, group=group)
