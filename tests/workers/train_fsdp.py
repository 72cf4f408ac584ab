"""torchrun worker: train with FSDP2 + activation checkpointing, save a full checkpoint, record
logits; then resume that checkpoint into a new sharded run and record its logits too (rank 0)."""

import dataclasses
import sys

import torch

from minillm import distributed
from minillm.train import TrainConfig, Trainer

data, out = sys.argv[1], sys.argv[2]
dist = distributed.setup("cpu")
cfg = TrainConfig(data=[data], out_dir=out, preset="tiny-llama", block_size=16, batch_size=2,
                  grad_accum=2, max_steps=2, warmup_steps=1, eval_interval=2, eval_batches=1,
                  ckpt_interval=2, fsdp=True, activation_checkpointing=True, progress=False)
x = torch.arange(32).view(2, 16) % 100


def logits(trainer):
    trainer.model.eval()
    with torch.no_grad():
        return trainer.model(x).logits


trained = Trainer(cfg, dist)
trained.train()
first = logits(trained)
resumed = Trainer(dataclasses.replace(cfg, resume=True), dist)
assert resumed.step == 2
second = logits(resumed)
if dist.is_main:
    torch.save({"trained": first, "resumed": second}, f"{out}/logits.pt")
del trained, resumed
distributed.cleanup()
