"""Countdown and arithmetic: tasks made from a seed, and a checker that parses, never evaluates."""

from fractions import Fraction

import pytest

from zo_fx.tasks.countdown import (
    CORRECT,
    WELL_FORMED,
    MalformedEquation,
    arithmetic_reward,
    arithmetic_task,
    check_countdown,
    countdown_reward,
    countdown_task,
    parse_equation,
)


@pytest.mark.parametrize("text, value, used", [
    ("1 + 2 * 3", 7, [1, 2, 3]),
    ("(1 + 2) * 3", 9, [1, 2, 3]),
    ("10 / 4", Fraction(5, 2), [10, 4]),
    ("8 - 3 - 2", 3, [8, 3, 2]),
    ("-(4 - 6) * 5", 10, [4, 6, 5]),
    ("((7))", 7, [7]),
])
def test_the_parser_follows_arithmetic(text, value, used):
    assert parse_equation(text) == (value, used)


@pytest.mark.parametrize("text", [
    "__import__('os').system('echo hacked')", "2 ** 3", "1 + ", "(1 + 2", "1 2", "", "abs(3)", "3 / 0",
    "1e9", "x + 1", "9999999 * 9999999", "1; 2", "[1, 2]",
])
def test_anything_but_an_equation_is_malformed(text):
    with pytest.raises(MalformedEquation):
        parse_equation(text)


def test_countdown_scores_correct_well_formed_and_malformed_answers():
    numbers, target = [3, 5, 7], 22
    assert check_countdown("<answer>3 * 5 + 7</answer>", numbers, target) == CORRECT
    assert check_countdown("I think... <answer> (5 + 7) * 3 - 14 </answer>", [5, 7, 3, 14], 22) == CORRECT
    assert check_countdown("<answer>3 * 5 + 7 = 22</answer>", numbers, target) == CORRECT
    assert check_countdown("3 * 5 + 7 </answer>", numbers, target) == CORRECT  # the prompt opened the tag
    assert check_countdown("<answer>3 + 5 + 7</answer>", numbers, target) == WELL_FORMED  # wrong value
    assert check_countdown("<answer>3 * 5 + 7 + 7</answer>", numbers, 29) == WELL_FORMED  # 7 used twice
    assert check_countdown("<answer>15 + 7</answer>", numbers, target) == WELL_FORMED  # 15 is not given
    assert check_countdown("3 * 5 + 7", numbers, target) == 0.0  # no answer tag
    assert check_countdown("<answer>open('/etc/passwd').read()</answer>", numbers, target) == 0.0
    assert countdown_reward(["<answer>3*5+7</answer>", "no"], numbers=[numbers] * 2, target=[22, 22]) == [1.0, 0.0]


def test_tasks_are_made_from_the_seed_with_fixed_disjoint_splits_and_solvable_examples():
    a, b = countdown_task(3, sizes={"train": 50, "validation": 10, "test": 10}), countdown_task(3, sizes={
        "train": 50, "validation": 10, "test": 10})
    assert a.train == b.train and a.test == b.test
    assert countdown_task(4, sizes={"train": 50, "validation": 10, "test": 10}).train != a.train
    prompts = [e["prompt"] for s in ("train", "validation", "test") for e in a.split(s)]
    assert len(prompts) == len(set(prompts)) == 70
    for e in a.train:
        assert 3 <= len(e["numbers"]) <= 4
        assert check_countdown(f"<answer>{e['solution']}</answer>", e["numbers"], e["target"]) == CORRECT
    arithmetic = arithmetic_task(0, sizes={"train": 20, "validation": 5, "test": 5})
    e = arithmetic.train[0]
    assert arithmetic_reward([f"it is {e['answer']}"], answer=[e["answer"]]) == [1.0]
