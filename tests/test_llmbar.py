import json

import pytest

from minillm.errors import UserError
from minillm.methods.llmbar import (LMEvaluator, Pair, Strategy, constructed_set, load_folder, load_subset,
                                    meta_evaluate, parse_verdict, write_folder)

SUBSETS = constructed_set(per_family=3, seed=0)
GOOD = {(p.input, p.output_1 if p.label == 1 else p.output_2)
        for pairs in SUBSETS.values() for p in pairs}


def always_a(triples):
    return ["a"] * len(triples)


def oracle(triples):
    return ["a" if (i, a) in GOOD else "b" for i, a, b in triples]


def longer(triples):
    return ["a" if len(a) > len(b) else "b" if len(b) > len(a) else None for i, a, b in triples]


def test_always_a_is_half_right_and_never_agrees_with_itself():
    for r in meta_evaluate(SUBSETS, always_a)["subsets"].values():
        assert r["accuracy"] == 0.5 and r["agreement"] == 0 and r["ties"] == 0


def test_oracle_scores_100_100():
    for r in meta_evaluate(SUBSETS, oracle)["subsets"].values():
        assert r["accuracy"] == 1 and r["agreement"] == 1


def test_length_preferring_evaluator_falls_below_chance_on_the_adversarial_set():
    report = meta_evaluate(SUBSETS, longer)["subsets"]
    assert report["Adversarial/Constructed"]["accuracy"] < 0.5
    assert report["Adversarial/Constructed"]["agreement"] == 1  # consistent, and wrong
    assert report["Natural"]["accuracy"] > report["Adversarial/Constructed"]["accuracy"]


def test_the_constructed_set_is_balanced_and_repeatable():
    for pairs in SUBSETS.values():
        assert len(pairs) == 24 and {p.label for p in pairs} == {1, 2}
        assert len({p.input for p in pairs}) > 12
    assert constructed_set(per_family=3, seed=0) == SUBSETS != constructed_set(per_family=3, seed=1)


def test_ties_and_mixed_verdicts_by_hand():
    pairs = [Pair("i1", "good", "bad", 1), Pair("i2", "bad", "good", 2), Pair("i3", "x", "y", 1)]
    # pair 1: right both ways; pair 2: (a) then (a): one right, disagree; pair 3: a tie, then right
    verdicts = iter(["a", "b", "a", "a", None, "b"])
    r = meta_evaluate({"Natural": pairs}, lambda t: [next(verdicts) for _ in t])
    assert r["subsets"]["Natural"] == {"n": 3, "accuracy": 4 / 6, "agreement": 1 / 3, "ties": 1}
    assert r["verdicts"]["Natural"][2] == (None, "b")


def test_adversarial_subsets_are_averaged_without_weights(tmp_path):
    subsets = {"Natural": [Pair("i", "g", "b", 1)],
               "Adversarial/Neighbor": [Pair("i", "g", "b", 1)] * 3,
               "Adversarial/GPTOut": [Pair("j", "b", "g", 2)]}
    # right on Neighbor (label 1 shown first as (a)), wrong on GPTOut both ways
    r = meta_evaluate(subsets, lambda t: ["a" if a == "g" else "b" for i, a, b in t][:2] +
                      ["a" if a == "g" else "b" for i, a, b in t][2:8] + ["a", "b"])
    assert r["subsets"]["Adversarial/Neighbor"]["accuracy"] == 1
    assert r["subsets"]["Adversarial/GPTOut"]["accuracy"] == 0
    assert r["subsets"]["Adversarial (mean)"]["accuracy"] == 0.5  # not 3/4 (weighted)


def test_released_layout_round_trip_and_named_errors(tmp_path):
    write_folder(tmp_path / "Dataset" / "LLMBar", SUBSETS)
    assert load_folder(tmp_path) == SUBSETS  # the repository root works too
    bad = tmp_path / "bad.json"
    items = [p.to_json() for p in SUBSETS["Natural"][:3]]
    items[2]["label"] = 3
    bad.write_text(json.dumps(items))
    with pytest.raises(UserError, match=r"bad.json: item 2: field 'label' is 3"):
        load_subset(bad)
    del items[2]["output_2"]
    bad.write_text(json.dumps(items))
    with pytest.raises(UserError, match=r"item 2: field 'output_2' is missing"):
        load_subset(bad)
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json: not a readable JSON"):
        load_subset(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no dataset.json"):
        load_folder(tmp_path / "empty")
    with pytest.raises(UserError, match="no such folder"):
        load_folder(tmp_path / "missing")


@pytest.mark.parametrize("text, verdict", [
    ("Verdict: Output (a)", "a"), ("**Verdict:** Output (B)", "b"),
    ("Output (a) is longer, but Output (b) follows it.\nVerdict: Output (b)", "b"),
    ("Output (b)", "b"), ("Output (a) and Output (b) are both fine", None), ("I cannot tell", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_strategy_names():
    assert Strategy.parse("vanilla") == Strategy()
    assert Strategy.parse("Rules+Metrics+Reference").name == "rules+metrics+reference"
    with pytest.raises(UserError, match="strategy 'rulez'"):
        Strategy.parse("rulez")


def oracle_pick(prompt):
    """What an oracle reads off a comparison prompt: the letter of the right output."""
    instruction = prompt.split("# Instruction\n")[1].split("\n\n")[0]
    a = prompt.split("# Output (a)\n")[1].split("\n\n")[0]
    return "a" if (instruction, a) in GOOD else "b"


class ScriptedLM:
    """Picks what `pick(prompt)` says (the oracle by default) and records its prompts."""

    def __init__(self, pick=oracle_pick):
        self._pick, self.prompts = pick, []

    def generate(self, prompts, **kw):
        self.prompts += prompts
        return [f"Because.\nVerdict: Output ({self._pick(p)})" if "# Output (a)" in p
                else "Is it exact?" for p in prompts]

    def score(self, contexts, continuations):
        return [(-1.0 if f"({self._pick(c)})" in x else -2.0, 3)
                for c, x in zip(contexts, continuations)]


@pytest.mark.parametrize("verdict_by", ["score", "text"])
def test_lm_evaluator_follows_the_model_and_builds_each_strategy(verdict_by):
    lm = ScriptedLM()
    ev = LMEvaluator(lm, "rules+cot+metrics+reference", verdict_by=verdict_by)
    r = meta_evaluate(SUBSETS, ev)["subsets"]
    assert all(x["accuracy"] == 1 and x["agreement"] == 1 for x in r.values())
    compare = [p for p in lm.prompts if "# Output (a)" in p]
    assert compare and all("Rules:" in p and "# Questions that" in p and "# A reference" in p
                           for p in compare)
    # questions and references are written once per instruction, not per order
    n_instructions = len({p.input for pairs in SUBSETS.values() for p in pairs})
    assert len(lm.prompts) - len(compare) == 2 * n_instructions


def test_swap_turns_a_positional_evaluator_into_ties_or_a_second_decision():
    # scored: equal margins in both orders cancel, a tie
    r = meta_evaluate(SUBSETS, LMEvaluator(ScriptedLM(lambda p: "a"), "swap"))["subsets"]["Natural"]
    assert r["agreement"] == 0 and r["ties"] == 2 * r["n"]
    # with text verdicts, disagreements go to a second prompt that sees both judgements
    swap_lm = ScriptedLM(lambda p: oracle_pick(p) if "Two judgements" in p else "a")
    ev = LMEvaluator(swap_lm, "swap", verdict_by="text")
    r = meta_evaluate(SUBSETS, ev)["subsets"]
    assert all(x["accuracy"] == 1 and x["agreement"] == 1 for x in r.values())
    assert any("Two judgements" in p for p in swap_lm.prompts)
