"""Benchmark: generation tokens/s with the KV cache vs. recomputing the whole sequence each step.

    python scripts/bench/generate.py [--preset tiny-llama] [--batch 8] [--prompt-len 32] [--new 96]

Before timing, checks that both paths produce the same greedy tokens (the cache is only worth
having if it is exact). Prints a table of tokens/s and the speed-up.
"""

import sys
import time

import torch

from minillm.cli import ArgumentParser
from minillm.generate import generate_ids
from minillm.model import GPT, PRESETS, preset


def main():
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny-llama", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=96, help="new tokens per prompt")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = preset(args.preset, block_size=max(args.prompt_len + args.new, 64))
    model = GPT(cfg).to(args.device).eval()
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
    same = (generate_ids(model, prompts, 16, temperature=0)
            == generate_ids(model, prompts, 16, temperature=0, use_cache=False))
    print(f"{args.preset} ({model.num_params() / 1e6:.1f}M params) on {args.device}, batch {args.batch}, "
          f"prompt {args.prompt_len}, {args.new} new tokens; cached == uncached (greedy): {same}")
    if not same:
        sys.exit("cached and uncached generation disagree: not timing a wrong result")
    rows = []
    for use_cache in (True, False):
        best = float("inf")
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            generate_ids(model, prompts, args.new, temperature=0, use_cache=use_cache)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        rows.append(("KV cache" if use_cache else "recompute", args.batch * args.new / best))
    print(f"{'mode':<12}{'tokens/s':>12}")
    for name, tps in rows:
        print(f"{name:<12}{tps:>12.0f}")
    print(f"speed-up: {rows[0][1] / rows[1][1]:.1f}x")


if __name__ == "__main__":
    main()
