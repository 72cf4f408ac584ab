import importlib.util
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minillm.methods.aor import (AoRConfig, ConstantJudge, LLMJudge, NoisyOracleJudge, ORMJudge, aggregate,
                                 bucket_by_answer, majority_vote, parse_scores, pool_sampler)
from minillm.cli import parse_config
from minillm.errors import run_main
from minillm.generate import Completion
from minillm.tasks import Arithmetic, check, make_problem

PROBLEM = make_problem(478, "+", 356)  # 834
OTHER = make_problem(1, "+", 2)


def chain(answer: str | None, tag: str = "") -> str:
    """A scripted chain: a step line (which makes equal answers distinct texts) and an answer."""
    return f"step {tag}\n" + ("" if answer is None else f"A: {answer}\n")


class ScriptedJudge:
    """Scores by the chain text from a table; records every call."""

    def __init__(self, table: dict[str, float], default: float = 0.0):
        self.table, self.default, self.calls = table, default, []

    def score(self, problem, chains, stage):
        self.calls.append((stage, list(chains)))
        return [self.table.get(c, self.default) for c in chains]


class RecordingSampler:
    def __init__(self, chains):
        self.sample, self.sizes = pool_sampler(chains), []

    def __call__(self, k):
        self.sizes.append(k)
        return self.sample(k)


# --- buckets and voting --------------------------------------------------------------------------

def test_buckets_group_by_answer_in_order_of_first_appearance_and_leave_out_answerless_chains():
    chains = [chain("5"), chain(None), chain("07"), chain("5"), "A: x\n", chain("-3")]
    assert bucket_by_answer(chains) == {"5": [0, 3], "7": [2], "-3": [5]}  # "07" reads as 7


def test_majority_vote_breaks_ties_by_first_appearance():
    assert majority_vote([chain("1"), chain("2"), chain("2"), chain("1")]) == "1"
    assert majority_vote([chain("1"), chain("2"), chain("2")]) == "2"
    assert majority_vote([chain(None), "no answer"]) is None
    assert majority_vote([]) is None


# --- the two stages ------------------------------------------------------------------------------

def test_two_stage_selection_by_hand():
    # 7 chains for the wrong 835 (the majority), 4 for the right 834, 1 without an answer.
    wrong = [chain("835", str(i)) for i in range(7)]
    right = [chain("834", str(i)) for i in range(4)]
    chains = wrong[:4] + right[:2] + [chain(None)] + wrong[4:] + right[2:]
    local = {**dict(zip(wrong, [5, 9, 6, 2, 7, 3, 1])), **dict(zip(right, [8, 4, 6, 9]))}
    judge = ScriptedJudge(local)
    glob = {wrong[1]: 4, wrong[4]: 6, wrong[2]: 2, right[3]: 9, right[0]: 7, right[2]: 8}

    def score(problem, cs, stage):
        judge.calls.append((stage, list(cs)))
        return [(local if stage == "local" else glob)[c] for c in cs]

    judge.score = score
    cfg = AoRConfig(initial_samples=12, max_samples=12)
    r = aggregate(PROBLEM, pool_sampler(chains), judge, cfg)

    # local: per bucket, batches of at most 5 chains of one answer, in sample order
    local_calls = [cs for stage, cs in judge.calls if stage == "local"]
    assert local_calls == [wrong[:5], wrong[5:], right]
    # representatives: scores >= 6, best first, at most 3
    assert r.representatives == {"835": [chains.index(w) for w in (wrong[1], wrong[4], wrong[2])],
                                 "834": [chains.index(c) for c in (right[3], right[0], right[2])]}
    # global: round t shows the t-th representative of each answer
    global_calls = [cs for stage, cs in judge.calls if stage == "global"]
    assert global_calls == [[wrong[1], right[3]], [wrong[4], right[0]], [wrong[2], right[2]]]
    assert r.scores == {"835": 4.0, "834": 8.0}
    assert r.answer == "834" != majority_vote(chains) and r.margin == 4.0 and not r.fallback
    assert r.judge_calls == 6 and r.samples == 12


def test_a_bucket_with_fewer_representatives_wraps_around_in_the_global_rounds():
    a = [chain("834", str(i)) for i in range(3)]
    b = [chain("1", "x")]
    judge = ScriptedJudge({**dict.fromkeys(a, 8), b[0]: 7})
    r = aggregate(PROBLEM, pool_sampler(a + b), judge, AoRConfig(initial_samples=4, max_samples=4))
    assert [cs for stage, cs in judge.calls if stage == "global"] == [[a[0], b[0]], [a[1], b[0]],
                                                                      [a[2], b[0]]]
    assert r.scores == {"834": 8.0, "1": 7.0} and r.margin == 1.0


def test_a_single_bucket_is_chosen_without_judging():
    judge = ScriptedJudge({})
    chains = [chain("12", str(i)) for i in range(5)] + [chain(None)]
    r = aggregate(PROBLEM, pool_sampler(chains), judge,
                  AoRConfig(initial_samples=6, max_samples=40))
    assert r.answer == "12" and r.margin == math.inf and judge.calls == [] and r.samples == 6


def test_one_surviving_bucket_has_its_score_as_margin():
    chains = [chain("834", "a"), chain("835", "b"), chain("835", "c")]
    judge = ScriptedJudge({chains[0]: 8, chains[1]: 3, chains[2]: 5})
    r = aggregate(PROBLEM, pool_sampler(chains), judge, AoRConfig(initial_samples=3, max_samples=3))
    assert r.answer == "834" and r.scores == {"834": 8.0} and r.margin == 8.0


def test_no_surviving_bucket_falls_back_to_the_vote_and_keeps_sampling():
    chains = [chain(str(i % 3), str(i)) for i in range(12)] + [chain("2", "extra")]
    sampler = RecordingSampler(chains)
    r = aggregate(PROBLEM, sampler, ScriptedJudge({}, default=5.0),
                  AoRConfig(initial_samples=6, max_samples=13, extra_samples=5))
    assert sampler.sizes == [6, 5, 2] and r.samples == 13
    assert r.fallback and r.margin == 0 and r.answer == "2" == majority_vote(chains)


def test_chains_without_answers_have_margin_zero_and_draw_more():
    chains = [chain(None, str(i)) for i in range(4)] + [chain("7"), chain("7", "b")]
    sampler = RecordingSampler(chains)
    r = aggregate(PROBLEM, sampler, ScriptedJudge({}), AoRConfig(initial_samples=4, max_samples=10,
                                                                 extra_samples=1))
    assert sampler.sizes == [4, 1] and r.answer == "7" and r.margin == math.inf
    empty = aggregate(PROBLEM, pool_sampler([chain(None)] * 3), ScriptedJudge({}),
                      AoRConfig(initial_samples=2, max_samples=3, extra_samples=1))
    assert empty.answer is None and empty.samples == 3


# --- dynamic sampling ----------------------------------------------------------------------------

def test_dynamic_sampling_stops_on_a_clear_margin():
    chains = [chain("834" if i % 3 == 0 else "835", str(i)) for i in range(40)]
    judge = ScriptedJudge({c: (9.0 if check(PROBLEM, c) else 6.5) for c in chains})
    sampler = RecordingSampler(chains)
    r = aggregate(PROBLEM, sampler, judge, AoRConfig())
    assert sampler.sizes == [20] and r.samples == 20
    assert r.answer == "834" and r.margin == pytest.approx(2.5)


def test_dynamic_sampling_continues_on_a_tie_and_stops_at_the_maximum():
    chains = [chain(str(i % 2), str(i)) for i in range(60)]
    sampler = RecordingSampler(chains)
    r = aggregate(PROBLEM, sampler, ScriptedJudge({}, default=8.0), AoRConfig())
    assert sampler.sizes == [20, 5, 5, 5, 5] and r.samples == 40 and r.margin == 0
    # ties go to the bigger bucket, then to the answer sampled first: "0" (20 chains each)
    assert r.answer == "0"


def test_dynamic_sampling_stops_once_new_chains_open_a_margin():
    # a tie among the first 20 (every chain 7); the next 5 bring two 10s for "834"
    first = [chain("834" if i % 2 else "835", str(i)) for i in range(20)]
    later = [chain("834", "best1"), chain("834", "best2")]
    later += [chain("835", f"l{i}") for i in range(8)]
    judge = ScriptedJudge({**dict.fromkeys(first, 7.0), later[0]: 10.0, later[1]: 10.0},
                          default=2.0)
    sampler = RecordingSampler(first + later)
    r = aggregate(PROBLEM, sampler, judge, AoRConfig())
    # 834's representatives become (10, 10, 7): mean 9 against 835's 7, margin 2 = the threshold
    assert sampler.sizes == [20, 5] and r.samples == 25
    assert r.answer == "834" and r.scores == {"835": 7.0, "834": 9.0} and r.margin == 2.0


def test_global_evaluation_reruns_only_when_representatives_change():
    first = [chain(str(i % 2), str(i)) for i in range(20)]
    later = [chain(str(i % 2), f"late{i}") for i in range(20)]
    judge = ScriptedJudge(dict.fromkeys(first, 8.0), default=3.0)  # later chains never pass
    r = aggregate(PROBLEM, pool_sampler(first + later), judge, AoRConfig())
    global_calls = [cs for stage, cs in judge.calls if stage == "global"]
    local_chains = [c for stage, cs in judge.calls if stage == "local" for c in cs]
    assert r.samples == 40 and len(global_calls) == 3  # one evaluation of 3 rounds
    assert sorted(local_chains) == sorted(first + later)  # every chain scored locally once


# --- the constant judge is majority voting -------------------------------------------------------

@given(answers=st.lists(st.sampled_from(["1", "2", "3", "44", None]), min_size=1, max_size=45),
       value=st.sampled_from([0.0, 5.9, 6.0, 10.0]), initial=st.integers(1, 20),
       dynamic=st.booleans())
def test_a_constant_judge_chooses_what_majority_voting_chooses(answers, value, initial, dynamic):
    chains = [chain(a, str(i)) for i, a in enumerate(answers)]
    cfg = AoRConfig(initial_samples=initial, max_samples=initial + (20 if dynamic else 0))
    r = aggregate(PROBLEM, pool_sampler(chains), ConstantJudge(value), cfg)
    assert r.answer == majority_vote(r.chains)
    assert r.chains == chains[:len(r.chains)]
    if not dynamic:
        assert r.samples == min(initial, len(chains))


# --- judges --------------------------------------------------------------------------------------

def test_noisy_oracle_at_the_extremes_and_its_threshold():
    right, wrong = PROBLEM.solution, PROBLEM.solution.replace("A: 834", "A: 835")
    for accuracy, expect in ((1.0, (True, False)), (0.0, (False, True))):
        judge = NoisyOracleJudge(accuracy, seed=3)
        s_right, s_wrong = judge.score(PROBLEM, [right, wrong], "local")
        assert (s_right >= 7, s_wrong >= 7) == expect
        assert all(0 <= s <= 10 and not 3 < s < 7 for s in (s_right, s_wrong))


def test_noisy_oracle_has_its_set_accuracy_is_deterministic_and_coupled_across_accuracies():
    problems = Arithmetic().problems(level=3, n=300, seed=1)
    texts = [(p, p.solution if i % 2 else p.solution.replace("A: ", "A: 1")) for i, p in
             enumerate(problems)]
    verdicts = {}
    for accuracy in (0.5, 0.7, 0.9):
        judge = NoisyOracleJudge(accuracy, seed=0)
        truthful = [judge.verdict(p, t) == check(p, t) for p, t in texts]
        assert abs(sum(truthful) / len(truthful) - accuracy) < 0.06
        verdicts[accuracy] = truthful
        again = NoisyOracleJudge(accuracy, seed=0)
        assert [judge.score(p, [t], "local") for p, t in texts] == \
               [again.score(p, [t], "local") for p, t in texts]
        glob = [judge.verdict(p, t, "global") == check(p, t) for p, t in texts]
        assert abs(sum(glob) / len(glob) - accuracy) < 0.06
        both = sum(a and b for a, b in zip(truthful, glob)) / len(texts)
        assert abs(both - accuracy ** 2) < 0.06  # the two stages' verdicts are independent
    # a verdict that is truthful at some accuracy stays truthful at any higher one
    assert all(not a or b for a, b in zip(verdicts[0.5], verdicts[0.7]))
    assert all(not a or b for a, b in zip(verdicts[0.7], verdicts[0.9]))
    assert verdicts[0.7] != [NoisyOracleJudge(0.7, seed=1).verdict(p, t) == check(p, t)
                             for p, t in texts]
    with pytest.raises(ValueError):
        NoisyOracleJudge(1.5)


def test_with_an_oracle_judge_aor_finds_a_sampled_minority_answer():
    right = [PROBLEM.solution] * 3
    wrong = [PROBLEM.solution.replace("A: 834", f"A: {a}") for a in (835,) * 12 + (734,) * 5]
    chains = wrong[:10] + right + wrong[10:]
    r = aggregate(PROBLEM, pool_sampler(chains), NoisyOracleJudge(1.0), AoRConfig())
    assert majority_vote(chains) == "835" and r.answer == "834" and r.samples == 20


class ScriptedORM:
    def __init__(self):
        self.seen = []

    def score(self, problems, texts):
        self.seen += list(texts)
        return [0.9 if check(p, t) else 0.2 for p, t in zip(problems, texts)]


def test_orm_judge_scales_probabilities_to_ten_and_scores_each_chain_once():
    orm = ScriptedORM()
    judge = ORMJudge(orm)
    other = OTHER
    judge.prefetch([PROBLEM, other], [[PROBLEM.solution, "A: 1\n"], [other.solution]])
    assert judge.score(PROBLEM, ["A: 1\n", PROBLEM.solution], "global") == [2.0, 9.0]
    assert judge.score(other, [other.solution, "A: 4\n"], "local") == [9.0, 2.0]
    assert orm.seen == [PROBLEM.solution, "A: 1\n", other.solution, "A: 4\n"] and judge.calls == 4


# --- the LLM judge -------------------------------------------------------------------------------

class ScriptedLM:
    """A `LanguageModel` that answers from a list and records the prompts."""

    def __init__(self, answers):
        self.answers, self.prompts = list(answers), []

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
                 stop=(), seed=None):
        self.prompts += prompts
        return [Completion(self.answers.pop(0), 100, 7) for _ in prompts]

    def score(self, contexts, continuations):
        raise AssertionError("the LLM judge generates; it never scores continuations")


def test_parse_scores_reads_lines_paragraphs_and_summaries():
    assert parse_scores("Solution 1: 7/10\nSolution 2: 3/10\n", 2) == [7, 3]
    text = "**Solution 2** — score: 8 / 10\n**Solution 1**: 6.5 out of 10"
    assert parse_scores(text, 2) == [6.5, 8]
    text = ("Solution 1\nThe first column 8+6=14 is right.\nScore: 9/10\n\n"
            "Solution 2\nThe carry is lost.\nScore: 2/10\n\nSummary: Solution 1: 10/10")
    assert parse_scores(text, 2) == [10, 2]  # the closing summary overrides
    assert parse_scores("Solution 1: 7\nChain 2 = 4", 2) == [7, 4]  # bare lines
    assert parse_scores("Solution 1: 12/10\nSolution 5: 3/10\nSolution 2: great", 2) == [10, None]
    assert parse_scores("I cannot judge these.", 3) == [None, None, None]
    assert parse_scores("7/10 overall. Solution 1: 100/10", 1) == [10]


def test_llm_judge_prompts_and_reads_scores():
    lm = ScriptedLM(["Solution 1: 8/10\nSolution 2: nonsense",
                     "Solution 2: 9/10\nSolution 1: 1/10"])
    judge = LLMJudge(lm, missing_score=0.5)
    right, wrong = PROBLEM.solution, PROBLEM.solution.replace("A: 834", "A: 835")
    assert judge.score(PROBLEM, [right, right + " "], "local") == [8.0, 0.5]
    assert judge.score(PROBLEM, [wrong, right], "global") == [1.0, 9.0]
    local, glob = lm.prompts
    assert "478+356" in local and "# Solution 1\n" in local and "# Solution 2\n" in local
    assert "same final answer" in local and "answer:" not in local
    assert "# Solution 1 (answer: 835)" in glob and "# Solution 2 (answer: 834)" in glob
    assert glob.index("A: 835") < glob.index("# Solution 2")
    assert judge.stats == {"prompts": 2, "chains": 4, "unparsed": 1, "completion_tokens": 14}
    with pytest.raises(ValueError):
        judge.make_prompt(PROBLEM, [right], "final")


def test_aor_with_an_llm_judge_end_to_end():
    # local scoring: two buckets of 2; global: one round per representative
    right = [PROBLEM.solution, PROBLEM.solution + "\n"]
    wrong = [PROBLEM.solution.replace("A: 834", "A: 835"), "8+6+0=14\nA: 835\n"]
    lm = ScriptedLM(["Solution 1: 7/10\nSolution 2: 9/10",  # bucket 835
                     "Solution 1: 8/10\nSolution 2: 8/10",  # bucket 834
                     "Solution 1: 3/10\nSolution 2: 9/10",  # round 1: 835's best, 834's best
                     "Solution 1: 4/10\nSolution 2: 8/10",  # round 2: the second ones
                     "Solution 1: 2/10\nSolution 2: 10/10"])  # round 3 wraps to the best again
    r = aggregate(PROBLEM, pool_sampler([wrong[0], right[0], wrong[1], right[1]]), LLMJudge(lm),
                  AoRConfig(initial_samples=4, max_samples=4))
    assert r.answer == "834" and r.scores == {"835": 3.0, "834": 9.0} and r.margin == 6.0
    assert lm.prompts[4] == lm.prompts[2] and lm.answers == []


# --- the script at tiny size ---------------------------------------------------------------------

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "aor.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("aor_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_tables_on_scripted_samples(tmp_path, script, capsys):
    argv = ["--tiny", "--out-dir", str(tmp_path)]
    cfg = script.resolve(parse_config(script.AoRScriptConfig, argv), argv)
    pcfg, _, key = script.sample_settings(cfg)
    problems = Arithmetic(ops=pcfg.ops).problems(cfg.level, cfg.questions, "test", cfg.seed)
    assert (cfg.questions, cfg.initial_samples, cfg.max_samples, cfg.extra_samples) == (6, 4, 8, 2)

    def chains(p, pattern):  # R: the right solution; 1, 2: wrong answers; N: no answer
        wrong = {"1": str(int(p.answer) + 1), "2": str(int(p.answer) + 2)}
        return [p.solution if x == "R" else "no answer\n" if x == "N"
                else p.solution.replace(f"A: {p.answer}", f"A: {wrong[x]}") for x in pattern]

    patterns = ["RRRRRRRR", "111RRRRR", "1212RR11", "R1R11111", "NNNNNNNN", "11111111"]
    pools = [chains(p, pat) for p, pat in zip(problems, patterns)]
    # the samples cache, as the script would have written it: the script reads it and samples none
    script.write_json(tmp_path / "samples.json", {"key": key, "chains": pools})
    script.main(argv)
    out = capsys.readouterr().out
    assert "sampled" not in out and "AoR dynamic 4-8, oracle 1" in out
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    kinds = results["questions"]
    assert [k["minority"] for k in kinds] == [False, True, False, False, False, False]
    assert [k["outvoted"] for k in kinds] == [False, True, False, True, False, False]
    vote = rows["majority@4"]["correct"]
    assert vote == [True, False, False, True, False, False]
    assert rows["majority@8"]["correct"] == [True, True, False, False, False, False]
    assert rows["AoR@4, constant"]["correct"] == vote  # the constant judge is voting
    assert rows["AoR@4, oracle 1"]["correct"] == rows["pass@4 (ceiling)"]["correct"] == \
        [True, True, False, True, False, False]
    assert rows["majority@4"]["minority"] == 0.0 and rows["AoR@4, oracle 1"]["minority"] == 1.0
    dynamic = rows["AoR dynamic 4-8, oracle 1"]
    # one answer: stop; the oracle leaves one bucket: stop; no right chain among the first 4: two
    # more (both right) settle it; no answers at all: sample to the maximum
    assert dynamic["per_question_samples"] == [4, 4, 6, 4, 8, 4]
    assert dynamic["correct"] == [True, True, True, True, False, False]
    assert dynamic["samples"] == 30 / 6
    for name, row in rows.items():
        assert all(4 <= s <= 8 for s in row["per_question_samples"]), name


def test_script_refuses_bad_settings_in_one_line(tmp_path, script, capsys):
    for flags, message in ((["--questions", "0"], "--questions 0"),
                           (["--initial-samples", "41"], "initial_samples (41)"),
                           (["--oracle-accuracy", "1.5"], "--oracle-accuracy 1.5")):
        with pytest.raises(SystemExit) as e:
            run_main(script.main, ["--tiny", "--out-dir", str(tmp_path)] + flags)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), max_size=15))
def test_script_auc_equals_the_pairwise_count(script, pairs):
    scores, labels = [float(s) for s, _ in pairs], [y for _, y in pairs]
    right = [s for s, y in pairs if y]
    wrong = [s for s, y in pairs if not y]
    expect = (sum((a > b) + 0.5 * (a == b) for a in right for b in wrong)
              / (len(right) * len(wrong)) if right and wrong else None)
    assert script.auc(scores, labels) == expect
