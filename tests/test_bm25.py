"""BM25: the index against the formula evaluated one document at a time, save / reload, edge cases."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minillm.bm25 import BM25Index, IDF_VARIANTS, brute_force_scores, brute_force_top, word_tokenize
from minillm.errors import UserError

WORDS = list("abcdefgh")
docs_st = st.lists(st.lists(st.sampled_from(WORDS), min_size=0, max_size=12), min_size=1, max_size=30)
query_st = st.lists(st.sampled_from(WORDS + ["zz"]), min_size=0, max_size=4)


@settings(max_examples=60, deadline=None)
@given(docs=docs_st, query=query_st, variant=st.sampled_from(IDF_VARIANTS),
       shard=st.integers(1, 7), k=st.integers(1, 12))
def test_index_equals_brute_force(docs, query, variant, shard, k):
    index = BM25Index.build(docs, k1=1.2, b=0.75, idf_variant=variant, shard_docs=shard)
    ref = brute_force_scores(docs, query, k1=1.2, b=0.75, idf_variant=variant)
    matched, scores = index.scores(query)
    assert sorted(matched.tolist()) == sorted(ref)
    np.testing.assert_allclose(scores, [ref[d] for d in matched.tolist()], rtol=1e-12, atol=1e-12)
    ids, top = index.search(query, k)  # ties included: small vocabularies tie often
    assert list(zip(ids.tolist(), top.tolist())) == brute_force_top(docs, query, k, k1=1.2, b=0.75,
                                                                    idf_variant=variant)


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
    for (a_ids, a_s), (b_ids, b_s) in zip(index.search_batch(queries, 10), loaded.search_batch(queries, 10)):
        assert a_ids.tolist() == b_ids.tolist() and a_s.tolist() == b_s.tolist()
    assert (loaded.k1, loaded.b, loaded.idf_variant) == (1.5, 0.75, "atire")


def test_empty_corpus_query_and_unknown_terms(tmp_path):
    empty = BM25Index.build([])
    assert empty.num_docs == 0
    ids, scores = empty.search("anything")
    assert len(ids) == 0 and len(scores) == 0
    empty.save(tmp_path / "e")
    assert BM25Index.load(tmp_path / "e").search("x")[0].size == 0
    index = BM25Index.build(["alpha beta", "beta gamma"])
    for q in ["", "   ", "!!", "unknown words only", []]:
        ids, scores = index.search(q)
        assert ids.size == 0 and scores.size == 0
    assert index.search("unknown beta")[0].tolist() == [0, 1]  # unknown tokens are dropped


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
