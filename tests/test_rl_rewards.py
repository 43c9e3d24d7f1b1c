"""Tests for megads.rl.rewards: parsing, the built-in rewards, known reward hacks, weighted scoring."""

import math
from dataclasses import dataclass

import pytest

from megads.rl.rewards import (
    BUILTIN_REWARDS,
    DEFAULT_SPEC,
    REWARDS,
    Parsed,
    RewardError,
    RewardRegistry,
    RewardSpec,
    UnknownRewardError,
    default_registry,
    parse_completion,
    partial_reward,
    score,
)
from megads.rl.tasks import ArithmeticTask

TASK = ArithmeticTask()
P = TASK.make_problem(47, "+", 38)  # answer "85", prompt "Q: 47+38\n"
CORRECT = "<think>7+8=15,4+3+1=8</think><answer>85</answer>"
WRONG = "<think>7+8=15,4+3=7</think><answer>75</answer>"
ALL = [("accuracy", 1.0), ("format", 1.0), ("partial", 1.0)]


def rewards_of(completion, problem=P):
    return {name: fn(completion, problem) for name, fn in REWARDS.items()}


def test_parse_well_formed():
    assert parse_completion(CORRECT) == Parsed(True, "85", "7+8=15,4+3+1=8")
    # Whitespace around and between the blocks, and around the answer, is allowed.
    assert parse_completion(" \n<think>\nx\n</think>\n\n<answer> 85 </answer>\n ") == Parsed(True, "85", "\nx\n")
    assert parse_completion("<think></think><answer>85</answer>") == Parsed(True, "85", "")


def test_correct():
    assert rewards_of(CORRECT) == {"accuracy": 1.0, "format": 1.0, "partial": 0.0}
    assert rewards_of("<think>x</think>\n<answer> 85\n</answer>\n") == {"accuracy": 1.0, "format": 1.0, "partial": 0.0}


def test_wrong_but_parsable_gets_partial_credit():
    assert rewards_of(WRONG) == {"accuracy": 0.0, "format": 1.0, "partial": 0.1}
    assert rewards_of("<think>x</think><answer>-3</answer>") == {"accuracy": 0.0, "format": 1.0, "partial": 0.1}
    assert partial_reward(0.25)(WRONG, P) == 0.25
    assert partial_reward(0.25)(CORRECT, P) == 0.0
    with pytest.raises(ValueError, match="finite"):
        partial_reward(math.nan)


@pytest.mark.parametrize("answer", ["085", "85.0", "+85", "８５", "eighty-five", "85."])
def test_no_numeric_leniency(answer):
    r = rewards_of(f"<think>x</think><answer>{answer}</answer>")
    assert r["accuracy"] == 0.0
    # "085" is a (wrong) integer: partial credit; the others are not integers: nothing.
    assert r["partial"] == (0.1 if answer == "085" else 0.0)
    assert r["format"] == (1.0 if answer == "085" else 0.0)


NOTHING = {"accuracy": 0.0, "format": 0.0, "partial": 0.0}


def assert_hack_earns_nothing(completion):
    assert not parse_completion(completion).well_formed
    assert parse_completion(completion).answer is None
    assert rewards_of(completion) == NOTHING


def test_hack_repeated_think_tags():
    assert_hack_earns_nothing("<think>a</think><think>b</think><answer>85</answer>")
    assert_hack_earns_nothing("<think><think>a</think><answer>85</answer>")


def test_hack_repeated_answer_tags():
    assert_hack_earns_nothing("<think>a</think><answer><answer>85</answer>")
    assert_hack_earns_nothing("<think>a</think><answer>85</answer></answer>")


def test_hack_empty_answer():
    assert_hack_earns_nothing("<think>a</think><answer></answer>")
    assert_hack_earns_nothing("<think>a</think><answer> \n\t</answer>")


def test_hack_multiple_answer_blocks():
    assert_hack_earns_nothing("<think>a</think><answer>84</answer><answer>85</answer>")
    assert_hack_earns_nothing("<think>a</think><answer>85</answer><answer>85</answer>")


def test_hack_multiple_answers_in_one_block():
    for answer in ["84 85", "84,85", "84 or 85", "84\n85"]:
        r = rewards_of(f"<think>a</think><answer>{answer}</answer>")
        assert r == NOTHING, answer


def test_hack_answer_outside_the_tags():
    assert_hack_earns_nothing("<think>a</think><answer>84</answer>85")
    assert_hack_earns_nothing("85<think>a</think><answer>85</answer>")
    assert_hack_earns_nothing("<think>a</think>85<answer>85</answer>")
    assert_hack_earns_nothing("<think>a</think><answer>85</answer> the answer is 85")
    assert_hack_earns_nothing("85")


def test_hack_answer_before_think():
    assert_hack_earns_nothing("<answer>85</answer><think>a</think>")
    assert_hack_earns_nothing("<think>a<answer>85</answer></think>")


def test_hack_missing_close_tags():
    assert_hack_earns_nothing("<think>a</think><answer>85")
    assert_hack_earns_nothing("<think>a<answer>85</answer>")
    assert_hack_earns_nothing("<think>a</think>85</answer>")
    assert_hack_earns_nothing("<answer>85</answer>")


def test_hack_nested_tags():
    assert_hack_earns_nothing("<think>a<think>b</think></think><answer>85</answer>")
    assert_hack_earns_nothing("<think>a</think><answer><answer>85</answer></answer>")
    assert_hack_earns_nothing("<think>a</think><answer>8<think>5</think></answer>")
    assert_hack_earns_nothing("<think>a<answer>84</answer></think><answer>85</answer>")


def test_reversed_and_mismatched_tags():
    assert_hack_earns_nothing("</think>a<think><answer>85</answer>")
    assert_hack_earns_nothing("<think>a</think></answer>85<answer>")
    assert_hack_earns_nothing("")


def test_weighting():
    completions = [CORRECT, WRONG, "85", "<think>a</think><answer>x</answer>"]
    problems = [P] * 4
    spec = RewardSpec([("accuracy", 2.0), ("format", 0.5), ("partial", 1.0)])
    total, per_function = score(completions, problems, spec)
    assert per_function == {
        "accuracy": [1.0, 0.0, 0.0, 0.0],
        "format": [1.0, 1.0, 0.0, 0.0],
        "partial": [0.0, 0.1, 0.0, 0.0],
    }
    assert total == pytest.approx([2.5, 0.6, 0.0, 0.0])
    # The default spec is TinyZero's: 1 correct, 0.1 well formed but wrong, 0 otherwise.
    assert score(completions, problems)[0] == pytest.approx([1.0, 0.1, 0.0, 0.0])
    assert score(completions, problems, DEFAULT_SPEC) == score(completions, problems)
    # Plain lists and mappings are accepted; negative weights are penalties.
    assert score(completions, problems, [("format", -1.0)])[0] == [-1.0, -1.0, 0.0, 0.0]
    assert score(completions, problems, {"accuracy": 3})[0] == [3.0, 0.0, 0.0, 0.0]
    assert score([], [], ALL) == ([], {"accuracy": [], "format": [], "partial": []})


def test_per_problem_answers():
    problems = [TASK.make_problem(1, "+", 2), TASK.make_problem(9, "-", 4)]
    completions = ["<think>1+2=3</think><answer>3</answer>", "<think>9-4=5</think><answer>3</answer>"]
    total, _ = score(completions, problems)
    assert total == pytest.approx([1.0, 0.1])


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, "1", None, True])
def test_weights_must_be_finite_numbers(weight):
    with pytest.raises(ValueError, match="the weight of reward 'accuracy' must be a finite number"):
        RewardSpec([("accuracy", weight)])


def test_spec_validation():
    with pytest.raises(ValueError, match="at least one"):
        RewardSpec([])
    with pytest.raises(ValueError, match="'format' appears more than once"):
        RewardSpec([("format", 1.0), ("format", 2.0)])
    with pytest.raises(ValueError, match=r"\(name, weight\) pair"):
        RewardSpec(["accuracy"])
    assert RewardSpec({"accuracy": 1}).terms == (("accuracy", 1.0),)


def test_unknown_reward_name():
    with pytest.raises(UnknownRewardError) as err:
        score([CORRECT], [P], [("accurracy", 1.0)])
    assert str(err.value) == "Unknown reward 'accurracy'; known rewards: accuracy, format, partial."
    assert isinstance(err.value, ValueError)
    with pytest.raises(UnknownRewardError, match="'length'"):
        RewardSpec([("length", 1.0)]).validate()


def test_failing_reward_names_reward_sample_and_prompt():
    registry = default_registry()

    def fragile(completion, problem):
        if problem.b == 4:
            raise ValueError("cannot handle four")
        return 1.0

    registry.register_reward("fragile", fragile)
    problems = [TASK.make_problem(10 + i, "+", 20 + i) for i in range(7)] + [TASK.make_problem(3, "+", 4)]
    with pytest.raises(RewardError) as err:
        score([CORRECT] * 8, problems, [("accuracy", 1.0), ("fragile", 1.0)], registry)
    assert str(err.value) == "reward 'fragile' failed on sample 7 (prompt 'Q: 3+4'): ValueError: cannot handle four"
    assert isinstance(err.value.__cause__, ValueError)


def test_reward_returning_a_non_number_is_an_error():
    registry = default_registry()
    registry.register_reward("nan", lambda completion, problem: math.nan)
    registry.register_reward("text", lambda completion, problem: 1.0 if problem is P else "1")
    with pytest.raises(RewardError, match=r"reward 'nan' failed on sample 0 \(prompt 'Q: 47\+38'\): it returned nan"):
        score([CORRECT], [P], [("nan", 1.0)], registry)
    with pytest.raises(RewardError, match="reward 'text' failed on sample 1"):
        score([CORRECT, CORRECT], [P, TASK.make_problem(1, "+", 1)], [("text", 1.0)], registry)


def test_problems_only_need_an_answer():
    @dataclass
    class Plain:
        answer: str

    total, _ = score(["<think>a</think><answer>yes</answer>"], [Plain("yes")], [("accuracy", 1.0), ("format", 1.0)])
    assert total == [2.0]
    # Without an answer_pattern, partial credit falls back to integers.
    assert partial_reward()("<think>a</think><answer>no</answer>", Plain("yes")) == 0.0
    assert partial_reward()("<think>a</think><answer>12</answer>", Plain("yes")) == 0.1

    @dataclass
    class NoAnswer:
        prompt: str

    @dataclass
    class OnlyId:
        id: str

    with pytest.raises(RewardError) as err:
        score([CORRECT], [NoAnswer("Q: 1?\n")], [("accuracy", 1.0)])
    assert str(err.value).startswith("reward 'accuracy' failed on sample 0 (prompt 'Q: 1?'): AttributeError: ")
    with pytest.raises(RewardError, match=r"failed on sample 1 \(prompt 'x-1'\): AttributeError"):
        score([CORRECT, CORRECT], [P, OnlyId("x-1")], [("accuracy", 1.0)])


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="one problem per completion, got 2 completions and 1 problems"):
        score([CORRECT, CORRECT], [P])


def test_registry_has_no_hidden_global_state():
    registry = default_registry()
    registry.register_reward("short", lambda completion, problem: float(len(completion) < 60))
    assert "short" in registry and registry.names() == ["accuracy", "format", "partial", "short"]
    assert "short" not in default_registry() and "short" not in REWARDS
    total, per_function = score([CORRECT], [P], [("accuracy", 1.0), ("short", 0.5)], registry)
    assert total == [1.5] and per_function["short"] == [1.0]
    with pytest.raises(UnknownRewardError, match="Unknown reward 'short'"):
        score([CORRECT], [P], [("short", 1.0)])
    with pytest.raises(ValueError, match="'accuracy' is already registered; pass replace=True"):
        registry.register_reward("accuracy", lambda c, p: 1.0)
    registry.register_reward("partial", partial_reward(0.5), replace=True)
    assert score([WRONG], [P], DEFAULT_SPEC, registry)[0] == [0.5]
    assert score([WRONG], [P], DEFAULT_SPEC)[0] == pytest.approx([0.1])
    with pytest.raises(TypeError, match="must be callable"):
        registry.register_reward("bad", 3)
    with pytest.raises(TypeError):
        BUILTIN_REWARDS["mine"] = lambda c, p: 1.0  # read-only
    only = RewardRegistry({"accuracy": BUILTIN_REWARDS["accuracy"]})
    assert only.names() == ["accuracy"]
