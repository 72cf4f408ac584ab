"""The o1 roadmap, part 1: reward design (Zeng et al. 2024, "Scaling of Search and Learning: a
Roadmap to Reproduce o1", section 4), the scorers that `minillm.methods.o1`'s search consults.

- Outcome reward: the checker `tasks.check` labels training data and grades; search never reads it
  (a search that did would be pass@N). `OracleScorer` is the reference solution as a process
  reward, for tests and ceilings.
- Monte-Carlo step values (`mc_step_values`, Wang et al. 2024 "Math-Shepherd"): the value of a
  step is the fraction of `rollouts` completions sampled from the chain up to it whose answer is
  right.
- Reward shaping (`shaped_rewards`, Ng et al. 1999): r'_t = r_t + gamma Phi(s_t) - Phi(s_{t-1}),
  with the step values as the potential Phi, for learning (part 2).
- Reward models (`RewardModel`): P(correct) of a chain or a prefix of one, from a copy of the
  policy with a linear head on the final hidden state of its last token, plus learned weights on
  the frozen policy's confidence in the chain (its lowest and mean token log-probability). Trained
  on the checker's labels at a chain's last step it is the outcome reward model (ORM, `train_orm`);
  trained on Monte-Carlo step values at every step, the process reward model (PRM, `train_prm`).
  Both are scorers: `score(problems, texts) -> [P(correct)]`.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from ..checkpoint import load_torch_file, save_checkpoint
from ..errors import UserError
from ..generate import LanguageModel
from ..model import GPT, ModelConfig
from ..tasks import Problem, chain_text, check, is_final, prompt, split_steps
from ..tokenizer import Tokenizer, tokenizer_from_dict


# --- rewards: the oracle, Monte-Carlo step values, shaping ---------------------------------------

class OracleScorer:
    """An oracle process reward, for tests and ceilings: 1 while every step of the text equals the
    reference solution's (a complete chain: when its answer is right), else 0."""

    def score(self, problems, texts):
        out = []
        for problem, text in zip(problems, texts):
            steps = split_steps(text)
            if steps and is_final(steps[-1]):
                out.append(float(check(problem, text)))
            else:
                out.append(float(steps == list(problem.steps[:len(steps)])))
        return out


def mc_step_values(lm: LanguageModel, problems: Sequence[Problem], chains: Sequence[Sequence[str]],
                   rollouts: int, max_new_tokens: int, temperature: float = 1.0, seed: int = 0
                   ) -> tuple[list[list[float]], int]:
    """Monte-Carlo value of every step of every chain: the fraction of `rollouts` completions
    sampled from the chain's prefix up to and including that step whose answer the checker accepts.
    An answer line is its own value (1 if right, 0 if wrong): nothing follows it. One batched call
    generates all rollouts. Returns (values per chain, generated tokens)."""
    requests = []  # (chain index, step index, prefix text)
    values = [[0.0] * len(steps) for steps in chains]
    for i, (problem, steps) in enumerate(zip(problems, chains)):
        for t, step in enumerate(steps):
            prefix = chain_text(steps[:t + 1])
            if is_final(step):
                values[i][t] = float(check(problem, prefix))
            else:
                requests.append((i, t, prefix))
    if not requests:
        return values, 0
    completions = lm.generate([prompt(problems[i]) + prefix
                               for i, _, prefix in requests for _ in range(rollouts)],
                              max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    for r, (i, t, prefix) in enumerate(requests):
        outs = completions[r * rollouts:(r + 1) * rollouts]
        values[i][t] = sum(check(problems[i], prefix + c) for c in outs) / rollouts
    return values, sum(c.completion_tokens or 0 for c in completions)


def shaped_rewards(values: Sequence[float], outcome: float, initial: float, gamma: float = 1.0
                   ) -> list[float]:
    """Potential-based shaping of a chain's step rewards (Ng et al. 1999): the outcome reward comes
    at the last step (r_T = outcome, r_t = 0 before), the potential Phi is the value of the state
    after each step (`values`, Phi(s_0) = `initial`), and the last state is terminal (Phi = 0):
    r'_t = r_t + gamma Phi(s_t) - Phi(s_{t-1}). Optimal policies are unchanged; with gamma = 1 the
    rewards sum to outcome - initial, so a search ranking prefixes by their summed shaped rewards
    ranks them as by their value Phi: shaping matters to learning (part 2), not to search."""
    phi = [initial, *values[:-1], 0.0]
    return [(outcome if t == len(values) else 0.0) + gamma * phi[t] - phi[t - 1]
            for t in range(1, len(values) + 1)]


# --- reward models -------------------------------------------------------------------------------

class RewardModel(nn.Module):
    """P(correct) of a chain or a prefix of one: a GPT backbone (a copy of the policy) read at the
    last token of prompt + text, a linear head, a sigmoid. Beside the hidden state, two learned
    weights see the policy's confidence in the chain so far (lowest and mean token log-probability
    under a frozen copy of the policy). Why: on 240 held-out chains sampled at temperature 0.7 from
    the default policy of scripts/o1.py, a head on the hidden state alone ranked right above wrong
    chains with AUC 0.52 (ORM) and 0.62 (PRM), while the policy's lowest token log-probability alone
    ranks them at 0.89; with both, 0.88 and 0.86. The two kinds differ in their training data only:
    `OutcomeRewardModel` learns outcome labels at a chain's last step, `ProcessRewardModel`
    Monte-Carlo step values at every step."""

    kind = "reward"

    def __init__(self, backbone: GPT, tokenizer: Tokenizer):
        super().__init__()
        self.backbone, self.tokenizer = backbone, tokenizer
        self.policy = copy.deepcopy(backbone).requires_grad_(False)  # frozen: its confidence
        self.head = nn.Linear(backbone.config.n_embd, 1)
        self.confidence = nn.Linear(2, 1, bias=False)
        for weight in (self.head.weight, self.head.bias, self.confidence.weight):
            nn.init.zeros_(weight)  # starts at P = 0.5 everywhere

    def forward_features(self, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states (B, T, d), the output of the backbone's final norm (by a hook), and
        the frozen policy's log-probability of every token given the ones before it (B, T;
        position 0, which nothing predicts, gets 0)."""
        captured = {}
        handle = self.backbone.norm_f.register_forward_hook(
            lambda module, inputs, output: captured.__setitem__("h_BTd", output))
        try:
            self.backbone(ids_BT)
        finally:
            handle.remove()
        with torch.no_grad():
            logits_BTV = self.policy(ids_BT).logits
            logp_BT = F.log_softmax(logits_BTV[:, :-1].float(), dim=-1).gather(
                -1, ids_BT[:, 1:, None]).squeeze(-1)
        return captured["h_BTd"], F.pad(logp_BT, (1, 0))

    def hidden_states(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return self.forward_features(ids_BT)[0]

    def logits(self, ids_BT: torch.Tensor, positions_BK: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) read at `positions_BK` (indices into T; column 0: the prompt's last token).
        A linear head on the hidden state there, plus learned weights on the lowest and the mean
        log-probability the frozen policy gives the chain's tokens up to there (its confidence: a
        sampled slip is a token it found unlikely)."""
        h_BTd, logp_BT = self.forward_features(ids_BT)
        index = positions_BK[..., None].expand(-1, -1, h_BTd.shape[-1])
        head_BK = self.head(h_BTd.gather(1, index).float()).squeeze(-1)
        T = ids_BT.shape[1]
        in_chain_BT = torch.arange(T, device=ids_BT.device) > positions_BK[:, :1]
        low_BT = torch.cummin(logp_BT.masked_fill(~in_chain_BT, 0.0), dim=1).values
        mean_BT = ((logp_BT * in_chain_BT).cumsum(1)
                   / in_chain_BT.cumsum(1).clamp(min=1))
        confidence_BK2 = torch.stack([low_BT.gather(1, positions_BK),
                                      mean_BT.gather(1, positions_BK)], dim=-1)
        return head_BK + self.confidence(confidence_BK2).squeeze(-1)

    def encode(self, problem: Problem, steps: Sequence[str]) -> tuple[list[int], list[int]]:
        """(ids of prompt + chain, position of the last token of the prompt and of every step)."""
        ids = self.tokenizer.encode_ordinary(prompt(problem))
        ends = [len(ids) - 1]
        for step in steps:  # the pre-tokenizer splits at newlines, so pieces encode independently
            ids = ids + self.tokenizer.encode_ordinary(step + "\n")
            ends.append(len(ids) - 1)
        return ids, ends

    def _batch(self, encoded: Sequence[tuple[list[int], list[int]]]):
        device = self.head.weight.device
        T = max(len(ids) for ids, _ in encoded)
        K = max(len(ends) for _, ends in encoded)
        if self.backbone.wpe is not None and T > self.backbone.config.block_size:
            raise UserError(f"a chain of {T} tokens is longer than the reward model's "
                            f"{self.backbone.config.block_size} positions")
        ids_BT = torch.full((len(encoded), T), self.tokenizer.eot_id, dtype=torch.long)
        pos_BK = torch.zeros((len(encoded), K), dtype=torch.long)
        for b, (ids, ends) in enumerate(encoded):  # right padding: causal attention ignores it
            ids_BT[b, :len(ids)] = torch.tensor(ids)
            pos_BK[b, :len(ends)] = torch.tensor(ends)
        return ids_BT.to(device), pos_BK.to(device)

    @torch.no_grad()
    def values(self, problems: Sequence[Problem], chains: Sequence[Sequence[str]],
               batch_size: int = 64) -> list[list[float]]:
        """[P(correct) after the prompt alone, after step 1, ..., after the last step] of each
        chain (a list of steps)."""
        was_training = self.training
        self.eval()
        out = []
        for start in range(0, len(problems), batch_size):
            encoded = [self.encode(p, steps) for p, steps in
                       zip(problems[start:start + batch_size], chains[start:start + batch_size])]
            probs_BK = torch.sigmoid(self.logits(*self._batch(encoded))).tolist()
            out += [row[:len(ends)] for row, (_, ends) in zip(probs_BK, encoded)]
        self.train(was_training)
        return out

    def score(self, problems: list[Problem], texts: list[str]) -> list[float]:
        """P(correct) after the last step of each text (the `Scorer` interface)."""
        return [v[-1] for v in self.values(problems, [split_steps(t) for t in texts])]

    def save(self, path: str | Path) -> None:
        save_checkpoint(Path(path), {
            "format": "minillm.o1.reward_model", "kind": self.kind,
            "config": self.backbone.describe().to_dict(), "tokenizer": self.tokenizer.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.state_dict().items()}})

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu"):
        """A reward model written by `save`, as the class it was saved from."""
        blob = load_torch_file(path, expected="a reward model (RewardModel.save)")
        if not isinstance(blob, dict) or blob.get("format") != "minillm.o1.reward_model":
            raise UserError(f"{path}: not a reward model written by RewardModel.save")
        kinds = {"orm": OutcomeRewardModel, "prm": ProcessRewardModel}
        if cls is not RewardModel and kinds.get(blob["kind"]) is not cls:
            raise UserError(f"{path} holds a reward model of kind {blob['kind']!r}, "
                            f"not {cls.kind!r}")
        rm = kinds[blob["kind"]](GPT(ModelConfig(**blob["config"])),
                                 tokenizer_from_dict(blob["tokenizer"]))
        rm.load_state_dict(blob["model"])
        return rm.to(device).eval()


class OutcomeRewardModel(RewardModel):
    """The ORM: P(a complete chain's answer is right), trained on chains the checker labelled."""
    kind = "orm"


class ProcessRewardModel(RewardModel):
    """The PRM: P(ending correct from a prefix), trained on Monte-Carlo step values."""
    kind = "prm"

    def score_steps(self, problem: Problem, steps: list[str]) -> list[float]:
        """One value per step prefix: after step 1, ..., after the last step."""
        return self.values([problem], [steps])[0][1:]


# --- training data and training ------------------------------------------------------------------

@dataclass
class RewardExample:
    """One chain with a target in [0, 1] at some of its steps (None: no target at that step)."""
    problem: Problem
    steps: list[str]
    targets: list[float | None]


def outcome_examples(problems: Sequence[Problem], completions: Sequence[Sequence[str]]
                     ) -> list[RewardExample]:
    """ORM data: every sampled chain, labelled by the checker at its last step."""
    out = []
    for problem, texts in zip(problems, completions):
        for text in texts:
            steps = split_steps(text)
            if steps:
                out.append(RewardExample(problem, steps,
                                         [None] * (len(steps) - 1) + [float(check(problem, text))]))
    return out


def process_examples(lm: LanguageModel, problems: Sequence[Problem],
                     completions: Sequence[Sequence[str]], rollouts: int, max_new_tokens: int,
                     temperature: float = 1.0, seed: int = 0) -> tuple[list[RewardExample], int]:
    """PRM data: every sampled chain with its Monte-Carlo step values (`mc_step_values`) as targets
    at every step. Returns (examples, tokens the rollouts generated)."""
    flat_problems, chains = [], []
    for problem, texts in zip(problems, completions):
        for text in texts:
            steps = split_steps(text)
            if steps:
                flat_problems.append(problem)
                chains.append(steps)
    values, tokens = mc_step_values(lm, flat_problems, chains, rollouts, max_new_tokens,
                                    temperature, seed)
    return [RewardExample(p, c, list(v)) for p, c, v in zip(flat_problems, chains, values)], tokens


def train_reward_model(cls: type[RewardModel], policy: GPT, tokenizer: Tokenizer,
                       examples: Sequence[RewardExample], steps: int, batch_size: int = 32,
                       lr: float = 1e-3, seed: int = 0,
                       log: Callable[[str], None] | None = print) -> RewardModel:
    """A reward model of class `cls` initialised from a copy of `policy`, trained by binary
    cross-entropy on the examples' soft targets (every labelled step of a batch weighs the same),
    AdamW at a constant learning rate after a linear warmup. Deterministic given `seed`. `log`
    reports the mean loss of each quarter of the steps beside the loss of the best constant
    prediction (the mean target), which a model that learned anything beats."""
    if not examples:
        raise UserError("no examples to train a reward model on")
    labels = torch.tensor([t for e in examples for t in e.targets if t is not None])
    mean = labels.mean().clamp(1e-6, 1 - 1e-6)
    constant_loss = F.binary_cross_entropy(mean.expand_as(labels), labels).item()
    torch.manual_seed(seed)
    rm = cls(copy.deepcopy(policy).float(), tokenizer).to(policy.wte.weight.device)
    rm.train()
    encoded = [rm.encode(e.problem, e.steps) for e in examples]
    targets = [[float("nan")] + [float("nan") if t is None else t for t in e.targets]
               for e in examples]  # no target after the prompt alone
    # the two confidence weights are a logistic regression of their own: larger steps
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in rm.named_parameters()
                    if p.requires_grad and not n.startswith("confidence")], "scale": 1.0},
        {"params": list(rm.confidence.parameters()), "scale": 30.0}], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    window: list[float] = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = group["scale"] * lr * min(1.0, (step + 1) / max(steps // 10, 1))
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        rows, order = order[:batch_size], order[batch_size:]
        ids_BT, pos_BK = rm._batch([encoded[i] for i in rows])
        K = pos_BK.shape[1]
        target_BK = torch.tensor([targets[i] + [float("nan")] * (K - len(targets[i]))
                                  for i in rows], device=ids_BT.device)
        labelled_BK = ~target_BK.isnan()
        logits_BK = rm.logits(ids_BT, pos_BK)
        loss = F.binary_cross_entropy_with_logits(logits_BK[labelled_BK], target_BK[labelled_BK])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.backbone.parameters(), 1.0)
        optimizer.step()
        window.append(loss.item())
        if log and (step + 1) % max(steps // 4, 1) == 0:
            log(f"{cls.kind} step {step + 1}/{steps}: loss {sum(window) / len(window):.4f} "
                f"(a constant prediction: {constant_loss:.4f})")
            window = []
    return rm.eval()


def train_orm(policy: GPT, tokenizer: Tokenizer, problems: Sequence[Problem],
              completions: Sequence[Sequence[str]], steps: int, **kwargs) -> OutcomeRewardModel:
    """The ORM on sampled chains labelled by the checker (`outcome_examples`)."""
    return train_reward_model(OutcomeRewardModel, policy, tokenizer,
                              outcome_examples(problems, completions), steps, **kwargs)


def train_prm(policy: GPT, tokenizer: Tokenizer, examples: Sequence[RewardExample], steps: int,
              **kwargs) -> ProcessRewardModel:
    """The PRM on chains with Monte-Carlo step values (`process_examples`)."""
    return train_reward_model(ProcessRewardModel, policy, tokenizer, examples, steps, **kwargs)


__all__ = ["OracleScorer", "OutcomeRewardModel", "ProcessRewardModel", "RewardExample",
           "RewardModel", "mc_step_values", "outcome_examples", "process_examples",
           "shaped_rewards", "train_orm", "train_prm", "train_reward_model"]
