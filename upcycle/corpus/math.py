"""A seeded generator of mathematics problems whose answers are exact, and a checker for them.

Every problem is one line, `Q: <question> A: <answer>`; a document is a block of such lines.
Kinds: integer arithmetic (`37 * 12 + 5 = ?`), powers, fractions (`(3/4) + (5/6) = ?`),
percentages, division with remainder, gcd/lcm, one linear equation in x (`3(x - 2) + 4 = 5x - 1`)
and a 2×2 linear system in x and y. Answers are integers, fractions in lowest terms (`-5/3`) or
`x = …, y = …` assignments.

Unusual choices, and why:
- The generator and the checker share no arithmetic. The generator knows each answer from how it
  built the problem (it picks x, then writes an equation that x solves); the checker re-reads
  the question *text* with its own small parser and evaluates it with `Fraction`, or substitutes
  the answer back into the equations. A test runs the checker over every generated problem, so a
  rendering bug (a missing parenthesis, a sign) cannot hide behind a shared helper.
- Equations are checked by substitution, and uniqueness by the coefficients read off the
  difference of the sides (slope f(1) - f(0), confirmed linear at a few more points), so an
  equation with no, many, or several isolated solutions (x^2 = 4) fails.
- `random.Random` drives everything: its integer draws are stable across Python versions, so a
  seed gives the same bytes on every machine.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from math import gcd  # the stdlib module: absolute imports never pick this file

__all__ = [
    "MathProblem",
    "check_answer",
    "check_line",
    "evaluate",
    "format_number",
    "generate_problems",
    "math_documents",
]

_MAX_EXPONENT = 64  # the checker refuses larger powers, so a hostile line cannot stall it


@dataclass(frozen=True)
class MathProblem:
    kind: str
    question: str
    answer: str

    @property
    def line(self) -> str:
        return f"Q: {self.question} A: {self.answer}"


def format_number(value: Fraction | int) -> str:
    """An integer as digits, a fraction in lowest terms as `p/q` (sign on the numerator)."""
    value = Fraction(value)
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


# --------------------------------------------------------------------------------------------
# Generator: each kind picks its numbers, renders the question, and knows the answer.
# --------------------------------------------------------------------------------------------

_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


def _arithmetic(rng: random.Random) -> MathProblem:
    """2 to 4 positive operands joined by + - *, rendered with only the parentheses needed."""
    text, value, _ = _random_expression(rng, rng.randint(2, 4))
    return MathProblem("arithmetic", f"{text} = ?", format_number(value))


def _random_expression(rng: random.Random, operands: int) -> tuple[str, int, int]:
    """(text, value, precedence) of a random expression tree with `operands` leaves."""
    if operands == 1:
        number = rng.randint(1, 999) if rng.random() < 0.2 else rng.randint(1, 99)
        return str(number), number, 3
    left_count = rng.randint(1, operands - 1)
    op = rng.choice("+-*")
    left_text, left, left_prec = _random_expression(rng, left_count)
    right_text, right, right_prec = _random_expression(rng, operands - left_count)
    if left_prec < _PRECEDENCE[op]:
        left_text = f"({left_text})"
    # The right child also needs parentheses at equal precedence after '-': a - (b + c).
    if right_prec < _PRECEDENCE[op] or (op == "-" and right_prec == _PRECEDENCE[op]):
        right_text = f"({right_text})"
    value = left + right if op == "+" else left - right if op == "-" else left * right
    return f"{left_text} {op} {right_text}", value, _PRECEDENCE[op]


def _power(rng: random.Random) -> MathProblem:
    base = rng.randint(2, 12)
    exponent = rng.randint(2, 10 if base <= 3 else 5)
    return MathProblem("power", f"{base}^{exponent} = ?", format_number(base**exponent))


def _fraction(rng: random.Random) -> MathProblem:
    (a, b), (c, d) = ((rng.randint(1, 11), rng.randint(2, 12)) for _ in range(2))
    op = rng.choice("+-*/")
    left, right = Fraction(a, b), Fraction(c, d)
    value = {"+": left + right, "-": left - right, "*": left * right, "/": left / right}[op]
    # Operands stay as drawn (4/6 is not reduced) and sit in parentheses, so that
    # (3/4) / (5/6) cannot be read as ((3/4) / 5) / 6.
    return MathProblem("fraction", f"({a}/{b}) {op} ({c}/{d}) = ?", format_number(value))


def _percent(rng: random.Random) -> MathProblem:
    """Bases are multiples of 20, so every answer is a terminating decimal (12% of 20 = 2.4)."""
    percent = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 80, 90, 125, 150])
    base = rng.randint(1, 60) * 20
    tenths = percent * base // 10  # exact: percent * base is a multiple of 20
    answer = str(tenths // 10) if tenths % 10 == 0 else f"{tenths // 10}.{tenths % 10}"
    return MathProblem("percent", f"{percent}% of {base} = ?", answer)


def _division(rng: random.Random) -> MathProblem:
    divisor = rng.randint(2, 25)
    quotient, remainder = rng.randint(1, 200), rng.randint(0, divisor - 1)
    dividend = quotient * divisor + remainder
    return MathProblem(
        "division", f"{dividend} divided by {divisor} = ?", f"{quotient} remainder {remainder}"
    )


def _gcd_lcm(rng: random.Random) -> MathProblem:
    common = rng.randint(1, 15)
    a, b = common * rng.randint(1, 20), common * rng.randint(1, 20)
    name = rng.choice(["gcd", "lcm"])
    divisor = _euclid(a, b)
    value = divisor if name == "gcd" else a * b // divisor
    return MathProblem(name, f"{name}({a}, {b}) = ?", str(value))


def _euclid(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _linear_side(coefficient: int, constant: int, variable: str = "x") -> str:
    """`3x - 7`, `-x`, `5`, ... for coefficient·variable + constant."""
    if coefficient == 0:
        return str(constant)
    term = {1: variable, -1: f"-{variable}"}.get(coefficient, f"{coefficient}{variable}")
    if constant == 0:
        return term
    return f"{term} {'+' if constant > 0 else '-'} {abs(constant)}"


def _linear_equation(rng: random.Random) -> MathProblem:
    """a(x + b) + c = d·x + e or a·x + b = d·x + e, with a ≠ d so x is unique."""
    a = rng.choice([n for n in range(-12, 13) if n != 0])
    d = rng.choice([n for n in range(-6, 7) if n != a]) if rng.random() < 0.5 else 0
    e = rng.randint(-40, 40)
    if rng.random() < 0.3:
        b, c = rng.choice([n for n in range(-9, 10) if n != 0]), rng.randint(-20, 20)
        shift = f"x {'+' if b > 0 else '-'} {abs(b)}"
        left = f"{'' if a == 1 else '-' if a == -1 else a}({shift})"
        left += "" if c == 0 else f" {'+' if c > 0 else '-'} {abs(c)}"
        x = Fraction(e - a * b - c, a - d)
    else:
        b = rng.randint(-30, 30)
        left = _linear_side(a, b)
        x = Fraction(e - b, a - d)
    question = f"Solve for x: {left} = {_linear_side(d, e)}."
    return MathProblem("linear", question, f"x = {format_number(x)}")


def _system_side(a: int, b: int) -> str:
    first = _linear_side(a, 0, "x") if a else ""
    if not b:
        return first
    second = {1: "y", -1: "y"}.get(b, f"{abs(b)}y")
    if not first:
        return f"-{second}" if b < 0 else second
    return f"{first} {'+' if b > 0 else '-'} {second}"


def _linear_system(rng: random.Random) -> MathProblem:
    x, y = rng.randint(-10, 10), rng.randint(-10, 10)
    while True:
        a1, b1, a2, b2 = (rng.randint(-9, 9) for _ in range(4))
        if a1 * b2 - a2 * b1 != 0 and (a1 or b1) and (a2 or b2):
            break
    first = f"{_system_side(a1, b1)} = {a1 * x + b1 * y}"
    second = f"{_system_side(a2, b2)} = {a2 * x + b2 * y}"
    return MathProblem("system", f"Solve for x and y: {first}, {second}.", f"x = {x}, y = {y}")


_KINDS: list[tuple[Callable[[random.Random], MathProblem], int]] = [
    (_arithmetic, 30),
    (_power, 5),
    (_fraction, 15),
    (_percent, 8),
    (_division, 8),
    (_gcd_lcm, 8),
    (_linear_equation, 16),
    (_linear_system, 10),
]


_MAKERS = [maker for maker, _ in _KINDS]
_CUMULATIVE_WEIGHTS = list(itertools.accumulate(weight for _, weight in _KINDS))


def _one_problem(rng: random.Random) -> MathProblem:
    return rng.choices(_MAKERS, cum_weights=_CUMULATIVE_WEIGHTS)[0](rng)


def generate_problems(count: int, seed: int = 0) -> list[MathProblem]:
    """`count` problems of mixed kinds; the same seed gives the same problems."""
    rng = random.Random(seed)
    return [_one_problem(rng) for _ in range(count)]


def math_documents(seed: int = 0, min_problems: int = 8, max_problems: int = 24) -> Iterator[str]:
    """An endless stream of documents, each a block of problem lines separated by newlines."""
    rng = random.Random(seed)
    while True:
        count = rng.randint(min_problems, max_problems)
        yield "\n".join(_one_problem(rng).line for _ in range(count))


# --------------------------------------------------------------------------------------------
# Checker: an independent parser over Fractions, and one verifier per question form.
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([a-z])|(.))")


class _Parser:
    """Recursive descent over + - * / ^ ( ), numbers, implicit products (3x, 2(x + 1))."""

    def __init__(self, text: str, variables: dict[str, Fraction]):
        self.tokens = [m.group(m.lastindex) for m in _TOKEN.finditer(text) if m.lastindex]
        self.tokens = [t for t in self.tokens if not t.isspace()]
        self.position = 0
        self.variables = variables

    def parse(self) -> Fraction:
        value = self._sum()
        if self.position != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.position]!r}")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise ValueError("unexpected end")
        self.position += 1
        return token

    def _sum(self) -> Fraction:
        value = self._product()
        while self._peek() in ("+", "-"):
            value = value + self._product() if self._take() == "+" else value - self._product()
        return value

    def _product(self) -> Fraction:
        value = self._unary()
        while True:
            token = self._peek()
            if token in ("*", "/"):
                self._take()
                right = self._unary()
                value = value * right if token == "*" else value / right
            elif token == "(" or (token is not None and token.isalpha()):
                value *= self._power()  # implicit product: 3x, 2(x + 1)
            else:
                return value

    def _unary(self) -> Fraction:
        if self._peek() == "-":
            self._take()
            return -self._unary()
        return self._power()

    def _power(self) -> Fraction:
        base = self._atom()
        if self._peek() != "^":
            return base
        self._take()
        exponent = self._unary()
        if exponent.denominator != 1 or not 0 <= exponent <= _MAX_EXPONENT:
            raise ValueError("exponent must be a small non-negative integer")
        return base ** int(exponent)

    def _atom(self) -> Fraction:
        token = self._take()
        if token == "(":
            value = self._sum()
            if self._take() != ")":
                raise ValueError("missing ')'")
            return value
        if token.isalpha():
            if token not in self.variables:
                raise ValueError(f"unknown variable {token!r}")
            return self.variables[token]
        if token[0].isdigit():
            return Fraction(token)
        raise ValueError(f"unexpected {token!r}")


def evaluate(expression: str, **variables: Fraction | int) -> Fraction:
    """The exact value of `expression` (raises ValueError or ZeroDivisionError when invalid)."""
    return _Parser(expression, {name: Fraction(value) for name, value in variables.items()}).parse()


def _number(text: str) -> Fraction:
    """An answer number: an integer, `p/q` or a decimal, optionally negative; nothing else."""
    if not re.fullmatch(r"-?\d+(?:/\d+|\.\d+)?", text.strip()):
        raise ValueError(f"not a number: {text!r}")
    return Fraction(text.strip())


def _assignments(answer: str, names: tuple[str, ...]) -> dict[str, Fraction]:
    values = {}
    for part in answer.split(","):
        name, _, value = part.partition("=")
        values[name.strip()] = _number(value)
    if tuple(values) != names:
        raise ValueError(f"expected values for {', '.join(names)}")
    return values


# Points where a side must agree with the linear function read off at 0 and the unit vectors;
# a non-linear side (x^2, 1/x) disagrees and the question is refused.
_SPOT_POINTS = [
    (Fraction(2), Fraction(-3)),
    (Fraction(-5, 3), Fraction(7, 2)),
    (Fraction(11), Fraction(1, 5)),
]


def _linear_form(expression: str, names: tuple[str, ...]) -> list[Fraction]:
    """The coefficients of `names` in a linear `expression` (ValueError when it is not linear)."""
    zero = dict.fromkeys(names, Fraction(0))
    constant = evaluate(expression, **zero)
    coefficients = [evaluate(expression, **{**zero, name: Fraction(1)}) - constant for name in names]
    for point in _SPOT_POINTS:
        values = dict(zip(names, point, strict=False))  # one-variable forms use the first value
        expected = constant + sum(c * values[name] for c, name in zip(coefficients, names, strict=True))
        if evaluate(expression, **values) != expected:
            raise ValueError(f"{expression!r} is not linear in {', '.join(names)}")
    return coefficients


def _check_linear(left: str, right: str, answer: str) -> bool:
    x = _assignments(answer, ("x",))["x"]
    (slope,) = _linear_form(f"({left}) - ({right})", ("x",))
    return slope != 0 and evaluate(left, x=x) == evaluate(right, x=x)  # unique, and x solves it


def _check_system(equations: list[tuple[str, str]], answer: str) -> bool:
    values = _assignments(answer, ("x", "y"))
    if any(evaluate(left, **values) != evaluate(right, **values) for left, right in equations):
        return False
    (a1, b1), (a2, b2) = (_linear_form(f"({left}) - ({right})", ("x", "y")) for left, right in equations)
    return a1 * b2 - a2 * b1 != 0  # exactly one solution


def _check_division(dividend: str, divisor: str, answer: str) -> bool:
    match = re.fullmatch(r"(\d+) remainder (\d+)", answer.strip())
    if not match:
        return False
    quotient, remainder = int(match[1]), int(match[2])
    return quotient * int(divisor) + remainder == int(dividend) and 0 <= remainder < int(divisor)


def _check_gcd_lcm(name: str, a: str, b: str, answer: str) -> bool:
    value, a, b = _number(answer), int(a), int(b)
    if value.denominator != 1 or value <= 0:
        return False
    value = int(value)
    if name == "gcd":  # a common divisor with nothing left in common after dividing it out
        return a % value == 0 and b % value == 0 and gcd(a // value, b // value) == 1
    return value % a == 0 and value % b == 0 and gcd(value // a, value // b) == 1


def _check_percent(percent: str, base: str, answer: str) -> bool:
    return _number(answer) == Fraction(int(percent) * int(base), 100)


def _check_expression(expression: str, answer: str) -> bool:
    return _number(answer) == evaluate(expression)


def _check_system_form(left1: str, right1: str, left2: str, right2: str, answer: str) -> bool:
    return _check_system([(left1, right1), (left2, right2)], answer)


# Tried in order; the catch-all expression form comes last.
_FORMS: list[tuple[re.Pattern, Callable[..., bool]]] = [
    (re.compile(r"Solve for x and y: (.+?) = (.+?), (.+?) = (.+?)\."), _check_system_form),
    (re.compile(r"Solve for x: (.+) = (.+)\."), _check_linear),
    (re.compile(r"(\d+) divided by (\d+) = \?"), _check_division),
    (re.compile(r"(gcd|lcm)\((\d+), (\d+)\) = \?"), _check_gcd_lcm),
    (re.compile(r"(\d+)% of (\d+) = \?"), _check_percent),
    (re.compile(r"(.+) = \?"), _check_expression),
]


def check_answer(question: str, answer: str) -> bool:
    """True when `answer` is exactly right for `question` (any equal value form is accepted)."""
    for pattern, checker in _FORMS:
        match = pattern.fullmatch(question.strip())
        if match:
            try:
                return checker(*match.groups(), answer)
            except (ValueError, ZeroDivisionError):
                return False
    return False


def check_line(line: str) -> bool:
    """`check_answer` on one `Q: … A: …` line."""
    match = re.fullmatch(r"Q: (.+) A: (.+)", line.strip())
    return bool(match) and check_answer(match[1], match[2])
