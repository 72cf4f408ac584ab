"""Benchmark: MinHash signatures + LSH candidate search, documents per second on one core.

    python scripts/bench/minhash.py [--docs 5000] [--text FILE]

Documents are ~2 KB windows of real English text (the King James Bible from Debian's bible-kjv if
installed, else the standard library's docstrings, or --text FILE), with 10% of them near-copies
(one word in 60 changed) of others so that the LSH stage has real work. Both implementations use word
5-grams and 128 permutations; minillm bands for its 0.7 verification threshold, datasketch's
MinHashLSH at threshold 0.8 (its own band choice). Reports documents/s for signatures alone and for
signatures + LSH, and the recall of the planted pairs.
"""

import random
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from minillm.cli import ArgumentParser
from minillm.corpus import stdlib_docstrings
from minillm.minhash import (MinHasher, UnionFind, band_hashes, jaccard_estimate,
                             lsh_params)

WORDS = re.compile(r"[^\W_]+")


def corpus_text(path: str | None) -> tuple[str, str]:
    if path:
        return Path(path).read_text(errors="replace"), path
    try:
        return subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, check=True,
                              text=True).stdout, "KJV"
    except (FileNotFoundError, subprocess.CalledProcessError):
        return "\n".join(stdlib_docstrings()), "stdlib docstrings"


def make_docs(text: str, n: int, seed: int = 0):
    rng = random.Random(seed)
    words = text.split()
    n_orig = int(n * 0.9)
    docs = []
    for _ in range(n_orig):
        start = rng.randrange(len(words) - 400)
        docs.append(" ".join(words[start:start + 350]))  # about 2 KB
    pairs = []
    for i in range(n - n_orig):
        src = rng.randrange(n_orig)
        w = docs[src].split()
        for j in range(0, len(w), 60):
            w[min(j + rng.randrange(60), len(w) - 1)] = "changed"
        pairs.append((src, len(docs)))
        docs.append(" ".join(w))
    return docs, pairs


def minillm_run(docs):
    hasher = MinHasher(128, 5)
    t0 = time.perf_counter()
    sig = np.concatenate([hasher.signatures(docs[i:i + 2000]) for i in range(0, len(docs), 2000)])
    t1 = time.perf_counter()
    bands, rows = lsh_params(128, 0.7)
    h = band_hashes(sig, bands, rows)
    uf = UnionFind()
    for b in range(bands):
        order = np.argsort(h[:, b], kind="stable")
        col = h[order, b]
        same = np.flatnonzero(col[1:] == col[:-1])
        first = order[np.searchsorted(col, col[same + 1])]
        second = order[same + 1]
        ok = jaccard_estimate(sig[first], sig[second]) >= 0.7
        for a, c in zip(first[ok].tolist(), second[ok].tolist()):
            uf.union(a, c)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0, uf


def datasketch_run(docs):
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError:
        return None
    t0 = time.perf_counter()
    mhs = []
    for d in docs:
        w = WORDS.findall(d.lower())
        m = MinHash(num_perm=128)
        m.update_batch([" ".join(w[i:i + 5]).encode() for i in range(len(w) - 4)])
        mhs.append(m)
    t1 = time.perf_counter()
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    found = {}
    for i, m in enumerate(mhs):
        found[i] = lsh.query(m)
        lsh.insert(str(i), m)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0, found


def main():
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--docs", type=int, default=5000)
    ap.add_argument("--text")
    args = ap.parse_args()
    text, source = corpus_text(args.text)
    docs, pairs = make_docs(text, args.docs)
    print(f"{len(docs)} documents of {np.mean([len(d) for d in docs]):.0f} characters from {source}; "
          f"{len(pairs)} planted near-copies")
    rows = []
    sig_s, total_s, uf = minillm_run(docs)
    recall = np.mean([uf.find(a) == uf.find(b) for a, b in pairs])
    rows.append(("minillm (numpy)", sig_s, total_s, recall))
    ds = datasketch_run(docs)
    if ds is None:
        print("(datasketch not installed: pip install datasketch to compare)")
    else:
        sig_s2, total_s2, found = ds
        recall2 = np.mean([str(a) in found[b] for a, b in pairs])
        rows.append(("datasketch MinHash + MinHashLSH", sig_s2, total_s2, recall2))
    print(f"{'implementation':<34}{'signatures docs/s':>19}{'+ LSH docs/s':>14}{'recall':>8}")
    for name, s, t, r in rows:
        print(f"{name:<34}{len(docs) / s:>19,.0f}{len(docs) / t:>14,.0f}{r:>8.3f}")
    if len(rows) == 2:
        print(f"speed-up (signatures + LSH): {rows[1][2] / rows[0][2]:.1f}x")


if __name__ == "__main__":
    main()
