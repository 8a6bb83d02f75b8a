"""Verifiable reward tasks the package generates from a seed: Countdown and simple arithmetic.

Countdown (as ES at scale and TinyZero pose it): reach a target number from 3 or 4 given
numbers with ``+ - * /``, each number used exactly once, the equation in
``<answer>...</answer>``. Reward 1.0 for a correct equation, 0.1 for a well-formed answer
that is wrong, 0.0 otherwise. Every example is made by building a random expression over its
numbers and taking its value as the target, so each has a solution (kept in ``solution``).

The checker parses the answer with a small recursive-descent parser over numbers, the four
operators and parentheses, in exact rational arithmetic (``fractions.Fraction``). Nothing is
ever evaluated as Python: anything else in the answer (names, calls, ``**``, attributes)
makes it malformed.

Arithmetic: "What is 37 + 58?" with the number as the answer, scored by the last number of
the completion.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction

from zo_fx.rewards import number_match
from zo_fx.tasks.reward_task import RewardTask

#: TinyZero's scores: a correct equation, and a well-formed one that is wrong
CORRECT, WELL_FORMED = 1.0, 0.1
SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")

COUNTDOWN_TEMPLATE = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use +, -, * and / and each "
    "number exactly once. Give the equation in <answer> </answer> tags, for example <answer> (1 + 2) / 3 "
    "</answer>.\nAnswer: <answer>"
)
ARITHMETIC_TEMPLATE = "What is {a} {op} {b}?\nAnswer: {a} {op} {b} ="


class MalformedEquation(ValueError):
    """The answer is not an equation of numbers, + - * / and parentheses."""


def _tokens(text: str) -> list[tuple[str, str]]:
    out = []
    for number, other in _TOKEN.findall(text):
        if number:
            out.append(("num", number))
        elif other.strip():
            if other not in "+-*/()":
                raise MalformedEquation(f"unexpected character {other!r}")
            out.append(("op", other))
    return out


def parse_equation(text: str) -> tuple[Fraction, list[int]]:
    """(exact value, numbers used) of an equation; :class:`MalformedEquation` for anything else.

    Grammar: expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*;
    factor := number | '(' expr ')' | '-' factor. Division by zero is malformed.
    """
    tokens = _tokens(text)
    if not tokens:
        raise MalformedEquation("empty")
    pos, used = 0, []

    def peek():
        return tokens[pos] if pos < len(tokens) else (None, None)

    def take(expected=None):
        nonlocal pos
        if pos >= len(tokens):
            raise MalformedEquation("ends too early")
        tok = tokens[pos]
        if expected is not None and tok != ("op", expected):
            raise MalformedEquation(f"expected {expected!r}, got {tok[1]!r}")
        pos += 1
        return tok

    def factor() -> Fraction:
        kind, value = peek()
        if kind == "num":
            take()
            if len(value) > 6:
                raise MalformedEquation("number too long")
            used.append(int(value))
            return Fraction(int(value))
        if (kind, value) == ("op", "("):
            take()
            inner = expr()
            take(")")
            return inner
        if (kind, value) == ("op", "-"):
            take()
            return -factor()
        raise MalformedEquation(f"unexpected {value!r}")

    def term() -> Fraction:
        value = factor()
        while peek() in (("op", "*"), ("op", "/")):
            op = take()[1]
            right = factor()
            if op == "/" and right == 0:
                raise MalformedEquation("division by zero")
            value = value * right if op == "*" else value / right
        return value

    def expr() -> Fraction:
        value = term()
        while peek() in (("op", "+"), ("op", "-")):
            op = take()[1]
            right = term()
            value = value + right if op == "+" else value - right
        return value

    value = expr()
    if pos != len(tokens):
        raise MalformedEquation(f"unexpected {tokens[pos][1]!r} after the equation")
    return value, used


def check_countdown(completion: str, numbers: list[int], target: int) -> float:
    """1.0 for an answer equation that uses each number once and equals the target, 0.1 for a well-formed
    wrong one, 0.0 for no ``<answer>`` or a malformed one. A completion of a prompt that already opened the
    tag (``... <answer>``) may omit the opening tag."""
    found = _ANSWER.findall(completion)
    if not found and "</answer>" in completion:
        found = [completion.split("</answer>")[0]]
    if not found:
        return 0.0
    equation = found[-1].split("=")[0]  # "3 + 4 = 7" states its value: the left side is the equation
    try:
        value, used = parse_equation(equation)
    except MalformedEquation:
        return 0.0
    if Counter(used) != Counter(int(n) for n in numbers):
        return WELL_FORMED
    return CORRECT if value == target else WELL_FORMED


def countdown_reward(completions: list[str], numbers, target, **columns) -> list[float]:
    """TRL-style reward of the Countdown task (columns ``numbers`` and ``target``)."""
    return [check_countdown(c, n, int(t)) for c, n, t in zip(completions, numbers, target)]


def arithmetic_reward(completions: list[str], answer, **columns) -> list[float]:
    return number_match(completions, answer=answer)


def _countdown_example(rng: random.Random) -> dict:
    while True:
        count = rng.choice((3, 4))
        numbers = [rng.randint(1, 99) for _ in range(count)]
        order = numbers[:]
        rng.shuffle(order)
        text, value = str(order[0]), Fraction(order[0])
        for n in order[1:]:
            op = rng.choice("+-*/")
            if op == "/" and (n == 0 or value % n != 0):
                op = rng.choice("+-*")
            text = f"({text}) {op} {n}" if op in "*/" and any(c in text for c in "+-") else f"{text} {op} {n}"
            value = {"+": value + n, "-": value - n, "*": value * n, "/": value / n}[op]
        if value.denominator == 1 and 1 <= value <= 999:
            target = int(value)
            prompt = COUNTDOWN_TEMPLATE.format(numbers=numbers, target=target)
            return {"prompt": prompt, "numbers": numbers, "target": target, "solution": text}


def _arithmetic_example(rng: random.Random) -> dict:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 99), rng.randint(2, 99)) if op != "*" else (rng.randint(2, 20), rng.randint(2, 20))
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"prompt": ARITHMETIC_TEMPLATE.format(a=a, op=op, b=b), "answer": str(value)}


def _splits(make, seed: int, sizes: dict) -> dict:
    rng = random.Random(f"zo_fx:{seed}")
    seen, out = set(), {s: [] for s in sizes}
    for split, n in sizes.items():
        while len(out[split]) < n:
            example = make(rng)
            if example["prompt"] not in seen:  # no prompt in two splits
                seen.add(example["prompt"])
                out[split].append(example)
    return out


def countdown_task(seed: int = 0, sizes: dict | None = None) -> RewardTask:
    """Countdown with fixed-size splits made from ``seed``; each example has a solution."""
    splits = _splits(_countdown_example, seed, sizes or SPLIT_SIZES)
    return RewardTask("countdown", "reach the target with + - * / and each number once (reward 1, 0.1 format)",
                      [countdown_reward], [1.0], **splits)


def arithmetic_task(seed: int = 0, sizes: dict | None = None) -> RewardTask:
    splits = _splits(_arithmetic_example, seed, sizes or SPLIT_SIZES)
    return RewardTask("arithmetic", "two-number +, -, * questions, reward 1 for the right number",
                      [arithmetic_reward], [1.0], **splits)


REWARD_TASKS = {"countdown": countdown_task, "arithmetic": arithmetic_task}
