"""Writes checkpoints of ~100 MB in a loop until killed (for the kill-while-writing test)."""

import sys
from pathlib import Path

import torch

from minillm.checkpoint import CHECKPOINT_FORMAT, save_checkpoint

out = Path(sys.argv[1])
big = torch.zeros(25_000_000)  # 100 MB: writing takes long enough to be caught mid-way
step = 1
while True:
    save_checkpoint(out / f"ckpt_{step:07d}.pt", {"format": CHECKPOINT_FORMAT, "step": step, "w": big})
    print(step, flush=True)
    step += 1
