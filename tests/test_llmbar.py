import json

import pytest

from minillm.errors import UserError
from minillm.methods.llmbar import (PAPER_STRATEGIES, PAPER_SUBSETS, LMEvaluator, Pair, Strategy,
                                    constructed_set, load_folder, load_subset, meta_evaluate,
                                    parse_verdict, recorded_evaluator, swap_labels, write_folder)

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
    pairs = [Pair("i1", "good", "bad", 1), Pair("i2", "bad", "good", 2), Pair("i3", "x", "y", 1),
             Pair("i4", "x", "y", 2)]
    # pair 1: right both ways; pair 2: (a) then (a): one right, disagree; pair 3: a tie, then right;
    # pair 4: two ties, which agree (as the authors' evaluate.py counts them) and are never right
    verdicts = iter(["a", "b", "a", "a", None, "b", None, None])
    r = meta_evaluate({"Natural": pairs}, lambda t: [next(verdicts) for _ in t])
    assert r["subsets"]["Natural"] == {"n": 4, "accuracy": 4 / 8, "agreement": 2 / 4, "ties": 3}
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
    with pytest.raises(UserError, match="bad.json: not a folder"):
        load_folder(bad)


def test_subsets_load_in_the_papers_order_natural_first(tmp_path):
    pair = [Pair("i", "g", "b", 1)]
    names = [*reversed(PAPER_SUBSETS), "Adversarial/Extra"]  # written in another order
    write_folder(tmp_path, {name: pair for name in names})
    assert list(load_folder(tmp_path)) == [*PAPER_SUBSETS, "Adversarial/Extra"]


def write_recorded(root, name, pairs, winners, subset="Natural"):
    """A run recorded in the released layout: per pair, the winners (original numbers) when
    output_1 and when output_2 was shown first."""
    items = [{**p.to_json(), "results": [{"swap = False": {"winner": w1},
                                          "swap = True": {"winner": w2}}]}
             for p, (w1, w2) in zip(pairs, winners)]
    path = root / subset / "evaluators" / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(items))


def test_recorded_verdicts_replay_through_the_protocol(tmp_path):
    pairs = [Pair("i1", "good", "bad", 1), Pair("i2", "good", "bad", 1), Pair("i3", "bad", "x", 2)]
    write_folder(tmp_path, {"Natural": pairs})
    # right twice; wrong then a tie; a tie twice (never right, but the two agree)
    write_recorded(tmp_path, "M/Vanilla", pairs, [("1", "1"), ("2", None), (None, None)])
    ev = recorded_evaluator(tmp_path, "M/Vanilla")
    assert ev([("i1", "good", "bad"), ("i1", "bad", "good"), ("i2", "bad", "good")]) == \
        ["a", "b", None]
    r = meta_evaluate(load_folder(tmp_path), ev)["subsets"]["Natural"]
    assert r == {"n": 3, "accuracy": 2 / 6, "agreement": 2 / 3, "ties": 3}
    with pytest.raises(UserError, match="no evaluators/M/CoT/result.json"):
        recorded_evaluator(tmp_path, "M/CoT")
    with pytest.raises(UserError, match="no recorded verdict"):
        ev([("other", "a", "b")])


@pytest.mark.parametrize("text, verdict", [
    ("Verdict: Output (a)", "a"), ("**Verdict:** Output (B)", "b"),
    ("Output (a) is longer, but Output (b) follows it.\nVerdict: Output (b)", "b"),
    ("Output (b)", "b"), ("Output (a) and Output (b) are both fine", None), ("I cannot tell", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_strategies_are_named_and_composed_as_in_the_paper():
    assert Strategy.parse("Vanilla") == Strategy() and Strategy().name == "Vanilla"
    # "*" is the Rules: the authors' Vanilla prompt (with rules) is the paper's Vanilla*
    assert Strategy.parse("Vanilla*") == Strategy.parse("rules") == Strategy(rules=True)
    assert Strategy.parse("Rules+Metrics+Reference").name == "Metrics+Reference*"
    assert Strategy.parse("swap+cot+rules") == Strategy.parse("Swap+CoT*")
    assert [Strategy.parse(n).name for n in PAPER_STRATEGIES] == list(PAPER_STRATEGIES)
    for bad in ("rulez", "*", "vanilla+swap", ""):
        with pytest.raises(UserError, match="strategy"):
            Strategy.parse(bad)


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


def test_swap_labels_trade_a_and_b():
    assert swap_labels("Output (a) lists 3; output (B) lists 5. Verdict: Output ( a )") == \
        "Output (b) lists 3; output (A) lists 5. Verdict: Output ( b )"


class PositionalLM(ScriptedLM):
    """Explains and picks "(a)" in every first-stage prompt (a position bias); reads the right
    output off the second prompt (Swap's), where it sees both explanations."""

    def __init__(self):
        super().__init__(lambda p: oracle_pick(p) if "Two judges disagree" in p else "a")

    def generate(self, prompts, **kw):
        self.prompts += prompts
        return [f"Output ({self._pick(p)}) follows it.\nVerdict: Output ({self._pick(p)})"
                for p in prompts]


@pytest.mark.parametrize("verdict_by", ["score", "text"])
def test_swap_judges_with_cot_both_ways_and_decides_conflicts_again_from_both_explanations(
        verdict_by):
    lm = PositionalLM()
    ev = LMEvaluator(lm, "Swap*", verdict_by=verdict_by)
    r = meta_evaluate(SUBSETS, ev)["subsets"]
    # alone, the first stage would be always-(a): 50%; every pair conflicts and is decided again
    assert all(x["accuracy"] == 1 and x["agreement"] == 1 for x in r.values())
    n_pairs = sum(len(p) for p in SUBSETS.values())
    assert ev.stats["swap_decisions"] == 2 * n_pairs  # the second prompt, in both orders
    first = [p for p in lm.prompts if "Two judges disagree" not in p]
    second = [p for p in lm.prompts if "Two judges disagree" in p]
    assert all("Rules:" in p and "First explain" in p for p in first)  # CoT*, first
    assert all("Rules:" in p and "Answer with one line" in p for p in second)  # then Swap*
    # each explanation is shown labelled for the output it favours, in this order's letters
    assert all("prefers Output (a)\nOutput (a) follows it." in p
               and "prefers Output (b)\nOutput (b) follows it." in p for p in second)


def test_swap_keeps_each_orders_verdict_unless_both_gave_one_and_they_conflict():
    pair = Pair("i", "good", "bad", 1)

    class Fixed(ScriptedLM):  # order 1 (good first) answers by `first`, order 2 by `second`
        def __init__(self, first, second):
            super().__init__()
            self.answers = {True: first, False: second}

        def generate(self, prompts, **kw):
            self.prompts += prompts
            return [self.answers[p.index("good") < p.index("bad")] for p in prompts]

    # both orders pick "good": they agree, no second prompt
    lm = Fixed("Verdict: Output (a)", "Verdict: Output (b)")
    ev = LMEvaluator(lm, "Swap*", verdict_by="text")
    assert ev([("i", "good", "bad"), ("i", "bad", "good")]) == ["a", "b"]
    assert ev.stats["swap_decisions"] == 0 and len(lm.prompts) == 2
    # one order unparseable: no conflict to settle, each order keeps its own verdict
    lm = Fixed("I cannot tell", "Verdict: Output (a)")
    ev = LMEvaluator(lm, "Swap*", verdict_by="text")
    assert ev([("i", "good", "bad"), ("i", "bad", "good")]) == [None, "a"]
    assert ev.stats["swap_decisions"] == 0
    assert meta_evaluate({"Natural": [pair]}, ev)["subsets"]["Natural"]["ties"] == 1
