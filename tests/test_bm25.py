"""BM25: the index against the formula evaluated one document at a time (numpy and compiled search,
MaxScore forced on and off), pruning that scores only what it must, save / reload, edge cases, and
the benchmark script at a tiny size."""

import importlib.util
import math
from pathlib import Path

import bm25s
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minillm.bm25 import BM25Index, IDF_VARIANTS, brute_force_scores, brute_force_top, word_tokenize
from minillm.errors import UserError

# MaxScore tried on every query, by default (only where it pays), never.
PRUNE_RATIOS = (0.0, 16.0, math.inf)
BACKENDS = (False, True)  # use_numba (numba is in the test extra)

WORDS = list("abcdefgh")
docs_st = st.lists(st.lists(st.sampled_from(WORDS), min_size=0, max_size=12), min_size=1, max_size=30)
query_st = st.lists(st.sampled_from(WORDS + ["zz"]), min_size=0, max_size=4)


@settings(max_examples=60, deadline=None)
@given(docs=docs_st, query=query_st, variant=st.sampled_from(IDF_VARIANTS),
       shard=st.integers(1, 7), k=st.integers(1, 12), use_numba=st.sampled_from(BACKENDS),
       prune_ratio=st.sampled_from(PRUNE_RATIOS))
def test_index_equals_brute_force(docs, query, variant, shard, k, use_numba, prune_ratio):
    index = BM25Index.build(docs, k1=1.2, b=0.75, idf_variant=variant, shard_docs=shard)
    index.use_numba, index.prune_ratio = use_numba, prune_ratio
    ref = brute_force_scores(docs, query, k1=1.2, b=0.75, idf_variant=variant)
    matched, scores = index.scores(query)
    assert sorted(matched.tolist()) == sorted(ref)
    np.testing.assert_allclose(scores, [ref[d] for d in matched.tolist()], rtol=1e-12, atol=1e-12)
    ids, top = index.search(query, k)  # exact floats, ties included: small vocabularies tie often
    assert list(zip(ids.tolist(), top.tolist())) == brute_force_top(docs, query, k, k1=1.2, b=0.75,
                                                                    idf_variant=variant)
    n_scored = int(index.docs_scored[0])  # MaxScore's candidates, or every matched document
    assert n_scored == len(ref) if prune_ratio == math.inf else min(k, len(ref)) <= n_scored <= len(ref)


def zipf_corpus(n_docs=600, vocab=400, seed=0):
    """Documents of 5-25 words drawn from a Zipf-like vocabulary (w0 is as common as "the"), plus a
    block of identical documents so that scores tie across rank k."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    docs = [[f"w{i}" for i in rng.choice(vocab, rng.integers(5, 26), p=p / p.sum())]
            for _ in range(n_docs)]
    return docs + [["w0", "tied", "w1"]] * 15


def document_word_queries(docs, n, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        doc = docs[rng.integers(len(docs))]
        out.append([doc[i] for i in rng.choice(len(doc), 3, replace=len(doc) < 3)])
    return out + [["tied", "w0"], ["w0"], ["w0", "w0", "w1"], ["tied", "nowhere"], []]


@pytest.mark.parametrize("variant", IDF_VARIANTS)
def test_numba_and_numpy_search_identical_on_zipf_text(variant):
    """Realistic query mixes (common and rare words) over 615 documents: both searches, with
    MaxScore on, off and forced, return the brute-force top 10 exactly (ids, float scores, ties at
    rank 10 by id) and score the same documents."""
    docs = zipf_corpus()
    queries = document_word_queries(docs, 60)
    index = BM25Index.build(docs, idf_variant=variant)
    ref = [brute_force_top(docs, q, 10, idf_variant=variant) for q in queries]
    for prune_ratio in PRUNE_RATIOS:
        scored = []
        for use_numba in BACKENDS:
            index.use_numba, index.prune_ratio = use_numba, prune_ratio
            out = index.search_batch(queries, 10)
            assert [list(zip(i.tolist(), s.tolist())) for i, s in out] == ref
            scored.append(index.docs_scored.tolist())
        assert scored[0] == scored[1]
    assert index.search(["tied", "w0"])[0].tolist() == list(range(600, 610))  # 15 tie: lowest ids


@pytest.mark.parametrize("use_numba", BACKENDS)
def test_maxscore_scores_only_the_rare_words_documents(use_numba):
    """A rare word beside words in every document: only the rare word's 13 documents are scored,
    and the result is still the exhaustive one; two equally rare words cannot be pruned."""
    rng = np.random.default_rng(0)
    docs = [["the", "and"] * int(rng.integers(1, 4)) + ["filler"] * int(rng.integers(0, 5))
            for _ in range(400)]
    for d in range(0, 400, 33):
        docs[d] = docs[d] + ["rare"]
    index = BM25Index.build(docs)
    index.use_numba = use_numba
    query = ["the", "rare", "and", "the"]
    ids, scores = index.search(query, 10)
    assert index.docs_scored.tolist() == [13]
    assert list(zip(ids.tolist(), scores.tolist())) == brute_force_top(docs, query, 10)
    index.prune_ratio = math.inf  # exhaustive: every document holds "the"
    assert index.search(query, 10)[0].tolist() == ids.tolist() and index.docs_scored.tolist() == [400]
    index.prune_ratio = 0.0  # tried, but the other rare word's bound reaches the 10th score
    twin = [d + ["twin"] if i % 33 == 1 else d for i, d in enumerate(docs)]
    index = BM25Index.build(twin)
    index.use_numba, index.prune_ratio = use_numba, 0.0
    ids, scores = index.search(["rare", "twin"], 10)
    assert index.docs_scored.tolist() == [26]
    assert list(zip(ids.tolist(), scores.tolist())) == brute_force_top(twin, ["rare", "twin"], 10)


def test_text_top10_on_prose_and_ties_by_id():
    text = ("the cat sat on the mat . a dog sat on a log . the dog ate the cat food . "
            "cats and dogs . the mat was red . a log is wood").split(" . ")
    docs = text * 3  # every document three times: exact ties, broken by id
    index = BM25Index.build(docs, shard_docs=4)
    toks = [word_tokenize(d) for d in docs]
    for q in ["the cat", "dog log", "red mat wood", "sat sat"]:
        ids, scores = index.search(q, 10)
        assert list(zip(ids.tolist(), scores.tolist())) == brute_force_top(toks, word_tokenize(q), 10)
    ids, _ = index.search("red", 10)
    assert ids.tolist() == [4, 10, 16]  # equal scores, ascending ids
    assert index.search("sat sat")[1][0] == pytest.approx(2 * index.search("sat")[1][0])  # repeats count


def test_save_load_identical(tmp_path):
    rng = np.random.default_rng(0)
    docs = [list(rng.choice(WORDS, rng.integers(1, 20))) for _ in range(300)]
    index = BM25Index.build(docs, idf_variant="atire", shard_docs=64)
    index.save(tmp_path / "idx")
    loaded = BM25Index.load(tmp_path / "idx")
    assert isinstance(loaded.weights, np.memmap)
    queries = [list(rng.choice(WORDS + ["zz"], 3)) for _ in range(50)]
    for use_numba in BACKENDS:  # the compiled search reads the memory-mapped arrays in place
        index.use_numba = loaded.use_numba = use_numba
        for (a_ids, a_s), (b_ids, b_s) in zip(index.search_batch(queries, 10),
                                              loaded.search_batch(queries, 10)):
            assert a_ids.tolist() == b_ids.tolist() and a_s.tolist() == b_s.tolist()
    assert (loaded.k1, loaded.b, loaded.idf_variant) == (1.5, 0.75, "atire")


def test_empty_corpus_query_and_unknown_terms(tmp_path):
    for use_numba in BACKENDS:
        empty = BM25Index.build([])
        empty.use_numba = use_numba
        assert empty.num_docs == 0
        ids, scores = empty.search("anything")
        assert len(ids) == 0 and len(scores) == 0
        empty.save(tmp_path / "e")
        assert BM25Index.load(tmp_path / "e").search("x")[0].size == 0
        index = BM25Index.build(["alpha beta", "beta gamma"])
        index.use_numba = use_numba
        for q in ["", "   ", "!!", "unknown words only", []]:
            ids, scores = index.search(q)
            assert ids.size == 0 and scores.size == 0
        assert index.search("unknown beta")[0].tolist() == [0, 1]  # unknown tokens are dropped
        assert [i.tolist() for i, _ in index.search_batch(["gamma", "", "alpha"], 5)] == [[1], [], [0]]


def test_robertson_idf_can_be_negative_and_bad_arguments():
    # "a" is in 3 of 4 documents: Robertson's idf is negative, so a match scores below zero.
    index = BM25Index.build([["a"], ["a", "b"], ["a"], ["c"]], idf_variant="robertson")
    assert (index.search(["a"])[1] < 0).all()
    with pytest.raises(UserError, match="idf variant"):
        BM25Index.build([["a"]], idf_variant="bm42")
    with pytest.raises(UserError, match="b in"):
        BM25Index.build([["a"]], b=1.5)
    with pytest.raises(UserError, match="k must be"):
        index.search(["a"], 0)


def test_load_refuses_other_folders(tmp_path):
    with pytest.raises(UserError, match="not a BM25 index"):
        BM25Index.load(tmp_path)


def test_benchmark_runs_both_query_kinds_and_both_bm25s_backends(tmp_path, capsys):
    """scripts/bench/bm25.py on 315 generated lines: vocabulary and document-word queries, minillm's
    two searches and bm25s in one run, the numpy version printed, minillm equal to the brute-force
    scorer and bm25s agreeing with it. bm25s's numba backend is in the default run but only built
    here: its first query compiles for a minute."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "bm25.py"
    spec = importlib.util.spec_from_file_location("bm25_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    docs = zipf_corpus(300)
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(" ".join(d) for d in docs) + "\n")
    rows = bench.main(["--text", str(text), "--queries", "40", "--repeats", "2",
                       "--brute-force-queries", "10", "--rank-bm25-queries", "0",
                       "--bm25s-backends", "numpy"])[str(text)]
    assert f"numpy {np.__version__}" in capsys.readouterr().out
    assert rows[0]["system"].startswith("minillm (numba") and rows[1]["system"] == "minillm (numpy)"
    assert rows[2]["system"] == f"bm25s {bm25s.__version__} (numpy backend)"
    for row in rows:
        for kind in ("vocabulary", "document words"):
            assert row[kind]["agree"] == 1.0 and row[kind]["qps"] > 0
    # Document words are common words: more documents to score than for rare vocabulary words.
    assert rows[1]["document words"]["scored"] > rows[1]["vocabulary"]["scored"]
    assert bench.BM25S_BACKENDS == ("numpy", "numba")  # the default run has both
    names = [s.name for s in bench.bm25s_systems(docs, len(docs))]
    assert "numpy backend" in names[0] and "numba backend" in names[1]
