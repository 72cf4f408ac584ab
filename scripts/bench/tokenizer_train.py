"""Benchmark: BPE training time of minillm's trainer vs. Hugging Face `tokenizers` on one core.

The default text is the King James Bible (Debian's `bible-kjv`, command `bible`) followed by the
GCIDE dictionary (Debian's `dict-gcide`), cut at 10 MB, so that the figure is reproducible on any
Debian machine (`apt-get install bible-kjv dict-gcide`). `--text FILE` benchmarks another file.

    python scripts/bench/tokenizer_train.py [--text FILE] [--vocab-size 8192] [--mb 10]

Prints a table: trainer, seconds (pre-tokenization + merges), vocab size, and the compression
(bytes per token) each trained tokenizer reaches on the same text, so that speed is not bought
with a worse vocabulary. `tokenizers` runs with RAYON_NUM_THREADS=1 (set before it is imported).
"""

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")

from minillm.cli import ArgumentParser
from minillm.tokenizer import EOT, PATTERNS, count_words, train_bpe

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")


def default_text(megabytes: float) -> str:
    """KJV followed by GCIDE, cut at `megabytes` * 10**6 UTF-8 bytes."""
    try:
        kjv = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError):
        sys.exit("the default text needs Debian's bible-kjv and dict-gcide packages "
                 "(apt-get install bible-kjv dict-gcide), or pass --text FILE")
    if not GCIDE.is_file():
        sys.exit(f"{GCIDE} not found: apt-get install dict-gcide, or pass --text FILE")
    data = kjv + gzip.open(GCIDE).read()  # dictzip is gzip-compatible
    return data[: int(megabytes * 1e6)].decode("utf-8", errors="replace")


def bench_minillm(text: str, vocab_size: int, pattern: str):
    t0 = time.perf_counter()
    counts = count_words([text], pattern)
    t1 = time.perf_counter()
    tok = train_bpe([], vocab_size, pattern, word_counts=counts)
    t2 = time.perf_counter()
    n_tokens = len(tok.encode_ordinary(text))
    return {"trainer": "minillm (Python)", "seconds": t2 - t0, "pretokenize_s": t1 - t0,
            "vocab": tok.vocab_size, "bytes_per_token": len(text.encode()) / n_tokens}


def bench_hf(text: str, vocab_size: int):
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    except ImportError:
        return None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t0 = time.perf_counter()
    tok.train_from_iterator([text], trainer=trainer)
    t1 = time.perf_counter()
    n_tokens = len(tok.encode(text).ids)
    return {"trainer": "HF tokenizers (Rust, 1 thread)", "seconds": t1 - t0, "pretokenize_s": None,
            "vocab": tok.get_vocab_size(), "bytes_per_token": len(text.encode()) / n_tokens}


def main():
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--text", help="UTF-8 text file to train on (default: KJV + GCIDE)")
    ap.add_argument("--mb", type=float, default=10.0, help="megabytes of text to use")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--pattern", choices=sorted(PATTERNS), default="gpt2",
                    help="split pattern for minillm (HF's ByteLevel pre-tokenizer uses GPT-2's)")
    args = ap.parse_args()

    if args.text:
        text = Path(args.text).read_bytes()[: int(args.mb * 1e6)].decode("utf-8", errors="replace")
        source = args.text
    else:
        text = default_text(args.mb)
        source = "KJV + GCIDE"
    print(f"text: {source}, {len(text.encode()) / 1e6:.1f} MB; vocab {args.vocab_size}; "
          f"pattern {args.pattern}")

    rows = [bench_minillm(text, args.vocab_size, PATTERNS[args.pattern])]
    hf = bench_hf(text, args.vocab_size)
    if hf is None:
        print("(HF tokenizers not installed: pip install tokenizers to compare)")
    else:
        rows.append(hf)

    print(f"{'trainer':<32}{'seconds':>9}{'pre-tok s':>11}{'vocab':>8}{'bytes/token':>13}")
    for r in rows:
        pre = f"{r['pretokenize_s']:.1f}" if r["pretokenize_s"] is not None else "-"
        print(f"{r['trainer']:<32}{r['seconds']:>9.1f}{pre:>11}{r['vocab']:>8}{r['bytes_per_token']:>13.2f}")
    if hf is not None:
        print(f"ratio minillm / tokenizers: {rows[0]['seconds'] / hf['seconds']:.2f}x")


if __name__ == "__main__":
    main()
