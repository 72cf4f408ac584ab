"""torchrun worker: an expert-parallel MoE over 2 gloo ranks equals the single-process MoE.

Checks outputs and gradients (tokens, router, experts) in three cases: random routing with
overflow, uneven splits, and routing that sends every token to rank 0's experts (rank 1 receives
nothing); then the data-parallel reduction (`allreduce_gradients`) against the single-process
data-parallel reference, whose loss is the mean over ranks; then a checkpoint saved with two ranks
loads into one process. Prints OK on success."""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from minillm.expert_parallel import ExpertParallelMoE
from minillm.moe import MoE, MoEConfig

dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ["MINILLM_DIST_TIMEOUT_S"])))
rank, world = dist.get_rank(), dist.get_world_size()
out_dir = sys.argv[1]


def check(case: str, T: int, skew: bool):
    torch.manual_seed(0)
    d, cfg = 12, MoEConfig(num_experts=4, top_k=2, expert_hidden=16, capacity_factor=1.0, min_capacity=1)
    ref = MoE(d, cfg)
    x_all = torch.randn(world, T, d)
    g_all = torch.randn(world, T, d)
    if skew:  # every token prefers experts 0 and 1, which live on rank 0
        with torch.no_grad():
            ref.router.gate.weight.zero_()
            ref.router.gate.weight[:, 0] = torch.tensor([5.0, 4.0, -5.0, -5.0])
        x_all[..., 0] = 1.0
    ep = ExpertParallelMoE(d, cfg)
    ep.load_full_state_dict(ref.state_dict())
    x = x_all[rank:rank + 1].clone().requires_grad_(True)
    y, _ = ep(x)
    (y * g_all[rank:rank + 1]).sum().backward()

    ys = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(ys, y.detach())
    gxs = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gxs, x.grad)
    router_grad = ep.router.gate.weight.grad.clone()
    dist.all_reduce(router_grad)  # the router is replicated: its gradient sums over ranks
    expert_grads = {}
    for name, p in ep.experts.named_parameters():
        parts = [torch.empty_like(p.grad) for _ in range(world)]
        dist.all_gather(parts, p.grad)
        expert_grads[name] = torch.cat(parts)

    # reference: each rank's tokens routed with their own capacity, all experts in one process
    xr = x_all.clone().requires_grad_(True)
    total = 0
    for r in range(world):
        yr, _ = ref(xr[r:r + 1])
        torch.testing.assert_close(ys[r], yr.detach(), msg=f"{case}: output of rank {r}")
        total = total + (yr * g_all[r:r + 1]).sum()
    total.backward()
    torch.testing.assert_close(torch.cat(gxs), xr.grad, msg=f"{case}: token gradients")
    torch.testing.assert_close(router_grad, ref.router.gate.weight.grad, msg=f"{case}: router gradient")
    for name, p in ref.experts.named_parameters():
        torch.testing.assert_close(expert_grads[name], p.grad, msg=f"{case}: {name}")
    if skew:
        assert ep.stats["tokens_per_expert"].sum() > 0
    return ep, ref


check("overflow", T=24, skew=False)
check("uneven", T=7, skew=False)
ep, ref = check("rank 1 receives nothing", T=10, skew=True)

# data-parallel reduction against the single-process data-parallel reference: the gradient of the
# loss averaged over ranks (each rank's tokens routed as their own group), router and experts alike
from minillm.expert_parallel import allreduce_gradients  # noqa: E402

allreduce_gradients(ep)
router_ratio = ep.router.gate.weight.grad.norm() / (ref.router.gate.weight.grad / world).norm()
torch.testing.assert_close(ep.router.gate.weight.grad, ref.router.gate.weight.grad / world)
for n, p in ep.experts.named_parameters():
    parts = [torch.empty_like(p.grad) for _ in range(world)]
    dist.all_gather(parts, p.grad)
    expected = dict(ref.experts.named_parameters())[n].grad / world
    torch.testing.assert_close(torch.cat(parts), expected, msg=f"data-parallel {n}")
    if rank == 0:
        print(f"{n}: {float(torch.cat(parts).norm() / expected.norm()):.3f}x the reference")
if rank == 0:
    print(f"router: {float(router_ratio):.3f}x the reference")

# a checkpoint written with two ranks loads into one process, experts under their global index
state = ep.full_state_dict()
if rank == 0:
    torch.save(state, f"{out_dir}/moe.pt")
dist.barrier()
single = MoE(12, ref.cfg)
single.load_state_dict(torch.load(f"{out_dir}/moe.pt", weights_only=True))
for name, t in ref.state_dict().items():
    assert torch.equal(single.state_dict()[name], t), name
dist.barrier()
dist.destroy_process_group()
if rank == 0:
    print("OK")
