"""Verifiable tasks generated in code, for GRPO's rule-based rewards.

A task makes problems (each with a stable id, a prompt and a canonical answer string), splits them
into a train and a held-out set by a deterministic function of the problem itself (so the two sets are
disjoint whatever seed samples them), and writes the cold-start SFT completion of a problem in
DeepSeek-R1's format, ``<think>...</think><answer>...</answer>`` (without the end-of-text token: the
caller appends it).

The one task is ``"arithmetic"``: addition and subtraction of non-negative integers with up to
``max_digits`` digits per operand. Subtraction problems have ``a >= b`` (answers are never negative).
Prompts are ``"Q: 47+38\\n"``; the think part works the columns right to left, one column per
comma-separated step, writing the carry (``+1``) or the borrow (``-1``) coming in from the column to its
right, and the ten borrowed from the column to its left as a leading ``1``::

    47+38  ->  <think>7+8=15,4+3+1=8</think><answer>85</answer>
    52-38  ->  <think>12-8=4,5-3-1=1</think><answer>14</answer>

A missing digit of the shorter operand reads as 0 (``7+38`` -> ``7+8=15,0+3+1=4``), and the answer drops
leading zeros (``52-48`` -> ``12-8=4,5-4-1=0``, answer ``4``).

Knobs (``ArithmeticTask(...)`` or ``get_task("arithmetic", ...)``): ``max_digits`` (default 2: 15,050
problems, ~10% held out; 3 gives 1,500,500 and a longer procedure), ``operations`` (``"+-"``, ``"+"`` or
``"-"``) and ``heldout_fraction`` (default 0.1; the held-out set of a smaller fraction is a subset of that
of a larger one, and a problem's split does not depend on ``max_digits`` or ``operations``).
"""

from __future__ import annotations

import hashlib
import inspect
import random
from dataclasses import dataclass

__all__ = [
    "INTEGER_PATTERN",
    "SPLITS",
    "TASKS",
    "ArithmeticTask",
    "Problem",
    "demonstration",
    "get_task",
    "prompt",
]

SPLITS = ("train", "heldout")
INTEGER_PATTERN = r"-?[0-9]+"  # what an answer of this task looks like (rewards: format / partial credit)

# Past this many problems in a space, enumerating it (to sample most of a split) is refused.
_MAX_ENUMERATED = 5_000_000


@dataclass(frozen=True)
class Problem:
    """One problem: ``a op b``. ``id`` is stable (it names the problem, not a draw of it); ``answer`` is
    the canonical answer string a completion must reproduce exactly; ``prompt`` is the model's input."""

    id: str
    a: int
    op: str
    b: int
    answer: str
    prompt: str
    answer_pattern: str = INTEGER_PATTERN  # regular expression a parsable answer fully matches


def _prompt_text(a: int, op: str, b: int) -> str:
    return f"Q: {a}{op}{b}\n"


def prompt(problem: Problem) -> str:
    """The prompt text of a problem, e.g. ``"Q: 47+38\\n"``."""
    return _prompt_text(problem.a, problem.op, problem.b)


def _digits(n: int, width: int) -> list[int]:
    """Digits of ``n`` from the right, padded with zeros to ``width``."""
    return [(n // 10**i) % 10 for i in range(width)]


def _addition_steps(a: int, b: int) -> tuple[list[str], str]:
    width = max(len(str(a)), len(str(b)))
    steps, digits, carry = [], [], 0
    for da, db in zip(_digits(a, width), _digits(b, width)):
        total = da + db + carry
        steps.append(f"{da}+{db}{'+1' if carry else ''}={total}")
        digits.append(total % 10)
        carry = total // 10
    if carry:
        digits.append(carry)
    return steps, str(int("".join(map(str, reversed(digits)))))


def _subtraction_steps(a: int, b: int) -> tuple[list[str], str]:
    width = len(str(a))  # a >= b
    steps, digits, borrow = [], [], 0
    for da, db in zip(_digits(a, width), _digits(b, width)):
        diff = da - db - borrow
        borrow_in = "-1" if borrow else ""
        borrow = int(diff < 0)
        top = da + 10 * borrow
        diff += 10 * borrow
        steps.append(f"{top}-{db}{borrow_in}={diff}")
        digits.append(diff)
    return steps, str(int("".join(map(str, reversed(digits)))))


def _steps(a: int, op: str, b: int) -> tuple[list[str], str]:
    return _addition_steps(a, b) if op == "+" else _subtraction_steps(a, b)


def demonstration(problem: Problem) -> str:
    """The cold-start SFT completion of a problem (no end-of-text token), e.g.
    ``"<think>7+8=15,4+3+1=8</think><answer>85</answer>"``."""
    steps, answer = _steps(problem.a, problem.op, problem.b)
    return f"<think>{','.join(steps)}</think><answer>{answer}</answer>"


def _heldout_score(a: int, op: str, b: int) -> float:
    """A uniform number in [0, 1) that depends on the problem only; below ``heldout_fraction`` = held out."""
    digest = hashlib.blake2b(f"{a}{op}{b}".encode(), digest_size=8, person=b"megads-arith").digest()
    return int.from_bytes(digest, "big") / 2.0**64


class ArithmeticTask:
    """Addition and subtraction (``a >= b``) of non-negative integers below ``10**max_digits``."""

    name = "arithmetic"

    def __init__(self, max_digits: int = 2, operations: str = "+-", heldout_fraction: float = 0.1):
        if isinstance(max_digits, bool) or not isinstance(max_digits, int) or not 1 <= max_digits <= 9:
            raise ValueError(f"arithmetic: max_digits must be an integer from 1 to 9, got {max_digits!r}.")
        if (
            not isinstance(operations, str)
            or not operations
            or set(operations) - {"+", "-"}
            or len(set(operations)) != len(operations)
        ):
            raise ValueError(f"arithmetic: operations must be '+-', '+' or '-', got {operations!r}.")
        if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) or not (
            0.0 < heldout_fraction < 1.0
        ):
            raise ValueError(f"arithmetic: heldout_fraction must be a number in (0, 1), got {heldout_fraction!r}.")
        self.max_digits = max_digits
        self.operations = operations
        self.heldout_fraction = float(heldout_fraction)
        self._limit = 10**max_digits  # operands are in [0, limit)
        self._enumerated: dict[str, dict[str, list[tuple[int, int]]]] = {}

    def __repr__(self) -> str:
        return (
            f"ArithmeticTask(max_digits={self.max_digits}, operations={self.operations!r}, "
            f"heldout_fraction={self.heldout_fraction})"
        )

    # -- problems ---------------------------------------------------------------------------------------

    def make_problem(self, a: int, op: str, b: int) -> Problem:
        """The problem ``a op b`` (validated against this task's knobs)."""
        if op not in self.operations:
            raise ValueError(f"arithmetic: operation {op!r} is not one of this task's {self.operations!r}.")
        for operand in (a, b):
            if isinstance(operand, bool) or not isinstance(operand, int) or not 0 <= operand < self._limit:
                raise ValueError(
                    f"arithmetic: operands must be integers in [0, {self._limit}) for max_digits="
                    f"{self.max_digits}, got {operand!r}."
                )
        if op == "-" and a < b:
            raise ValueError(f"arithmetic: subtraction needs a >= b (answers are non-negative), got {a}-{b}.")
        answer = str(a + b if op == "+" else a - b)
        return Problem(id=f"{self.name}:{a}{op}{b}", a=a, op=op, b=b, answer=answer, prompt=_prompt_text(a, op, b))

    def split_of(self, problem: Problem) -> str:
        """``"heldout"`` or ``"train"``: a deterministic function of the problem (and heldout_fraction)."""
        return self._split(problem.a, problem.op, problem.b)

    def _split(self, a: int, op: str, b: int) -> str:
        return "heldout" if _heldout_score(a, op, b) < self.heldout_fraction else "train"

    def space_size(self, op: str | None = None) -> int:
        """How many problems exist (of one operation, or of all of this task's operations)."""
        n = self._limit
        sizes = {"+": n * n, "-": n * (n + 1) // 2}
        return sum(sizes[o] for o in (self.operations if op is None else op))

    def split_size(self, split: str) -> int:
        """How many distinct problems a split has (exact; enumerates the space, so O(space_size()))."""
        _check_split(split)
        return sum(len(pairs) for pairs in self._enumerate(split).values())

    def problems(self, split: str, count: int, seed: int) -> list[Problem]:
        """``count`` distinct problems of ``split``, deterministic in ``seed`` (and the knobs).

        Each draw picks an operation uniformly, then operands uniformly among that operation's problems
        in the split. Raises ValueError when the split has fewer than ``count`` problems.
        """
        _check_split(split)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"arithmetic: count must be a non-negative integer, got {count!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"arithmetic: seed must be an integer, got {seed!r}.")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        fraction = self.heldout_fraction if split == "heldout" else 1.0 - self.heldout_fraction
        if count <= min(self.space_size(op) for op in self.operations) * fraction / 4:
            pairs = self._sample_by_rejection(split, count, rng)  # cheap; no enumeration
        else:
            pairs = self._sample_enumerated(split, count, rng)
        return [self.make_problem(a, op, b) for op, a, b in pairs]

    def _draw(self, op: str, rng: random.Random) -> tuple[int, int]:
        while True:
            a, b = rng.randrange(self._limit), rng.randrange(self._limit)
            if op == "+" or a >= b:
                return a, b

    def _sample_by_rejection(self, split: str, count: int, rng: random.Random) -> list[tuple[str, int, int]]:
        chosen: list[tuple[str, int, int]] = []
        seen: set[tuple[str, int, int]] = set()
        # Each operation's share of the split is >= 4x count, so a draw is kept with probability
        # >= ~0.75 * min(fraction); this bound is never reached in practice.
        attempts = 1000 + 1000 * count
        while len(chosen) < count:
            attempts -= 1
            if attempts < 0:
                raise RuntimeError(f"arithmetic: could not draw {count} distinct {split} problems.")
            op = rng.choice(self.operations)
            a, b = self._draw(op, rng)
            key = (op, a, b)
            if key not in seen and self._split(a, op, b) == split:
                seen.add(key)
                chosen.append(key)
        return chosen

    def _sample_enumerated(self, split: str, count: int, rng: random.Random) -> list[tuple[str, int, int]]:
        by_op = self._enumerate(split)
        available = sum(len(pairs) for pairs in by_op.values())
        if count > available:
            raise ValueError(
                f"arithmetic: the {split} split has only {available} distinct problems with max_digits="
                f"{self.max_digits}, operations={self.operations!r} and heldout_fraction="
                f"{self.heldout_fraction}, fewer than the {count} asked for."
            )
        pools = {op: rng.sample(pairs, len(pairs)) for op, pairs in by_op.items()}
        chosen = []
        while len(chosen) < count:
            op = rng.choice([o for o in self.operations if pools[o]])
            a, b = pools[op].pop()
            chosen.append((op, a, b))
        return chosen

    def _enumerate(self, split: str) -> dict[str, list[tuple[int, int]]]:
        if split not in self._enumerated:
            if self.space_size() > _MAX_ENUMERATED:
                raise ValueError(
                    f"arithmetic: sampling this many problems needs the whole space enumerated, and "
                    f"max_digits={self.max_digits} has {self.space_size()} problems (at most "
                    f"{_MAX_ENUMERATED} are enumerated); ask for fewer."
                )
            n = self._limit
            self._enumerated[split] = {
                op: [
                    (a, b)
                    for a in range(n)
                    for b in (range(n) if op == "+" else range(a + 1))
                    if self._split(a, op, b) == split
                ]
                for op in self.operations
            }
        return self._enumerated[split]

    # -- text -------------------------------------------------------------------------------------------

    def prompt(self, problem: Problem) -> str:
        """The prompt text of a problem, e.g. ``"Q: 47+38\\n"``."""
        return prompt(problem)

    def demonstration(self, problem: Problem) -> str:
        """The cold-start SFT completion (no end-of-text token)."""
        return demonstration(problem)

    @property
    def max_prompt_bytes(self) -> int:
        """The longest prompt, in UTF-8 bytes (= tokens of a byte-level tokenizer)."""
        return len("Q: \n") + 2 * self.max_digits + 1

    @property
    def max_completion_bytes(self) -> int:
        """The longest demonstration, in bytes (without the end-of-text token): a budget for generation."""
        n, tags = self.max_digits, len("<think></think><answer></answer>")
        # Addition, all nines: "9+9=18" then n-1 steps "9+9+1=19", commas, n+1 answer digits.
        longest = {"+": tags + 6 + 8 * (n - 1) + (n - 1) + (n + 1)}
        # Subtraction: "1d-d=d", middle steps "1d-d-1=d", top step "d-d-1=d" (a >= b), n answer digits.
        longest["-"] = tags + (5 + 1 if n == 1 else 6 + 8 * (n - 2) + 7 + (n - 1) + n)
        return max(longest[op] for op in self.operations)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; splits are: {', '.join(SPLITS)}.")


TASKS = {"arithmetic": ArithmeticTask}


def get_task(name: str, **options) -> ArithmeticTask:
    """The task registered as ``name``, built with ``options`` (its constructor's keyword arguments)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}.")
    cls = TASKS[name]
    known = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"Task {name!r} has no option {unknown[0]!r}; its options are: {', '.join(known)}.")
    return cls(**options)
