"""The o1 roadmap, part 1: Monte-Carlo step values, shaping, reward models, token budgets, search
(MCTS, beam search) on scripted policies, and policy training / reuse at a tiny size."""

import math

import pytest
import torch

from minillm.methods import o1
from minillm.generate import Completion
from minillm.model import GPT, ModelConfig
from minillm.tasks import make_problem, prompt


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
    also a policy that writes whole chains). A character costs one token; a stop string cuts the
    completion as a backend does. Every call is recorded."""

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
            cut = min((text.find(s) + len(s) for s in stop if s in text), default=len(text))
            used = min(cut, max_new_tokens)
            kept = text[:used]
            for s in stop:
                kept = kept.split(s)[0]
            out.append(Completion(kept, len(p), used, None, None,
                                  "stop" if used == cut else "length"))
        return out

    def score(self, contexts, continuations):
        raise NotImplementedError


P = make_problem(47, "+", 35)  # 7+5+0=12, write 2 carry 1 / 4+3+1=8, write 8 carry 0 / A: 82
Q = prompt(P)
S1, S2, ANS = P.steps[0], P.steps[1], "A: 82"
WRONG1 = "7+5+0=13, write 3 carry 1"


# --- Monte-Carlo step values and shaping ----------------------------------------------------------

def test_mc_step_values_on_a_scripted_policy_equal_the_hand_computation():
    after_s1 = Q + o1.chain_text([S1])
    after_s2 = Q + o1.chain_text([S1, S2])
    after_wrong = Q + o1.chain_text([WRONG1])
    lm = ScriptedLM({
        # from step 1: 3 of 4 rollouts end with the right answer
        after_s1: [f"{S2}\nA: 82\n", f"{S2}\nA: 82\n", "4+3+1=9, write 9 carry 0\nA: 92\n",
                   f"{S2}\nA: 82\n"],
        # from step 2: 2 of 4 (one has no answer line at all)
        after_s2: ["A: 82\n", "A: 81\n", "A: 82\n", "I do not know\n"],
        after_wrong: ["4+3+1=8, write 8 carry 0\nA: 83\n"] * 3 + ["A: 82\n"],
    })
    chains = [[S1, S2, ANS], [S1, S2, "A: 81"], [WRONG1]]
    values, tokens = o1.mc_step_values(lm, [P, P, P], chains, rollouts=4, max_new_tokens=64)
    # the second chain's first two steps share prefixes with the first: the script keeps turning,
    # so they see the same four completions again (the scripted cycle has length 4)
    assert values == [[3 / 4, 2 / 4, 1.0], [3 / 4, 2 / 4, 0.0], [1 / 4]]
    assert tokens == (2 * sum(map(len, lm.script[after_s1]))
                      + 2 * sum(map(len, lm.script[after_s2]))
                      + sum(map(len, lm.script[after_wrong])))
    assert len(lm.calls) == 1 and len(lm.calls[0][0]) == 5 * 4  # one batched call, 5 prefixes x 4


def test_mc_step_tokens_are_the_completions_tokens():
    after_s1 = Q + o1.chain_text([S1])
    lm = ScriptedLM({after_s1: ["A: 82\n", "A: 8\n"]})
    values, tokens = o1.mc_step_values(lm, [P], [[S1]], rollouts=2, max_new_tokens=64)
    assert values == [[0.5]] and tokens == len("A: 82\n") + len("A: 8\n")


def test_shaped_rewards_telescope_to_the_outcome_minus_the_initial_value():
    values, outcome, initial = [0.5, 0.75, 1.0], 1.0, 0.25
    rewards = o1.shaped_rewards(values, outcome, initial, gamma=1.0)
    # r'_1 = 0 + 0.5 - 0.25, r'_2 = 0 + 0.75 - 0.5, r'_3 = 1 + 0 (terminal) - 0.75
    assert rewards == pytest.approx([0.25, 0.25, 0.25])
    assert sum(rewards) == pytest.approx(outcome - initial)
    discounted = o1.shaped_rewards(values, outcome, initial, gamma=0.5)
    assert discounted == pytest.approx([0.5 * 0.5 - 0.25, 0.5 * 0.75 - 0.5, 1.0 - 0.75])


# --- reward models --------------------------------------------------------------------------------

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


def test_reward_model_reads_the_last_token_of_every_step_and_learns_soft_targets(tok, tmp_path):
    torch.manual_seed(0)
    policy = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                             n_embd=16))
    rm = o1.ProcessRewardModel(policy, tok)
    ids, ends = rm.encode(P, [S1, S2])
    assert tok.decode(ids[:ends[0] + 1]) == Q
    assert tok.decode(ids[:ends[2] + 1]) == Q + S1 + "\n" + S2 + "\n"
    assert rm.score([P], [S1 + "\n"]) == [0.5]  # the head starts at zero
    # the head reads the final norm's output: the same as the LM head's input
    h = rm.hidden_states(torch.tensor([ids]))
    assert torch.allclose(policy.lm_head(h), policy(torch.tensor([ids])).logits, atol=1e-6)
    # a right chain after one step is worth 0.8, a wrong one 0.1; the final answers 1 and 0
    examples = [o1.RewardExample(P, [S1, S2, ANS], [0.8, None, 1.0]),
                o1.RewardExample(P, [WRONG1, "A: 83"], [0.1, 0.0])]
    trained = o1.train_prm(policy, tok, examples, steps=150, batch_size=2, lr=3e-3, log=None)
    right, wrong = trained.score_steps(P, [S1, S2, ANS]), trained.score_steps(P, [WRONG1, "A: 83"])
    assert right[0] == pytest.approx(0.8, abs=0.05) and right[2] > 0.95
    assert wrong[0] == pytest.approx(0.1, abs=0.05) and wrong[1] < 0.05
    assert trained.score([P], [o1.chain_text([WRONG1])]) == pytest.approx([wrong[0]])
    assert all(p.grad is None for p in policy.parameters())  # the policy itself is untouched
    trained.save(tmp_path / "prm.pt")
    loaded = o1.ProcessRewardModel.load(tmp_path / "prm.pt")
    assert isinstance(loaded, o1.ProcessRewardModel)
    assert loaded.score_steps(P, [S1, S2]) == pytest.approx(trained.score_steps(P, [S1, S2]))
    with pytest.raises(o1.UserError, match="of kind 'prm', not 'orm'"):
        o1.OutcomeRewardModel.load(tmp_path / "prm.pt")


def test_reward_model_confidence_is_the_policys_lowest_and_mean_token_logprob(tok):
    torch.manual_seed(0)
    policy = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                             n_embd=16))
    rm = o1.OutcomeRewardModel(policy, tok)
    ids, ends = rm.encode(P, [S1, S2])
    with torch.no_grad():
        logp = torch.log_softmax(policy(torch.tensor([ids])).logits[0], -1)
        token_logp = [logp[t - 1, ids[t]].item() for t in range(len(ids))]
        ids_BT, pos_BK = torch.tensor([ids]), torch.tensor([ends])
        for weights, reduce in (([1.0, 0.0], min), ([0.0, 1.0], lambda x: sum(x) / len(x))):
            rm.confidence.weight.copy_(torch.tensor([weights]))
            got = rm.logits(ids_BT, pos_BK)[0].tolist()
            # after the prompt nothing of the chain is seen yet: 0; then over the chain's tokens
            want = [0.0] + [reduce(token_logp[ends[0] + 1:end + 1]) for end in ends[1:]]
            assert got == pytest.approx(want, abs=1e-5)


def test_the_orm_learns_the_checker_labels_of_sampled_chains(tok, tmp_path):
    torch.manual_seed(0)
    policy = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                             n_embd=16))
    chains = [P.solution, f"{WRONG1}\nA: 83\n", ""]
    examples = o1.outcome_examples([P], [chains])
    assert [e.targets for e in examples] == [[None, None, 1.0], [None, 0.0]]
    orm = o1.train_orm(policy, tok, [P], [chains], steps=60, batch_size=2, lr=3e-3, log=None)
    right, wrong = orm.score([P, P], chains[:2])
    assert right > 0.9 and wrong < 0.1
    orm.save(tmp_path / "orm.pt")
    assert o1.RewardModel.load(tmp_path / "orm.pt").score([P], chains[:1]) == pytest.approx([right])


def test_process_examples_carry_the_mc_values_of_every_step():
    lm = ScriptedLM({Q + o1.chain_text([S1]): [f"{S2}\nA: 82\n", "A: 1\n"]})
    examples, tokens = o1.process_examples(lm, [P], [[f"{S1}\nA: 82\n"]], rollouts=2,
                                           max_new_tokens=64)
    assert [(e.steps, e.targets) for e in examples] == [([S1, ANS], [0.5, 1.0])]
    assert tokens == len(f"{S2}\nA: 82\n") + len("A: 1\n")


# --- token budgets --------------------------------------------------------------------------------

def test_token_budget_charges_completion_tokens_and_refuses_what_it_cannot_cover():
    lm = ScriptedLM({Q: ["abc", "abcdefgh"]})
    budget = o1.TokenBudget(lm, limit=20)
    assert budget.affordable(8) == 2
    budget.generate([Q, Q], max_new_tokens=8)
    assert budget.spent == 3 + 8 and budget.remaining == 9 and budget.prompt_tokens == 2 * len(Q)
    with pytest.raises(o1.BudgetExceeded):
        budget.generate([Q, Q], max_new_tokens=5)
    assert budget.spent == 11 and budget.affordable(5) == 1


# --- policy initialisation ------------------------------------------------------------------------

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
    r1, r2 = o1.chain_text([S1]), o1.chain_text([S1, S2])
    w1 = o1.chain_text([WRONG1])
    w2 = o1.chain_text([S1, "4+3+1=9, write 9 carry 0"])
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
    result = o1.beam_search(lm, o1.OracleScorer(), P, limit=1000, width=1, expand=3,
                            step_tokens=40)
    assert result.text == P.solution and result.answer == "82"
    # three rounds: 3 first steps, 3 seconds of the survivor, 3 answers; each a call of 3
    assert [len(prompts) for prompts, _, stop in lm.calls] == [3, 3, 3]
    assert all(stop == ("\n",) for _, _, stop in lm.calls)


def test_mcts_with_an_oracle_prm_finds_the_correct_chain():
    lm = arithmetic_tree()
    result = o1.mcts(lm, o1.OracleScorer(), P, limit=1000, children=2, step_tokens=40, c_uct=0.5)
    assert result.answer == "82" and result.text == P.solution
    assert "A: 83" not in result.text


def test_mcts_rollout_evaluation_scores_sampled_completions():
    lm = arithmetic_tree()
    lm.script[Q + o1.chain_text([S1])] = [f"{S2}\n"]  # rollouts from the right first step
    lm.script[Q + o1.chain_text([S1, S2])] = ["A: 82\n"]
    result = o1.mcts(lm, o1.OracleScorer(), P, limit=400, children=3, step_tokens=40,
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
        "best-of-n": lambda lm: o1.orm_best_of_n(lm, o1.OracleScorer(), P, limit, 90),
        "beam": lambda lm: o1.beam_search(lm, o1.OracleScorer(), P, limit, 2, 2, step_tokens=30),
        "mcts": lambda lm: o1.mcts(lm, o1.OracleScorer(), P, limit, 3, step_tokens=30),
        "mcts-rollout": lambda lm: o1.mcts(lm, o1.OracleScorer(), P, limit, 2, step_tokens=30,
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
    assert o1.majority_vote(chains) == "y\nA: 7\n"
    assert o1.majority_vote(["x\nA: 5\n", "y\nA: 7\n"]) == "x\nA: 5\n"  # a tie: seen first
    assert o1.majority_vote(["no answer\n"]) is None

    class Length:
        def score(self, problems, texts):
            return [float(len(t)) for t in texts]

    assert o1.best_of_n(chains, P, Length()) == "no answer\n"


# --- the script -----------------------------------------------------------------------------------

def test_the_script_runs_at_a_tiny_size_within_its_budgets_and_reuses_what_it_trained(tmp_path,
                                                                                      capsys):
    import importlib.util
    import json
    from pathlib import Path

    from minillm.errors import run_main

    path = Path(__file__).resolve().parents[1] / "scripts" / "o1.py"
    spec = importlib.util.spec_from_file_location("o1_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
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
        # a second run reuses the policy and the reward models
        script.main(["--tiny", "true", "--out-dir", str(tmp_path)])
        out = capsys.readouterr().out
        assert "reusing" in out and "pretraining" in out and "training" not in out.replace(
            "pretraining", "")
        with pytest.raises(SystemExit) as e:
            run_main(script.main, ["--budgets", "0", "--out-dir", str(tmp_path)])
        assert e.value.code == 2 and "--budgets" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
