"""The o1 roadmap, part 1: rewards. Monte-Carlo step values and shaping against hand
computations on a scripted policy; reward models read the right positions, see the policy's
confidence, learn soft targets, and save / load as their kind."""

import pytest
import torch

from minillm.methods import o1, o1_reward
from minillm.model import GPT, ModelConfig
from minillm.tasks import chain_text
from tests.test_o1 import ANS, P, Q, S1, S2, WRONG1, ScriptedLM, one_thread  # noqa: F401 (autouse)


# --- Monte-Carlo step values and shaping ----------------------------------------------------------

def test_mc_step_values_on_a_scripted_policy_equal_the_hand_computation():
    after_s1 = Q + chain_text([S1])
    after_s2 = Q + chain_text([S1, S2])
    after_wrong = Q + chain_text([WRONG1])
    lm = ScriptedLM({
        # from step 1: 3 of 4 rollouts end with the right answer
        after_s1: [f"{S2}\nA: 82\n", f"{S2}\nA: 82\n", "4+3+1=9, write 9 carry 0\nA: 92\n",
                   f"{S2}\nA: 82\n"],
        # from step 2: 2 of 4 (one has no answer line at all)
        after_s2: ["A: 82\n", "A: 81\n", "A: 82\n", "I do not know\n"],
        after_wrong: ["4+3+1=8, write 8 carry 0\nA: 83\n"] * 3 + ["A: 82\n"],
    })
    chains = [[S1, S2, ANS], [S1, S2, "A: 81"], [WRONG1]]
    values, tokens = o1_reward.mc_step_values(lm, [P, P, P], chains, rollouts=4, max_new_tokens=64)
    # the second chain's first two steps share prefixes with the first: the script keeps turning,
    # so they see the same four completions again (the scripted cycle has length 4)
    assert values == [[3 / 4, 2 / 4, 1.0], [3 / 4, 2 / 4, 0.0], [1 / 4]]
    # every rollout's characters and its end-of-text token
    assert tokens == (2 * sum(map(len, lm.script[after_s1]))
                      + 2 * sum(map(len, lm.script[after_s2]))
                      + sum(map(len, lm.script[after_wrong])) + 5 * 4)
    assert len(lm.calls) == 1 and len(lm.calls[0][0]) == 5 * 4  # one batched call, 5 prefixes x 4


def test_mc_step_tokens_are_the_completions_tokens():
    after_s1 = Q + chain_text([S1])
    lm = ScriptedLM({after_s1: ["A: 82\n", "A: 8\n"]})
    values, tokens = o1_reward.mc_step_values(lm, [P], [[S1]], rollouts=2, max_new_tokens=64)
    assert values == [[0.5]] and tokens == len("A: 82\n") + len("A: 8\n") + 2  # + end of text


def test_shaped_rewards_telescope_to_the_outcome_minus_the_initial_value():
    values, outcome, initial = [0.5, 0.75, 1.0], 1.0, 0.25
    rewards = o1_reward.shaped_rewards(values, outcome, initial, gamma=1.0)
    # r'_1 = 0 + 0.5 - 0.25, r'_2 = 0 + 0.75 - 0.5, r'_3 = 1 + 0 (terminal) - 0.75
    assert rewards == pytest.approx([0.25, 0.25, 0.25])
    assert sum(rewards) == pytest.approx(outcome - initial)
    discounted = o1_reward.shaped_rewards(values, outcome, initial, gamma=0.5)
    assert discounted == pytest.approx([0.5 * 0.5 - 0.25, 0.5 * 0.75 - 0.5, 1.0 - 0.75])


# --- reward models --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return o1.arithmetic_tokenizer()


def test_reward_model_reads_the_last_token_of_every_step_and_learns_soft_targets(tok, tmp_path):
    torch.manual_seed(0)
    policy = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                             n_embd=16))
    rm = o1_reward.ProcessRewardModel(policy, tok)
    ids, ends = rm.encode(P, [S1, S2])
    assert tok.decode(ids[:ends[0] + 1]) == Q
    assert tok.decode(ids[:ends[2] + 1]) == Q + S1 + "\n" + S2 + "\n"
    assert rm.score([P], [S1 + "\n"]) == [0.5]  # the head starts at zero
    # the head reads the final norm's output: the same as the LM head's input
    h = rm.hidden_states(torch.tensor([ids]))
    assert torch.allclose(policy.lm_head(h), policy(torch.tensor([ids])).logits, atol=1e-6)
    # a right chain after one step is worth 0.8, a wrong one 0.1; the final answers 1 and 0
    examples = [o1_reward.RewardExample(P, [S1, S2, ANS], [0.8, None, 1.0]),
                o1_reward.RewardExample(P, [WRONG1, "A: 83"], [0.1, 0.0])]
    trained = o1_reward.train_prm(policy, tok, examples, steps=150, batch_size=2, lr=3e-3, log=None)
    right, wrong = trained.score_steps(P, [S1, S2, ANS]), trained.score_steps(P, [WRONG1, "A: 83"])
    assert right[0] == pytest.approx(0.8, abs=0.05) and right[2] > 0.95
    assert wrong[0] == pytest.approx(0.1, abs=0.05) and wrong[1] < 0.05
    assert trained.score([P], [chain_text([WRONG1])]) == pytest.approx([wrong[0]])
    assert all(p.grad is None for p in policy.parameters())  # the policy itself is untouched
    trained.save(tmp_path / "prm.pt")
    loaded = o1_reward.ProcessRewardModel.load(tmp_path / "prm.pt")
    assert isinstance(loaded, o1_reward.ProcessRewardModel)
    assert loaded.score_steps(P, [S1, S2]) == pytest.approx(trained.score_steps(P, [S1, S2]))
    with pytest.raises(o1_reward.UserError, match="of kind 'prm', not 'orm'"):
        o1_reward.OutcomeRewardModel.load(tmp_path / "prm.pt")


def test_reward_model_confidence_is_the_policys_lowest_and_mean_token_logprob(tok):
    torch.manual_seed(0)
    policy = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                             n_embd=16))
    rm = o1_reward.OutcomeRewardModel(policy, tok)
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
    examples = o1_reward.outcome_examples([P], [chains])
    assert [e.targets for e in examples] == [[None, None, 1.0], [None, 0.0]]
    orm = o1_reward.train_orm(policy, tok, [P], [chains], steps=60, batch_size=2, lr=3e-3, log=None)
    right, wrong = orm.score([P, P], chains[:2])
    assert right > 0.9 and wrong < 0.1
    orm.save(tmp_path / "orm.pt")
    loaded = o1_reward.RewardModel.load(tmp_path / "orm.pt")
    assert loaded.score([P], chains[:1]) == pytest.approx([right])


def test_process_examples_carry_the_mc_values_of_every_step():
    lm = ScriptedLM({Q + chain_text([S1]): [f"{S2}\nA: 82\n", "A: 1\n"]})
    examples, tokens = o1_reward.process_examples(lm, [P], [[f"{S1}\nA: 82\n"]], rollouts=2,
                                           max_new_tokens=64)
    assert [(e.steps, e.targets) for e in examples] == [([S1, ANS], [0.5, 1.0])]
    assert tokens == len(f"{S2}\nA: 82\n") + len("A: 1\n") + 2
