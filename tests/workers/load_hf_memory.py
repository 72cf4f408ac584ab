"""Load a Hugging Face folder; print the peak anonymous memory the load added, and the weights' size.

Anonymous memory (RssAnon) is what holds tensors; file-backed pages (shared libraries) come and go
with the page cache and are not the load's doing. A thread samples RssAnon every half millisecond
to catch the peak. One-time costs are paid before measuring: importing torch, and torch's
meta-device kernels (a first model built on the meta device imports about 80 MB of Python code).
"""

import sys
import threading
import time

import torch

from minillm.hf import load_hf
from minillm.model import GPT, ModelConfig


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


with torch.device("meta"):
    GPT(ModelConfig(vocab_size=8, n_layer=1, n_head=1, n_embd=8))
before = rss_anon()
peak, done = before, False


def sample():
    global peak
    while not done:
        peak = max(peak, rss_anon())
        time.sleep(0.0005)


sampler = threading.Thread(target=sample)
sampler.start()
model = load_hf(sys.argv[1])
done = True
sampler.join()
peak = max(peak, rss_anon())
print(peak - before, sum(p.numel() * p.element_size() for p in model.parameters()))
