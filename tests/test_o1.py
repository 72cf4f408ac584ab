"""The o1 roadmap, part 1: search (MCTS, beam search, voting, best-of-N) on scripted policies,
token budgets (the end-of-text token included), and policy training / reuse at a tiny size. The
reward models are tested in test_o1_reward.py."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from minillm.errors import run_main
from minillm.generate import Completion, LocalLM
from minillm.methods import o1
from minillm.methods.o1_reward import OracleScorer
from minillm.model import GPT, ModelConfig
from minillm.tasks import (chain_text, extract_answer, majority_vote, make_problem,
                           prompt)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (two contend on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ScriptedLM:
    """A `LanguageModel` that follows a script: `script[text]` lists what may follow `text`, handed
    out in turn (cycling). A generation takes the next option of its prompt, then goes on from
    prompt + what it has so far while the script knows that text (so a scripted tree of steps is
    also a policy that writes whole chains). A character costs one token. As a backend does, a
    stop string cuts the completion (its tokens are spent), and a completion that ends within
    `max_new_tokens` without one ends with the end-of-text token, which is spent too. Every call
    is recorded."""

    def __init__(self, script):
        self.script, self.turn, self.calls = script, {}, []

    def _next(self, context):
        options = self.script[context]
        turn = self.turn.get(context, 0)
        self.turn[context] = turn + 1
        return options[turn % len(options)]

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
                 stop=(), seed=None):
        self.calls.append((list(prompts), max_new_tokens, tuple(stop)))
        out = []
        for p in prompts:
            text = self._next(p)
            while p + text in self.script and not any(s in text for s in stop):
                text += self._next(p + text)
            stop_end = min((text.find(s) + len(s) for s in stop if s in text), default=None)
            if stop_end is not None and stop_end <= max_new_tokens:
                used, reason = stop_end, "stop"
            elif len(text) < max_new_tokens:
                used, reason = len(text) + 1, "stop"  # + the end-of-text token
            else:
                used, reason = max_new_tokens, "length"
            kept = text[:used]
            for s in stop:
                kept = kept.split(s)[0]
            out.append(Completion(kept, len(p), used, None, None, reason))
        return out

    def score(self, contexts, continuations):
        raise NotImplementedError


P = make_problem(47, "+", 35)  # 7+5+0=12, write 2 carry 1 / 4+3+1=8, write 8 carry 0 / A: 82
Q = prompt(P)
S1, S2, ANS = P.steps[0], P.steps[1], "A: 82"
WRONG1 = "7+5+0=13, write 3 carry 1"


# --- token budgets --------------------------------------------------------------------------------

def test_token_budget_charges_completion_tokens_and_refuses_what_it_cannot_cover():
    lm = ScriptedLM({Q: ["abc", "abcdefgh"]})
    budget = o1.TokenBudget(lm, limit=20)
    assert budget.affordable(8) == 2
    budget.generate([Q, Q], max_new_tokens=8)
    # "abc" and its end-of-text token; "abcdefgh" fills the 8 tokens and has none
    assert budget.spent == 4 + 8 and budget.remaining == 8 and budget.prompt_tokens == 2 * len(Q)
    with pytest.raises(o1.BudgetExceeded):
        budget.generate([Q, Q], max_new_tokens=5)
    assert budget.spent == 12 and budget.affordable(5) == 1


def eot_policy():
    """A local model that always writes the end-of-text token first (an empty chain)."""
    tok = o1.arithmetic_tokenizer()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                            n_embd=16))
    eot_BTV = torch.zeros(tok.vocab_size)
    eot_BTV[tok.eot_id] = 100.0
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + eot_BTV)
    return LocalLM(model, tok)


def test_budget_charges_the_end_of_text_token():
    lm = eot_policy()
    (out,) = lm.generate([Q], max_new_tokens=5, temperature=1.0, seed=0)
    assert out == "" and out.token_ids == [] and out.completion_tokens == 1
    assert out.finish_reason == "stop"
    # whole chains: each empty chain costs its end-of-text token, so sampling ends when 5 more
    # tokens no longer fit (uncharged, it would never end)
    budget = o1.TokenBudget(lm, limit=12)
    chains = o1.sample_chains(budget, P, max_new_tokens=5)
    assert chains == [""] * 8 and budget.spent == 8 and budget.remaining < 5
    # steps: a sample without a step extends nothing, so nothing is finished and nothing answered
    beam = o1.beam_search(lm, OracleScorer(), P, limit=100, width=2, expand=2, step_tokens=10)
    assert beam.tokens == 2 and beam.candidates == [] and beam.answer is None
    tree = o1.mcts(lm, OracleScorer(), P, limit=100, children=3, step_tokens=10)
    # the root got no child: a dead end, closed, so the search stops after one expansion
    assert tree.tokens == 3 and tree.candidates == [] and tree.text == ""


# --- policy initialisation ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return o1.arithmetic_tokenizer()


def test_arithmetic_tokenizer_splits_digits_and_prefixes_encode_alike(tok):
    text = Q + P.solution
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok.encode_ordinary("Q: 478+356\n")][1:4] == [" 4", "7", "8"]
    # a chain encodes as its prompt and steps encoded apart (what RewardModel.encode relies on)
    pieces = tok.encode_ordinary(Q) + [i for s in (S1, S2, ANS)
                                       for i in tok.encode_ordinary(s + "\n")]
    assert pieces == ids


def tiny_policy_config(**kw):
    return o1.PolicyConfig(**{**dict(levels=[1, 2], problems_per_level=40, n_layer=1, n_embd=16,
                                     n_head=2, block_size=64, pretrain_steps=4, sft_steps=8,
                                     batch_size=4), **kw})


def test_a_killed_policy_stage_resumes_exactly_and_a_trained_policy_is_reused(tmp_path, tok):
    cfg = tiny_policy_config()
    policy = o1.train_policy(cfg, tmp_path / "a")
    model, tokenizer = policy  # a (model, tokenizer) pair
    assert tokenizer.vocab_size == tok.vocab_size
    assert (tmp_path / "a" / "pretrain" / "model.pt").is_file()
    # killed after the SFT stage's checkpoint at step 6 of 8: the rerun resumes from it
    sft = tmp_path / "a" / "sft"
    (tmp_path / "a" / "policy.pt").unlink()
    (sft / "model.pt").unlink()
    (sft / "ckpt_0000008.pt").unlink()
    assert [p.name for p in sorted(sft.glob("ckpt_*.pt"))] == ["ckpt_0000006.pt"]
    resumed = o1.train_policy(cfg, tmp_path / "a")
    for a, b in zip(policy.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    # a finished policy is loaded, not trained again; other settings are refused
    (sft / "ckpt_0000006.pt").unlink()
    reused = o1.train_policy(cfg, tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(policy.model.state_dict().values(),
                                                reused.model.state_dict().values()))
    with pytest.raises(o1.UserError, match="other settings"):
        o1.train_policy(tiny_policy_config(sft_steps=9), tmp_path / "a")
    lm = reused.lm()
    out = o1.sample(lm, [P, make_problem(3, "+", 4)], n=3, max_new_tokens=8, seed=1)
    assert [len(x) for x in out] == [3, 3] and all(c.completion_tokens <= 8 for x in out for c in x)


# --- search ---------------------------------------------------------------------------------------

def test_uct_prefers_unvisited_then_trades_value_for_exploration_and_backup_reaches_the_root():
    root = o1.Node("", visits=11, value_sum=10.4)
    a = o1.Node("a\n", root, visits=1, value_sum=0.9)
    b = o1.Node("b\n", root, visits=10, value_sum=9.5)
    root.children = [a, b]
    assert o1.uct(a, 11, 1.0) == pytest.approx(0.9 + math.sqrt(math.log(11) / 1))
    assert o1.uct(b, 11, 1.0) == pytest.approx(0.95 + math.sqrt(math.log(11) / 10))
    assert o1.select(root, c=1.0) is a  # 2.45 beats 1.44: the little-visited child is explored
    assert o1.select(root, c=0.0) is b  # no exploration: the higher mean
    c = o1.Node("c\n", root)
    root.children.append(c)
    assert o1.uct(c, 11, 1.0) == math.inf and o1.select(root, c=0.0) is c
    # two levels down: backup adds one visit and the value to the node and every ancestor
    d = o1.Node("c\nd\n", c)
    c.children = [d]
    o1.backup(d, 0.25)
    assert (d.visits, d.value_sum, c.visits, c.value_sum) == (1, 0.25, 1, 0.25)
    assert (root.visits, root.value_sum) == (12, pytest.approx(10.65))
    assert o1.select(root, c=0.0) is b  # c's mean is now 0.25
    # a closed node is never selected, and selection descends to a node without children
    o1.close(a), o1.close(b)
    assert not root.closed and o1.select(root, c=0.0) is d
    o1.close(d)  # closing the last open child closes its parent, up to the root
    assert c.closed and root.closed


def arithmetic_tree():
    """A scripted policy on 47+35: at every step the right step is one option among wrong ones."""
    r1, r2 = chain_text([S1]), chain_text([S1, S2])
    w1 = chain_text([WRONG1])
    w2 = chain_text([S1, "4+3+1=9, write 9 carry 0"])
    return ScriptedLM({
        Q: [f"{WRONG1}\n", f"{S1}\n", "7+5+0=11, write 1 carry 1\n"],
        Q + r1: ["4+3+1=9, write 9 carry 0\n", f"{S2}\n"],
        Q + r2: ["A: 81\n", "A: 82\n"],
        Q + w1: ["4+3+1=8, write 8 carry 0\n"], Q + w1 + "4+3+1=8, write 8 carry 0\n": ["A: 83\n"],
        Q + "7+5+0=11, write 1 carry 1\n": ["A: 11\n"],
        Q + w2: ["A: 92\n"],
    })


def test_beam_search_with_an_oracle_prm_finds_the_correct_chain():
    greedy = o1.greedy(arithmetic_tree(), P, limit=1000, max_new_tokens=90)
    assert greedy.answer == "83"  # the first option at every step is wrong
    lm = arithmetic_tree()
    result = o1.beam_search(lm, OracleScorer(), P, limit=1000, width=1, expand=3,
                            step_tokens=40)
    assert result.text == P.solution and result.answer == "82"
    # three rounds: 3 first steps, 3 seconds of the survivor, 3 answers; each a call of 3
    assert [len(prompts) for prompts, _, stop in lm.calls] == [3, 3, 3]
    assert all(stop == ("\n",) for _, _, stop in lm.calls)


def test_mcts_with_an_oracle_prm_finds_the_correct_chain():
    lm = arithmetic_tree()
    result = o1.mcts(lm, OracleScorer(), P, limit=1000, children=2, step_tokens=40, c_uct=0.5)
    assert result.answer == "82" and result.text == P.solution
    assert "A: 83" not in result.text


def test_mcts_rollout_evaluation_scores_sampled_completions():
    lm = arithmetic_tree()
    lm.script[Q + chain_text([S1])] = [f"{S2}\n"]  # rollouts from the right first step
    lm.script[Q + chain_text([S1, S2])] = ["A: 82\n"]
    result = o1.mcts(lm, OracleScorer(), P, limit=400, children=3, step_tokens=40,
                     evaluation="rollout", rollout_tokens=80)
    assert result.answer == "82" and P.solution in result.candidates


class CountingLM(ScriptedLM):
    """Counts every generated token, whoever asked for it."""

    def __init__(self, script):
        super().__init__(script)
        self.tokens = 0

    def generate(self, prompts, max_new_tokens=128, **kw):
        out = super().generate(prompts, max_new_tokens, **kw)
        self.tokens += sum(c.completion_tokens for c in out)
        return out


@pytest.mark.parametrize("limit", [0, 30, 95, 400])
def test_every_search_stays_within_its_token_budget(limit):
    def make():
        lm = arithmetic_tree()
        counting = CountingLM(lm.script)
        return counting

    runs = {
        "greedy": lambda lm: o1.greedy(lm, P, limit, max_new_tokens=90),
        "majority": lambda lm: o1.majority(lm, P, limit, max_new_tokens=90),
        "best-of-n": lambda lm: o1.orm_best_of_n(lm, OracleScorer(), P, limit, 90),
        "beam": lambda lm: o1.beam_search(lm, OracleScorer(), P, limit, 2, 2, step_tokens=30),
        "mcts": lambda lm: o1.mcts(lm, OracleScorer(), P, limit, 3, step_tokens=30),
        "mcts-rollout": lambda lm: o1.mcts(lm, OracleScorer(), P, limit, 2, step_tokens=30,
                                           evaluation="rollout", rollout_tokens=60),
    }
    for name, run in runs.items():
        lm = make()
        result = run(lm)
        assert result.tokens == lm.tokens <= limit, name
        # each stopped because the next generation's worst case no longer fitted (or it was done)
        if limit == 0:
            assert lm.calls == [] and result.answer is None
    lm = make()
    chains = o1.sample_chains(o1.TokenBudget(lm, 400), P, max_new_tokens=90)
    # a sampled chain here costs 27-31 tokens, so waves go on while 90 more tokens fit: 400 // 90
    # = 4 chains first, then as many as the rest covers
    assert len(chains) > 4 and lm.tokens <= 400 and 400 - lm.tokens < 90


def test_majority_vote_and_best_of_n_select_as_defined():
    chains = ["x\nA: 5\n", "y\nA: 7\n", "no answer\n", "z\nA: 7\n"]
    assert majority_vote(chains) == "7" and o1.voted_chain(chains) == "y\nA: 7\n"
    assert majority_vote(["x\nA: 5\n", "y\nA: 7\n"]) == "5"  # a tie: the answer seen first
    assert majority_vote(["no answer\n"]) is None and o1.voted_chain(["no answer\n"]) is None
    assert majority_vote([]) is None

    class Length:
        def score(self, problems, texts):
            return [float(len(t)) for t in texts]

    assert o1.best_of_n(chains, P, Length()) == "no answer\n"


def test_a_prefix_without_an_answer_never_counts_as_a_finished_chain():
    # MCTS at depth 1: the children are closed at the depth limit, but none is a complete chain
    lm = arithmetic_tree()
    tree = o1.mcts(lm, OracleScorer(), P, limit=1000, children=3, step_tokens=40, max_depth=1)
    assert tree.candidates == [] and tree.answer is None and len(tree.text.split("\n")) == 2
    # rollouts cut before their answer line are evaluated, but are no candidates
    lm = arithmetic_tree()
    tree = o1.mcts(lm, OracleScorer(), P, limit=1000, children=3, step_tokens=40,
                   evaluation="rollout", rollout_tokens=20)
    assert tree.candidates and all(extract_answer(c) is not None for c in tree.candidates)
    # beam search: a beam whose policy writes a blank line is dropped, the others go on
    lm = arithmetic_tree()
    lm.script[Q] = ["\n", f"{S1}\n"]
    beam = o1.beam_search(lm, OracleScorer(), P, limit=1000, width=2, expand=2, step_tokens=40)
    assert beam.text == P.solution and all("\n\n" not in c for c in beam.candidates)


# --- the script -----------------------------------------------------------------------------------

def load_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "o1.py"
    spec = importlib.util.spec_from_file_location("o1_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_script_reports_auc_pooled_and_within_a_question():
    auc = load_script().auc
    # question 0 is easy (every score high), question 1 hard (every score low)
    scores = [0.9, 0.7, 0.8, 0.3, 0.1, 0.2]
    labels = [True, True, False, True, False, False]
    questions = [0, 0, 0, 1, 1, 1]
    # within: q0 has (0.9 > 0.8, 0.7 < 0.8), q1 has (0.3 > 0.1, 0.3 > 0.2): 3 of 4 pairs
    assert auc(scores, labels, questions) == 0.75
    # pooled: 3 right x 3 wrong pairs; the hard question's right chain loses to q0's wrong one
    assert auc(scores, labels) == pytest.approx(7 / 9)
    assert auc([0.5, 0.5], [True, False]) == 0.5 and auc([0.5], [True]) is None
    assert auc([0.9, 0.1], [True, False], [0, 1]) is None  # no question has both


def test_the_script_runs_at_a_tiny_size_within_its_budgets_and_reuses_what_it_trained(tmp_path,
                                                                                      capsys):
    script = load_script()
    threads = torch.get_num_threads()
    try:
        script.main(["--tiny", "true", "--out-dir", str(tmp_path)])
        results = json.loads((tmp_path / "results.json").read_text())
        cap, accuracy, tokens = results["cap"], results["accuracy"], results["tokens"]
        assert set(accuracy) == {"greedy", "majority", "orm-best-of-n", "prm-beam", "mcts-prm",
                                 "pass@n"}
        for method, per_budget in tokens.items():
            for n, spent in per_budget.items():
                assert 0 < spent <= int(n) * cap, (method, n)
        for n in accuracy["pass@n"]:  # the ceiling of the chains the two selections chose from
            assert accuracy["majority"][n] <= accuracy["pass@n"][n]
            assert accuracy["orm-best-of-n"][n] <= accuracy["pass@n"][n]
        out = capsys.readouterr().out
        assert "| pass@N (ceiling) |" in out and "| MCTS (PRM evaluation) |" in out
        assert set(results["reward_model_auc"]["orm"]) == {"pooled", "within_question"}
        # a second run reuses the policy and the reward models
        script.main(["--tiny", "true", "--out-dir", str(tmp_path)])
        out = capsys.readouterr().out
        assert "reusing" in out and "pretraining" in out and "training" not in out.replace(
            "pretraining", "")
        # other reward-model settings are not reused
        script.main(["--tiny", "true", "--out-dir", str(tmp_path), "--rm-lr", "0.002"])
        assert "reusing" not in capsys.readouterr().out
        with pytest.raises(SystemExit) as e:
            run_main(script.main, ["--budgets", "0", "--out-dir", str(tmp_path)])
        assert e.value.code == 2 and "--budgets" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_tiny_keeps_the_size_flags_the_user_gave():
    script = load_script()
    argv = ["--tiny", "true", "--eval-problems", "5", "--n-embd", "24"]
    cfg = script.shrink(script.parse_config(script.O1Config, argv),
                        script.given_fields(script.O1Config, argv))
    assert (cfg.eval_problems, cfg.n_embd) == (5, 24)  # given: kept
    assert (cfg.pretrain_steps, cfg.n_layer) == (4, 1)  # not given: the smoke run's
