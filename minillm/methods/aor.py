"""AoR: Aggregation of Reasoning (Yin et al. 2024, "Aggregation of Reasoning: A Hierarchical
Framework for Enhancing Answer Selection in Large Language Models", LREC-COLING 2024).

Majority voting picks the answer most sampled chains reach, so it fails whenever the right answer
is in the minority. AoR judges the chains themselves, in two stages, and samples more chains only
while its choice is unclear:

1. Buckets: the sampled chains grouped by answer (`extract_answer`). One bucket: its answer, with
   no judging.
2. Local scoring: within each bucket, a judge scores the chains out of 10, `local_batch` chains per
   call (one prompt, for an LLM judge). Chains under `score_threshold` are dropped; the best
   `representatives` of each bucket are kept. A bucket with no chain left is out.
3. Global evaluation: round t shows the judge the t-th representative of every surviving bucket
   together (a bucket with fewer representatives wraps around) and scores each; an answer's score
   is its mean over the rounds; the highest wins. The margin is the winner's score minus the
   runner-up's (minus 0 when one bucket survives).
4. Dynamic sampling: start from `initial_samples` chains; while the margin is under
   `margin_threshold` and fewer than `max_samples` chains are drawn, draw `extra_samples` more,
   score them locally, update the representatives, and evaluate globally again if they changed.

Defaults: the argparse defaults of the authors' code (github.com/yinzhangyue/AoR, `code/aor.py`):
`--initial-sample-size 20`, `--max-sample-size 40`, `--additional-sample-size 5`, `--batch-size 5`
(chains per local-scoring prompt), `--representative-count 3`, `--scoring-threshold 6` and
`--termination-threshold 2`, on scores out of 10 as their prompts ask for.

Choices of ours, where the paper and its code are silent or do otherwise:
- A chain without a well-formed answer line joins no bucket (it still counts as a sample drawn).
- Ties (equal global scores) go to the answer with more chains, then to the one sampled first.
  Majority voting (`tasks.majority_vote`) breaks its ties the same way, so a judge that gives
  every chain the same score chooses exactly what voting chooses on the same chains (above the
  threshold every bucket ties globally; below it every bucket is dropped, which falls back to
  voting).
- No bucket survives local scoring: the authors' code gives up on the question; here the margin is
  0 (dynamic sampling continues) and, if nothing survives at the end, the answer is the vote over
  all chains, marked `fallback` in the result. Chains drawn with no answer at all also have margin
  0.
- The authors show the local judge of new chains the bucket's best and worst scored chain as
  references; the `Judge` protocol below scores chains without references.
- Local scores are kept per chain and never recomputed; the global stage is re-run only when a
  bucket's representatives change.

Judges (`Judge`: `score(problem, chains, stage) -> scores in [0, 10]`, stage "local" or "global"):
`LLMJudge` over any `LanguageModel` with prompts of our own, parsed leniently (a chain whose score
cannot be read gets `missing_score`, 0 by default, and is counted); `ORMJudge` over a trained
outcome reward model (10 x its probability that the chain is right); `NoisyOracleJudge`, which knows
the right answer and tells the truth about a chain with probability `accuracy` (deterministic per
seed, stage and chain); `ConstantJudge`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..generate import LanguageModel
from ..tasks import Problem, check, extract_answer, majority_vote

MAX_SCORE = 10.0


# --- buckets -------------------------------------------------------------------------------------

def bucket_by_answer(chains: Sequence[str]) -> dict[str, list[int]]:
    """Indices of the chains reaching each answer, answers in order of first appearance; chains
    without an answer are left out."""
    buckets: dict[str, list[int]] = {}
    for i, chain in enumerate(chains):
        answer = extract_answer(chain)
        if answer is not None:
            buckets.setdefault(answer, []).append(i)
    return buckets


# --- judges --------------------------------------------------------------------------------------

class Judge(Protocol):
    def score(self, problem: Problem, chains: Sequence[str], stage: str) -> list[float]:
        """A score in [0, 10] for each chain. stage "local": the chains reach the same answer (one
        bucket); "global": one representative per answer, shown together."""


class ConstantJudge:
    """Every chain gets `value`: AoR then chooses what majority voting chooses."""

    def __init__(self, value: float = MAX_SCORE):
        self.value = value

    def score(self, problem, chains, stage):
        return [self.value] * len(chains)


def _uniforms(*parts: object) -> tuple[float, float]:
    """Two numbers in [0, 1), a fixed function of `parts` (not of Python's hash seed)."""
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return (int.from_bytes(digest[:8], "big") / 2 ** 64,
            int.from_bytes(digest[8:16], "big") / 2 ** 64)


class NoisyOracleJudge:
    """A judge that knows whether each chain's answer is right (`tasks.check`) and tells the truth
    with probability `accuracy`. A chain it calls right scores in [7, 10], one it calls wrong in
    [0, 3] (uniform jitter), so the default threshold 6 keeps exactly the chains it calls right.

    The draws are a function of (seed, stage, question, chain text): the same chain gets the same
    score whenever it is judged in a stage, and its local and global verdicts are independent (the
    global stage is a second look, not a replay of the first). At a higher accuracy every truthful
    verdict stays truthful: a sweep over accuracy is coupled, not independently noisy. accuracy
    0.5 is a judge at chance; 1.0 is an oracle."""

    def __init__(self, accuracy: float, seed: int = 0):
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy {accuracy}: expected a probability in [0, 1]")
        self.accuracy, self.seed = accuracy, seed

    def verdict(self, problem: Problem, chain: str, stage: str = "local") -> bool:
        """Whether the judge calls `chain` right in `stage`."""
        truthful = _uniforms(self.seed, stage, problem.question, chain)[0] < self.accuracy
        return check(problem, chain) == truthful

    def score(self, problem, chains, stage):
        out = []
        for chain in chains:
            jitter = 3.0 * _uniforms(self.seed, stage, problem.question, chain)[1]
            out.append(7.0 + jitter if self.verdict(problem, chain, stage) else jitter)
        return out


class OutcomeScorer(Protocol):
    def score(self, problems: list[Problem], texts: list[str]) -> list[float]:
        """Probability that each text, a solution of its problem, reaches the right answer
        (`minillm.methods.o1_reward.OutcomeRewardModel` is one)."""


class ORMJudge:
    """A trained outcome reward model as judge: 10 x its probability that a chain is right, the
    same in both stages (it sees one chain at a time). Scores are cached per (question, chain);
    `prefetch` scores many problems' chains in one batched call."""

    def __init__(self, orm: OutcomeScorer):
        self.orm = orm
        self.cache: dict[tuple[str, str], float] = {}
        self.calls = 0  # chains the ORM actually scored

    def prefetch(self, problems: Sequence[Problem], chains: Sequence[Sequence[str]]) -> None:
        todo = {(p.question, c): p for p, cs in zip(problems, chains) for c in cs}
        todo = {k: p for k, p in todo.items() if k not in self.cache}
        if not todo:
            return
        keys = list(todo)
        probs = self.orm.score([todo[k] for k in keys], [c for _, c in keys])
        self.calls += len(keys)
        self.cache.update((k, MAX_SCORE * float(p)) for k, p in zip(keys, probs))

    def score(self, problem, chains, stage):
        self.prefetch([problem], [chains])
        return [self.cache[(problem.question, c)] for c in chains]


# --- an LLM as judge -----------------------------------------------------------------------------

LOCAL_PROMPT = """You are checking worked solutions to one arithmetic problem. All of them reach \
the same final answer; judge how sound each one's steps are, not the answer.
Score each solution from 0 to 10: 10 when every step is right and follows from the step before, \
0 when the steps are wrong, missing or do not lead to the answer.

# Problem
{problem}
{solutions}
Reply with one line per solution, "Solution N: S/10", where N is its number and S its score."""

GLOBAL_PROMPT = """You are choosing the right answer to one arithmetic problem. Each solution \
below reaches a different final answer, so at most one of them is right. Check every step of each.
Score each solution from 0 to 10: 10 when every step is right and the answer follows from them, \
0 when a step is wrong or the answer does not follow.

# Problem
{problem}
{solutions}
Reply with one line per solution, "Solution N: S/10", where N is its number and S its score."""

# "Solution 3" (or "Chain 3", "#3") opens a solution's part of the answer; the next "S/10" (or
# "S out of 10") is its score, so both "Solution 1: 7/10" and a paragraph ending "Score: 7/10" read.
_MENTION_RE = re.compile(r"(?:solution|chain)\s*#?\s*(\d+)", re.IGNORECASE)
_SCORE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*10(?![\d.])", re.IGNORECASE)
# a bare "Solution 3: 7" line, with no "/10"
_BARE_LINE_RE = re.compile(r"^\W*(?:solution|chain)\s*#?\s*(\d+)\W*?[:=\-]\s*(\d+(?:\.\d+)?)\W*$",
                           re.IGNORECASE | re.MULTILINE)


def parse_scores(text: str, n: int) -> list[float | None]:
    """Scores of solutions 1..n read from a judge's answer: for each solution, the last "S/10"
    after its last-seen mention (so a closing summary overrides an earlier analysis), else a bare
    "Solution N: S" line. Scores are clipped to [0, 10]; None where none was found."""
    scores: list[float | None] = [None] * n
    events = sorted([(m.start(), "mention", m) for m in _MENTION_RE.finditer(text)]
                    + [(m.start(), "score", m) for m in _SCORE_RE.finditer(text)],
                    key=lambda e: e[0])
    current = None
    for _, kind, m in events:
        if kind == "mention":
            current = int(m.group(1))
        elif current is not None and 1 <= current <= n:
            scores[current - 1] = min(max(float(m.group(1)), 0.0), MAX_SCORE)
    for m in _BARE_LINE_RE.finditer(text):
        k = int(m.group(1))
        if 1 <= k <= n and scores[k - 1] is None:
            scores[k - 1] = min(max(float(m.group(2)), 0.0), MAX_SCORE)
    return scores


class LLMJudge:
    """A `Judge` from any `LanguageModel`: one prompt per call (the chains numbered, their answers
    named in the global stage), the scores parsed from its answer with `parse_scores`. A score it
    cannot read is `missing_score` (0: an unreadable verdict trusts no chain). `stats` counts
    prompts, chains scored, unreadable scores and generated tokens."""

    def __init__(self, lm: LanguageModel, max_new_tokens: int = 512, temperature: float = 0.0,
                 missing_score: float = 0.0):
        self.lm, self.max_new_tokens, self.temperature = lm, max_new_tokens, temperature
        self.missing_score = missing_score
        self.stats = {"prompts": 0, "chains": 0, "unparsed": 0, "completion_tokens": 0}

    def make_prompt(self, problem: Problem, chains: Sequence[str], stage: str) -> str:
        if stage not in ("local", "global"):
            raise ValueError(f"stage {stage!r}: expected 'local' or 'global'")
        parts = []
        for k, chain in enumerate(chains, 1):
            named = f" (answer: {extract_answer(chain)})" if stage == "global" else ""
            parts.append(f"\n# Solution {k}{named}\n{chain.strip()}\n")
        template = LOCAL_PROMPT if stage == "local" else GLOBAL_PROMPT
        return template.format(problem=problem.question, solutions="".join(parts))

    def score(self, problem, chains, stage):
        if not chains:
            return []
        out = self.lm.generate([self.make_prompt(problem, chains, stage)],
                               max_new_tokens=self.max_new_tokens, temperature=self.temperature)[0]
        parsed = parse_scores(out, len(chains))
        self.stats["prompts"] += 1
        self.stats["chains"] += len(chains)
        self.stats["unparsed"] += sum(s is None for s in parsed)
        self.stats["completion_tokens"] += getattr(out, "completion_tokens", None) or 0
        return [self.missing_score if s is None else s for s in parsed]


# --- the two stages and dynamic sampling ---------------------------------------------------------

@dataclass(frozen=True)
class AoRConfig:
    initial_samples: int = 20  # chains drawn first
    max_samples: int = 40  # dynamic sampling stops here (= initial_samples: no dynamic sampling)
    extra_samples: int = 5  # chains drawn per dynamic-sampling step
    local_batch: int = 5  # chains per local-scoring call
    representatives: int = 3  # chains kept per bucket by local scoring
    score_threshold: float = 6.0  # local scores under it are dropped
    margin_threshold: float = 2.0  # dynamic sampling goes on while the margin is under it

    def __post_init__(self):
        if not 1 <= self.initial_samples <= self.max_samples:
            raise ValueError(f"need 1 <= initial_samples ({self.initial_samples}) <= max_samples "
                             f"({self.max_samples})")
        if min(self.extra_samples, self.local_batch, self.representatives) < 1:
            raise ValueError("extra_samples, local_batch and representatives must be at least 1")


@dataclass
class AoRResult:
    answer: str | None
    chains: list[str]  # every chain drawn, in order
    margin: float  # winner's global score minus the runner-up's; inf when all chains agreed
    scores: dict[str, float] = field(default_factory=dict)  # global score of each surviving answer
    representatives: dict[str, list[int]] = field(default_factory=dict)  # chain indices, best first
    local_scores: dict[int, float] = field(default_factory=dict)  # chain index -> local score
    fallback: bool = False  # no bucket survived local scoring: the answer is the vote
    judge_calls: int = 0

    @property
    def samples(self) -> int:
        return len(self.chains)


class _Aggregation:
    """The state of AoR on one problem: chains drawn so far, their local scores, the current
    representatives and global scores."""

    def __init__(self, problem: Problem, judge: Judge, cfg: AoRConfig):
        self.problem, self.judge, self.cfg = problem, judge, cfg
        self.result = AoRResult(answer=None, chains=[], margin=0.0)

    def _judge(self, chains: list[str], stage: str) -> list[float]:
        scores = self.judge.score(self.problem, chains, stage)
        if len(scores) != len(chains):
            raise ValueError(f"the judge returned {len(scores)} scores for {len(chains)} chains")
        self.result.judge_calls += 1
        return [float(s) for s in scores]

    def score_locally(self, buckets: dict[str, list[int]]) -> None:
        """Local scores for every answered chain that has none yet, `local_batch` per call."""
        r = self.result
        for indices in buckets.values():
            todo = [i for i in indices if i not in r.local_scores]
            for start in range(0, len(todo), self.cfg.local_batch):
                batch = todo[start:start + self.cfg.local_batch]
                scores = self._judge([r.chains[i] for i in batch], "local")
                r.local_scores.update(zip(batch, scores))

    def pick_representatives(self, buckets: dict[str, list[int]]) -> dict[str, list[int]]:
        reps = {}
        for answer, indices in buckets.items():
            kept = [i for i in indices if self.result.local_scores[i] >= self.cfg.score_threshold]
            kept.sort(key=lambda i: -self.result.local_scores[i])  # stable: earlier chain first
            if kept:
                reps[answer] = kept[:self.cfg.representatives]
        return reps

    def evaluate_globally(self, reps: dict[str, list[int]]) -> dict[str, float]:
        rounds = self.cfg.representatives  # as the authors' code, even when buckets hold fewer
        totals = dict.fromkeys(reps, 0.0)
        for t in range(rounds):
            shown = [reps[a][t % len(reps[a])] for a in reps]
            scores = self._judge([self.result.chains[i] for i in shown], "global")
            for answer, s in zip(reps, scores):
                totals[answer] += s
        return {a: total / rounds for a, total in totals.items()}

    def decide(self, buckets: dict[str, list[int]]) -> None:
        """Answer and margin from the chains drawn so far (judging only what is new)."""
        r = self.result
        if len(buckets) == 1:  # every answered chain agrees: nothing to judge
            r.answer, r.margin, r.fallback = next(iter(buckets)), float("inf"), False
            return
        if not buckets:
            r.answer, r.margin = None, 0.0
            return
        self.score_locally(buckets)
        reps = self.pick_representatives(buckets)
        if not reps:
            r.answer, r.margin, r.fallback = majority_vote(r.chains), 0.0, True
            r.representatives, r.scores = {}, {}
            return
        if reps != r.representatives or not r.scores:
            r.representatives, r.scores = reps, self.evaluate_globally(reps)
        # best global score; ties to the bigger bucket, then to the answer sampled first
        order = sorted(r.scores, key=lambda a: (-r.scores[a], -len(buckets[a]), buckets[a][0]))
        r.answer, r.fallback = order[0], False
        r.margin = r.scores[order[0]] - (r.scores[order[1]] if len(order) > 1 else 0.0)


def aggregate(problem: Problem, sample: Callable[[int], Sequence[str]], judge: Judge,
              cfg: AoRConfig = AoRConfig()) -> AoRResult:
    """AoR on one problem. `sample(k)` returns k new chains (fewer, or none, when it has run out);
    `judge` scores them (see `Judge`)."""
    agg = _Aggregation(problem, judge, cfg)
    r = agg.result
    r.chains += list(sample(cfg.initial_samples))
    agg.decide(bucket_by_answer(r.chains))
    while r.margin < cfg.margin_threshold and len(r.chains) < cfg.max_samples:
        new = list(sample(min(cfg.extra_samples, cfg.max_samples - len(r.chains))))
        if not new:
            break
        r.chains += new
        agg.decide(bucket_by_answer(r.chains))
    return r


def pool_sampler(chains: Iterable[str]) -> Callable[[int], list[str]]:
    """A `sample` for `aggregate` that hands out precomputed chains in order, so that several
    methods can be compared on the same samples."""
    it = iter(chains)

    def sample(k: int) -> list[str]:
        return [c for _, c in zip(range(k), it)]

    return sample


__all__ = ["AoRConfig", "AoRResult", "ConstantJudge", "GLOBAL_PROMPT", "Judge", "LLMJudge",
           "LOCAL_PROMPT", "NoisyOracleJudge", "ORMJudge", "aggregate", "bucket_by_answer",
           "majority_vote", "parse_scores", "pool_sampler"]
