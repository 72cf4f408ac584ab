"""The o1 roadmap, part 1: policy initialisation, reward models and search (Zeng et al. 2024,
"Scaling of Search and Learning: a Roadmap to Reproduce o1").

On the verifiable arithmetic task of `minillm.tasks` (worked column solutions, one step a line):

- Policy initialisation (`train_policy`): a BPE tokenizer for the task, a tiny GPT pretrained on
  worked problems (loss on every token), then supervised fine-tuning on (question, solution) pairs
  (loss on the solution only, `minillm.sft` packing through `Trainer(data_source=...)`). Each stage
  checkpoints and resumes; a finished policy is saved once and reused (`policy.pt`).
- Rewards. The outcome checker `tasks.check` labels training data and measures pass@N only: search
  never reads it (a search that did would be pass@N). `RewardModel` is a copy of the policy with a
  linear head on the final hidden state of a chain's last token (read by a forward hook on the
  final norm) and learned weights on the frozen policy's confidence in the chain (its lowest and
  mean token log-probability), giving P(correct). Trained on outcome labels at the last step it is the outcome
  reward model (ORM); trained on Monte-Carlo step values (`mc_step_values`: the fraction of
  rollouts from a step that end correct, Wang et al. 2024 "Math-Shepherd") at every step it is the
  process reward model (PRM). `shaped_rewards` turns step values into potential-shaped step rewards
  r'_t = r_t + gamma Phi(s_t) - Phi(s_{t-1}) (Ng et al. 1999), for learning (part 2).
- Search, each on one question within a `TokenBudget` of generated tokens counted from the
  backend's `Completion.completion_tokens`: `greedy`, `sample_chains` then `majority_vote` or
  `best_of_n` (ORM), `beam_search` (step-level, PRM-guided, Snell et al. 2024), `mcts` (UCT
  selection, expansion of sampled steps, PRM or rollout evaluation, backup). The budget rule is the
  same for all: a generation starts only if the budget covers its worst case (every prompt using its
  `max_new_tokens`), so no method ever spends more than its budget; step-level searches may give
  their last step what is left, at least half a step, so that a short answer line still fits.

Search code takes any `LanguageModel` (`LocalLM`, `OpenAIClient`, a scripted fake) and any `Scorer`
(an object with `score(prompts, texts) -> list[float]`, higher is better): a trained reward model,
or an oracle in tests. `prompts` are `tasks.prompt(problem)`; `texts` are chains (or prefixes of
chains) in canonical form, one step a line, each line ending in a newline (`chain_text`).
"""

from __future__ import annotations

import copy
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import setup as setup_device
from ..errors import UserError
from ..generate import Completion, LanguageModel, LocalLM
from ..model import GPT, ModelConfig
from ..checkpoint import load_model, load_torch_file, save_model
from ..sft import PackedLoader, encode_example
from ..tasks import ANSWER_RE, Arithmetic, Problem, check, extract_answer, prompt, split_steps
from ..tokenizer import Tokenizer, train_bpe, tokenizer_from_dict
from ..train import TrainConfig, Trainer

# Every digit its own pre-token (a leading space kept with it), so a number is its digits and a
from ..checkpoint import checkpoints, save_checkpoint
# column step reads the digits it adds; words and punctuation merge freely.
ARITHMETIC_PATTERN = r" ?\p{N}| ?[^\s\p{N}]+|\s+"


def chain_text(steps: Sequence[str]) -> str:
    """The canonical text of a chain or of a prefix of one: each step on its own line."""
    return "".join(s + "\n" for s in steps)


def canonical(text: str) -> str:
    """A generated solution in canonical form: its steps up to the answer line (`split_steps`)."""
    return chain_text(split_steps(text))


def is_final(step: str) -> bool:
    """Whether a step is an answer line (the chain ends there)."""
    return ANSWER_RE.match(step) is not None


def arithmetic_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer for the task (both operations), deterministic: trained on a fixed
    set of worked problems until no pair repeats (about 280 ids)."""
    texts = []
    for level in (1, 2, 3, 4):
        for p in Arithmetic(ops="+-").problems(level, 30, seed=0):
            texts.append(prompt(p) + p.solution)
    return train_bpe(texts, vocab_size=512, pattern=ARITHMETIC_PATTERN, name="arithmetic")


def task_problems(task: Arithmetic, level: int, n: int, split: str, seed: int) -> list[Problem]:
    """Up to `n` problems of `level` from `split`: all of them where the level has fewer (1 digit:
    about 50 per operation)."""
    if level <= 2:
        low = 0 if level == 1 else 10 ** (level - 1)
        available = sum(1 for op in task.ops for a in range(low, 10 ** level)
                        for b in range(low, (a + 1 if op == "-" else 10 ** level))
                        if task.split_of(a, op, b) == split)
        n = min(n, available)
    return task.problems(level, n, split, seed)


# --- policy initialisation ------------------------------------------------------------------------

@dataclass
class PolicyConfig:
    """The tiny policy: its task, its size and its two training stages."""
    levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    ops: str = "+"
    problems_per_level: int = 3000
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 128
    pretrain_steps: int = 200
    sft_steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    device: str = "cpu"


class Policy(NamedTuple):
    """A trained policy: `model, tokenizer = train_policy(...)`, or `.model` / `.tokenizer`."""
    model: GPT
    tokenizer: Tokenizer

    def lm(self, batch_size: int = 64) -> LocalLM:
        """The policy as a `LanguageModel`. A prompt that does not fit the model's positions (a
        long garbled chain of an undertrained policy) is cut from the left (`truncated` counts)."""
        return LocalLM(self.model, self.tokenizer, batch_size=batch_size, truncate_left=True)


def train_stage(examples: Sequence[tuple[str, str]], tokenizer: Tokenizer, out_dir: str | Path,
                steps: int, *, init_from: str | Path | None = None, n_layer: int = 2,
                n_head: int = 4, n_embd: int = 64, block_size: int = 128, batch_size: int = 16,
                lr: float = 3e-3, seed: int = 0, device: str = "cpu",
                attend_across: bool = False, log_interval: int | None = None) -> GPT:
    """Train on (prompt, response) examples (loss on responses; an empty prompt: on everything)
    with the trainer and a packed data source, from `init_from` (a model file) or a fresh tiny GPT
    of the given sizes. Checkpoints in `out_dir`: a killed stage resumes exactly where it was, and a
    finished one (`out_dir/model.pt`) is loaded instead of trained again."""
    out_dir = Path(out_dir)
    final = out_dir / "model.pt"
    if final.is_file():
        return load_model(final, device=device)[0].eval()
    encoded = [encode_example(tokenizer, p, r) for p, r in examples]
    dist = setup_device(device)
    loader = PackedLoader(encoded, block_size=block_size, batch_size=batch_size,
                          pad_id=tokenizer.eot_id, seed=seed, attend_across=attend_across,
                          device=dist.device)
    resume = bool(checkpoints(out_dir))
    cfg = TrainConfig(out_dir=str(out_dir), preset="tiny-gpt",
                      init_from=str(init_from) if init_from else None,
                      n_layer=None if init_from else n_layer, n_head=None if init_from else n_head,
                      n_embd=None if init_from else n_embd, block_size=block_size,
                      batch_size=batch_size, max_steps=steps, lr=lr,
                      warmup_steps=min(20, steps // 10), eval_interval=0,
                      ckpt_interval=max(steps // 4, 1), log_interval=log_interval or steps,
                      seed=seed, device=device, resume=resume, overwrite=not resume,
                      progress=False)
    trainer = Trainer(cfg, dist, data_source=loader, tokenizer=tokenizer)
    trainer.train()
    save_model(final, trainer.model, tokenizer)
    return trainer.model.eval()


def policy_problems(cfg: PolicyConfig, split: str = "train", seed: int | None = None
                    ) -> list[Problem]:
    task = Arithmetic(ops=cfg.ops)
    seed = cfg.seed if seed is None else seed
    return [p for level in cfg.levels
            for p in task_problems(task, level, cfg.problems_per_level, split, seed)]


def train_policy(cfg: PolicyConfig, out_dir: str | Path) -> Policy:
    """Pretraining on worked problems (every token), then SFT on (question, solution) of the train
    split of `cfg.levels`. `out_dir/policy.pt` holds the result and its settings: a second call with
    the same settings loads it, with other settings it is refused (use another `out_dir`)."""
    out_dir = Path(out_dir)
    path = out_dir / "policy.pt"
    if path.is_file():
        model, tok, extra = load_model(path, device=cfg.device)
        if extra.get("policy_config") != asdict(cfg):
            raise UserError(f"{path} holds a policy trained with other settings "
                            f"({extra.get('policy_config')}); pass another out dir or delete it")
        return Policy(model.eval(), tok)
    if any(not 1 <= level <= 9 for level in cfg.levels) or not cfg.levels:
        raise UserError(f"policy levels {cfg.levels}: expected digits per operand in 1-9")
    tok = arithmetic_tokenizer()
    sizes = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                 block_size=cfg.block_size, batch_size=cfg.batch_size, lr=cfg.lr, device=cfg.device)
    init = None
    if cfg.pretrain_steps:
        docs = [("", prompt(p) + p.solution) for p in policy_problems(cfg, seed=cfg.seed + 1)]
        train_stage(docs, tok, out_dir / "pretrain", cfg.pretrain_steps, attend_across=True,
                    seed=cfg.seed, **sizes)
        init = out_dir / "pretrain" / "model.pt"
    pairs = [(prompt(p), p.solution) for p in policy_problems(cfg)]
    model = train_stage(pairs, tok, out_dir / "sft", cfg.sft_steps, init_from=init,
                        seed=cfg.seed, **sizes)
    save_model(path, model, tok, extra={"policy_config": asdict(cfg)})
    return Policy(model.eval(), tok)


def sample(lm: LanguageModel, problems: Sequence[Problem], n: int, temperature: float = 1.0,
           max_new_tokens: int = 64, seed: int = 0) -> list[list[Completion]]:
    """`n` chains of every problem (completions of `prompt(problem)`), from one batched call."""
    flat = lm.generate([prompt(p) for p in problems for _ in range(n)],
                       max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return [flat[i * n:(i + 1) * n] for i in range(len(problems))]


# --- rewards --------------------------------------------------------------------------------------

class Scorer(Protocol):
    """What search needs from a reward: a score per (problem, chain or prefix of a chain), higher
    is better. `OutcomeRewardModel`, `ProcessRewardModel` and `OracleScorer` are scorers."""

    def score(self, problems: list[Problem], texts: list[str]) -> list[float]: ...


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
    AdamW at a constant learning rate after a linear warmup. Deterministic given `seed`."""
    if not examples:
        raise UserError("no examples to train a reward model on")
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
        if log and (step + 1) % max(steps // 4, 1) == 0:
            log(f"{cls.kind} step {step + 1}/{steps}: loss {loss.item():.4f}")
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


# --- token budgets --------------------------------------------------------------------------------

class BudgetExceeded(RuntimeError):
    """A generation was asked for that the budget cannot cover (a bug in the search calling it)."""


class TokenBudget:
    """The generated tokens one question may spend, counted from `Completion.completion_tokens`.

    `affordable(max_new_tokens)` is how many generations of at most `max_new_tokens` tokens each
    the rest of the budget covers; `generate` refuses (BudgetExceeded) a call whose worst case the
    budget does not cover, so `spent <= limit` always. Prompt tokens are counted beside, not
    charged: a server with prefix caching does not recompute them."""

    def __init__(self, lm: LanguageModel, limit: int):
        self.lm, self.limit = lm, limit
        self.spent = self.prompt_tokens = self.calls = 0

    @property
    def remaining(self) -> int:
        return self.limit - self.spent

    def affordable(self, max_new_tokens: int) -> int:
        return max(self.remaining, 0) // max(max_new_tokens, 1)

    def generate(self, prompts: list[str], max_new_tokens: int, **kwargs) -> list[Completion]:
        if len(prompts) * max_new_tokens > self.remaining:
            raise BudgetExceeded(f"{len(prompts)} generations of up to {max_new_tokens} tokens "
                                 f"exceed the {self.remaining} tokens left")
        out = self.lm.generate(prompts, max_new_tokens=max_new_tokens, **kwargs)
        for c in out:
            if getattr(c, "completion_tokens", None) is None:
                raise UserError("the backend reports no completion token counts, which token "
                                "budgets need")
            self.spent += c.completion_tokens
            self.prompt_tokens += c.prompt_tokens or 0
        self.calls += 1
        return out


@dataclass
class SearchResult:
    """What a search chose (`text`, canonical, and its `answer`, None if it has none), the chains it
    finished (`candidates`) and what it spent."""
    text: str
    answer: str | None
    tokens: int
    prompt_tokens: int
    candidates: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, text: str, budget: TokenBudget, candidates: list[str]) -> "SearchResult":
        return cls(text, extract_answer(text), budget.spent, budget.prompt_tokens, candidates)


# --- search ---------------------------------------------------------------------------------------

def _seeds(seed: int):
    rng = random.Random(seed)
    while True:
        yield rng.randrange(2 ** 31)


def _extend(text: str, completion: str) -> tuple[str, bool]:
    """A prefix extended by one generated step (a completion cut before its newline), and whether
    the chain ends there: at an answer line, or where the policy stopped without writing a step."""
    line = completion.strip().split("\n")[0].strip()
    if not line:
        return text, True
    return text + line + "\n", is_final(line)


def _step_call(budget: TokenBudget, wanted: int, step_tokens: int) -> tuple[int, int]:
    """(generations, max_new_tokens) of the next round of steps: as many of the `wanted` as the
    budget covers at `step_tokens` each; when it covers none but still half a step, one step cut to
    what is left (a short last line, such as the answer, fits); else (0, 0)."""
    n = min(wanted, budget.affordable(step_tokens))
    if n:
        return n, step_tokens
    return (1, budget.remaining) if budget.remaining >= max(step_tokens // 2, 1) else (0, 0)


def greedy(lm: LanguageModel, problem: Problem, limit: int, max_new_tokens: int) -> SearchResult:
    """One chain at temperature 0."""
    budget = TokenBudget(lm, limit)
    if not budget.affordable(max_new_tokens):
        return SearchResult.of("", budget, [])
    text = canonical(budget.generate([prompt(problem)], max_new_tokens, temperature=0.0)[0])
    return SearchResult.of(text, budget, [text])


def sample_chains(budget: TokenBudget, problem: Problem, max_new_tokens: int,
                  temperature: float = 1.0, seed: int = 0, wave: int = 64) -> list[str]:
    """Sampled chains (canonical) until the budget cannot cover another one: waves of as many as it
    covers (at most `wave`), each chain up to `max_new_tokens` tokens. A chain that ends early
    leaves its unspent tokens to later waves."""
    chains, seeds = [], _seeds(seed)
    while n := min(budget.affordable(max_new_tokens), wave):
        out = budget.generate([prompt(problem)] * n, max_new_tokens, temperature=temperature,
                              seed=next(seeds))
        chains += [canonical(c) for c in out]
    return chains


def majority_vote(chains: Sequence[str]) -> str | None:
    """The chain whose answer is the most common among those with one (ties: the answer seen
    first); None when no chain has an answer."""
    answers = [extract_answer(c) for c in chains]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == top)
    return chains[answers.index(winner)]


def best_of_n(chains: Sequence[str], problem: Problem, scorer: Scorer) -> str | None:
    """The chain the scorer (the ORM, never the checker) ranks highest (ties: the first)."""
    if not chains:
        return None
    scores = scorer.score([problem] * len(chains), list(chains))
    return chains[max(range(len(chains)), key=lambda i: (scores[i], -i))]


def majority(lm: LanguageModel, problem: Problem, limit: int, max_new_tokens: int,
             temperature: float = 1.0, seed: int = 0) -> SearchResult:
    """Majority voting (self-consistency) over the chains sampled within the budget."""
    budget = TokenBudget(lm, limit)
    chains = sample_chains(budget, problem, max_new_tokens, temperature, seed)
    return SearchResult.of(majority_vote(chains) or "", budget, chains)


def orm_best_of_n(lm: LanguageModel, scorer: Scorer, problem: Problem, limit: int,
                  max_new_tokens: int, temperature: float = 1.0, seed: int = 0) -> SearchResult:
    """Best-of-N: the sampled chain the outcome reward model scores highest."""
    budget = TokenBudget(lm, limit)
    chains = sample_chains(budget, problem, max_new_tokens, temperature, seed)
    return SearchResult.of(best_of_n(chains, problem, scorer) or "", budget, chains)


def beam_search(lm: LanguageModel, scorer: Scorer, problem: Problem, limit: int, width: int,
                expand: int, step_tokens: int, max_steps: int = 16, temperature: float = 1.0,
                seed: int = 0) -> SearchResult:
    """Step-level beam search guided by a process reward (Snell et al. 2024): every open beam
    samples `expand` next steps (as many as the budget covers, dealt to the beams in turn), the
    scorer rates each extended prefix, the `width` best candidates survive; a survivor that ends
    (an answer line) is set aside as finished and no longer takes a beam slot. Stops when no beam
    is open or the budget cannot cover one more step; answers with the best-scored finished chain
    (or, if none finished, the best open prefix)."""
    budget, seeds, q = TokenBudget(lm, limit), _seeds(seed), prompt(problem)
    beams: list[str] = [""]
    scored: list[tuple[float, str]] = []
    finished: list[tuple[float, str]] = []
    for _ in range(max_steps):
        n, max_new = _step_call(budget, len(beams) * expand, step_tokens)
        if n == 0:
            break
        parents = [beams[i % len(beams)] for i in range(n)]
        out = budget.generate([q + p for p in parents], max_new, temperature=temperature,
                              stop=["\n"], seed=next(seeds))
        candidates = {}  # extended text -> ended; identical extensions are one candidate
        for parent, completion in zip(parents, out):
            text, ended = _extend(parent, completion)
            candidates[text] = candidates.get(text, False) or ended
        texts = list(candidates)
        scores = scorer.score([problem] * len(texts), texts)
        ranked = sorted(zip(scores, texts), key=lambda st: -st[0])[:width]
        beams, scored = [], ranked
        for score, text in ranked:
            (finished.append((score, text)) if candidates[text] else beams.append(text))
        if not beams:
            break
    pool = finished or scored
    best = max(pool, key=lambda st: st[0])[1] if pool else ""
    return SearchResult.of(best, budget, [t for _, t in finished])


@dataclass(eq=False)
class Node:
    """A node of the search tree: a prefix of a chain (`text`, canonical) and its statistics."""
    text: str
    parent: "Node | None" = None
    children: list["Node"] = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0
    terminal: bool = False  # the chain ends here
    closed: bool = False  # terminal, or every child closed: nothing left to search below

    @property
    def value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0


def uct(child: Node, parent_visits: int, c: float) -> float:
    """UCT (Kocsis & Szepesvari 2006): mean value + c sqrt(ln N(parent) / N(child)); an unvisited
    child comes first."""
    if child.visits == 0:
        return math.inf
    return child.value + c * math.sqrt(math.log(parent_visits) / child.visits)


def select(root: Node, c: float) -> Node:
    """From the root, the open child of highest UCT (ties: the first) until a node without
    children."""
    node = root
    while node.children:
        node = max((ch for ch in node.children if not ch.closed),
                   key=lambda ch: uct(ch, node.visits, c))
    return node


def backup(node: Node, value: float) -> None:
    """One evaluation of `node`: it and every ancestor count a visit and add the value."""
    while node is not None:
        node.visits += 1
        node.value_sum += value
        node = node.parent


def close(node: Node) -> None:
    """Mark a node closed, and every ancestor whose children are now all closed."""
    node.closed = True
    while node.parent is not None and all(ch.closed for ch in node.parent.children):
        node = node.parent
        node.closed = True


def mcts(lm: LanguageModel, scorer: Scorer, problem: Problem, limit: int, children: int,
         step_tokens: int, c_uct: float = 1.0, evaluation: str = "prm",
         rollout_tokens: int = 0, max_depth: int = 16, temperature: float = 1.0,
         seed: int = 0) -> SearchResult:
    """Monte-Carlo tree search over steps. Each iteration: selection (UCT from the root down to a
    node without children), expansion (sample `children` next steps of it; identical ones are one
    child), evaluation of every new child (`"prm"`: the scorer's value of its prefix; `"rollout"`:
    the scorer's value of a chain sampled on from it, up to `rollout_tokens` tokens), backup of each
    value to the root. A child that ends the chain is closed (never selected again). Stops when the
    budget cannot cover an expansion (with its rollouts) or the whole tree is closed; answers with
    the best-scored complete chain seen (ended children and rollouts), else the most visited
    path."""
    if evaluation not in ("prm", "rollout"):
        raise UserError(f"MCTS evaluation {evaluation!r}: expected prm or rollout")
    budget, seeds, q = TokenBudget(lm, limit), _seeds(seed), prompt(problem)
    root = Node("")
    complete: list[tuple[float, str]] = []
    cost = step_tokens + (rollout_tokens if evaluation == "rollout" else 0)
    while not root.closed:
        leaf = select(root, c_uct)
        if evaluation == "rollout":
            k, max_new = min(children, budget.affordable(cost)), step_tokens
        else:
            k, max_new = _step_call(budget, children, step_tokens)
        if k == 0:
            break
        out = budget.generate([q + leaf.text] * k, max_new, temperature=temperature,
                              stop=["\n"], seed=next(seeds))
        new: dict[str, Node] = {}
        depth = len(split_steps(leaf.text)) + 1
        for completion in out:
            text, ended = _extend(leaf.text, completion)
            if text not in new:
                new[text] = Node(text, leaf, terminal=ended or depth >= max_depth)
        nodes = list(new.values())
        texts = [n.text for n in nodes]
        if evaluation == "rollout":
            open_nodes = [i for i, n in enumerate(nodes) if not n.terminal]
            if open_nodes:
                rolled = budget.generate([q + texts[i] for i in open_nodes], rollout_tokens,
                                         temperature=temperature, seed=next(seeds))
                for i, r in zip(open_nodes, rolled):
                    texts[i] = canonical(texts[i] + r)
        values = scorer.score([problem] * len(nodes), texts)
        for node, text, value in zip(nodes, texts, values):
            leaf.children.append(node)
            backup(node, value)
            if node.terminal or evaluation == "rollout":
                complete.append((value, text))
        for node in nodes:
            if node.terminal:
                close(node)
    if complete:
        best = max(complete, key=lambda vt: vt[0])[1]
    else:
        node = root
        while node.children:
            node = max(node.children, key=lambda ch: ch.visits)
        best = node.text
    return SearchResult.of(best, budget, [t for _, t in complete])
