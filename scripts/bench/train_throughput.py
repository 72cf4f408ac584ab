"""Benchmark: training throughput of minillm's Trainer, beside a bare nanoGPT-style loop on the same
model, in one run.

    python scripts/bench/train_throughput.py                 # on a GPU: nanoGPT's bench settings
    python scripts/bench/train_throughput.py --device cpu    # seconds: the tiny CPU size

On a CUDA device the defaults are those of nanoGPT's bench.py: GPT-2 124M with the vocabulary
padded to 50,304, batch 12 x 1024, bf16 autocast, torch.compile, fused AdamW. nanoGPT's bench.py
on these settings: 27.05 ms/step on an H200, 28.68 ms on an H100 (../shared/ENVIRONMENT.md; not
rerun here, as nanoGPT is not installed on the GPU machines).

Two loops, each timed after warm-up steps (compilation happens there), the faster of two timed
intervals of `--steps` steps kept:
- trainer: `minillm.train.Trainer` as a user runs it (data loader, lr schedule, gradient clipping,
  the non-finite check, metrics read on log steps only), on token shards prepared in a temporary
  folder. Token values do not change the arithmetic, so a small tokenizer's ids feed the
  50,304-row model.
- bare: forward, backward, optimizer step on one fixed batch, reading the loss every step and
  without clipping, as nanoGPT's bench.py does.
Prints ms/step, tokens/s and MFU (from `GPT.flops_per_token`, the PaLM formula nanoGPT uses, against
the card's dense bf16 peak).
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

from minillm.cli import ArgumentParser
from minillm.corpus import stdlib_docstrings
from minillm.data import prepare
from minillm.distributed import DistInfo
from minillm.model import GPT, PRESETS, preset
from minillm.tokenizer import train_bpe
from minillm.train import TrainConfig, Trainer, make_optimizer, peak_flops


def parse_args():
    cuda = torch.cuda.is_available()
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="default: gpt2 on cuda, tiny-gpt on cpu")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: 50304 on cuda (padded "
                    "GPT-2 vocabulary), the preset's on cpu")
    ap.add_argument("--block-size", type=int, default=None, help="default: 1024 on cuda, 64 on cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 12 on cuda, 4 on cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per loop (default: 20 on "
                    "cuda, 5 on cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 on "
                    "cuda, 2 on cpu)")
    ap.add_argument("--compile", choices=("true", "false"), default=None,
                    help="torch.compile (default: true on cuda, false on cpu)")
    ap.add_argument("--loops", default="trainer,bare", help="which loops to time")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    defaults = dict(preset="gpt2" if gpu else "tiny-gpt", vocab_size=50304 if gpu else None,
                    block_size=1024 if gpu else 64, batch_size=12 if gpu else 4,
                    steps=20 if gpu else 5, warmup=10 if gpu else 2, compile="true" if gpu else "false")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.compile = args.compile == "true"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is visible")
    return args


def model_config(args):
    overrides = {"block_size": args.block_size}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    return preset(args.preset, **overrides)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_trainer(args, device, data_dir, out_dir) -> float:
    """Seconds per step of `Trainer.train`, from the tokens/s it logs every `--steps` steps (it
    waits for the device only on log steps, so an interval's time is exact); of three intervals,
    the first (compilation) is dropped and the faster of the others kept."""
    cfg = TrainConfig(data=[str(data_dir)], out_dir=str(out_dir), block_size=args.block_size,
                      batch_size=args.batch_size, max_steps=3 * args.steps,
                      warmup_steps=args.warmup, log_interval=args.steps, eval_interval=0,
                      ckpt_interval=0, compile=args.compile, progress=False)
    trainer = Trainer(cfg, DistInfo(device=device), model_config=model_config(args))
    history = trainer.train()
    logged = [h for h in history if "tokens_per_s" in h][1:]  # the first interval compiles
    tokens = args.batch_size * args.block_size
    return min(tokens / h["tokens_per_s"] for h in logged)


def time_bare(args, device) -> float:
    """Seconds per step of the bare loop (nanoGPT's bench.py: loss read every step, no clipping)."""
    torch.manual_seed(0)
    model = GPT(model_config(args)).to(device)
    optimizer = make_optimizer(model, TrainConfig(), device)
    step_model = torch.compile(model) if args.compile else model
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    x = torch.randint(0, model.config.vocab_size, (args.batch_size, args.block_size), device=device)
    y = torch.roll(x, -1, dims=1)
    best = float("inf")
    for interval, n in enumerate((args.warmup, args.steps, args.steps)):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            with autocast:
                loss = step_model(x, y).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()
        sync(device)
        if interval > 0:  # the first interval compiles
            best = min(best, (time.perf_counter() - t0) / n)
    return best


def main():
    args = parse_args()
    device = torch.device(args.device)
    cfg = model_config(args)
    with torch.device("meta"):
        meta = GPT(cfg)
    n_params = meta.num_params()
    flops_per_token = meta.flops_per_token(args.block_size)
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.preset} ({n_params / 1e6:.1f}M params, vocab {cfg.vocab_size}) on {name}: "
          f"batch {args.batch_size} x {args.block_size}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, "
          f"compile {args.compile}, {args.steps} timed steps after {args.warmup}")
    rows = []
    loops = args.loops.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "trainer" in loops:
            docs = list(stdlib_docstrings(max_files=60))
            prepare(docs, train_bpe(docs, vocab_size=300), Path(tmp) / "data", val_fraction=0.0,
                    progress=False)
            rows.append(("minillm Trainer", time_trainer(args, device, Path(tmp) / "data",
                                                         Path(tmp) / "out")))
        if "bare" in loops:
            rows.append(("bare loop (nanoGPT bench.py's)", time_bare(args, device)))
    tokens = args.batch_size * args.block_size
    print(f"{'loop':<32}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}")
    for loop, seconds in rows:
        mfu = f"{100 * flops_per_token * tokens / seconds / peak:.1f}%" if peak else "-"
        print(f"{loop:<32}{1000 * seconds:>10.2f}{tokens / seconds:>12,.0f}{mfu:>8}")


if __name__ == "__main__":
    main()
