import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.tasks import (Arithmetic, check, correct_prefix, extract_answer, make_problem, prompt,
                           solve, split_steps)


def test_worked_example_reads_as_documented():
    p = make_problem(478, "+", 356)
    assert prompt(p) == "Q: 478+356\n"
    assert p.solution == ("8+6+0=14, write 4 carry 1\n7+5+1=13, write 3 carry 1\n"
                          "4+3+1=8, write 8 carry 0\nA: 834\n")
    assert make_problem(999, "+", 1).steps[-1] == "0+0+1=1, write 1 carry 0"
    assert make_problem(512, "-", 389).steps[0] == "2-9-0: 12-9-0=3, write 3 borrow 1"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10 ** 9), st.integers(0, 10 ** 9), st.sampled_from("+-"))
def test_checker_accepts_every_generated_solution_and_only_the_true_answer(a, b, op):
    if op == "-" and a < b:
        a, b = b, a
    p = make_problem(a, op, b)
    assert int(p.answer) == (a + b if op == "+" else a - b)
    assert check(p, p.solution) and check(p, prompt(p) + p.solution)
    assert not check(p, p.solution.replace(f"A: {p.answer}", f"A: {int(p.answer) + 1}"))
    steps = split_steps(p.solution)
    assert steps == [*p.steps, f"A: {p.answer}"] and correct_prefix(p, p.solution) == len(steps)


def test_steps_are_consistent_with_the_column_rule():
    # each step's written digit, read from the units up, spells the answer
    for a, b in [(478, 356), (5, 7), (999, 1), (123456789, 987654321)]:
        p = make_problem(a, "+", b)
        written = [int(s.split("write ")[1].split()[0]) for s in p.steps]
        assert int("".join(map(str, reversed(written)))) == a + b


@pytest.mark.parametrize("text, expected", [
    ("A: 834", "834"),
    ("steps\nA: 0834\n", "834"),  # canonical form
    ("A: 12\nA: 13\n", "12"),  # the first answer line counts
    ("A: -5\n", "-5"),
    ("the answer is 834", None),
    ("A: 8 34\n", None),
    ("A: eight\n", None),
    ("xA: 834\n", None),
    ("A:834\n", None),
    ("", None),
    ("A: 834 apples\n", None),
])
def test_extractor_on_malformed_text(text, expected):
    assert extract_answer(text) == expected


def test_split_steps_stops_at_the_answer_and_skips_blank_lines():
    assert split_steps("1+2+0=3, write 3 carry 0\n\n  A: 3 \nQ: 5+5\n") == [
        "1+2+0=3, write 3 carry 0", "A: 3"]
    assert split_steps("no answer\nline two") == ["no answer", "line two"]


def test_correct_prefix_stops_at_the_first_wrong_step():
    p = make_problem(478, "+", 356)
    wrong = p.solution.replace("7+5+1=13", "7+5+1=12")
    assert correct_prefix(p, wrong) == 1 and not check(p, "A: 835")
    assert correct_prefix(p, "") == 0


@pytest.mark.parametrize("ops", ["+", "+-"])
def test_splits_are_disjoint_levels_hold_and_generation_repeats(ops):
    task = Arithmetic(ops=ops)
    for level in (1, 2, 4):
        n = 8 if level == 1 else 150
        train = task.problems(level, n, "train", seed=0)
        test = task.problems(level, n // 4 if level == 1 else n, "test", seed=0)
        assert len({p.question for p in train}) == len(train)
        assert not {p.question for p in train} & {p.question for p in test}
        for p in train + test:
            a, b = map(int, p.question.replace("-", "+").split("+"))
            assert p.level == level and all(len(str(x)) == level for x in (a, b))
            assert task.split_of(a, p.question[len(str(a))], b) == ("test" if p in test else "train")
        assert task.problems(level, n, "train", seed=0) == train
        assert task.problems(level, n, "train", seed=1) != train


def test_held_out_share_and_order_independence():
    task = Arithmetic()
    rng = random.Random(0)
    pairs = [(rng.randint(100, 999), rng.randint(100, 999)) for _ in range(4000)]
    share = sum(task.split_of(a, "+", b) == "test" for a, b in pairs) / len(pairs)
    assert 0.08 < share < 0.12
    assert all(task.split_of(a, "+", b) == task.split_of(b, "+", a) for a, b in pairs[:200])


def test_impossible_requests_are_refused():
    with pytest.raises(ValueError, match="fewer than"):
        Arithmetic().problems(1, 60, "test")
    with pytest.raises(ValueError):
        Arithmetic().problems(0, 1)
    with pytest.raises(ValueError):
        solve(3, "-", 5)
