"""Load a Hugging Face folder and print the peak resident memory the load added, in bytes.

One-time costs are paid before measuring: importing torch, and torch's meta-device kernels (a
first model built on the meta device imports about 80 MB of Python code). What remains is the cost
of the checkpoint itself."""

import resource
import sys

import torch  # noqa: F401  (imported before measuring: its own footprint is not the load's)

from minillm.hf import load_hf
from minillm.model import GPT, ModelConfig


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


with torch.device("meta"):
    GPT(ModelConfig(vocab_size=8, n_layer=1, n_head=1, n_embd=8))
before = rss_bytes()
model = load_hf(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak - before, sum(p.numel() * p.element_size() for p in model.parameters()))
