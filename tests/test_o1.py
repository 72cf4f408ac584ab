"""The o1 roadmap, part 1: Monte-Carlo step values, shaping, reward models, token budgets, search
(MCTS, beam search) on scripted policies, and policy training / reuse at a tiny size."""

import math

import pytest
import torch

from minillm import o1
from minillm.generate import Completion
from minillm.model import GPT, ModelConfig
from minillm.tasks import make_problem, prompt


class ScriptedLM:
    """A `LanguageModel` that answers each prompt from a script: `script[prompt]` is a list of
    completions handed out in turn (cycling). A completion costs one token per character; stop
    strings cut it as a backend does. Every call is recorded."""

    def __init__(self, script):
        self.script, self.turn, self.calls = script, {}, []

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
                 stop=(), seed=None):
        self.calls.append((list(prompts), max_new_tokens, tuple(stop)))
        out = []
        for p in prompts:
            options = self.script[p]
            text = options[self.turn.get(p, 0) % len(options)]
            self.turn[p] = self.turn.get(p, 0) + 1
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


# --- Monte-Carlo step values and shaping -----------------------------------------------------------

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
    assert tokens == (2 * sum(map(len, lm.script[after_s1])) + 2 * sum(map(len, lm.script[after_s2]))
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


# --- reward models ---------------------------------------------------------------------------------

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


def test_the_orm_learns_the_checker_labels_of_sampled_chains(tok, tmp_path):
    torch.manual_seed(0)
    policy = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                             n_embd=16))
    chains = [P.solution, f"{WRONG1}\nA: 83\n", ""]
    assert [e.targets for e in o1.outcome_examples([P], [chains])] == [[None, None, 1.0], [None, 0.0]]
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


# --- token budgets ---------------------------------------------------------------------------------

def test_token_budget_charges_completion_tokens_and_refuses_what_it_cannot_cover():
    lm = ScriptedLM({Q: ["abc", "abcdefgh"]})
    budget = o1.TokenBudget(lm, limit=20)
    assert budget.affordable(8) == 2
    budget.generate([Q, Q], max_new_tokens=8)
    assert budget.spent == 3 + 8 and budget.remaining == 9 and budget.prompt_tokens == 2 * len(Q)
    with pytest.raises(o1.BudgetExceeded):
        budget.generate([Q, Q], max_new_tokens=5)
    assert budget.spent == 11 and budget.affordable(5) == 1


# --- policy initialisation -------------------------------------------------------------------------

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
