"""Benchmark minillm.bm25 beside bm25s and rank_bm25 (the `bench` extra) on KJV verses and GCIDE
entries (Debian packages bible-kjv, dict-gcide; not needed by the tests).

Every system gets the same token lists (minillm's word tokenizer, run once, not timed) and the same
1,000 three-word queries drawn uniformly from the corpus vocabulary with a fixed seed; queries run
in one batch call per system, top-10, on one core (affinity and thread variables set before numpy
loads). Agreement: a query agrees when the two top-10 score lists are equal at every rank
(rtol 1e-4: bm25s scores in float32; missing ranks count as score 0). bm25s is compared with the
"lucene" index (bm25s's default method, same formula); rank_bm25's BM25Okapi with the "robertson"
index times (k1 + 1) (its tf factor), which differs where rank_bm25 floors a negative idf.

    python scripts/bench/bm25.py [--corpus kjv gcide] [--queries 1000] [--rank-bm25-queries 1000]
"""

import os

os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                  NUMBA_NUM_THREADS="1")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

import platform
import time

import numpy as np

from minillm.cli import ArgumentParser
from minillm.bm25 import BM25Index, word_tokenize
from minillm.errors import UserError, run_main
from minillm.methods.query_of_cc import gcide_entries, kjv_verses

K1, B, K = 1.5, 0.75, 10


def padded(scores, k=K):
    out = np.zeros(k)
    out[:len(scores)] = scores[:k]
    return out


def agreement(a: list, b: list) -> float:
    return float(np.mean([np.allclose(padded(x), padded(y), rtol=1e-4, atol=1e-6) for x, y in zip(a, b)]))


def bench(name, docs, n_queries, n_rank_queries):
    tokens = [word_tokenize(d) for d in docs]
    vocab = sorted({t for doc in tokens for t in doc})
    rng = np.random.default_rng(0)
    queries = [[vocab[i] for i in rng.integers(0, len(vocab), 3)] for _ in range(n_queries)]
    rows = []

    t = time.perf_counter()
    ours = BM25Index.build(tokens, k1=K1, b=B, idf_variant="lucene")
    build = time.perf_counter() - t
    t = time.perf_counter()
    ours_out = ours.search_batch(queries, K)
    qtime = time.perf_counter() - t
    ours_scores = [s for _, s in ours_out]
    rows.append(("minillm.bm25 (lucene)", build, n_queries / qtime, "-"))

    try:
        import bm25s
        t = time.perf_counter()
        ret = bm25s.BM25(method="lucene", k1=K1, b=B)
        ret.index(tokens, show_progress=False)
        build = time.perf_counter() - t
        t = time.perf_counter()
        _, s_scores = ret.retrieve(queries, k=K, show_progress=False, n_threads=0)
        qtime = time.perf_counter() - t
        rows.append((f"bm25s {bm25s.__version__} (lucene, numpy backend)", build, n_queries / qtime,
                     f"{agreement(ours_scores, list(s_scores)):.3f}"))
    except ImportError:
        print("bm25s is not installed (pip install -e .[bench]); skipped")

    try:
        from rank_bm25 import BM25Okapi
        robertson = BM25Index.build(tokens, k1=K1, b=B, idf_variant="robertson")
        sub = queries[:n_rank_queries]
        t = time.perf_counter()
        okapi = BM25Okapi(tokens, k1=K1, b=B)
        build = time.perf_counter() - t
        t = time.perf_counter()
        r_scores = []
        for q in sub:
            s = okapi.get_scores(q)
            top = np.argsort(-s, kind="stable")[:K]
            r_scores.append(s[top])
        qtime = time.perf_counter() - t
        ref = [s * (K1 + 1) for _, s in robertson.search_batch(sub, K)]
        rows.append((f"rank_bm25 BM25Okapi ({len(sub)} queries)", build, len(sub) / qtime,
                     f"{agreement(ref, r_scores):.3f}"))
    except ImportError:
        print("rank_bm25 is not installed (pip install -e .[bench]); skipped")

    print(f"\n{name}: {len(docs):,} documents, {sum(map(len, tokens)):,} tokens, "
          f"{len(vocab):,} terms, {ours.indptr[-1]:,} postings")
    print(f"{'system':48s} {'build s':>8s} {'queries/s':>10s} {'agree':>6s}")
    for system, build, qps, agree in rows:
        print(f"{system:48s} {build:8.2f} {qps:10.0f} {agree:>6s}")


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", nargs="+", default=["kjv", "gcide"], choices=["kjv", "gcide"])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--rank-bm25-queries", type=int, default=1000)
    args = p.parse_args()
    if args.queries < 1 or args.rank_bm25_queries < 1:
        raise UserError("--queries and --rank-bm25-queries must be >= 1")
    print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"numpy {np.__version__}, one core (affinity {sorted(os.sched_getaffinity(0))})")
    for name in args.corpus:
        docs = kjv_verses()[0] if name == "kjv" else gcide_entries()
        bench(name, docs, args.queries, min(args.rank_bm25_queries, args.queries))


if __name__ == "__main__":
    run_main(main)
