"""Query of CC: the bootstrap loop with a scripted LM, the query filter, the PRF stand-in, the
corpus writer (JSONL, shards, counts, MinHash dedup) and the evaluation at equal budgets."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from minillm.bm25 import BM25Index
from minillm.data import open_shard
from minillm.errors import UserError
from minillm.methods.query_of_cc import (Config, LMExpander, PRFExpander, bootstrap, dedup,
                                         filter_near_duplicates, write_corpus)
from minillm.tokenizer import train_bpe

spec = importlib.util.spec_from_file_location("qcc_script", Path(__file__).parents[1] / "scripts/query_of_cc.py")
qcc_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qcc_script)

FRUIT = ["apple pie with cinnamon", "banana bread recipe", "cherry jam and apple sauce",
         "pear and apple orchard harvest", "banana smoothie with cherry"]
METAL = ["iron ore smelting furnace", "copper wire conducts current", "bronze is copper and tin",
         "steel from iron and carbon", "tin cans and iron rust"]
DOCS = FRUIT + METAL + ["apple pie with cinnamon"]  # the last one: a planted duplicate
LABELS = ["fruit"] * 5 + ["metal"] * 5 + ["fruit"]


class ScriptedLM:
    """Answers extension prompts and thought prompts from fixed lists; records the prompts."""

    def __init__(self):
        self.prompts = []
        self.extensions = iter(["banana bread", "Banana  bread!", "cherry jam", "copper wire", "steel carbon"] * 10)
        self.thoughts = iter(["pear orchard", "smelting furnace", "tin cans", "bronze tin"] * 10)

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, seed=None, stop=(), **_):
        self.prompts += prompts
        src = self.extensions if prompts[0].startswith("You are collecting") else self.thoughts
        return [next(src) for _ in prompts]


def test_bootstrap_with_scripted_lm_builds_expected_pool():
    index = BM25Index.build(DOCS)
    lm = ScriptedLM()
    seeds = {"fruit": ["apple pie"], "metal": ["iron ore"]}
    cfg = Config(rounds=2, samples_per_round=2, k=2)
    result = bootstrap(index, seeds, LMExpander(lm), cfg)
    # Round 1 fruit: extensions "banana bread", "Banana  bread!" (a near-duplicate: same word set),
    # thoughts "pear orchard", "smelting furnace". Then metal: "cherry jam", "copper wire",
    # "tin cans", "bronze tin". Round 2 fruit: "steel carbon", "banana bread" (already in the pool),
    # "pear orchard", "smelting furnace" (all three already in the pool).
    assert result.pools["fruit"] == ["apple pie", "banana bread", "pear orchard", "smelting furnace",
                                     "steel carbon"]
    assert result.pools["metal"][:5] == ["iron ore", "cherry jam", "copper wire", "tin cans", "bronze tin"]
    assert [lg.new_queries for lg in result.rounds if lg.domain == "fruit"] == [
        ["banana bread", "pear orchard", "smelting furnace"], ["steel carbon"]]
    assert any("apple pie" in p and "fruit" in p for p in lm.prompts)  # prompts carry pool and domain
    assert result.retrieved["fruit"][0] == [0, 10]  # seed "apple pie": ties broken by id
    assert set(result.cumulative("fruit", 1)) >= {0, 1, 3}


def test_filter_near_duplicates():
    kept = filter_near_duplicates(["a b c", "A b C", "a b c d", "", "x y", "x y z w"], ["q r"], 0.75)
    # "A b C": the same word set; "a b c d": Jaccard 3/4 with "a b c"; "": no words; "x y z w": 2/4.
    assert kept == ["a b c", "x y", "x y z w"]


def test_prf_expander_adds_feedback_terms_from_top_documents():
    index = BM25Index.build(DOCS)
    prf = PRFExpander(index, DOCS, prf_docs=1, prf_terms=2)
    # Top document of "banana bread" is "banana bread recipe": its only new term is "recipe".
    assert prf.extend("fruit", [["banana bread"]], 0) == ["banana bread recipe"]
    thought = prf.think("metal", ["copper wire"], 0)[0].split()
    assert thought and set(thought) <= {"conducts", "current"}


def test_write_corpus_jsonl_shards_counts_and_dedup(tmp_path):
    index = BM25Index.build(DOCS)
    result = bootstrap(index, {"fruit": ["apple pie"], "metal": ["iron ore"]}, LMExpander(ScriptedLM()),
                       Config(rounds=1, samples_per_round=2, k=2))
    tok = train_bpe(DOCS, 300)
    counts = write_corpus(tmp_path, DOCS, result, tok, LABELS, dedup_threshold=0.8)
    records = [json.loads(line) for line in open(tmp_path / "corpus.jsonl")]
    fruit_ids = [r["id"] for r in records if r["domain"] == "fruit"]
    assert 0 in fruit_ids and 10 not in fruit_ids  # the planted copy of document 0 was removed
    assert counts["retrieved"] == counts["after_dedup"] + 1 == len(records) + 1
    assert all(r["label"] == LABELS[r["id"]] and r["text"] == DOCS[r["id"]] for r in records)
    fruit = counts["per_domain"]["fruit"]
    assert fruit["per_round"][0]["new_documents"] == 1  # "apple pie": 0 (its copy 10 deduplicated)
    assert sum(x["new_documents"] for d in counts["per_domain"].values() for x in d["per_round"]) == len(records)
    _, tokens = open_shard(next((tmp_path / "shards").glob("train_*.bin")))
    assert counts["tokens"] == len(tokens)
    assert tok.decode([t for t in tokens.tolist() if t != tok.eot_id]).startswith(records[0]["text"])


def test_dedup_keeps_earliest_of_near_copies():
    base = "the quick brown fox jumps over the lazy dog near the river bank today " * 3
    texts = [base, "completely different words about metals and ores " * 3, base + "!"]
    assert dedup(texts) == [0, 1]
    assert dedup([]) == []


def test_evaluation_at_equal_budget_and_errors():
    index = BM25Index.build(DOCS)
    seeds = {"fruit": ["apple pie"], "metal": ["iron ore"]}
    cfg = Config(rounds=2, samples_per_round=2, k=2)
    result = bootstrap(index, seeds, LMExpander(ScriptedLM()), cfg)
    rows = qcc_script.evaluate(index, LABELS, seeds, result, cfg, np.random.default_rng(0))
    by = {(d, r, m): (n, p, rec) for d, r, m, n, p, rec, _ in rows}
    for d in seeds:
        for r in range(3):
            assert by[(d, r, "bootstrap")][0] == by[(d, r, "random control")][0]  # equal budgets
        assert by[(d, 0, "bootstrap")] == by[(d, 0, "random control")]  # round 0: the seeds alone
    assert by[("fruit", 0, "bootstrap")][1] == 1.0  # "apple pie" retrieves only fruit
    with pytest.raises(UserError, match="seed"):
        bootstrap(index, {"fruit": []}, LMExpander(ScriptedLM()), cfg)


def test_a_max_docs_that_drops_a_domain_is_one_error_line(tmp_path):
    import subprocess
    import sys
    script = Path(__file__).parents[1] / "scripts" / "query_of_cc.py"
    proc = subprocess.run([sys.executable, str(script), "--corpus", "kjv", "--max-docs", "10",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "--max-docs 10 leaves no document of the domain(s)" in lines[0]
    assert not (tmp_path / "out").exists()
