"""Learning from search (the o1 roadmap, part 2): expert iteration, GRPO and DPO in rounds.

Zeng et al. 2024 ("Scaling of Search and Learning: a Roadmap to Reproduce o1") close the loop of
the roadmap with learning: the policy searches, a reward says which of its chains are good, and
the policy is trained on that signal, round after round. Three ways to learn, each a `method` of
`run_rounds`, plus the control they are compared with:

- `expert`: expert iteration / rejection-sampling fine-tuning (Anthony et al. 2017; STaR, Zelikman
  et al. 2022; RFT, Yuan et al. 2023). Sample `group_size` chains per question, keep the ones the
  checker verifies (`keep="verified"`) or the one an outcome reward model scores highest
  (`keep="scores"`, scores given by the caller), add them to a growing data set, fine-tune on it.
- `grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath). A question's group of
  samples is its own baseline: advantage = (reward - group mean) / (group std + eps), the same for
  every token of a chain; the PPO clipped ratio objective against the sampling policy; a per-token
  KL penalty to the frozen reference policy, by Schulman's k3 estimator (`kl_estimator="k3"`, what
  DeepSeekMath uses) or exactly over the vocabulary (`"exact"`). The reward is the checker's
  outcome (1 correct, 0 not), or, with `grpo_rewards="process"`, a step scorer's per-step rewards
  (e.g. a process reward model's), as DeepSeekMath's process supervision.
- `dpo`: Direct Preference Optimization (Rafailov et al. 2023) on pairs from sampling, a verified
  chain (chosen) and a wrong one (rejected) of the same question, with the frozen reference policy.
  `dpo_nll_coef` > 0 adds the chosen chains' length-normalised NLL, as Iterative Reasoning
  Preference Optimization does (Pang et al. 2024): plain DPO can lower the likelihood of the chosen
  chains too, and a correct and a wrong chain here share most of their tokens.
- `sft`: the control, plain supervised fine-tuning on the original worked solutions, with the same
  optimizer and the same number of steps per round.

GRPO's and DPO's reference is the initial policy, frozen, or (`reference="round"`) the policy at
the start of each round: iterative DPO (Pang et al. 2024) and DeepSeekMath's iterative RL. The
learning rate warms up linearly, then stays constant (the DPO authors' schedule). Where this
departs from TRL's trainers and the DPO authors' code is listed in DESIGN.md.

Every log-probability here is `sequence_logprobs`-style: the sum of token log-probs over the
completion tokens only (the prompt and the right padding are masked), from one batched forward pass.
A completion ends with <|endoftext|> when the policy stopped by itself, so that stopping is learned.

Rounds are resumable: after each round the policy, the optimizer, the round index, the RNG state,
the expert-iteration data and the per-round history are written to one file atomically; a killed
run restarts the round it was in and, since each round draws its questions and samples from seeds
fixed by (seed, round), produces the same numbers as a run that was never stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_torch_file, save_checkpoint
from ..errors import UserError
from ..generate import LocalLM
from ..model import GPT
from ..tasks import Problem, check, prompt, split_steps
from ..tokenizer import Tokenizer

STATE_FORMAT = "minillm.methods.o1_learning"
METHODS = ("expert", "grpo", "dpo", "sft")


# --- completion batches and their log-probabilities -------------------------------------------------

@dataclass
class TokenBatch:
    """Right-padded prompt + completion sequences, shifted for next-token prediction. All (B, T):
    `inputs` are the sequences but the last token, `targets` all but the first, and `mask` is True
    where the target is a completion token (prompt targets and padding are False)."""
    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def make_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               pad_id: int = 0, device: str | torch.device = "cpu") -> TokenBatch:
    if len(prompts) != len(completions) or not prompts:
        raise ValueError("make_batch needs as many prompts as completions, at least one")
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token (the first target is predicted from it)")
    T = max(len(s) for s in seqs) - 1
    inputs_BT = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets_BT = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        n = len(s) - 1
        inputs_BT[b, :n] = torch.as_tensor(s[:-1])
        targets_BT[b, :n] = torch.as_tensor(s[1:])
        mask_BT[b, len(p) - 1:n] = True  # the target at position t is token t + 1
    return TokenBatch(inputs_BT.to(device), targets_BT.to(device), mask_BT.to(device))


def token_logprobs(model: GPT, batch: TokenBatch, full: bool = False):
    """Log-probability (B, T) of every target token under `model` (zero where `mask` is False),
    differentiable; with `full`, also the whole log-distribution (B, T, V) (for the exact KL).
    Right padding needs no attention mask: a causal model never looks ahead at it."""
    logp_BTV = F.log_softmax(model(batch.inputs).logits.float(), dim=-1)
    logp_BT = logp_BTV.gather(-1, batch.targets[..., None])[..., 0] * batch.mask
    return (logp_BT, logp_BTV) if full else logp_BT


def sequence_logprobs(model: GPT, batch: TokenBatch) -> torch.Tensor:
    """log pi(completion | prompt) (B,): the sum of the completion tokens' log-probabilities."""
    return token_logprobs(model, batch).sum(-1)


# --- losses ------------------------------------------------------------------------------------------

def group_advantages(rewards_NG: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantages (N questions, G >= 2 samples each): (r - group mean) / (group std +
    eps), with the sample std (divide by G - 1), as TRL's GRPOTrainer. A group whose rewards are all
    equal gets zeros."""
    mean_N1 = rewards_NG.mean(dim=1, keepdim=True)
    std_N1 = rewards_NG.std(dim=1, unbiased=True, keepdim=True)
    return (rewards_NG - mean_N1) / (std_N1 + eps)


def kl_k3(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi || ref) per sampled token: r - log r - 1 with
    r = ref / pi. Non-negative, zero where the policy equals the reference, unbiased for tokens
    drawn from pi (GRPO draws them from the sampling policy, close to pi)."""
    log_ratio_BT = ref_logp_BT - logp_BT
    return log_ratio_BT.exp() - log_ratio_BT - 1


def kl_exact(logp_BTV: torch.Tensor, ref_logp_BTV: torch.Tensor) -> torch.Tensor:
    """KL(pi || ref) of the next-token distributions at every position (B, T): a sum over the
    vocabulary, exact where k3 samples one token."""
    return (logp_BTV.exp() * (logp_BTV - ref_logp_BTV)).sum(-1)


def process_advantages(step_rewards: Sequence[Sequence[float]], eps: float = 1e-4) -> list[list[float]]:
    """GRPO's process supervision (DeepSeekMath 4.1.3) for one group: every step reward is
    normalised by the mean and sample std (as `group_advantages`) of all step rewards in the group,
    and a step's advantage is the sum of the normalised rewards of that step and of the steps
    after it. Returns one advantage per step of every chain (zeros when there is only one)."""
    flat = [r for rewards in step_rewards for r in rewards]
    if not flat:
        return [[] for _ in step_rewards]
    mean = sum(flat) / len(flat)
    std = (sum((r - mean) ** 2 for r in flat) / (len(flat) - 1)) ** 0.5 if len(flat) > 1 else 0.0
    out = []
    for rewards in step_rewards:
        normed = [(r - mean) / (std + eps) for r in rewards]
        out.append([sum(normed[j:]) for j in range(len(normed))])
    return out


def token_advantages(completion: Sequence[int], step_advantages: Sequence[float],
                     step_ends: set[int]) -> list[float]:
    """Each completion token's advantage: that of the step it belongs to (step j holds the tokens
    after the j-th step end, up to and including the next one; tokens past the last scored step,
    such as <|endoftext|>, count to the last step). A chain with no step gets zeros."""
    if not step_advantages:
        return [0.0] * len(completion)
    out, step = [], 0
    for token in completion:
        out.append(step_advantages[min(step, len(step_advantages) - 1)])
        step += token in step_ends
    return out


def grpo_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages: torch.Tensor,
              mask_BT: torch.Tensor, kl_BT: torch.Tensor, clip_eps: float = 0.2,
              kl_coef: float = 0.04) -> torch.Tensor:
    """GRPO's objective, to minimise. Per token: -(min(rho A, clip(rho, 1 - eps, 1 + eps) A)
    - kl_coef KL) with rho = pi / pi_old; averaged over each completion's tokens, then over the
    completions (DeepSeekMath's 1/G sum_i 1/|o_i| sum_t). `advantages` is (B,) for outcome
    rewards or (B, T) per token (process rewards)."""
    adv_BT = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio_BT = (logp_BT - old_logp_BT).exp()
    surrogate_BT = torch.minimum(ratio_BT * adv_BT,
                                 ratio_BT.clamp(1 - clip_eps, 1 + clip_eps) * adv_BT)
    per_token_BT = -(surrogate_BT - kl_coef * kl_BT) * mask_BT
    per_seq_B = per_token_BT.sum(-1) / mask_BT.sum(-1).clamp(min=1)
    return per_seq_B.mean()


def clipped_tokens(ratio_BT: torch.Tensor, adv_BT: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """Where GRPO's min() takes the clipped term (B, T): the ratio has left [1 - eps, 1 + eps] in
    the direction the advantage favours, so the token gives no policy gradient (its KL term
    still does). TRL logs this fraction as the clip ratio."""
    return ((ratio_BT > 1 + clip_eps) & (adv_BT > 0)) | ((ratio_BT < 1 - clip_eps) & (adv_BT < 0))


def dpo_loss(chosen_B: torch.Tensor, rejected_B: torch.Tensor, ref_chosen_B: torch.Tensor,
             ref_rejected_B: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO: -log sigmoid(beta ((log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-)))), averaged
    over pairs; the arguments are sequence log-probabilities (B,)."""
    margin_B = beta * ((chosen_B - ref_chosen_B) - (rejected_B - ref_rejected_B))
    return -F.logsigmoid(margin_B).mean()


# --- rollouts, rewards and the data they give ---------------------------------------------------------

@dataclass
class Rollout:
    """One sampled chain: `completion` are its token ids, ending with <|endoftext|> when the
    policy stopped by itself (a chain cut at max_new_tokens has none)."""
    problem: Problem
    text: str
    prompt_ids: list[int]
    completion: list[int]
    reward: float = 0.0


def sample_rollouts(model: GPT, tokenizer: Tokenizer, problems: Sequence[Problem], n: int,
                    temperature: float, max_new_tokens: int, seed: int,
                    batch_size: int = 256) -> list[list[Rollout]]:
    """`n` chains per problem (a group each), rewarded by the exact checker (1.0 or 0.0)."""
    lm = LocalLM(model, tokenizer, batch_size=batch_size)
    prompts = [prompt(p) for p in problems for _ in range(n)]
    outs = lm.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    groups = []
    for i, problem in enumerate(problems):
        group = []
        for out in outs[i * n:(i + 1) * n]:
            stopped = out.finish_reason == "stop"  # ended at <|endoftext|> (counted in the budget)
            completion = list(out.token_ids) + ([tokenizer.eot_id] if stopped else [])
            group.append(Rollout(problem, out.text, tokenizer.encode_ordinary(prompt(problem)),
                                 completion, float(check(problem, out.text))))
        groups.append(group)
    return groups


def verified_chains(groups: Sequence[Sequence[Rollout]], per_question: int = 4,
                    verify: Callable[[Problem, str], bool] | None = None) -> list[Rollout]:
    """Expert iteration's filter: the chains `verify` (default: the exact checker) accepts,
    distinct texts only, at most `per_question` of each question."""
    verify = verify or check
    kept = []
    for group in groups:
        seen = set()
        for r in group:
            if len(seen) < per_question and r.text not in seen and verify(r.problem, r.text):
                seen.add(r.text)
                kept.append(r)
    return kept


def best_chains(groups: Sequence[Sequence[Rollout]], scores: Sequence[Sequence[float]]) -> list[Rollout]:
    """Expert iteration without a checker: each question's chain with the highest score (e.g. a
    trained outcome reward model's), first one on ties."""
    return [group[max(range(len(group)), key=lambda i: s[i])] for group, s in zip(groups, scores)]


def preference_pairs(groups: Sequence[Sequence[Rollout]], per_question: int,
                     rng: random.Random) -> list[tuple[Rollout, Rollout]]:
    """DPO pairs (chosen, rejected): a verified chain and a wrong one of the same question, drawn
    at random, at most `per_question` distinct pairs per question; a question whose samples are
    all right or all wrong gives none."""
    pairs = []
    for group in groups:
        good = list({r.text: r for r in group if r.reward > 0}.values())
        bad = list({r.text: r for r in group if r.reward <= 0}.values())
        combos = [(g, b) for g in good for b in bad]
        rng.shuffle(combos)
        pairs += combos[:per_question]
    return pairs


def cut_at_first_difference(chosen: Sequence[int], rejected: Sequence[int],
                            step_ends: set[int]) -> tuple[list[int], list[int]]:
    """A pair cut to a step-level preference (as in Step-DPO, Lai et al. 2024, with the step found
    from the pair itself): both chains up to the end of the first step where they differ (the
    first token in `step_ends`, e.g. the newline tokens, at or after the first differing token).
    Their common prefix cancels in DPO's margin anyway; what is cut is the rejected chain's
    continuation of its error, whose tokens are often right given that error."""
    first = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                 min(len(chosen), len(rejected)))

    def cut(ids):
        end = next((i for i in range(first, len(ids)) if ids[i] in step_ends), len(ids) - 1)
        return list(ids[:end + 1])
    return cut(chosen), cut(rejected)


# --- rounds ------------------------------------------------------------------------------------------

@dataclass
class LearnConfig:
    method: str = field(default="grpo", metadata={"help": "expert, grpo, dpo or sft (the control)"})
    rounds: int = 4
    steps_per_round: int = field(default=16, metadata={"help": "optimizer steps per round"})
    batch_size: int = field(default=16, metadata={"help": "chains per step (pairs for DPO)"})
    lr: float = 1e-4
    warmup_steps: int = field(default=0, metadata={
        "help": "linear warmup over the run's first optimizer steps, then constant (as the DPO "
                "authors' trainer: lr * min(1, (step + 1) / (warmup + 1))); 0: none"})
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    questions_per_round: int = 32
    group_size: int = field(default=8, metadata={"help": "samples per question"})
    temperature: float = 1.0
    max_new_tokens: int = 64
    keep: str = field(default="verified", metadata={
        "help": "expert iteration keeps the checker-verified chains (verified) or each question's "
                "best chain by the caller's scores, e.g. an outcome reward model (scores)"})
    keep_per_question: int = 4
    reference: str = field(default="initial", metadata={
        "help": "GRPO's and DPO's reference policy: the initial policy, frozen (initial), or the "
                "policy as it is at the start of each round (round: iterative DPO / iterative RL)"})
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    kl_estimator: str = field(default="k3", metadata={"help": "k3 or exact"})
    adv_eps: float = 1e-4
    grpo_rewards: str = field(default="outcome", metadata={
        "help": "outcome (the checker's, per chain) or process (a step scorer's, per step)"})
    dpo_beta: float = 0.1
    dpo_nll_coef: float = field(default=0.0, metadata={
        "help": "weight of the chosen chains' NLL added to the DPO loss (IRPO, Pang et al. 2024); "
                "0: plain DPO"})
    pairs_per_question: int = 2
    dpo_cut: bool = field(default=False, metadata={
        "help": "DPO compares a pair only up to the end of the first step where it differs"})
    seed: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.keep not in ("verified", "scores"):
            raise UserError(f"--keep {self.keep!r}: expected verified or scores")
        if self.grpo_rewards not in ("outcome", "process"):
            raise UserError(f"--grpo-rewards {self.grpo_rewards!r}: expected outcome or process")
        if self.kl_estimator not in ("k3", "exact"):
            raise UserError(f"--kl-estimator {self.kl_estimator!r}: expected k3 or exact")
        if self.reference not in ("initial", "round"):
            raise UserError(f"--reference {self.reference!r}: expected initial or round")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps {self.warmup_steps}: expected 0 or more")
        for name in ("rounds", "steps_per_round", "batch_size", "questions_per_round",
                     "group_size", "max_new_tokens", "keep_per_question", "pairs_per_question"):
            if getattr(self, name) < (0 if name == "rounds" else 1):
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} is too small")
        if not (self.lr > 0 and self.temperature > 0):
            raise UserError(f"--lr {self.lr} / --temperature {self.temperature}: both must be > 0")
        if self.method == "grpo" and self.group_size < 2:
            raise UserError("GRPO needs --group-size >= 2: a group of one has no relative advantage")


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant: step s runs at lr * min(1, (s + 1) / (warmup_steps + 1)), the
    DPO authors' schedule (their trainer's LambdaLR). One schedule for a learner's whole run."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))


def _step(model: GPT, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def _minibatches(n: int, batch_size: int, steps: int, rng: random.Random) -> list[list[int]]:
    """`steps` index lists of `batch_size` (fewer when n is smaller), through shuffled epochs."""
    order, out = [], []
    for _ in range(steps):
        batch = []
        while len(batch) < min(batch_size, n):
            if not order:
                order = rng.sample(range(n), n)
            batch.append(order.pop())
        out.append(batch)
    return out


def sft_steps(model: GPT, optimizer, examples: Sequence[tuple[list[int], list[int]]],
              cfg: LearnConfig, rng: random.Random, pad_id: int, scheduler=None) -> list[dict]:
    """Supervised steps on (prompt ids, completion ids): the mean NLL over completion tokens.
    Returns each step's {"loss"}."""
    device = model.wte.weight.device
    stats = []
    for idx in _minibatches(len(examples), cfg.batch_size, cfg.steps_per_round, rng):
        batch = make_batch([examples[i][0] for i in idx], [examples[i][1] for i in idx], pad_id, device)
        loss = -token_logprobs(model, batch).sum() / batch.mask.sum()
        _step(model, optimizer, loss, cfg.grad_clip, scheduler)
        stats.append({"loss": loss.item()})
    return stats


def grpo_steps(model: GPT, reference: GPT, optimizer, groups: Sequence[Sequence[Rollout]],
               cfg: LearnConfig, rng: random.Random, pad_id: int,
               step_scorer: Callable[[Problem, list[str]], list[float]] | None = None,
               step_ends: set[int] | None = None, scheduler=None) -> list[dict]:
    """GRPO updates on one round's groups: advantages per group, the sampling policy's log-probs
    computed once, then `steps_per_round` clipped updates on minibatches. Outcome advantages (the
    checker's reward, one per chain) by default; with a `step_scorer` (e.g. a process reward
    model's `score_steps`) process advantages per token, the chains' steps (`tasks.split_steps`)
    ending at the tokens in `step_ends`. Returns each step's {"loss", "kl": the mean per-token KL
    to the reference, "clipped": the fraction of tokens whose ratio is clipped (no gradient)}."""
    device = model.wte.weight.device
    rollouts = [r for g in groups for r in g]
    if step_scorer is None:
        rewards_NG = torch.tensor([[r.reward for r in g] for g in groups], dtype=torch.float32)
        adv = [[a] * len(r.completion) for a, r in
               zip(group_advantages(rewards_NG, cfg.adv_eps).reshape(-1).tolist(), rollouts)]
    else:
        adv = []
        for g in groups:
            per_step = process_advantages([step_scorer(r.problem, split_steps(r.text)) for r in g],
                                          cfg.adv_eps)
            adv += [token_advantages(r.completion, a, step_ends) for r, a in zip(g, per_step)]
    old = []  # log-probs under the sampling policy pi_old (the policy as it is now), per chain
    with torch.no_grad():
        for start in range(0, len(rollouts), 64):
            chunk = rollouts[start:start + 64]
            logp_BT = token_logprobs(model, make_batch([r.prompt_ids for r in chunk],
                                                       [r.completion for r in chunk], pad_id, device))
            old += [logp_BT[b, :len(r.prompt_ids) + len(r.completion) - 1] for b, r in enumerate(chunk)]
    stats = []
    for idx in _minibatches(len(rollouts), cfg.batch_size, cfg.steps_per_round, rng):
        chosen = [rollouts[i] for i in idx]
        batch = make_batch([r.prompt_ids for r in chosen], [r.completion for r in chosen], pad_id, device)
        old_BT = torch.zeros_like(batch.mask, dtype=torch.float32)
        adv_BT = torch.zeros_like(old_BT)
        for b, i in enumerate(idx):
            old_BT[b, :len(old[i])] = old[i]
            start = len(rollouts[i].prompt_ids) - 1  # the first completion token's target slot
            adv_BT[b, start:start + len(adv[i])] = torch.tensor(adv[i])
        exact = cfg.kl_estimator == "exact"
        with torch.no_grad():
            ref = token_logprobs(reference, batch, full=exact)
        if exact:
            logp_BT, logp_BTV = token_logprobs(model, batch, full=True)
            kl_BT = kl_exact(logp_BTV, ref[1])
        else:
            logp_BT = token_logprobs(model, batch)
            kl_BT = kl_k3(logp_BT, ref)
        loss = grpo_loss(logp_BT, old_BT, adv_BT, batch.mask, kl_BT, cfg.clip_eps, cfg.kl_coef)
        _step(model, optimizer, loss, cfg.grad_clip, scheduler)
        with torch.no_grad():
            clipped_BT = clipped_tokens((logp_BT - old_BT).exp(), adv_BT, cfg.clip_eps) & batch.mask
            n = batch.mask.sum().clamp(min=1)
            stats.append({"loss": loss.item(), "kl": float((kl_BT * batch.mask).sum() / n),
                          "clipped": float(clipped_BT.sum() / n)})
    return stats


def dpo_steps(model: GPT, reference: GPT, optimizer, pairs: Sequence[tuple[Rollout, Rollout]],
              cfg: LearnConfig, rng: random.Random, pad_id: int, scheduler=None) -> list[dict]:
    """DPO updates on (chosen, rejected) pairs. Returns each step's {"loss"} and, measured before
    the update as TRL logs them, the implicit rewards beta (log pi - log ref) of the chosen and
    the rejected chains ("chosen", "rejected") and the fraction of pairs whose chosen chain has
    the higher one ("pair_acc", 0 at the reference: the margin must become positive)."""
    device = model.wte.weight.device
    stats = []
    for idx in _minibatches(len(pairs), cfg.batch_size, cfg.steps_per_round, rng):
        chains = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]  # chosen, then rejected
        batch = make_batch([r.prompt_ids for r in chains], [r.completion for r in chains], pad_id, device)
        with torch.no_grad():
            ref_B = sequence_logprobs(reference, batch)
        logp_BT = token_logprobs(model, batch)
        pol_B, k = logp_BT.sum(-1), len(idx)
        loss = dpo_loss(pol_B[:k], pol_B[k:], ref_B[:k], ref_B[k:], cfg.dpo_beta)
        if cfg.dpo_nll_coef:  # IRPO: the chosen chains' mean token NLL keeps their likelihood up
            loss = loss - cfg.dpo_nll_coef * (pol_B[:k] / batch.mask[:k].sum(-1)).mean()
        _step(model, optimizer, loss, cfg.grad_clip, scheduler)
        with torch.no_grad():
            reward_B = cfg.dpo_beta * (pol_B - ref_B)
            stats.append({"loss": loss.item(), "chosen": float(reward_B[:k].mean()),
                          "rejected": float(reward_B[k:].mean()),
                          "pair_acc": float((reward_B[:k] > reward_B[k:]).float().mean())})
    return stats


def greedy_accuracy(model: GPT, tokenizer: Tokenizer, problems: Sequence[Problem],
                    max_new_tokens: int, batch_size: int = 256) -> float:
    outs = LocalLM(model, tokenizer, batch_size=batch_size).generate(
        [prompt(p) for p in problems], max_new_tokens=max_new_tokens, temperature=0.0)
    return sum(check(p, o) for p, o in zip(problems, outs)) / max(len(problems), 1)


def _settings(cfg: LearnConfig) -> dict:
    """The settings a resumed run must share with the saved one (more rounds may be asked for)."""
    d = dataclasses.asdict(cfg)
    d.pop("rounds")
    return d


def load_round_state(path: Path, cfg: LearnConfig) -> dict | None:
    """The saved state of `path` (None when there is none); a state saved with other settings is
    a `UserError`: its rounds cannot be continued under these."""
    if not path.is_file():
        return None
    state = load_torch_file(path, expected="an o1_learning round state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path}: not an o1_learning round state")
    if state["settings"] != _settings(cfg):
        diff = sorted(k for k in _settings(cfg) if state["settings"].get(k) != _settings(cfg)[k])
        raise UserError(f"{path} was written with other settings ({', '.join(diff)}): use another "
                        "out dir, or the saved settings, to continue it")
    return state


def run_rounds(cfg: LearnConfig, policy: GPT, tokenizer: Tokenizer, questions: Sequence[Problem],
               sft_examples: Sequence[Problem], eval_sets: dict[str, Sequence[Problem]],
               state_path: str | Path, scorer: Callable | None = None,
               step_scorer: Callable | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Train `policy` in place for `cfg.rounds` rounds of `cfg.method`; returns one record per
    round, round 0 being the policy before learning: greedy accuracy on each of `eval_sets`,
    and what the round did (mean sampled reward, the fraction of questions with both right and
    wrong samples, chains kept, pairs, steps, the learning rate at its end, the means over its
    steps of the loss and of the learner's gauges: GRPO's KL to the reference and clipped
    fraction, DPO's implicit rewards and pair accuracy; seconds).

    `questions` are the problems that sampling draws from (only their answers are used, through
    the checker); `sft_examples` are the problems whose worked solutions the `sft` control trains
    on. `scorer(problems, texts) -> scores` ranks chains for `keep="scores"`;
    `step_scorer(problem, steps) -> one score per step` gives GRPO's `grpo_rewards="process"`.
    The reference policy of GRPO and DPO is a frozen copy of `policy` as given
    (`reference="initial"`) or of the policy at the start of each round (`"round"`). After every
    round the state is written to `state_path`; when that file exists the run continues from it
    (`policy`'s weights are then replaced by the saved ones, and the initial reference by the
    saved initial policy)."""
    cfg.validate()
    if cfg.keep == "scores" and cfg.method == "expert" and scorer is None:
        raise UserError("--keep scores needs a scorer (an outcome reward model)")
    if cfg.grpo_rewards == "process" and cfg.method == "grpo" and step_scorer is None:
        raise UserError("--grpo-rewards process needs a step scorer (a process reward model)")
    state_path = Path(state_path)
    device = policy.wte.weight.device
    pad_id = tokenizer.eot_id
    state = load_round_state(state_path, cfg)
    reference = copy.deepcopy(policy)
    if state is not None:
        reference.load_state_dict(state["reference"])
        policy.load_state_dict(state["model"])
    reference.requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = warmup_schedule(optimizer, cfg.warmup_steps)
    if state is None:
        state = {"format": STATE_FORMAT, "settings": _settings(cfg), "round": 0, "data": [],
                 "history": [], "reference": _cpu_copy(policy)}
    else:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        log(f"{cfg.method}: resuming after round {state['round']} from {state_path}")
    data: list[list[list[int]]] = state["data"]  # expert iteration's kept chains: [prompt, completion]
    history: list[dict] = state["history"]
    step_ends = {t for t in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([t])}
    sft_pairs = [(tokenizer.encode_ordinary(prompt(p)),
                  tokenizer.encode_ordinary(p.solution) + [tokenizer.eot_id]) for p in sft_examples]

    def evaluate(record: dict) -> dict:
        for name, problems in eval_sets.items():
            record[f"acc/{name}"] = greedy_accuracy(policy, tokenizer, problems, cfg.max_new_tokens)
        return record

    def save(round_done: int) -> None:
        state.update(round=round_done, model=_cpu_copy(policy), optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), rng=torch.get_rng_state())
        state_path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(state_path, state)

    if not history:
        history.append(evaluate({"round": 0, "method": cfg.method, "steps": 0}))
        log(_describe(history[-1]))
        save(0)
    for rnd in range(state["round"] + 1, cfg.rounds + 1):
        t0 = time.perf_counter()
        rng = random.Random(f"{cfg.seed}/{rnd}")
        record = {"round": rnd, "method": cfg.method}
        if cfg.reference == "round":  # iterative DPO / RL: this round's policy is its reference
            reference.load_state_dict(policy.state_dict())
        policy.train()
        if cfg.method == "sft":
            stats = sft_steps(policy, optimizer, sft_pairs, cfg, rng, pad_id, scheduler)
        else:
            batch = rng.sample(list(questions), min(cfg.questions_per_round, len(questions)))
            groups = sample_rollouts(policy, tokenizer, batch, cfg.group_size, cfg.temperature,
                                     cfg.max_new_tokens, seed=rng.randrange(2 ** 31))
            record["sample_reward"] = sum(r.reward for g in groups for r in g) / (len(groups) * cfg.group_size)
            # questions whose samples are neither all right nor all wrong: GRPO's and DPO's signal
            record["mixed"] = sum(len({r.reward for r in g}) > 1 for g in groups) / len(groups)
            stats = []
            if cfg.method == "expert":
                if cfg.keep == "verified":
                    kept = verified_chains(groups, cfg.keep_per_question)
                else:
                    texts = [[r.text for r in g] for g in groups]
                    kept = best_chains(groups, [scorer([g[0].problem] * len(t), t)
                                                for g, t in zip(groups, texts)])
                data += [[r.prompt_ids, r.completion] for r in kept]
                record.update(kept=len(kept), data=len(data))
                if data:
                    stats = sft_steps(policy, optimizer, [tuple(d) for d in data], cfg, rng, pad_id,
                                      scheduler)
            elif cfg.method == "grpo":
                stats = grpo_steps(policy, reference, optimizer, groups, cfg, rng, pad_id,
                                   step_scorer if cfg.grpo_rewards == "process" else None,
                                   step_ends, scheduler)
            else:
                pairs = preference_pairs(groups, cfg.pairs_per_question, rng)
                if cfg.dpo_cut:
                    pairs = [_cut_pair(a, b, step_ends) for a, b in pairs]
                record["pairs"] = len(pairs)
                if pairs:
                    stats = dpo_steps(policy, reference, optimizer, pairs, cfg, rng, pad_id, scheduler)
        record.update(steps=len(stats), lr=scheduler.get_last_lr()[0])
        for key in (stats[0] if stats else {"loss": None}):  # the round's mean of each gauge
            record[key] = sum(s[key] for s in stats) / len(stats) if stats else None
        policy.eval()
        evaluate(record)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(record)
        log(_describe(record))
        save(rnd)
    policy.to(device)
    return history


def _cut_pair(chosen: Rollout, rejected: Rollout, step_ends: set[int]) -> tuple[Rollout, Rollout]:
    a, b = cut_at_first_difference(chosen.completion, rejected.completion, step_ends)
    return dataclasses.replace(chosen, completion=a), dataclasses.replace(rejected, completion=b)


def _cpu_copy(model: GPT) -> dict:
    # a copy, not a view: on the CPU .cpu() would alias the parameters the optimizer changes
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _describe(record: dict) -> str:
    parts = [f"{record['method']} round {record['round']}"]
    for k, v in record.items():
        if k in ("round", "method") or v is None:
            continue
        if isinstance(v, float):  # learning rates are small: 3 significant digits, not 3 decimals
            parts.append(f"{k} {v:.3g}" if k == "lr" else f"{k} {v:.3f}")
        else:
            parts.append(f"{k} {v}")
    return " | ".join(parts)


__all__ = ["METHODS", "LearnConfig", "Rollout", "TokenBatch", "best_chains", "clipped_tokens",
           "cut_at_first_difference", "dpo_loss", "dpo_steps", "greedy_accuracy",
           "group_advantages", "grpo_loss", "grpo_steps", "kl_exact", "kl_k3", "load_round_state",
           "make_batch", "preference_pairs", "process_advantages", "run_rounds", "sample_rollouts",
           "sequence_logprobs", "sft_steps", "token_advantages", "token_logprobs",
           "verified_chains", "warmup_schedule"]
