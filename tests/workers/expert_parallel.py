"""torchrun worker: the MoE layer sharded over 2 gloo ranks (expert parallelism) equals one process
holding every expert, in which each rank's tokens are routed as a group of their own (capacity over
that group; Intra-GPU Rectification told the group lives on that rank's device).

Cases: overflow and padding with no transform, with Intra-GPU, Fill-in and both (expert biases and
an output bias on); uneven token counts; all tokens sent to rank 0's experts; dropless routing with
different loads per rank; evaluation. Checked each time: outputs, auxiliary losses, and the
gradients of the tokens, the router, the output bias and every expert. Then the gradient reduction
and global norm against the reference's mean loss, and checkpoints under global expert indices.
Prints OK on success."""

import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from minillm import distributed
from minillm.expert_parallel import (gather_experts, global_grad_norm, reduce_expert_gradients,
                                     shard_experts, sharded_parameters)
from minillm.moe import MoE, MoEConfig
from minillm.methods.rectify_router import FillInRectification, IntraGPURectification

dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ["MINILLM_DIST_TIMEOUT_S"])))
rank, world = dist.get_rank(), dist.get_world_size()
d, E = 8, 4


def on_device(r):
    """Reference transform: the group's tokens live on device r (experts E/world per device)."""
    def place(plan):
        T = plan.probs_TE.shape[0]
        return dataclasses.replace(plan, token_device_T=torch.full((T,), r),
                                   expert_device_E=torch.arange(E) // (E // world))
    return place


def check(case, T_of_rank, transforms=(), skew=False, training=True, **cfg_kw):
    torch.manual_seed(0)
    cfg = MoEConfig(**{**dict(num_experts=E, top_k=2, expert_hidden=6, capacity_factor=1.0,
                              min_capacity=1), **cfg_kw})
    ref = MoE(d, cfg)
    ref.output_bias = torch.nn.Parameter(torch.randn(d))
    xs = [torch.randn(1, T, d) for T in T_of_rank]
    gs = [torch.randn(1, T, d) for T in T_of_rank]
    if skew:  # every token prefers experts 0 and 1, which live on rank 0
        with torch.no_grad():
            ref.router.gate.weight.zero_()
            ref.router.gate.weight[:, 0] = torch.tensor([5.0, 4.0, -5.0, -5.0])
        for x in xs:
            x[..., 0] = 1.0
    ep = MoE(d, cfg, plan_transforms=list(transforms))
    ep.output_bias = torch.nn.Parameter(torch.zeros(d))
    ep.load_state_dict(ref.state_dict())
    ep.shard_experts(dist.group.WORLD)
    ep.train(training), ref.train(training)

    x = xs[rank].clone().requires_grad_(True)
    y, aux = ep(x)
    ((y * gs[rank]).sum() + sum(aux.values())).backward()

    xr = [x.clone().requires_grad_(True) for x in xs]
    total = 0
    for r in range(world):
        ref.plan_transforms = [on_device(r), *transforms]
        yr, aux_r = ref(xr[r])
        total = total + (yr * gs[r]).sum() + sum(aux_r.values())
        if r == rank:
            torch.testing.assert_close(y, yr, msg=f"{case}: output")
            for name in aux_r:
                torch.testing.assert_close(aux[name], aux_r[name], msg=f"{case}: {name}")
    total.backward()
    torch.testing.assert_close(x.grad, xr[rank].grad, msg=f"{case}: token gradients")
    for name, p in ep.named_parameters():  # replicated: each rank's share sums to the reference
        if not name.startswith("experts."):
            g = p.grad.clone()
            dist.all_reduce(g)
            torch.testing.assert_close(g, ref.get_parameter(name).grad, msg=f"{case}: {name}")
    grads = {n: p.grad for n, p in ep.sharded_parameters().items()}
    full = gather_experts(grads, set(grads), dist.group.WORLD)
    for name, g in full.items():
        torch.testing.assert_close(g, ref.get_parameter(name).grad, msg=f"{case}: {name}")
    return ep, ref, y


intra, fill = IntraGPURectification(num_devices=world, dropped_when="any"), FillInRectification()
_, _, plain = check("no transform", [24, 24], bias=True)
for name, transforms in (("intra", [intra]), ("fill", [fill]), ("intra + fill", [intra, fill])):
    _, _, y = check(name, [24, 24], transforms, bias=True)
    changed = torch.tensor(float(not torch.allclose(y, plain)))
    dist.all_reduce(changed)
    assert changed > 0, f"{name}: the transform changed nothing; the case does not test it"
check("uneven", [7, 10], [intra, fill])
ep, ref, _ = check("rank 1 receives nothing", [10, 10], [intra], skew=True)
assert ep.stats["tokens_per_expert"][2:].sum() == 0  # no buffered row for rank 1's experts
check("dropless, loads differ", [9, 5], capacity_factor=0.0)
check("evaluation", [6, 11], [intra, fill], training=False)

# data-parallel reduction: every gradient that of the mean loss over ranks, the norm global
ep, ref, _ = check("reduction", [12, 12], [intra, fill])
replicated = [p for n, p in ep.named_parameters() if not n.startswith("experts.")]
for p in replicated:  # what DDP does for replicated parameters
    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
reduce_expert_gradients(list(ep.sharded_parameters().values()), world, None)
norm = global_grad_norm(replicated, list(ep.sharded_parameters().values()), dist.group.WORLD,
                        torch.device("cpu"))
expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() / world for p in ref.parameters()]))
torch.testing.assert_close(norm, expected)
grads = {n: p.grad for n, p in ep.sharded_parameters().items()}
for name, g in gather_experts(grads, set(grads), dist.group.WORLD).items():
    torch.testing.assert_close(g, ref.get_parameter(name).grad / world, msg=f"reduced {name}")

# checkpoints: the gathered state is the single-process layer's; its shard loads back
names = {f"ffn.{n}" for n in ep.sharded_parameters()}
holder = torch.nn.Module()
holder.ffn = ep
assert set(sharded_parameters(holder)) == names
state = gather_experts(holder.state_dict(), names, dist.group.WORLD)
for name, t in ref.state_dict().items():
    assert torch.equal(state[f"ffn.{name}"], t), name
again = MoE(d, ref.cfg, ep_group=dist.group.WORLD)
again.output_bias = torch.nn.Parameter(torch.zeros(d))
again.load_state_dict(shard_experts(ref.state_dict(), {n[4:] for n in names}, rank, world))
for name, t in again.state_dict().items():
    assert torch.equal(t, ep.state_dict()[name]), name
distributed.cleanup()  # releases the layers' groups before destroying them
if rank == 0:
    print("OK", flush=True)
