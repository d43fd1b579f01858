"""The ``calculator`` tool: exact arithmetic over an allow-list, never ``eval``.

A small Pratt parser reads the expression into numbers and operators; numbers
stay exact (``fractions.Fraction``) through + - * /, integer powers, ``%`` and
the exact functions, so ``0.1 + 0.2`` is ``0.3`` and ``2**64`` has every digit.
Functions that are irrational in general (sqrt of a non-square, log, sin, …)
turn the value approximate (a float), and the answer says so.

Every way to make it hang is bounded before the work is done: the expression's
length, nesting depth, the digits a power or factorial would produce, and the
size of every intermediate number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from llamad.errors import ToolInputError

MAX_EXPRESSION_CHARS = 1000
MAX_DEPTH = 64
# Of any exact intermediate: 2**13000 is fine, 9**9**9 is not. Below Python's
# own 4,300-digit guard on int -> str, which exists because that is quadratic.
MAX_DIGITS = 4000
MAX_FACTORIAL = 1000  # 1000! has 2,568 digits

Number = Fraction | float


@dataclass(frozen=True)
class Answer:
    value: Number
    exact: bool

    def text(self) -> str:
        """The answer as a model (and a person) should read it."""
        if isinstance(self.value, float):
            return _float_text(self.value)
        return _exact_text(self.value)


def calculate(expression: str) -> Answer:
    """Evaluate ``expression``; raises ``ToolInputError`` with a one-line reason."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolInputError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    parser = _Parser(_tokenize(expression))
    value = parser.expression(0)
    parser.expect_end()
    return Answer(value, exact=isinstance(value, Fraction))


# ------------------------------------------------------------------ tokens

_TOKEN = re.compile(
    r"""
    \s*(?:
      (?P<number>(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
    | (?P<op>\*\*|//|[-+*/^%(),!×÷−√π])
    )""",
    re.VERBOSE,
)
_ALIASES = {"×": "*", "÷": "/", "−": "-", "^": "**", "π": "pi", "√": "sqrt"}


@dataclass(frozen=True)
class _Token:
    kind: str  # "number" | "name" | "op" | "end"
    text: str
    at: int


def _tokenize(expression: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(expression):
        if expression[position:].strip() == "":
            break
        match = _TOKEN.match(expression, position)
        if match is None or match.lastgroup is None:
            rest = expression[position:].lstrip()
            raise ToolInputError(
                f"unexpected {rest[:1]!r} at position {len(expression) - len(rest)}"
                "; use numbers, + - * / ** % ( ) and functions such as sqrt(x)"
            )
        text = _ALIASES.get(match.group(match.lastgroup), match.group(match.lastgroup))
        kind = "name" if text in ("pi", "sqrt") and match.lastgroup == "op" else match.lastgroup
        tokens.append(_Token(kind, text, match.start(match.lastgroup)))
        position = match.end()
    tokens.append(_Token("end", "", len(expression)))
    return tokens


# ------------------------------------------------------------------ parser

_BINARY = {"+": 10, "-": 10, "*": 20, "/": 20, "//": 20, "%": 20, "**": 40}
_UNARY_PRECEDENCE = 30  # -2**2 is -(2**2), as in mathematics and Python


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._index = 0
        self._depth = 0

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _take(self) -> _Token:
        token = self._tokens[self._index]
        self._index += 1
        return token

    def expect_end(self) -> None:
        token = self._peek()
        if token.kind != "end":
            raise ToolInputError(f"unexpected {token.text!r} at position {token.at}")

    def _expect(self, text: str) -> None:
        token = self._take()
        if token.text != text:
            found = "the end" if token.kind == "end" else repr(token.text)
            raise ToolInputError(f"expected {text!r} but found {found} at position {token.at}")

    def expression(self, min_precedence: int) -> Number:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ToolInputError(f"the expression is nested more than {MAX_DEPTH} levels deep")
        left = self._prefix()
        while True:
            token = self._peek()
            if token.kind == "op" and token.text == "!":
                self._take()
                left = _factorial(left)
                continue
            precedence = _BINARY.get(token.text) if token.kind == "op" else None
            if precedence is None or precedence < min_precedence:
                break
            self._take()
            # ** is right-associative: 2**3**2 is 2**9
            next_min = precedence if token.text == "**" else precedence + 1
            right = self.expression(next_min)
            left = _binary(token.text, left, right)
        self._depth -= 1
        return left

    def _prefix(self) -> Number:
        token = self._take()
        if token.kind == "number":
            return _number(token.text)
        if token.kind == "op" and token.text in "+-":
            operand = self.expression(_UNARY_PRECEDENCE)
            return _checked(-operand if token.text == "-" else operand)
        if token.kind == "op" and token.text == "(":
            value = self.expression(0)
            self._expect(")")
            return value
        if token.kind == "name":
            return self._name(token)
        found = "the end of the expression" if token.kind == "end" else repr(token.text)
        raise ToolInputError(f"expected a number but found {found} at position {token.at}")

    def _name(self, token: _Token) -> Number:
        name = token.text.lower()
        if name in _CONSTANTS:
            return _CONSTANTS[name]
        function = _FUNCTIONS.get(name)
        if function is None:
            known = ", ".join(sorted(_FUNCTIONS))
            raise ToolInputError(f"unknown name {token.text!r}; known functions: {known}")
        if self._peek().text != "(":  # sqrt 16, √16
            return function.call([self.expression(_UNARY_PRECEDENCE)], token.text)
        self._take()
        arguments = [self.expression(0)]
        while self._peek().text == ",":
            self._take()
            arguments.append(self.expression(0))
        self._expect(")")
        return function.call(arguments, token.text)


# ----------------------------------------------------------------- numbers


def _number(text: str) -> Number:
    try:
        value = Fraction(text.replace("_", ""))
    except (ValueError, ZeroDivisionError):
        raise ToolInputError(f"{text!r} is not a number") from None
    return _checked(value)


def _digits(value: Fraction) -> int:
    return max(_int_digits(value.numerator), _int_digits(value.denominator))


def _int_digits(value: int) -> int:
    # bit_length is O(1); 0.30103 = log10(2)
    return int(abs(value).bit_length() * 0.30103) + 1


def _log10_size(value: Fraction) -> float:
    """Digits per unit of exponent: ``value ** n`` has about ``n * this`` digits."""
    return max(math.log10(abs(value.numerator)), math.log10(value.denominator))


def _checked(value: Number) -> Number:
    if isinstance(value, Fraction) and _digits(value) > MAX_DIGITS:
        raise ToolInputError(f"a number in the calculation has more than {MAX_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolInputError("the result is too large (or not a number) for approximate math")
    return value


def _binary(operator: str, left: Number, right: Number) -> Number:
    try:
        if operator == "+":
            return _checked(left + right)
        if operator == "-":
            return _checked(left - right)
        if operator == "*":
            return _checked(left * right)
        if operator == "/":
            return _checked(left / right)
        if operator == "//":
            return _checked(Fraction(left // right))
        if operator == "%":
            return _checked(left % right)
        return _power(left, right)
    except ZeroDivisionError:
        raise ToolInputError("division by zero") from None
    except OverflowError:
        raise ToolInputError("the result is too large for approximate math") from None


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(base, Fraction) and isinstance(exponent, Fraction):
        if exponent.denominator == 1:
            if base == 0 and exponent < 0:
                raise ToolInputError("division by zero (0 to a negative power)")
            # Estimate the digits before computing: 9**9**9 must fail at once.
            if base not in (0, 1, -1) and abs(exponent) * _log10_size(base) > MAX_DIGITS:
                raise ToolInputError(
                    f"the power would have more than {MAX_DIGITS} digits; use a smaller exponent"
                )
            return _checked(base ** int(exponent))
        root = _exact_root(base, exponent)
        if root is not None:
            return _checked(root)
    if base < 0 and exponent != int(exponent):  # float ** float would be complex
        raise ToolInputError("a negative number to a fractional power is not a real number")
    try:
        return _checked(float(base) ** float(exponent))
    except OverflowError:
        raise ToolInputError("the power is too large for approximate math") from None


def _exact_root(base: Fraction, exponent: Fraction) -> Fraction | None:
    """``base ** (p/q)`` exactly when base is a perfect q-th power (4**0.5 is 2)."""
    if base < 0 or exponent.denominator > 64:
        return None
    q = exponent.denominator
    numerator, denominator = _int_root(base.numerator, q), _int_root(base.denominator, q)
    if numerator is None or denominator is None:
        return None
    root = Fraction(numerator, denominator)
    if abs(exponent.numerator) * _log10_size(root) > MAX_DIGITS:
        raise ToolInputError(f"the power would have more than {MAX_DIGITS} digits")
    return root**exponent.numerator


def _int_root(value: int, degree: int) -> int | None:
    if degree == 2:
        guess = math.isqrt(value)  # exact at any size
    elif value < 2**1000:
        guess = round(float(value) ** (1 / degree))
    else:
        return None
    for candidate in (guess - 1, guess, guess + 1):
        if candidate >= 0 and candidate**degree == value:
            return candidate
    return None


def _factorial(value: Number) -> Number:
    if not (isinstance(value, Fraction) and value.denominator == 1 and value >= 0):
        raise ToolInputError("factorial needs a whole number ≥ 0")
    if value > MAX_FACTORIAL:
        raise ToolInputError(f"factorial is limited to n ≤ {MAX_FACTORIAL}")
    return Fraction(math.factorial(int(value)))


# --------------------------------------------------------------- functions


@dataclass(frozen=True)
class _Function:
    arity: tuple[int, ...]
    apply: Callable[..., Number]

    def call(self, arguments: list[Number], name: str) -> Number:
        if len(arguments) not in self.arity:
            wanted = " or ".join(str(n) for n in self.arity)
            raise ToolInputError(f"{name}() takes {wanted} argument(s), not {len(arguments)}")
        try:
            return _checked(self.apply(*arguments))
        except (ValueError, ZeroDivisionError):
            raise ToolInputError(f"{name}() is not defined for {_args_text(arguments)}") from None
        except OverflowError:
            raise ToolInputError(f"{name}() overflows for {_args_text(arguments)}") from None


def _args_text(arguments: list[Number]) -> str:
    return ", ".join(Answer(a, isinstance(a, Fraction)).text() for a in arguments)


def _approximate(function: Callable[[float], float]) -> Callable[[Number], Number]:
    return lambda x: function(float(x))


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise ValueError
    if isinstance(x, Fraction):
        root = _exact_root(x, Fraction(1, 2))
        if root is not None:
            return root
    return math.sqrt(x)


def _log(x: Number, base: Number | None = None) -> Number:
    if isinstance(x, Fraction) and isinstance(base, Fraction) and base > 1 and x > 0:
        # exact when x is an integer power of base: log(1024, 2) is 10
        estimate = round(math.log(x) / math.log(base))
        if abs(estimate) * _digits(base) <= MAX_DIGITS and base**estimate == x:
            return Fraction(estimate)
    if x <= 0:
        raise ValueError
    natural = _natural_log(x)
    return natural if base is None else natural / _natural_log(base)


def _natural_log(x: Number) -> float:
    if isinstance(x, Fraction):  # math.log takes big ints whole; float() of them overflows
        return math.log(x.numerator) - math.log(x.denominator)
    return math.log(x)


def _round(x: Number, places: Number = Fraction(0)) -> Number:
    """Half away from zero, as taught in school (Python's round() is half to even)."""
    if not (isinstance(places, Fraction) and places.denominator == 1 and abs(places) < 100):
        raise ValueError
    scale = Fraction(10) ** int(places)
    scaled = Fraction(x) * scale
    whole = math.floor(abs(scaled) + Fraction(1, 2))
    return Fraction(whole if scaled >= 0 else -whole) / scale


_FUNCTIONS: dict[str, _Function] = {
    "sqrt": _Function((1,), _sqrt),
    "cbrt": _Function((1,), lambda x: _power(abs(x), Fraction(1, 3)) * (1 if x >= 0 else -1)),
    "abs": _Function((1,), abs),
    "log": _Function((1, 2), _log),
    "ln": _Function((1,), _log),
    "log10": _Function((1,), lambda x: _log(x, Fraction(10))),
    "log2": _Function((1,), lambda x: _log(x, Fraction(2))),
    "exp": _Function((1,), _approximate(math.exp)),
    "sin": _Function((1,), _approximate(math.sin)),
    "cos": _Function((1,), _approximate(math.cos)),
    "tan": _Function((1,), _approximate(math.tan)),
    "asin": _Function((1,), _approximate(math.asin)),
    "acos": _Function((1,), _approximate(math.acos)),
    "atan": _Function((1,), _approximate(math.atan)),
    "sinh": _Function((1,), _approximate(math.sinh)),
    "cosh": _Function((1,), _approximate(math.cosh)),
    "tanh": _Function((1,), _approximate(math.tanh)),
    "degrees": _Function((1,), _approximate(math.degrees)),
    "radians": _Function((1,), _approximate(math.radians)),
    "floor": _Function((1,), lambda x: Fraction(math.floor(x))),
    "ceil": _Function((1,), lambda x: Fraction(math.ceil(x))),
    "round": _Function((1, 2), _round),
    "factorial": _Function((1,), _factorial),
    "min": _Function(tuple(range(1, 65)), min),
    "max": _Function(tuple(range(1, 65)), max),
}
_CONSTANTS: dict[str, Number] = {"pi": math.pi, "e": math.e, "tau": math.tau}


# ------------------------------------------------------------------ output


def _exact_text(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    decimal = _terminating_decimal(value)
    if decimal is not None:
        return decimal
    return f"{value.numerator}/{value.denominator} (≈ {_fraction_to_float(value)!r})"


def _terminating_decimal(value: Fraction) -> str | None:
    """1/8 is 0.125 exactly; 1/3 has no finite decimal."""
    denominator = value.denominator
    twos = fives = 0
    while denominator % 2 == 0:
        denominator //= 2
        twos += 1
    while denominator % 5 == 0:
        denominator //= 5
        fives += 1
    places = max(twos, fives)
    if denominator != 1 or places > 100:  # 2**-13000 reads better as a fraction
        return None
    scaled = abs(value.numerator) * 10**places // value.denominator
    digits = str(scaled).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def _fraction_to_float(value: Fraction) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _float_text(value: float) -> str:
    return f"{value!r} (approximate)"
