"""Tests for megads.rl.tasks: the arithmetic task, its split, prompts and SFT demonstrations."""

import pytest

from megads.rl.rewards import DEFAULT_SPEC, parse_completion, score
from megads.rl.tasks import TASKS, ArithmeticTask, Problem, demonstration, get_task, prompt


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask()


@pytest.fixture(scope="module")
def every_problem(task):
    """The whole default (2-digit) space: 10,000 additions and 5,050 subtractions."""
    return [task.make_problem(a, "+", b) for a in range(100) for b in range(100)] + [
        task.make_problem(a, "-", b) for a in range(100) for b in range(a + 1)
    ]


def test_problem_answer_id_and_prompt(task):
    p = task.make_problem(47, "+", 38)
    assert (p.id, p.answer, p.prompt) == ("arithmetic:47+38", "85", "Q: 47+38\n")
    assert prompt(p) == task.prompt(p) == "Q: 47+38\n"
    q = task.make_problem(52, "-", 48)
    assert (q.id, q.answer, q.prompt) == ("arithmetic:52-48", "4", "Q: 52-48\n")
    # The id names the problem, not the draw or the task's knobs.
    assert ArithmeticTask(max_digits=3).make_problem(47, "+", 38) == p


@pytest.mark.parametrize(
    "a, op, b, completion",
    [
        (47, "+", 38, "<think>7+8=15,4+3+1=8</think><answer>85</answer>"),
        (7, "+", 38, "<think>7+8=15,0+3+1=4</think><answer>45</answer>"),
        (99, "+", 99, "<think>9+9=18,9+9+1=19</think><answer>198</answer>"),
        (3, "+", 4, "<think>3+4=7</think><answer>7</answer>"),
        (52, "-", 38, "<think>12-8=4,5-3-1=1</think><answer>14</answer>"),
        (52, "-", 48, "<think>12-8=4,5-4-1=0</think><answer>4</answer>"),
        (90, "-", 19, "<think>10-9=1,9-1-1=7</think><answer>71</answer>"),
        (0, "-", 0, "<think>0-0=0</think><answer>0</answer>"),
    ],
)
def test_demonstration_text(task, a, op, b, completion):
    p = task.make_problem(a, op, b)
    assert demonstration(p) == task.demonstration(p) == completion


def test_three_digit_demonstrations():
    task = ArithmeticTask(max_digits=3)
    assert task.demonstration(task.make_problem(999, "+", 999)) == (
        "<think>9+9=18,9+9+1=19,9+9+1=19</think><answer>1998</answer>"
    )
    assert task.demonstration(task.make_problem(900, "-", 109)) == (
        "<think>10-9=1,10-0-1=9,9-1-1=7</think><answer>791</answer>"
    )


def test_every_demonstration_is_well_formed_and_correct(task, every_problem):
    completions = [task.demonstration(p) for p in every_problem]
    for p, c in zip(every_problem, completions):
        parsed = parse_completion(c)
        assert parsed.well_formed and parsed.answer == p.answer == str(p.a + p.b if p.op == "+" else p.a - p.b)
    total, per_function = score(completions, every_problem, [("accuracy", 1.0), ("format", 1.0), ("partial", 1.0)])
    assert set(per_function["accuracy"]) == {1.0}
    assert set(per_function["format"]) == {1.0}
    assert set(per_function["partial"]) == {0.0}
    assert set(total) == {2.0}
    assert set(score(completions, every_problem, DEFAULT_SPEC)[0]) == {1.0}


def test_three_digit_demonstrations_are_correct():
    task = ArithmeticTask(max_digits=3)
    problems = task.problems("train", 2000, seed=1) + task.problems("heldout", 2000, seed=1)
    for p in problems:
        parsed = parse_completion(task.demonstration(p))
        assert parsed.well_formed and parsed.answer == str(p.a + p.b if p.op == "+" else p.a - p.b)


def test_length_bounds(task, every_problem):
    prompts = [len(p.prompt.encode()) for p in every_problem]
    completions = [len(task.demonstration(p).encode()) for p in every_problem]
    assert max(prompts) == task.max_prompt_bytes == 9 <= 16
    assert max(completions) == task.max_completion_bytes == 50
    assert ArithmeticTask(operations="-").max_completion_bytes == 48
    for digits, operations in [(1, "+-"), (1, "-"), (3, "+"), (3, "-")]:
        small = ArithmeticTask(max_digits=digits, operations=operations)
        n = 10**digits
        worst = [small.make_problem(n - 1, "+", n - 1)] if "+" in operations else []
        worst += [small.make_problem(2 * n // 10 if digits > 1 else 9, "-", 9)] if "-" in operations else []
        sample = small.problems("train", 3000 if digits > 1 else small.split_size("train"), seed=0) + worst
        assert max(len(small.demonstration(p).encode()) for p in sample) == small.max_completion_bytes
        assert max(len(p.prompt.encode()) for p in sample) <= small.max_prompt_bytes
    assert ArithmeticTask(max_digits=3).max_prompt_bytes == 11


def test_problems_are_deterministic_distinct_and_of_their_split(task):
    for split in ("train", "heldout"):
        first = task.problems(split, 300, seed=7)
        assert first == task.problems(split, 300, seed=7)
        assert first != task.problems(split, 300, seed=8)
        assert len({p.id for p in first}) == 300
        assert {task.split_of(p) for p in first} == {split}
        assert {p.op for p in first} == {"+", "-"}
    # A fresh task object gives the same problems (nothing depends on process state).
    assert ArithmeticTask().problems("heldout", 50, seed=3) == task.problems("heldout", 50, seed=3)


def test_split_is_disjoint_whatever_the_seed(task, every_problem):
    heldout_ids = {p.id for p in every_problem if task.split_of(p) == "heldout"}
    train_ids = {p.id for p in every_problem if task.split_of(p) == "train"}
    assert not heldout_ids & train_ids and len(heldout_ids) + len(train_ids) == len(every_problem)
    for seed in range(20):
        assert not {p.id for p in task.problems("train", 500, seed)} & heldout_ids
        assert not {p.id for p in task.problems("heldout", 100, seed)} & train_ids
    # Whole splits (the enumerating path) partition the space.
    all_train = task.problems("train", task.split_size("train"), seed=0)
    all_heldout = task.problems("heldout", task.split_size("heldout"), seed=0)
    assert {p.id for p in all_train} == train_ids
    assert {p.id for p in all_heldout} == heldout_ids


def test_split_depends_on_the_problem_only(task):
    other = ArithmeticTask(max_digits=3, operations="+")
    for p in task.problems("heldout", 200, seed=0):
        if p.op == "+":
            assert other.split_of(p) == "heldout"
    # A smaller held-out fraction holds out a subset.
    smaller = ArithmeticTask(heldout_fraction=0.05)
    assert {p.id for p in smaller.problems("heldout", smaller.split_size("heldout"), 0)} < {
        p.id for p in task.problems("heldout", task.split_size("heldout"), 0)
    }


def test_space_and_split_sizes(task):
    assert task.space_size() == 15_050 and task.space_size("+") == 10_000 and task.space_size("-") == 5_050
    heldout, train = task.split_size("heldout"), task.split_size("train")
    assert heldout + train == 15_050
    assert heldout >= 500
    assert (heldout, train) == (1531, 13519)
    assert len({p.id for p in task.problems("heldout", 500, seed=0)}) == 500
    assert len(task.problems("heldout", heldout, seed=5)) == heldout


def test_too_many_problems_is_a_clear_error(task):
    heldout = task.split_size("heldout")
    with pytest.raises(ValueError, match=f"heldout split has only {heldout} distinct problems.*{heldout + 1}"):
        task.problems("heldout", heldout + 1, seed=0)
    with pytest.raises(ValueError, match="train split has only"):
        ArithmeticTask(max_digits=1).problems("train", 1000, seed=0)


def test_bad_arguments(task):
    with pytest.raises(ValueError, match="Unknown split 'test'; splits are: train, heldout."):
        task.problems("test", 1, 0)
    with pytest.raises(ValueError, match="count must be a non-negative integer"):
        task.problems("train", -1, 0)
    assert task.problems("train", 0, 0) == []
    with pytest.raises(ValueError, match="subtraction needs a >= b"):
        task.make_problem(3, "-", 4)
    with pytest.raises(ValueError, match=r"operands must be integers in \[0, 100\)"):
        task.make_problem(100, "+", 4)
    with pytest.raises(ValueError, match="max_digits must be an integer from 1 to 9"):
        ArithmeticTask(max_digits=0)
    with pytest.raises(ValueError, match="operations must be"):
        ArithmeticTask(operations="*")
    with pytest.raises(ValueError, match="heldout_fraction must be a number in"):
        ArithmeticTask(heldout_fraction=1.0)
    only_add = ArithmeticTask(operations="+")
    assert {p.op for p in only_add.problems("train", 100, 0)} == {"+"}
    with pytest.raises(ValueError, match="operation '-' is not one of"):
        only_add.make_problem(5, "-", 3)


def test_registry():
    assert TASKS == {"arithmetic": ArithmeticTask}
    t = get_task("arithmetic", max_digits=3)
    assert isinstance(t, ArithmeticTask) and t.max_digits == 3
    assert get_task("arithmetic").max_digits == 2
    with pytest.raises(ValueError) as err:
        get_task("countdown")
    assert str(err.value) == "Unknown task 'countdown'; known tasks: arithmetic."
    with pytest.raises(ValueError, match="Task 'arithmetic' has no option 'digits'; its options are: max_digits"):
        get_task("arithmetic", digits=3)


def test_problem_is_hashable_and_frozen(task):
    p = task.make_problem(1, "+", 2)
    assert isinstance(p, Problem) and {p: 1}[task.make_problem(1, "+", 2)] == 1
    with pytest.raises(AttributeError):
        p.answer = "4"
