import dataclasses
import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

import minillm.methods.o1_learning as ol
from minillm.errors import UserError
from minillm.generate import continuation_logprobs
from minillm.methods.o1_learning import (
    LearnConfig,
    Rollout,
    dpo_loss,
    group_advantages,
    grpo_loss,
    kl_exact,
    kl_k3,
    make_batch,
    preference_pairs,
    run_rounds,
    sequence_logprobs,
    token_logprobs,
    verified_chains,
)
from minillm.model import GPT, ModelConfig
from minillm.tasks import Arithmetic, prompt
from minillm.tokenizer import train_bpe

PROBLEMS = Arithmetic().problems(level=1, n=40, split="train", seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and much faster on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return train_bpe([prompt(p) + p.solution for p in PROBLEMS], vocab_size=300)


def tiny_gpt(tok, seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=32))


# --- log-probabilities ---

def test_sequence_logprobs_equal_unpadded_scoring_and_skip_the_prompt(tok):
    model = tiny_gpt(tok).eval()
    prompts = [tok.encode_ordinary(prompt(p)) for p in PROBLEMS[:3]]
    completions = [tok.encode_ordinary(p.solution) + [tok.eot_id] for p in PROBLEMS[:3]]
    completions[1] = completions[1][:2]  # lengths differ: right padding in one batch
    batch = make_batch(prompts, completions, pad_id=tok.eot_id)
    assert batch.mask.sum(-1).tolist() == [len(c) for c in completions]
    got = sequence_logprobs(model, batch)
    want = [float(x.sum()) for x in continuation_logprobs(model, prompts, completions)]
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=1e-5)
    # exactly the completion tokens carry a log-probability
    assert (token_logprobs(model, batch) != 0).sum(-1).tolist() == [len(c) for c in completions]


# --- losses against hand computations ---

def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]), eps=0.0)
    # group 1: mean 0.5, sample std sqrt(4 * 0.25 / 3) (TRL divides by G - 1); group 2: all equal
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(adv[0], torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]))
    assert group_advantages(torch.tensor([[1.0, 1.0, 1.0]]), eps=1e-4).tolist() == [[0.0, 0.0, 0.0]]
    r = torch.tensor([[2.0, 0.0, 1.0]])
    std = math.sqrt(((2 - 1) ** 2 + 1 + 0) / 2)
    torch.testing.assert_close(group_advantages(r, eps=0.1),
                               torch.tensor([[1 / (std + 0.1), -1 / (std + 0.1), 0.0]]))


def test_grpo_loss_by_hand():
    logp = torch.tensor([[-1.0, -0.5, 0.0], [-2.0, -1.0, -0.3]])
    old = torch.tensor([[-1.2, -0.5, 0.0], [-1.0, -1.1, 0.0]])
    ref = torch.tensor([[-1.1, -0.4, 0.0], [-2.0, -0.9, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.5, -0.5])
    eps, beta = 0.2, 0.1

    def k3(lp, rf):
        return math.exp(rf - lp) - (rf - lp) - 1

    def token(lp, od, rf, a):
        rho = math.exp(lp - od)
        surrogate = min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
        return -(surrogate - beta * k3(lp, rf))

    # sequence 1: tokens 1-2 (rho = e^0.2 = 1.22 is clipped to 1.2 for A > 0; rho = 1)
    seq1 = (token(-1.0, -1.2, -1.1, 1.5) + token(-0.5, -0.5, -0.4, 1.5)) / 2
    # sequence 2: rho = e^-1 = 0.37 (clip at 0.8 is the min for A < 0), e^0.1, e^-0.3
    seq2 = (token(-2.0, -1.0, -2.0, -0.5) + token(-1.0, -1.1, -0.9, -0.5)
            + token(-0.3, 0.0, 0.0, -0.5)) / 3
    kl = kl_k3(logp, ref)
    got = grpo_loss(logp, old, adv, mask, kl, clip_eps=eps, kl_coef=beta)
    assert got.item() == pytest.approx((seq1 + seq2) / 2, rel=1e-6)
    # per-token advantages (B, T) equal to the broadcast (B,) ones give the same loss
    assert grpo_loss(logp, old, adv[:, None].expand(2, 3), mask, kl, eps, beta).item() == \
        pytest.approx(got.item(), rel=1e-6)
    # clipping matters: sequence 1's first token with rho = 1.22 > 1.2 has no gradient
    lp = logp.clone().requires_grad_(True)
    grpo_loss(lp, old, adv, mask, torch.zeros_like(lp), eps, 0.0).backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] != 0 and lp.grad[0, 2] == 0
    # the clipped-token gauge marks exactly the completion tokens that get no gradient
    ratio = (logp - old).exp()
    assert torch.equal(ol.clipped_tokens(ratio, adv[:, None].expand(2, 3), eps) & mask,
                       (lp.grad == 0) & mask)


def test_process_advantages_by_hand():
    # one group: chain 1 has steps rewarded 1, 0; chain 2 has one step rewarded 1
    # all step rewards: mean 2/3, sample std sqrt((1/9 + 4/9 + 1/9) / 2) = sqrt(1/3)
    m, sd = 2 / 3, math.sqrt(1 / 3)
    got = ol.process_advantages([[1.0, 0.0], [1.0]], eps=0.0)
    n1, n0 = (1 - m) / sd, (0 - m) / sd
    assert got[0] == pytest.approx([n1 + n0, n0]) and got[1] == pytest.approx([n1])
    assert ol.process_advantages([[], []]) == [[], []]
    assert ol.process_advantages([[1.0], []]) == [[0.0], []]  # one step reward: no spread
    # tokens take their step's advantage; the step end belongs to its step; the tail to the last
    nl = 9
    assert ol.token_advantages([1, 2, nl, 3, nl, 0], [0.5, -1.0], {nl}) == [0.5, 0.5, 0.5, -1.0, -1.0, -1.0]
    assert ol.token_advantages([1, 2], [], {nl}) == [0.0, 0.0]


def test_dpo_loss_by_hand():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    beta = 0.5
    margins = [beta * ((-3.0 + 3.5) - (-4.0 + 3.0)), beta * ((-5.0 + 4.0) - (-2.0 + 2.5))]
    want = sum(math.log(1 + math.exp(-m)) for m in margins) / 2
    assert dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta).item() == pytest.approx(want)
    # at the reference the loss is log 2 whatever beta
    assert dpo_loss(chosen, rejected, chosen, rejected, 3.0).item() == pytest.approx(math.log(2))


def test_kl_terms_by_hand_and_zero_at_the_reference(tok):
    lp, rf = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_k3(lp, rf).item() == pytest.approx(0.5 - math.log(0.5) - 1)
    p, q = torch.tensor([[[0.5, 0.25, 0.25]]]), torch.tensor([[[0.25, 0.25, 0.5]]])
    assert kl_exact(p.log(), q.log()).item() == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5))
    # the policy equal to the reference: both KL terms are exactly zero on real batches
    model = tiny_gpt(tok)
    reference = tiny_gpt(tok)
    batch = make_batch([tok.encode_ordinary(prompt(p)) for p in PROBLEMS[:4]],
                       [tok.encode_ordinary(p.solution) for p in PROBLEMS[:4]], tok.eot_id)
    logp, logp_full = token_logprobs(model, batch, full=True)
    ref, ref_full = token_logprobs(reference, batch, full=True)
    assert kl_k3(logp, ref).abs().max().item() == 0.0
    assert kl_exact(logp_full, ref_full).abs().max().item() == 0.0
    # and differs from zero (positive) for another policy
    other = token_logprobs(tiny_gpt(tok, seed=1), batch, full=True)
    assert (kl_k3(other[0], ref)[batch.mask] > 0).all()
    assert (kl_exact(other[1], ref_full) > 0).all()


# --- data from sampling ---

def rollout(problem, text, tok):
    return Rollout(problem, text, tok.encode_ordinary(prompt(problem)), tok.encode_ordinary(text),
                   float(text == problem.solution))


def test_expert_iteration_keeps_only_verified_chains(tok):
    p, q = PROBLEMS[0], PROBLEMS[1]
    wrong_answer = p.solution.replace(f"A: {p.answer}", f"A: {int(p.answer) + 1}")
    groups = [[rollout(p, p.solution, tok), rollout(p, wrong_answer, tok), rollout(p, p.solution, tok),
               rollout(p, "garbage", tok)],
              [rollout(q, "A: 12345\n", tok)]]
    kept = verified_chains(groups, per_question=4)
    assert [(r.problem, r.text) for r in kept] == [(p, p.solution)]  # duplicates once
    # a checker that accepts everything keeps every distinct text, at most per_question each
    assert len(verified_chains(groups, per_question=2, verify=lambda *_: True)) == 3


def test_expert_iteration_by_scores_keeps_each_questions_best_chain(tok, tmp_path, monkeypatch):
    p, q = PROBLEMS[0], PROBLEMS[1]
    groups = [[rollout(p, t, tok) for t in ("a\n", "bbb\n", "cc\n")],
              [rollout(q, t, tok) for t in ("dd\n", "e\n")]]
    scores = [[0.1, 0.9, 0.5], [0.3, 0.3]]
    assert [r.text for r in ol.best_chains(groups, scores)] == ["bbb\n", "dd\n"]  # first on ties
    # in a round: the scorer (here: longest text wins) decides, never the checker
    policy, questions, sft, evals = setup_run(tok)
    monkeypatch.setattr(ol, "check", lambda problem, text: False)
    cfg = LearnConfig(method="expert", keep="scores", rounds=1, steps_per_round=1, batch_size=2,
                      questions_per_round=3, group_size=3, max_new_tokens=12, temperature=1.5)
    with pytest.raises(UserError, match="scorer"):
        run_rounds(cfg, policy, tok, questions, sft, evals, tmp_path / "x.pt", log=lambda s: None)
    scored = []

    def longest(problems, texts):
        scored.append(texts)
        return [float(len(t)) for t in texts]
    history = run_rounds(cfg, policy, tok, questions, sft, evals, tmp_path / "s.pt",
                         scorer=longest, log=lambda s: None)
    assert history[1]["kept"] == 3 and history[1]["steps"] == 1 and len(scored) == 3
    data = ol.load_round_state(tmp_path / "s.pt", cfg)["data"]
    for texts, (_, completion) in zip(scored, data):
        assert tok.decode(completion).startswith(max(texts, key=len))


def test_preference_pairs_are_a_correct_and_a_wrong_chain_of_one_question(tok):
    p, q = PROBLEMS[0], PROBLEMS[1]
    wrong = [p.solution.replace(f"A: {p.answer}", f"A: {k}") for k in (1001, 1002, 1003)]
    groups = [[rollout(p, p.solution, tok)] + [rollout(p, w, tok) for w in wrong],
              [rollout(q, q.solution, tok)] * 3]  # all right: no pair
    pairs = preference_pairs(groups, per_question=2, rng=random.Random(0))
    assert len(pairs) == 2 and len({b.text for _, b in pairs}) == 2
    assert all(a.problem == b.problem == p and a.reward == 1 and b.reward == 0 for a, b in pairs)


def test_a_pair_is_cut_after_its_first_differing_step():
    nl = 9
    chosen = [1, 2, nl, 3, 4, nl, 5, 6, nl]
    rejected = [1, 2, nl, 3, 7, 7, nl, 8, nl]
    assert ol.cut_at_first_difference(chosen, rejected, {nl}) == ([1, 2, nl, 3, 4, nl],
                                                                  [1, 2, nl, 3, 7, 7, nl])
    # a chain that ends without a step end is kept whole; a prefix pair differs at the shorter end
    assert ol.cut_at_first_difference([1, 2], [1, 3, 4], {nl}) == ([1, 2], [1, 3, 4])
    assert ol.cut_at_first_difference([1, nl], [1, nl, 5, nl], {nl}) == ([1, nl], [1, nl, 5, nl])


# --- the methods move the policy the right way ---

def test_grpo_and_dpo_steps_raise_the_likelihood_of_correct_chains(tok):
    p = PROBLEMS[2]
    wrong = p.solution.replace(f"A: {p.answer}", f"A: {int(p.answer) + 3}")
    chains = [rollout(p, p.solution, tok), rollout(p, wrong, tok)] * 2
    for r in chains:
        r.completion = r.completion + [tok.eot_id]
    cfg = LearnConfig(steps_per_round=10, batch_size=4, lr=3e-3, kl_coef=0.0)
    batch = make_batch([r.prompt_ids for r in chains[:2]], [r.completion for r in chains[:2]], tok.eot_id)
    step_ends = {t for t in range(tok.vocab_size) if "\n" in tok.decode([t])}

    def oracle_steps(problem, steps):  # 1 for a step of the worked solution, 0 otherwise
        return [float(a == b) for a, b in zip(steps, ol.split_steps(problem.solution))]
    for method in ("grpo", "grpo-process", "dpo"):
        model, reference = tiny_gpt(tok), tiny_gpt(tok)
        with torch.no_grad():
            before = sequence_logprobs(model, batch)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        if method == "grpo":
            ol.grpo_steps(model, reference, opt, [chains], cfg, random.Random(0), tok.eot_id)
        elif method == "grpo-process":
            ol.grpo_steps(model, reference, opt, [chains], cfg, random.Random(0), tok.eot_id,
                          oracle_steps, step_ends)
        else:
            ol.dpo_steps(model, reference, opt, [(chains[0], chains[1])], cfg, random.Random(0),
                         tok.eot_id)
        with torch.no_grad():
            after = sequence_logprobs(model, batch)
        gap_before, gap_after = before[0] - before[1], after[0] - after[1]
        assert gap_after > gap_before + 1.0, method


# --- rounds: state and resume ---

def setup_run(tok):
    policy = tiny_gpt(tok)
    questions = Arithmetic().problems(level=1, n=8, split="train", seed=1)
    evals = {"held_out": Arithmetic().problems(level=1, n=4, split="test", seed=0)}
    return policy, questions, PROBLEMS[:8], evals


def scripted_step_scores(problem, steps):
    return [float(len(step) % 2) for step in steps]


def _run(tok, cfg, path, log=lambda s: None):
    policy, questions, sft, evals = setup_run(tok)
    history = run_rounds(cfg, policy, tok, questions, sft, evals, path,
                         step_scorer=scripted_step_scores, log=log)
    return policy, [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.mark.parametrize("method", ["expert", "grpo", "grpo-exact", "grpo-process", "dpo",
                                    "dpo-cut-nll", "dpo-round", "sft"])
def test_a_killed_run_resumes_at_its_round_and_matches_an_uninterrupted_one(tok, tmp_path, method,
                                                                             monkeypatch):
    variants = {"grpo-exact": {"kl_estimator": "exact"}, "grpo-process": {"grpo_rewards": "process"},
                "dpo-cut-nll": {"dpo_cut": True, "dpo_nll_coef": 0.5}, "dpo-round": {"reference": "round"}}
    # the warmup (3 steps) ends in round 2: a resumed run must continue the schedule, not restart it
    cfg = dict(method=method.split("-")[0], steps_per_round=2, batch_size=4, questions_per_round=4,
               group_size=3, max_new_tokens=24, lr=1e-3, warmup_steps=3, temperature=1.5,
               **variants.get(method, {}))
    # an untrained policy is never right: a checker that accepts even lengths gives every method
    # mixed rewards, so kept chains (expert), advantages (grpo) and pairs (dpo) are exercised
    monkeypatch.setattr(ol, "check", lambda problem, text: len(text) % 2 == 0)
    straight, want = _run(tok, LearnConfig(rounds=3, **cfg), tmp_path / "a.pt")
    assert [r["round"] for r in want] == [0, 1, 2, 3]
    assert all(r["steps"] == 2 for r in want[1:])
    # lr * min(1, (step + 1) / 4) after 2, 4, 6 steps
    assert [r["lr"] for r in want[1:]] == pytest.approx([0.75e-3, 1e-3, 1e-3])
    if method != "sft":
        assert all(0 < r["sample_reward"] < 1 for r in want[1:])
    # killed during round 2: its sampling raises after round 1 was saved
    real, calls = ol.sample_rollouts, []

    def dies_in_round_2(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(ol, "sample_rollouts", dies_in_round_2)
    if method == "sft":  # the control samples nothing: it dies in its second round's steps
        real_sft = ol.sft_steps

        def sft_dies(*args, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real_sft(*args, **kw)
        monkeypatch.setattr(ol, "sft_steps", sft_dies)
    with pytest.raises(KeyboardInterrupt):
        _run(tok, LearnConfig(rounds=3, **cfg), tmp_path / "b.pt")
    monkeypatch.setattr(ol, "sample_rollouts", real)
    if method == "sft":
        monkeypatch.setattr(ol, "sft_steps", real_sft)
    assert ol.load_round_state(tmp_path / "b.pt", LearnConfig(rounds=3, **cfg))["round"] == 1
    logs = []
    resumed, got = _run(tok, LearnConfig(rounds=3, **cfg), tmp_path / "b.pt", log=logs.append)
    assert "resuming after round 1" in logs[0]
    assert got == want
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_a_per_round_reference_is_the_policy_at_the_start_of_each_round(tok, tmp_path, method,
                                                                        monkeypatch):
    # one step a round: the round's gauges are measured at its first step, before any update
    monkeypatch.setattr(ol, "check", lambda problem, text: len(text) % 2 == 0)
    cfg = {"method": method, "rounds": 3, "steps_per_round": 1, "batch_size": 4, "questions_per_round": 4,
               "group_size": 3, "max_new_tokens": 24, "lr": 1e-2, "temperature": 1.5}
    gauge = "kl" if method == "grpo" else "chosen"
    for reference in ("initial", "round"):
        _, history = _run(tok, LearnConfig(reference=reference, **cfg), tmp_path / f"{reference}.pt")
        assert history[1][gauge] == 0.0  # round 1: the policy is the initial policy
        later = [r[gauge] for r in history[2:]]
        if reference == "round":  # KL and implicit rewards are exactly zero at the reference
            assert later == [0.0, 0.0] and all(r["rejected"] == 0.0 for r in history[1:]
                                               if method == "dpo")
        else:  # the frozen initial reference: the policy has moved away from it
            assert all(abs(g) > 1e-6 for g in later)


def test_more_rounds_continue_and_other_settings_are_refused(tok, tmp_path):
    cfg = {"method": "grpo", "steps_per_round": 1, "batch_size": 4, "questions_per_round": 2, "group_size": 2,
               "max_new_tokens": 16}
    _, one = _run(tok, LearnConfig(rounds=1, **cfg), tmp_path / "s.pt")
    _, two = _run(tok, LearnConfig(rounds=2, **cfg), tmp_path / "s.pt")
    assert two[:2] == one and len(two) == 3
    with pytest.raises(UserError, match="lr"):
        _run(tok, LearnConfig(rounds=2, **{**cfg, "lr": 0.5}), tmp_path / "s.pt")
    with pytest.raises(UserError, match="method"):
        LearnConfig(method="ppo").validate()
    with pytest.raises(UserError, match="warmup"):
        LearnConfig(warmup_steps=-1).validate()


# --- the script ---

def test_script_runs_at_a_tiny_size_and_a_second_run_resumes(tmp_path, capsys):
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("o1_learn_script", root / "scripts/o1_learn.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = script.O1LearnConfig(out_dir=str(tmp_path), tiny=True, threads=1)
    first = script.main(cfg)
    results = first["results"]
    assert list(results) == ["sft", "expert", "grpo", "dpo"]
    assert all([r["round"] for r in h] == [0, 1] for h in results.values())
    # one policy: every learner starts from the same greedy accuracy
    assert len({h[0]["acc/level2"] for h in results.values()}) == 1
    assert results["sft"][1]["steps"] == results["grpo"][1]["steps"] == 2
    # each learner at its own learning rate, warmed up over 1 step (the tiny policy is never
    # right: expert iteration and DPO find nothing to learn from and take no step)
    for method, history in results.items():
        factor = min(1.0, (history[1]["steps"] + 1) / 2)
        assert history[1]["lr"] == pytest.approx(factor * getattr(cfg, f"{method}_lr")), method
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"] == results
    capsys.readouterr()
    second = script.main(cfg)  # every round is done: nothing is trained again
    assert second["results"] == results
    assert capsys.readouterr().out.count("resuming after round 1") == 4
    with pytest.raises(UserError, match="methods"):
        script.main(dataclasses.replace(cfg, methods=["ppo"]))
    for bad, flag in (({"dpo_reference": "sometimes"}, "--dpo-reference"),
                      ({"grpo_lr": 0.0}, "--grpo-lr"), ({"question_pool": 0}, "--question-pool")):
        with pytest.raises(UserError, match=flag):
            script.main(dataclasses.replace(cfg, **bad))


def test_script_with_reward_models_at_a_tiny_size(tmp_path):
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("o1_learn_script_rm", root / "scripts/o1_learn.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = script.O1LearnConfig(out_dir=str(tmp_path), tiny=True, threads=1, keep="scores",
                               grpo_rewards="process", rm_questions=4, rm_chains=2, prm_rollouts=2,
                               rm_steps=4)
    results = script.main(cfg)["results"]
    # the ORM picks one chain per question whatever the checker says (the tiny policy is never
    # right); GRPO's per-step rewards from the PRM give it a loss where outcome rewards give none
    assert results["expert"][1]["kept"] == 4 and results["expert"][1]["sample_reward"] == 0
    assert results["grpo"][1]["steps"] == 2 and abs(results["grpo"][1]["loss"]) > 0.01
    assert (tmp_path / "orm.pt").is_file() and (tmp_path / "prm.pt").is_file()
    with pytest.raises(UserError, match="other settings"):
        script.main(dataclasses.replace(cfg, rm_steps=5))


def test_tiny_keeps_the_flags_the_user_gave():
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("o1_learn_tiny", root / "scripts/o1_learn.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--tiny", "true", "--eval-problems", "5", "--rounds", "3"]
    cfg = script.tiny(script.parse_config(script.O1LearnConfig, argv),
                      script.given_fields(script.O1LearnConfig, argv))
    assert (cfg.eval_problems, cfg.rounds) == (5, 3)  # given: kept
    assert (cfg.steps_per_round, cfg.batch_size) == (2, 4)  # not given: the smoke run's
