"""torchrun worker: train a few steps with DDP (evaluating at the end) and save the final
parameters (rank 0)."""

import sys

import torch

from minillm import distributed
from minillm.train import TrainConfig, Trainer

data, out = sys.argv[1], sys.argv[2]
dist = distributed.setup("cpu")
cfg = TrainConfig(data=[data], out_dir=out, preset="tiny-gpt", block_size=16, batch_size=2,
                  grad_accum=4, max_steps=3, warmup_steps=1, eval_interval=1000, eval_batches=3,
                  ckpt_interval=0,
                  progress=False)
trainer = Trainer(cfg, dist)
trainer.train()
if dist.is_main:
    torch.save(trainer.model.state_dict(), f"{out}/final.pt")
distributed.cleanup()
