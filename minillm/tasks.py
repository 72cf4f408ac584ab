"""Verifiable reasoning tasks: multi-digit addition and subtraction with worked column solutions.

A problem's solution is a chain of steps, one line each, computed column by column from the units
up, then the answer line:

    Q: 478+356
    8+6+0=14, write 4 carry 1
    7+5+1=13, write 3 carry 1
    4+3+1=8, write 8 carry 0
    A: 834

    Q: 512-389
    2-9-0: 12-9-0=3, write 3 borrow 1      (a column that borrows shows the ten it borrowed)
    1-8-1: 11-8-1=2, write 2 borrow 1
    5-3-1=1, write 1 borrow 0
    A: 123

An addition that ends with a carry adds a column of zeros ("0+0+1=1, write 1 carry 0"), so every
step has the same form.
Every step depends only on two digits and the carry (or borrow) of the step before, so a small
model can learn it, a step can be checked on its own, and a chain's answer is exact.

- `Arithmetic.problems(level, n, split, seed)`: `level` is the number of digits of each operand
  (1-9); `split` is "train" or "test" (held out), decided by a hash of the unordered operands, so
  the splits are disjoint at every level (`test_fraction` of all problems are held out, and a+b
  and b+a fall on the same side).
- `prompt(problem)`, `problem.solution` (the text a model should generate after the prompt),
  `split_steps(text)`, `extract_answer(text)` (None when there is no well-formed answer line),
  `check(problem, text)` (exact: the extracted answer equals the true integer),
  `correct_prefix(problem, text)` (how many leading steps equal the reference: an oracle process
  reward).
- Chains as search and reward models see them: `chain_text(steps)` (one step a line),
  `canonical(text)` (a generated solution cut after its answer line), `is_final(step)` (an answer
  line), and `majority_vote(chains)` (self-consistency: the answer most chains reach).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

ANSWER_RE = re.compile(r"^A: (-?\d+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Problem:
    question: str  # "478+356"
    answer: str  # "834"
    steps: tuple[str, ...]  # the worked solution's steps, answer line excluded
    level: int

    @property
    def solution(self) -> str:
        """The text a model generates after `prompt(problem)`: the steps, then the answer line."""
        return "".join(s + "\n" for s in self.steps) + f"A: {self.answer}\n"


def prompt(problem: Problem) -> str:
    return f"Q: {problem.question}\n"


def split_steps(text: str) -> list[str]:
    """The steps of a generated solution: its non-empty lines, up to and including the first
    answer line (what follows the answer is not part of the chain)."""
    steps = []
    for line in text.split("\n"):
        line = line.strip()
        if line:
            steps.append(line)
            if ANSWER_RE.match(line):
                break
    return steps


def extract_answer(text: str) -> str | None:
    """The integer on the first line of the form `A: <integer>`, canonical (no leading zeros), or
    None when no line has that form."""
    m = ANSWER_RE.search(text)
    return None if m is None else str(int(m.group(1)))


def check(problem: Problem, text: str) -> bool:
    """Exact outcome check: the answer extracted from `text` is the problem's answer."""
    return extract_answer(text) == problem.answer


def chain_text(steps: Sequence[str]) -> str:
    """The canonical text of a chain or of a prefix of one: each step on its own line."""
    return "".join(s + "\n" for s in steps)


def canonical(text: str) -> str:
    """A generated solution in canonical form: its steps up to the answer line (`split_steps`)."""
    return chain_text(split_steps(text))


def is_final(step: str) -> bool:
    """Whether a step is an answer line (the chain ends there)."""
    return ANSWER_RE.match(step) is not None


def majority_vote(chains: Sequence[str]) -> str | None:
    """The answer most chains reach (self-consistency, Wang et al. 2023); a tie goes to the answer
    reached first; None when no chain has an answer."""
    counts = Counter(a for a in map(extract_answer, chains) if a is not None)
    # a Counter keeps first-appearance order, and max keeps the first of equal counts
    return max(counts, key=counts.__getitem__, default=None)


def correct_prefix(problem: Problem, text: str) -> int:
    """Number of leading steps of `text` equal to the reference solution's steps (the answer line
    counts as the last step): an oracle process reward."""
    reference = split_steps(problem.solution)
    n = 0
    for got, want in zip(split_steps(text), reference):
        if got != want:
            break
        n += 1
    return n


def solve(a: int, op: str, b: int) -> tuple[tuple[str, ...], str]:
    """The worked column solution (steps) and the answer of `a op b` (for "-", a >= b)."""
    if op not in "+-" or a < 0 or b < 0 or (op == "-" and a < b):
        raise ValueError(f"unsupported problem {a}{op}{b}: + of naturals, or - with a >= b")
    da, db = str(a)[::-1], str(b)[::-1]
    steps, digits, carry = [], [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if op == "+":
            total = x + y + carry
            digit, new_carry = total % 10, total // 10
            steps.append(f"{x}+{y}+{carry}={total}, write {digit} carry {new_carry}")
        else:
            new_carry = 1 if x - y - carry < 0 else 0
            digit = x + 10 * new_carry - y - carry
            if new_carry:
                steps.append(f"{x}-{y}-{carry}: {x + 10}-{y}-{carry}={digit}, write {digit} borrow 1")
            else:
                steps.append(f"{x}-{y}-{carry}={digit}, write {digit} borrow 0")
        digits.append(digit)
        carry = new_carry
    if carry:  # only addition ends with a carry: one more column of zeros, in the same form
        steps.append("0+0+1=1, write 1 carry 0")
        digits.append(1)
    answer = str(int("".join(str(d) for d in reversed(digits))))
    assert answer == str(a + b if op == "+" else a - b)
    return tuple(steps), answer


def make_problem(a: int, op: str, b: int, level: int | None = None) -> Problem:
    steps, answer = solve(a, op, b)
    return Problem(f"{a}{op}{b}", answer, steps, level or len(str(max(a, b))))


@dataclass(frozen=True)
class Arithmetic:
    """Problem generator. `ops`: the operations drawn ("+", "-" or "+-")."""

    ops: str = "+"
    test_fraction: float = 0.1

    def split_of(self, a: int, op: str, b: int) -> str:
        key = f"{min(a, b)}{op}{max(a, b)}".encode()
        bucket = int.from_bytes(hashlib.sha1(key).digest()[:8], "big") / 2 ** 64
        return "test" if bucket < self.test_fraction else "train"

    def problems(self, level: int, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        """`n` distinct problems of `level`-digit operands from `split`, in a fixed order per seed."""
        if not 1 <= level <= 9:
            raise ValueError(f"level {level}: expected 1-9 digits per operand")
        if split not in ("train", "test"):
            raise ValueError(f"split {split!r}: expected 'train' or 'test'")
        low, high = (0 if level == 1 else 10 ** (level - 1)), 10 ** level - 1
        # upper bound on the split's size, to refuse an impossible n instead of looping forever
        available = len(self.ops) * (high - low + 1) ** 2
        rng = random.Random(f"{seed}/{level}/{split}/{self.ops}")
        seen, out, tries = set(), [], 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n + 1000 and tries > 3 * available:
                raise ValueError(f"level {level} has fewer than {n} distinct {split} problems")
            a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice(self.ops)
            if op == "-" and a < b:
                a, b = b, a
            if (a, op, b) in seen or self.split_of(a, op, b) != split:
                continue
            seen.add((a, op, b))
            out.append(make_problem(a, op, b, level))
        return out


__all__ = ["Arithmetic", "Problem", "canonical", "chain_text", "check", "correct_prefix",
           "extract_answer", "is_final", "majority_vote", "make_problem", "prompt", "solve",
           "split_steps"]
