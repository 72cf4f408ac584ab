"""torchrun worker (2 ranks): the trainer with --expert-parallel 2.

1. An MoE run with Intra-GPU and Fill-in rectification: replicated weights and AdamW moments are
   identical on both ranks after training, the experts differ; the final checkpoint holds the
   gathered model and moments under global expert indices; a run killed after its step-2
   checkpoint resumes to the same losses.
2. Without rectification, expert parallelism is a layout, not a model: 2 ranks with experts sharded
   train like 2 data-parallel ranks holding every expert (losses, gathered weights), and the step-2
   checkpoint of the sharded run resumes data-parallel (--expert-parallel 1) to the same losses.
Prints OK on success."""

import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist

import minillm.moe as moe_module
from minillm import distributed, expert_parallel
from minillm.methods.rectify_router import FillInRectification, IntraGPURectification
from minillm.train import TrainConfig, Trainer

data, out = sys.argv[1], sys.argv[2]
dist = distributed.setup("cpu")


def cfg(name, **kw):
    base = dict(data=[data], out_dir=f"{out}/{name}", preset="tiny-llama", n_layer=2, n_embd=32,
                block_size=16, batch_size=2, grad_accum=2, max_steps=4, warmup_steps=1, lr=1e-2,
                eval_interval=4, eval_batches=2, ckpt_interval=2, progress=False, moe_experts=4,
                moe_top_k=1, moe_capacity_factor=1.0, expert_parallel=2)
    return TrainConfig(**{**base, **kw})


def rectified(name, callbacks=(), **kw):
    return Trainer(cfg(name, moe_rectify=["intra", "fill"], **kw), dist, callbacks=list(callbacks),
                   plan_transforms=[IntraGPURectification(num_devices=2), FillInRectification()])


def gathered(trainer):
    return expert_parallel.gather_experts(trainer.model.state_dict(), set(trainer.sharded),
                                          trainer.ep_group)


def same_on_every_rank(t):
    parts = [torch.empty_like(t) for _ in range(dist.world_size)]
    torch_dist.all_gather(parts, t.contiguous())
    return all(torch.equal(p, parts[0]) for p in parts)


class StopAt3:
    def on_step_end(self, trainer, record):
        if trainer.step == 3:
            raise KeyboardInterrupt


# 1. rectified, expert-parallel: replicas agree, the checkpoint is the gathered model, resume exact
run = rectified("rect")
assert set(run.sharded) == {f"blocks.1.ffn.experts.{n}" for n in ("w_up", "w_gate", "w_down")}
# The buffer size needs no all-reduce in training (fixed capacity, one micro-batch shape on every
# rank); evaluation routes dropless, where the ranks must agree on the largest load.
capacity_exchanges, exchange = [], moe_module.max_over
moe_module.max_over = lambda *a: capacity_exchanges.append(run.model.training) or exchange(*a)
history = [r["loss"] for r in run.train()]
moe_module.max_over = exchange
assert capacity_exchanges and not any(capacity_exchanges), capacity_exchanges
for name, p in run.model.named_parameters():
    moments = run.optimizer.state[p]
    identical = [same_on_every_rank(t) for t in (p, moments["exp_avg"], moments["exp_avg_sq"])]
    assert all(identical) if name not in run.sharded else not any(identical), name
state = torch.load(f"{out}/rect/ckpt_0000004.pt", weights_only=True)
for name, t in gathered(run).items():
    assert torch.equal(state["model"][name], t), name
for name in run.sharded:
    assert state["model"][name].shape[0] == 4, name
    for key in ("exp_avg", "exp_avg_sq"):
        mine = run.optimizer.state[run.model.get_parameter(name)][key]
        full = expert_parallel.gather_experts({key: mine}, {key}, run.ep_group)[key]
        assert torch.equal(state["optimizer"]["state"][name][key], full), (name, key)
try:
    rectified("rect_split", callbacks=[StopAt3()]).train()
except KeyboardInterrupt:
    pass
resumed = rectified("rect_split", resume=True)
assert resumed.step == 2, resumed.step
assert [r["loss"] for r in resumed.train()] == history[2:]

# 2. no rectification: expert-parallel equals data-parallel; resume into the other layout
class FirstGradients:
    """AdamW's first moment after step 1, (1 - beta1) * the (reduced, clipped) gradient, with the
    experts gathered. (Weights are not compared after several steps: where a gradient is near
    AdamW's eps, its update lr * g / (|g| + eps) turns float noise into visible differences.)"""

    def on_step_end(self, trainer, record):
        if trainer.step == 1:
            moments = {n: trainer.optimizer.state[p]["exp_avg"].clone()
                       for n, p in trainer.model.named_parameters()}
            self.moments = (expert_parallel.gather_experts(moments, set(trainer.sharded),
                                                           trainer.ep_group)
                            if trainer.sharded else moments)


sharded_grads, dense_grads = FirstGradients(), FirstGradients()
sharded_losses = [r["loss"] for r in Trainer(cfg("ep"), dist, callbacks=[sharded_grads]).train()]
dense_losses = [r["loss"] for r in Trainer(cfg("dp", expert_parallel=1), dist,
                                           callbacks=[dense_grads]).train()]
torch.testing.assert_close(sharded_losses, dense_losses, rtol=1e-5, atol=0)
for name, m in dense_grads.moments.items():
    torch.testing.assert_close(sharded_grads.moments[name], m, rtol=1e-5, atol=1e-8, msg=name)
if dist.is_main:  # keep the step-2 checkpoint only, then resume it without sharding
    shutil.copytree(f"{out}/ep", f"{out}/ep_to_dp")
    (Path(out) / "ep_to_dp" / "ckpt_0000004.pt").unlink()
torch_dist.barrier()
relaid = Trainer(cfg("ep_to_dp", expert_parallel=1, resume=True), dist)
assert relaid.step == 2 and not relaid.sharded
torch.testing.assert_close([r["loss"] for r in relaid.train()], sharded_losses[2:], rtol=1e-5, atol=0)
distributed.cleanup()
if dist.is_main:
    print("OK", flush=True)
