"""Rule-based rewards for GRPO: parse a completion, score it with named, weighted reward functions.

A completion (the generated text after the prompt, without the end-of-text token) is *well formed* when
it is exactly ``<think>...</think><answer>...</answer>``: each of the four tags once, in that order, the
answer block directly after the think block, only whitespace around and between the blocks, and a
non-empty answer. Anything else (a repeated or nested tag, a second answer block, text outside the tags,
the answer before the think block, a missing close tag, an empty answer) is not, and earns nothing.

Built-in reward functions, each ``fn(completion, problem) -> float`` (``BUILTIN_REWARDS``, also ``REWARDS``):

- ``"accuracy"``: 1.0 when well formed and the answer equals ``problem.answer`` exactly (both stripped).
  No numeric leniency: ``"085"``, ``"85.0"`` and ``"+85"`` are wrong for ``"85"``. The demonstrations
  teach one canonical rendering, and accepting several would let a policy spread probability over
  renderings (or find a lenient parser's loophole) for no gain in what it can compute.
- ``"format"``: 1.0 when well formed and the answer is *one* answer of the task's shape (it fully matches
  ``problem.answer_pattern`` when the problem has one, e.g. an integer), so ``"85 or 86"`` earns nothing.
- ``"partial"``: 0.1 (TinyZero's value) for a well-formed, parsable (integer, or the problem's
  ``answer_pattern``) but wrong answer, 0 otherwise; ``partial_reward(value)`` makes one with another value.

With ``DEFAULT_SPEC`` (accuracy 1 + partial 1) a completion scores 1.0 correct, 0.1 well formed but wrong,
0 otherwise: TinyZero's scheme.

A problem is anything with an ``answer`` string; ``prompt`` (named in errors) and ``answer_pattern``
are optional. Extra reward functions go into a registry object, not into module state::

    registry = default_registry()                  # a fresh copy of the built-ins
    registry.register_reward("short", lambda completion, problem: float(len(completion) < 40))
    total, per_function = score(completions, problems, RewardSpec([("accuracy", 1.0), ("short", 0.1)]), registry)
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "BUILTIN_REWARDS",
    "DEFAULT_PARTIAL_CREDIT",
    "DEFAULT_SPEC",
    "REWARDS",
    "TAGS",
    "Parsed",
    "RewardError",
    "RewardFn",
    "RewardRegistry",
    "RewardSpec",
    "accuracy_reward",
    "default_registry",
    "format_reward",
    "parse_completion",
    "partial_reward",
    "score",
]

RewardFn = Callable[[str, Any], float]

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
DEFAULT_PARTIAL_CREDIT = 0.1  # TinyZero: 1.0 correct, 0.1 well formed but wrong, 0 otherwise
_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only (\d also matches e.g. Arabic-Indic digits)
_STRUCTURE = re.compile(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>\s*", re.DOTALL)


class RewardError(RuntimeError):
    """A reward function failed (or returned a non-finite / non-number value) on one sample."""


class UnknownRewardError(ValueError):
    """A reward name that the registry does not hold."""


@dataclass(frozen=True)
class Parsed:
    """``well_formed``: see the module docstring. ``answer``: the stripped answer text when well formed
    (never empty), else None. ``think``: the text inside the think block when well formed, else None."""

    well_formed: bool
    answer: str | None
    think: str | None = None


_MALFORMED = Parsed(well_formed=False, answer=None, think=None)


def parse_completion(text: str) -> Parsed:
    """Parse a completion in R1's ``<think>...</think><answer>...</answer>`` format."""
    if not isinstance(text, str):
        raise TypeError(f"a completion must be a str, got {type(text).__name__}.")
    if any(text.count(tag) != 1 for tag in TAGS):  # repeated, nested or missing tags
        return _MALFORMED
    match = _STRUCTURE.fullmatch(text)  # order, adjacency, nothing but whitespace outside the tags
    if match is None:
        return _MALFORMED
    answer = match.group(2).strip()
    if not answer:
        return _MALFORMED
    return Parsed(well_formed=True, answer=answer, think=match.group(1))


def _answer_shape_ok(answer: str, problem: Any, default: re.Pattern | None) -> bool:
    pattern = getattr(problem, "answer_pattern", None)
    if pattern is not None:
        return re.fullmatch(pattern, answer) is not None
    return default is None or default.fullmatch(answer) is not None


def accuracy_reward(completion: str, problem: Any) -> float:
    """1.0 when well formed and the answer equals the problem's canonical answer exactly, else 0."""
    parsed = parse_completion(completion)
    return float(parsed.well_formed and parsed.answer == str(problem.answer).strip())


def format_reward(completion: str, problem: Any) -> float:
    """1.0 when well formed and the answer has the task's shape (``problem.answer_pattern``), else 0."""
    parsed = parse_completion(completion)
    return float(parsed.well_formed and _answer_shape_ok(parsed.answer, problem, None))


def partial_reward(value: float = DEFAULT_PARTIAL_CREDIT) -> RewardFn:
    """A reward of ``value`` for a well-formed, parsable (``problem.answer_pattern``, else an integer) but
    wrong answer; 0 for a correct or unparsable one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"partial credit must be a finite number, got {value!r}.")
    value = float(value)

    def partial(completion: str, problem: Any) -> float:
        parsed = parse_completion(completion)
        if not parsed.well_formed or parsed.answer == str(problem.answer).strip():
            return 0.0
        return value if _answer_shape_ok(parsed.answer, problem, _INTEGER) else 0.0

    partial.__name__ = f"partial_reward_{value:g}"
    return partial


BUILTIN_REWARDS: Mapping[str, RewardFn] = MappingProxyType(
    {"accuracy": accuracy_reward, "format": format_reward, "partial": partial_reward()}
)
REWARDS = BUILTIN_REWARDS  # read-only; add your own to a RewardRegistry


class RewardRegistry:
    """Named reward functions: the built-ins plus any registered on this instance (no global state)."""

    def __init__(self, rewards: Mapping[str, RewardFn] | None = None):
        self._rewards: dict[str, RewardFn] = {}
        for name, fn in (BUILTIN_REWARDS if rewards is None else rewards).items():
            self.register_reward(name, fn)

    def register_reward(self, name: str, fn: RewardFn, *, replace: bool = False) -> None:
        """Add ``fn(completion, problem) -> float`` as ``name``; an existing name needs ``replace=True``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a reward name must be a non-empty string, got {name!r}.")
        if not callable(fn):
            raise TypeError(f"reward {name!r} must be callable as fn(completion, problem), got {fn!r}.")
        if name in self._rewards and not replace:
            raise ValueError(f"reward {name!r} is already registered; pass replace=True to replace it.")
        self._rewards[name] = fn

    def get(self, name: str) -> RewardFn:
        if name not in self._rewards:
            raise UnknownRewardError(f"Unknown reward {name!r}; known rewards: {', '.join(self.names())}.")
        return self._rewards[name]

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._rewards

    def names(self) -> list[str]:
        return sorted(self._rewards)


def default_registry() -> RewardRegistry:
    """A fresh registry holding the built-in rewards."""
    return RewardRegistry()


@dataclass(frozen=True)
class RewardSpec:
    """Which rewards to sum, with their weights: ``RewardSpec([("accuracy", 1.0), ("format", 0.5)])``.
    Names are unique; weights are finite numbers (negative ones are penalties)."""

    terms: tuple[tuple[str, float], ...]

    def __init__(self, terms: Iterable[tuple[str, float]] | Mapping[str, float]):
        items = list(terms.items()) if isinstance(terms, Mapping) else list(terms)
        checked = []
        for item in items:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"a reward spec term must be a (name, weight) pair, got {item!r}.")
            name, weight = item
            if not isinstance(name, str) or not name:
                raise ValueError(f"a reward name must be a non-empty string, got {name!r}.")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"the weight of reward {name!r} must be a finite number, got {weight!r}.")
            checked.append((name, float(weight)))
        if not checked:
            raise ValueError("a reward spec needs at least one (name, weight) term.")
        names = [name for name, _ in checked]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"reward {duplicates[0]!r} appears more than once in the reward spec.")
        object.__setattr__(self, "terms", tuple(checked))

    def names(self) -> list[str]:
        return [name for name, _ in self.terms]

    def validate(self, registry: RewardRegistry | None = None) -> None:
        """Raise UnknownRewardError for a name the registry (default: the built-ins) does not hold."""
        registry = default_registry() if registry is None else registry
        for name in self.names():
            registry.get(name)


DEFAULT_SPEC = RewardSpec([("accuracy", 1.0), ("partial", 1.0)])


def _failed(name: str, index: int, problem: Any) -> str:
    text = getattr(problem, "prompt", None)
    text = text.rstrip("\n") if isinstance(text, str) else str(getattr(problem, "id", problem))
    return f"reward {name!r} failed on sample {index} (prompt {text!r})"


def score(
    completions: Sequence[str],
    problems: Sequence[Any],
    spec: RewardSpec | Iterable[tuple[str, float]] = DEFAULT_SPEC,
    registry: RewardRegistry | None = None,
) -> tuple[list[float], dict[str, list[float]]]:
    """Score completions against their problems (``problems[i]`` belongs to ``completions[i]``).

    Returns ``(total, per_function)``: ``total[i]`` = sum over the spec of weight * reward, and
    ``per_function[name][i]`` = the unweighted value of each reward (for metrics).
    """
    if not isinstance(spec, RewardSpec):
        spec = RewardSpec(spec)
    registry = default_registry() if registry is None else registry
    if len(completions) != len(problems):
        raise ValueError(f"score needs one problem per completion, got {len(completions)} completions "
                         f"and {len(problems)} problems.")
    fns = {name: registry.get(name) for name in spec.names()}  # unknown names fail before any work
    per_function: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        for i, (completion, problem) in enumerate(zip(completions, problems)):
            try:
                value = fn(completion, problem)
            except Exception as err:
                raise RewardError(f"{_failed(name, i, problem)}: {type(err).__name__}: {err}") from err
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise RewardError(f"{_failed(name, i, problem)}: it returned {value!r}, not a finite number.")
            per_function[name].append(float(value))
    total = [sum(weight * per_function[name][i] for name, weight in spec.terms) for i in range(len(completions))]
    return total, per_function
