"""Benchmark minillm.bm25 beside bm25s (its numpy and numba backends) and rank_bm25 on KJV verses
and GCIDE entries (Debian packages bible-kjv, dict-gcide) or a text file with one document a line.

Two kinds of three-word queries, `--queries` of each (seed 0), because they cost very differently:
- vocabulary: words drawn uniformly from the corpus vocabulary, so nearly all rare;
- document words: three different positions of a random document (of 3+ words), so as common as
  text is ("the", "and", "of" often among them), which touches far more postings.

Every system gets the same token lists (minillm's word tokenizer, run once, not timed) and answers
each query set in one batch call, top-10, on one core (affinity and thread variables are set before
numpy loads). The batches of all systems are interleaved, in a rotating order, and repeated
(`--repeats`); the table gives the median queries/s, from the process's CPU time (on a shared
machine wall time also counts other jobs; its median is printed beside). Each system answers one
untimed batch first (numba compiles then). "scored" is the mean number of documents a query scored:
minillm's MaxScore candidates or matched documents (`BM25Index.docs_scored`); bm25s and rank_bm25
score every document.

Agreement: minillm (both paths) against the brute-force scorer (the formula, one document at a time)
on the first `--brute-force-queries` queries of each kind: ids and scores equal at every rank, ties
by id. bm25s against minillm: top-10 score lists equal at every rank (rtol 1e-4: bm25s scores in
float32; missing ranks count as score 0), on the "lucene" index (bm25s's default method, the same
formula). rank_bm25's BM25Okapi (the first `--rank-bm25-queries` queries, timed once: it is slow)
against the "robertson" index times (k1 + 1), its tf factor; they differ where rank_bm25 floors a
negative idf.

    python scripts/bench/bm25.py [--corpus kjv gcide] [--text FILE] [--queries 1000] [--repeats 5]
"""

import os

if __name__ == "__main__":  # one core and one thread; not when a test imports this file
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                      NUMBA_NUM_THREADS="1")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from minillm.bm25 import BM25Index, brute_force_top, numba, word_tokenize  # noqa: E402
from minillm.cli import ArgumentParser  # noqa: E402
from minillm.errors import UserError, run_main  # noqa: E402
from minillm.methods.query_of_cc import gcide_entries, kjv_verses  # noqa: E402

K1, B, K = 1.5, 0.75, 10
KINDS = ("vocabulary", "document words")
BM25S_BACKENDS = ("numpy", "numba")


def cpu_name() -> str:
    """The processor's model name, and whether it has AVX-512 (numpy picks SIMD kernels by it)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())
    return name + (", AVX-512" if " avx512f" in info else "")


def make_queries(tokens: list[list[str]], n: int, seed: int = 0) -> dict[str, list[list[str]]]:
    rng = np.random.default_rng(seed)
    vocab = sorted({t for doc in tokens for t in doc})
    vocabulary = [[vocab[i] for i in rng.integers(0, len(vocab), 3)] for _ in range(n)]
    long_docs = [doc for doc in tokens if len(doc) >= 3]
    if not long_docs:
        raise UserError("no document has 3 words: nothing to draw document-word queries from")
    document_words = []
    for _ in range(n):
        doc = long_docs[rng.integers(len(long_docs))]
        document_words.append([doc[i] for i in rng.choice(len(doc), 3, replace=False)])
    return {"vocabulary": vocabulary, "document words": document_words}


def padded(scores, k=K):
    out = np.zeros(k)
    out[:len(scores)] = scores[:k]
    return out


def score_agreement(a: list, b: list) -> float:
    return float(np.mean([np.allclose(padded(x), padded(y), rtol=1e-4, atol=1e-6)
                          for x, y in zip(a, b)]))


class System:
    """One retriever: `run(queries)` -> (top-10 score lists, mean documents scored)."""

    def __init__(self, name, build, run):
        self.name, self.build_s, self.run = name, build, run


def minillm_systems(tokens):
    t = time.perf_counter()
    index = BM25Index.build(tokens, k1=K1, b=B, idf_variant="lucene")
    build = time.perf_counter() - t

    def runner(use_numba):
        def run(queries):
            index.use_numba = use_numba
            out = index.search_batch(queries, K)
            return out, float(index.docs_scored.mean())
        return run

    systems = [System("minillm (numpy)", build, runner(False))]
    if numba is not None:
        systems.insert(0, System(f"minillm (numba {numba.__version__})", build, runner(True)))
    else:
        print("numba is not installed (pip install -e .[bench]): minillm's compiled search skipped")
    return index, systems


def bm25s_systems(tokens, n_docs, backends=BM25S_BACKENDS):
    try:
        import bm25s
    except ImportError:
        print("bm25s is not installed (pip install -e .[bench]); skipped")
        return []
    if numba is None and "numba" in backends:
        print("numba is not installed (pip install -e .[bench]): bm25s's numba backend skipped")
        backends = [b for b in backends if b != "numba"]
    systems = []
    for backend in backends:
        t = time.perf_counter()
        retriever = bm25s.BM25(method="lucene", k1=K1, b=B, backend=backend)
        retriever.index(tokens, show_progress=False)
        build = time.perf_counter() - t

        def run(queries, retriever=retriever):
            # n_threads=0: the numpy backend maps in this thread (1 would hand every query to a
            # worker thread); the numba backend reads 0 as its serial kernel.
            docs, scores = retriever.retrieve(queries, k=min(K, n_docs), show_progress=False,
                                              n_threads=0)
            return [(d, s) for d, s in zip(docs, scores)], float(n_docs)
        systems.append(System(f"bm25s {bm25s.__version__} ({backend} backend)", build, run))
    return systems


def bench(name: str, docs: list[str], n_queries: int, repeats: int, n_brute: int, n_rank: int,
          bm25s_backends=BM25S_BACKENDS):
    tokens = [word_tokenize(d) for d in docs]
    queries = make_queries(tokens, n_queries)
    index, systems = minillm_systems(tokens)
    systems += bm25s_systems(tokens, len(docs), bm25s_backends)

    results = {s.name: {} for s in systems}  # name -> kind -> outputs of the last run
    cpu = {(s.name, kind): [] for s in systems for kind in KINDS}
    wall = {(s.name, kind): [] for s in systems for kind in KINDS}
    scored = {}
    for s in systems:  # warm-up (numba compiles on the first call)
        s.run(queries["vocabulary"][:10])
    for r in range(repeats):
        for kind in KINDS:
            for i in range(len(systems)):
                s = systems[(i + r) % len(systems)]
                t_cpu, t_wall = time.process_time(), time.perf_counter()
                results[s.name][kind], scored[s.name, kind] = s.run(queries[kind])
                cpu[s.name, kind].append(n_queries / max(time.process_time() - t_cpu, 1e-9))
                wall[s.name, kind].append(n_queries / (time.perf_counter() - t_wall))

    rows = []
    for s in systems:
        row = {"system": s.name, "build_s": s.build_s}
        for kind in KINDS:
            out = results[s.name][kind]
            if s.name.startswith("minillm"):
                sub = queries[kind][:n_brute]
                agree = np.mean([[(int(d), float(x)) for d, x in zip(*o)] ==
                                 brute_force_top(tokens, q, K, k1=K1, b=B, idf_variant="lucene")
                                 for q, o in zip(sub, out)]) if sub else float("nan")
            else:
                ours = [x for _, x in results[systems[0].name][kind]]
                agree = score_agreement(ours, [x for _, x in out])
            row[kind] = {"qps": float(np.median(cpu[s.name, kind])),
                         "qps_wall": float(np.median(wall[s.name, kind])),
                         "scored": scored[s.name, kind], "agree": float(agree)}
        rows.append(row)
    if len(systems) > 1 and systems[1].name.startswith("minillm"):  # numba and numpy: identical
        for kind in KINDS:
            a, b = results[systems[0].name][kind], results[systems[1].name][kind]
            assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
                       for x, y in zip(a, b)), "minillm's numba and numpy searches differ"
    rows += rank_bm25_rows(tokens, queries, index, n_rank)

    print(f"\n{name}: {len(docs):,} documents, {sum(map(len, tokens)):,} tokens, "
          f"{len(index.vocab):,} terms, {index.indptr[-1]:,} postings; {n_queries:,} queries of each "
          f"kind, median of {repeats} interleaved runs (cpu time; wall time in brackets)")
    head = "".join(f" | {kind + ' q/s':>24s} {'scored':>8s} {'agree':>6s}" for kind in KINDS)
    print(f"{'system':34s} {'build s':>7s}{head}")
    for row in rows:
        cells = "".join(f" | {row[kind]['qps']:>9,.0f} ({row[kind]['qps_wall']:>9,.0f}) "
                        f"{row[kind]['scored']:>8,.0f} {row[kind]['agree']:>6.3f}" for kind in KINDS)
        print(f"{row['system']:34s} {row['build_s']:7.2f}{cells}")
    return rows


def rank_bm25_rows(tokens, queries, index, n_rank):
    if n_rank == 0:
        return []
    try:
        import rank_bm25
    except ImportError:
        print("rank_bm25 is not installed (pip install -e .[bench]); skipped")
        return []
    robertson = BM25Index.build(tokens, k1=K1, b=B, idf_variant="robertson")
    t = time.perf_counter()
    okapi = rank_bm25.BM25Okapi(tokens, k1=K1, b=B)
    row = {"system": f"rank_bm25 ({n_rank} queries, one run)", "build_s": time.perf_counter() - t}
    for kind in KINDS:
        sub = queries[kind][:n_rank]
        t_cpu, t_wall = time.process_time(), time.perf_counter()
        scores = []
        for q in sub:
            s = okapi.get_scores(q)
            scores.append(s[np.argsort(-s, kind="stable")[:K]])
        qps = len(sub) / max(time.process_time() - t_cpu, 1e-9)
        qps_wall = len(sub) / (time.perf_counter() - t_wall)
        ref = [s * (K1 + 1) for _, s in robertson.search_batch(sub, K)]
        row[kind] = {"qps": qps, "qps_wall": qps_wall, "scored": float(len(tokens)),
                     "agree": score_agreement(ref, scores)}
    return [row]


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", nargs="+", default=["kjv", "gcide"], choices=["kjv", "gcide"])
    p.add_argument("--text", help="a text file, one document per line (instead of --corpus)")
    p.add_argument("--queries", type=int, default=1000, help="queries of each kind")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed runs (median)")
    p.add_argument("--brute-force-queries", type=int, default=20,
                   help="queries of each kind checked against the brute-force scorer")
    p.add_argument("--rank-bm25-queries", type=int, default=100, help="0 leaves rank_bm25 out")
    p.add_argument("--bm25s-backends", nargs="*", default=list(BM25S_BACKENDS),
                   choices=BM25S_BACKENDS, help="bm25s's numba backend compiles for a minute")
    args = p.parse_args(argv)
    if args.queries < 1 or args.repeats < 1:
        raise UserError("--queries and --repeats must be >= 1")
    if args.brute_force_queries < 0 or args.rank_bm25_queries < 0:
        raise UserError("--brute-force-queries and --rank-bm25-queries must be >= 0")
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"{cpu_name()}, python {platform.python_version()}, "
          f"numpy {np.__version__}, numba {numba.__version__ if numba else 'not installed'}, "
          f"cores {affinity}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.text:
        try:
            lines = Path(args.text).read_text(errors="replace").splitlines()
        except OSError as e:
            raise UserError(f"--text {args.text}: {e.strerror}") from None
        corpora = [(args.text, [line for line in lines if line.strip()])]
    else:
        corpora = [(name, kjv_verses()[0] if name == "kjv" else gcide_entries())
                   for name in args.corpus]
    rows = {}
    for name, docs in corpora:
        if not docs:
            raise UserError(f"{name}: no documents")
        rows[name] = bench(name, docs, args.queries, args.repeats,
                           min(args.brute_force_queries, args.queries),
                           min(args.rank_bm25_queries, args.queries), args.bm25s_backends)
    return rows


if __name__ == "__main__":
    run_main(main)
