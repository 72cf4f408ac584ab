"""Benchmark: the HTTP server (scripts/serve.py, continuous batching) against LocalLM.generate in
process, on the same requests, at 1, 4 and 16 concurrent clients.

    python scripts/bench/serve.py [--preset tiny-llama] [--requests 32] [--max-tokens 32]

A random-weight model of `--preset` with a 512-token BPE (trained on standard-library docstrings)
is saved to a temporary folder and served by scripts/serve.py in its own process (`--threads`
torch threads, `--max-batch 16`). Before timing, the server's greedy answers must equal
LocalLM.generate's for every request. Then, for each client count c, c threads send the
`--requests` prompts (one request each, `OpenAIClient`), and LocalLM.generate runs the same prompts
in batches of c in this process (same thread count). Prints requests/s and generated tokens/s
(`usage.completion_tokens`; LocalLM's `completion_tokens`) for both.
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minillm.backends import OpenAIClient
from minillm.checkpoint import save_model
from minillm.corpus import stdlib_docstrings
from minillm.generate import LocalLM
from minillm.model import GPT, PRESETS, preset
from minillm.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[2]


def start_server(checkpoint: Path, threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--checkpoint",
                             str(checkpoint), "--served-model-name", "bench", "--port", "0",
                             "--threads", str(threads), "--max-batch", str(max_batch),
                             "--log-level", "warning"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    found = re.search(r" at (http://\S+)$", line.strip())
    if not found:
        proc.kill()
        sys.exit(f"the server did not start: {line!r}")
    return proc, found.group(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-llama", choices=sorted(PRESETS))
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=1, help="torch threads, server and LocalLM")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    docs = list(stdlib_docstrings(max_files=40))
    tok = train_bpe(docs[:400], vocab_size=512)
    torch.manual_seed(0)
    model = GPT(preset(args.preset, vocab_size=tok.vocab_size)).eval()
    # prompts of 8-64 tokens: the starts of docstrings
    prompts = [tok.decode(tok.encode_ordinary(d)[:8 + (7 * i) % 57])
               for i, d in enumerate(docs[:args.requests])]
    lm = LocalLM(model, tok)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp) / "model.pt", model, tok)
        proc, url = start_server(Path(tmp) / "model.pt", args.threads, max(args.clients))
        try:
            client = OpenAIClient(url, "bench", max_concurrency=max(args.clients), timeout=600)
            want = lm.generate(prompts, args.max_tokens, temperature=0.0)
            got = client.generate(prompts, args.max_tokens, temperature=0.0)
            same = got == want and [g.completion_tokens for g in got] == [
                w.completion_tokens for w in want]
            print(f"{args.preset} ({model.num_params() / 1e6:.2f}M parameters), CPU, "
                  f"{args.threads} thread(s); {len(prompts)} requests of {args.max_tokens} tokens, "
                  f"greedy; server == LocalLM.generate: {same}")
            if not same:
                sys.exit("the server's answers differ from LocalLM.generate: not timing them")
            print(f"{'clients':>7} | {'server req/s':>12} {'tokens/s':>9} | "
                  f"{'LocalLM req/s':>13} {'tokens/s':>9}")
            for c in args.clients:
                t0 = time.perf_counter()
                outs = OpenAIClient(url, "bench", max_concurrency=c, timeout=600).generate(
                    prompts, args.max_tokens, temperature=0.0)
                served = time.perf_counter() - t0
                t0 = time.perf_counter()
                local = LocalLM(model, tok, batch_size=c).generate(prompts, args.max_tokens,
                                                                   temperature=0.0)
                in_process = time.perf_counter() - t0
                n_served = sum(o.completion_tokens for o in outs)
                n_local = sum(o.completion_tokens for o in local)
                print(f"{c:>7} | {len(prompts) / served:>12.1f} {n_served / served:>9.0f} | "
                      f"{len(prompts) / in_process:>13.1f} {n_local / in_process:>9.0f}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
