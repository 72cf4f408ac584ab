"""Load a Hugging Face folder and touch every weight; print the peak resident memory the load added
(anonymous plus file-backed), and the weights' size.

Both kinds of memory count: tensors read into memory are anonymous, tensors left in a memory map of
the checkpoint are file-backed (and paged in when first used, which is why every weight is touched).
A thread samples /proc/self/status every half millisecond to catch the peak. One-time costs are paid
before measuring: importing torch, and torch's meta-device kernels (a first model built on the meta
device imports about 80 MB of Python code).
"""

import sys
import threading
import time

import torch

from minillm.hf import load_hf
from minillm.model import GPT, ModelConfig


def resident() -> int:
    with open("/proc/self/status") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(("RssAnon:", "RssFile:")))


with torch.device("meta"):
    GPT(ModelConfig(vocab_size=8, n_layer=1, n_head=1, n_embd=8))
before = resident()
peak, done = before, False


def sample():
    global peak
    while not done:
        peak = max(peak, resident())
        time.sleep(0.0005)


sampler = threading.Thread(target=sample)
sampler.start()
model = load_hf(sys.argv[1])
checksum = sum(p.sum().item() for p in model.parameters())  # pages in mapped weights
done = True
sampler.join()
peak = max(peak, resident())
print(peak - before, sum(p.numel() * p.element_size() for p in model.parameters()))
