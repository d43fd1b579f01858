"""The README's promises that a test can hold it to, against the real daemon."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Llamad, ready_daemon

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
MakeLlamad = Callable[..., Llamad]


def troubleshooting_quotes() -> list[str]:
    """The messages quoted in the first column of the troubleshooting table."""
    section = README.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    quotes: list[str] = []
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| you see"):
            quotes += re.findall(r"`([^`]+)`", line.split(" | ")[0])
    return quotes


def quoted(message: str) -> bool:
    """Whether the table quotes ``message``: a quote's words, … and N/M/X standing for any."""
    for quote in troubleshooting_quotes():
        pattern = ".*".join(
            re.escape(piece) for piece in re.split(r"…|\b[NMX]\b", quote.rstrip("…"))
        )
        if re.search(pattern, message):
            return True
    return False


@pytest.mark.server
def test_the_context_error_is_quoted_as_llamad_says_it(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models, ctx_size=256)
    result = daemon.ctl("chat", "the word " * 400)
    assert result.returncode == 1
    error = result.stderr.strip().removeprefix("llamactl: ")
    assert quoted(error), f"the README's troubleshooting table does not quote: {error}"
