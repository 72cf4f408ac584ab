"""The o1 roadmap, part 1: search at a fixed token budget (Zeng et al. 2024, "Scaling of Search
and Learning: a Roadmap to Reproduce o1", section 5), and the policy it searches with.

Search spends more generated tokens on one question to answer it better. Every method here works
on one question within a `TokenBudget` and repeats the same loop until the budget cannot cover the
next generation:

    generate  -- sample whole chains, or next steps of chosen prefixes (one step a line)
    score     -- a reward (`Scorer`: a reward model, never the checker) rates chains or prefixes
    keep      -- the best survive (beam search), or the values update the tree (MCTS)

- `greedy`: one chain at temperature 0.
- `majority` (self-consistency: the answer most sampled chains reach, `tasks.majority_vote`) and
  `orm_best_of_n` (the sampled chain an outcome reward model scores highest): whole chains sampled
  in waves (`sample_chains`) until the budget is spent.
- `beam_search` (step-level, guided by a process reward model, Snell et al. 2024): each open beam
  samples `expand` next steps, the PRM rates every extended prefix, the `width` best survive; a
  survivor that ends in an answer line is set aside as finished.
- `mcts` (Monte-Carlo tree search over steps): selection by UCT, child = argmax over open children
  of V(child) + c sqrt(ln N(parent) / N(child)) (Kocsis & Szepesvari 2006); expansion by `children`
  sampled next steps; evaluation of each new child by the PRM (or by scoring a rollout sampled on
  from it); backup of the value to the root.

The budget counts generated tokens as the backend reports them (`Completion.completion_tokens`:
every generated token, a stop string's and the end-of-text token's included). A generation starts
only if the budget covers its worst case (every prompt using its `max_new_tokens`), so no method
spends more than its budget; step-level searches may give their last step what is left, at least
half a step, so that a short answer line still fits. A chain is finished only at an answer line:
a step the policy does not write (it stops, or writes a blank line) extends nothing.

Search takes any `LanguageModel` (`LocalLM`, `OpenAIClient`, a scripted fake) and any `Scorer`
(`score(problems, texts) -> list[float]`, higher is better; `minillm.methods.o1_reward` has the
reward models, and an oracle for tests). `texts` are chains or prefixes of chains in canonical
form, one step a line, each line ending in a newline (`tasks.chain_text`).

The policy (`train_policy`, after the search code): a BPE tokenizer for the task, a tiny GPT
pretrained on worked problems (loss on every token), then supervised fine-tuning on (question,
solution) pairs (loss on the solution only, `minillm.sft` packing through
`Trainer(data_source=...)`). Each stage checkpoints and resumes; a finished policy is saved once and
reused (`policy.pt`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from ..checkpoint import checkpoints, load_model, save_model
from ..distributed import setup as setup_device
from ..errors import UserError
from ..generate import Completion, LanguageModel, LocalLM
from ..model import GPT
from ..sft import PackedLoader, encode_example
from ..tasks import (Arithmetic, Problem, canonical, extract_answer, is_final, majority_vote,
                     prompt, split_steps)
from ..tokenizer import Tokenizer, train_bpe
from ..train import TrainConfig, Trainer


class Scorer(Protocol):
    """What search needs from a reward: a score per (problem, chain or prefix of a chain), higher
    is better (`o1_reward.OutcomeRewardModel`, `ProcessRewardModel` and `OracleScorer` are
    scorers)."""

    def score(self, problems: list[Problem], texts: list[str]) -> list[float]: ...


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
    def of(cls, text: str, budget: TokenBudget, candidates: list[str]) -> SearchResult:
        return cls(text, extract_answer(text), budget.spent, budget.prompt_tokens, candidates)


# --- whole chains: greedy, majority voting, best-of-N ---------------------------------------------

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


def voted_chain(chains: Sequence[str]) -> str | None:
    """The first chain that reaches the majority answer (`tasks.majority_vote`); None when no chain
    has an answer."""
    answer = majority_vote(chains)
    if answer is None:
        return None
    return next(c for c in chains if extract_answer(c) == answer)


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
    return SearchResult.of(voted_chain(chains) or "", budget, chains)


def orm_best_of_n(lm: LanguageModel, scorer: Scorer, problem: Problem, limit: int,
                  max_new_tokens: int, temperature: float = 1.0, seed: int = 0) -> SearchResult:
    """Best-of-N: the sampled chain the outcome reward model scores highest."""
    budget = TokenBudget(lm, limit)
    chains = sample_chains(budget, problem, max_new_tokens, temperature, seed)
    return SearchResult.of(best_of_n(chains, problem, scorer) or "", budget, chains)


# --- step-level beam search -----------------------------------------------------------------------

def beam_search(lm: LanguageModel, scorer: Scorer, problem: Problem, limit: int, width: int,
                expand: int, step_tokens: int, max_steps: int = 16, temperature: float = 1.0,
                seed: int = 0) -> SearchResult:
    """Step-level beam search guided by a process reward (Snell et al. 2024): every open beam
    samples `expand` next steps (as many as the budget covers, dealt to the beams in turn), the
    scorer rates each extended prefix, the `width` best candidates survive; a survivor that ends
    (an answer line) is set aside as finished and no longer takes a beam slot. A sample without a
    step is no candidate. Stops when no beam is open, no beam got a step, or the budget cannot
    cover one more step; answers with the best-scored finished chain (or, if none finished, the
    best prefix of the last round that had candidates)."""
    budget, seeds, q = TokenBudget(lm, limit), _seeds(seed), prompt(problem)
    beams: list[str] = [""]
    ranked: list[tuple[float, str]] = []
    finished: list[tuple[float, str]] = []
    for _ in range(max_steps):
        n, max_new = _step_call(budget, len(beams) * expand, step_tokens)
        if n == 0:
            break
        parents = [beams[i % len(beams)] for i in range(n)]
        out = budget.generate([q + p for p in parents], max_new, temperature=temperature,
                              stop=["\n"], seed=next(seeds))
        # extended text -> whether it ends in an answer line; identical extensions are one
        candidates = dict(step for parent, completion in zip(parents, out)
                          if (step := _extend(parent, completion)) is not None)
        if not candidates:
            break
        texts = list(candidates)
        scores = scorer.score([problem] * len(texts), texts)
        ranked = sorted(zip(scores, texts), key=lambda st: -st[0])[:width]
        beams = []
        for score, text in ranked:
            (finished.append((score, text)) if candidates[text] else beams.append(text))
        if not beams:
            break
    pool = finished or ranked
    best = max(pool, key=lambda st: st[0])[1] if pool else ""
    return SearchResult.of(best, budget, [t for _, t in finished])


# --- Monte-Carlo tree search ----------------------------------------------------------------------

@dataclass(eq=False)
class Node:
    """A node of the search tree: a prefix of a chain (`text`, canonical) and its statistics."""
    text: str
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0
    terminal: bool = False  # nothing follows: an answer line, or the depth limit
    closed: bool = False  # terminal, a dead end, or every child closed: nothing left below

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
    child, a sample without a step is none, and a node that gets no child is a dead end, closed),
    evaluation of every new child (`"prm"`: the scorer's value of its prefix; `"rollout"`: the
    scorer's value of a chain sampled on from it, up to `rollout_tokens` tokens), backup of each
    value to the root. A child that ends in an answer line, or at `max_depth` steps, is closed
    (never selected again). Stops when the budget cannot cover an expansion (with its rollouts) or
    the whole tree is closed; answers with the best-scored complete chain seen (children and
    rollouts that end in an answer line), else the most visited path."""
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
        depth = len(split_steps(leaf.text)) + 1
        new: dict[str, Node] = {}
        for completion in out:
            step = _extend(leaf.text, completion)
            if step is not None and step[0] not in new:
                text, ended = step
                new[text] = Node(text, leaf, terminal=ended or depth >= max_depth)
        if not new:  # the policy stops here without another step: nothing to search below
            close(leaf)
            continue
        nodes = list(new.values())
        texts = [n.text for n in nodes]  # what is evaluated: the prefix, or its rollout
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
            if extract_answer(text) is not None:  # a complete chain (canonical: it ends there)
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


# --- token budgets and steps ----------------------------------------------------------------------

class BudgetExceeded(RuntimeError):
    """A generation was asked for that the budget cannot cover (a bug in the search calling it)."""


class TokenBudget:
    """The generated tokens one question may spend, counted from `Completion.completion_tokens`
    (every generated token, the end-of-text token included).

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


def _seeds(seed: int):
    rng = random.Random(seed)
    while True:
        yield rng.randrange(2 ** 31)


def _extend(text: str, completion: str) -> tuple[str, bool] | None:
    """A prefix extended by one generated step (a completion cut before its newline) and whether
    the chain ends there (an answer line); None when the completion holds no step (the policy
    stopped, or wrote a blank line): a prefix without an answer never counts as finished."""
    line = completion.strip().split("\n")[0].strip()
    if not line:
        return None
    return text + line + "\n", is_final(line)


def _step_call(budget: TokenBudget, wanted: int, step_tokens: int) -> tuple[int, int]:
    """(generations, max_new_tokens) of the next round of steps: as many of the `wanted` as the
    budget covers at `step_tokens` each; when it covers none but still half a step, one step cut to
    what is left (a short last line, such as the answer, fits); else (0, 0)."""
    n = min(wanted, budget.affordable(step_tokens))
    if n:
        return n, step_tokens
    return (1, budget.remaining) if budget.remaining >= max(step_tokens // 2, 1) else (0, 0)


# --- the policy: initialisation by pretraining and SFT --------------------------------------------

# Every digit its own pre-token (a leading space kept with it), so a number is its digits and a
# column step reads the digits it adds; words and punctuation merge freely.
ARITHMETIC_PATTERN = r" ?\p{N}| ?[^\s\p{N}]+|\s+"


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


__all__ = ["BudgetExceeded", "Node", "Policy", "PolicyConfig", "Scorer", "SearchResult",
           "TokenBudget", "arithmetic_tokenizer", "backup", "beam_search", "best_of_n", "close",
           "greedy", "majority", "mcts", "orm_best_of_n", "policy_problems", "sample",
           "sample_chains", "select", "task_problems", "train_policy", "train_stage", "uct",
           "voted_chain"]
