"""Built-in tools a model may call: their JSON-schema definitions and how to run them.

Pure and synchronous: the chat engine runs ``run_tool`` in a worker thread with
a timeout. A tool's failure is not an error of the chat: ``run_tool`` returns
the reason as the result text, so the model reads it and can try again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from llamad.errors import ToolInputError
from llamad.tools.calculator import MAX_EXPRESSION_CHARS, calculate
from llamad.tools.file_search import SearchLimits, search_files

__all__ = ["TOOL_NAMES", "ToolOutcome", "ToolSpec", "openai_tools", "run_tool"]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object


@dataclass(frozen=True)
class ToolOutcome:
    ok: bool  # False: the arguments were refused; ``text`` says why
    text: str


CALCULATOR = ToolSpec(
    name="calculator",
    description=(
        "Exact arithmetic. Use it for any calculation instead of guessing. Supports integers, "
        "decimals and fractions, + - * / // % and ** (or ^), parentheses, n!, the constants "
        "pi and e, and sqrt, cbrt, abs, log(x[, base]), ln, log10, log2, exp, sin, cos, tan, "
        "asin, acos, atan, floor, ceil, round(x[, places]), factorial, min, max."
    ),
    parameters={
        "type": "object",
        "properties": {
            "expression": {
                "type": "string",
                "description": "the expression, for example (2**64 - 1) / 3",
                "maxLength": MAX_EXPRESSION_CHARS,
            }
        },
        "required": ["expression"],
    },
)

FILE_SEARCH = ToolSpec(
    name="file_search",
    description=(
        "Find the user's files by name pattern and/or by text they contain. Returns paths, "
        "and for text matches the line numbers and the matching lines. Read-only."
    ),
    parameters={
        "type": "object",
        "properties": {
            "name": {
                "type": "string",
                "description": "shell pattern for the file name, for example *.md or notes*",
                "maxLength": 200,
            },
            "text": {
                "type": "string",
                "description": "text a line must contain (case-insensitive)",
                "maxLength": 1000,
            },
            "path": {
                "type": "string",
                "description": "optional folder to search in, relative to the searchable roots",
                "maxLength": 1000,
            },
        },
    },
)

DEFAULT_SEARCH_LIMITS: Final = SearchLimits()
SPECS: Final[Mapping[str, ToolSpec]] = {spec.name: spec for spec in (CALCULATOR, FILE_SEARCH)}
TOOL_NAMES: Final[tuple[str, ...]] = tuple(SPECS)


def openai_tools(names: Sequence[str]) -> list[dict[str, Any]]:
    """The ``tools`` array of a ``/v1/chat/completions`` request."""
    return [
        {
            "type": "function",
            "function": {
                "name": SPECS[name].name,
                "description": SPECS[name].description,
                "parameters": SPECS[name].parameters,
            },
        }
        for name in names
    ]


def parse_arguments(raw: str) -> dict[str, Any]:
    """A tool call's ``arguments`` (a JSON object as text, from the model)."""
    if not raw.strip():
        return {}
    try:
        arguments = json.loads(raw)
    except ValueError:
        raise ToolInputError(f"the arguments are not valid JSON: {raw[:200]!r}") from None
    if not isinstance(arguments, dict):
        raise ToolInputError("the arguments must be a JSON object")
    return arguments


def run_tool(
    name: str,
    raw_arguments: str,
    *,
    search_roots: Sequence[Path] = (),
    search_limits: SearchLimits = DEFAULT_SEARCH_LIMITS,
) -> ToolOutcome:
    """Run one call. Never raises for bad input: the model is told what was wrong."""
    runner = _RUNNERS.get(name)
    if runner is None:
        return ToolOutcome(False, f"there is no tool named {name!r}; tools: {', '.join(SPECS)}")
    try:
        arguments = parse_arguments(raw_arguments)
        return ToolOutcome(True, runner(arguments, search_roots, search_limits))
    except ToolInputError as exc:
        return ToolOutcome(False, f"error: {exc}")


def _string(arguments: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = arguments.get(key)
    if value is None:
        if required:
            raise ToolInputError(f"the argument {key!r} is required")
        return None
    if not isinstance(value, str):
        raise ToolInputError(f"the argument {key!r} must be a string")
    return value


def _run_calculator(
    arguments: Mapping[str, Any], _roots: Sequence[Path], _limits: SearchLimits
) -> str:
    expression = _string(arguments, "expression", required=True)
    assert expression is not None
    return calculate(expression).text()


def _run_file_search(
    arguments: Mapping[str, Any], roots: Sequence[Path], limits: SearchLimits
) -> str:
    result = search_files(
        roots,
        name=_string(arguments, "name") or None,
        text=_string(arguments, "text") or None,
        path=_string(arguments, "path"),
        limits=limits,
    )
    return result.text()


_RUNNERS: Final[Mapping[str, Callable[[Mapping[str, Any], Sequence[Path], SearchLimits], str]]] = {
    "calculator": _run_calculator,
    "file_search": _run_file_search,
}
