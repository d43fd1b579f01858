"""docs/protocol.md against llamad/protocol.py: every message, field and error code documented.

The page is the contract a client is written from; it drifted from the code
once (issue 11), so the tables are checked against the Structs themselves.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import msgspec
import pytest

from llamad import protocol

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def _section(heading: str) -> str:
    """The text under a heading (``### ModelStatus``) up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", DOC, re.MULTILINE | re.DOTALL)
    assert match is not None, f"docs/protocol.md has no section {heading!r}"
    return match.group(1)


def _rows(text: str) -> dict[str, str]:
    """Table rows by their first cell's `name`: ``| `chat` | ... |`` -> the whole row."""
    rows: dict[str, str] = {}
    lines = text.splitlines()
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        match = re.match(r"\|\s*`([^`]+)`\s*\|", line)
        if match and not following.startswith("|-"):  # not a header row
            rows[match.group(1)] = line
    return rows


def _members(union: object) -> list[type[msgspec.Struct]]:
    return list(typing.get_args(union))


def _fields(struct: type[msgspec.Struct]) -> tuple[str, ...]:
    return struct.__struct_fields__


def _tag(struct: type[msgspec.Struct]) -> str:
    tag = struct.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def _quoted(name: str, text: str) -> bool:
    return f"`{name}`" in text


def _named(name: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


REQUEST_TABLES = _section("Requests (client → llamad)")
REPLY_TABLE = _section("Final replies (llamad → client)")
EVENT_TABLE = _section("Events (llamad → client)")


@pytest.mark.parametrize("struct", _members(protocol.Request), ids=_tag)
def test_every_request_and_its_fields_are_documented(struct: type[msgspec.Struct]) -> None:
    row = _rows(REQUEST_TABLES).get(_tag(struct))
    assert row is not None, f"request {_tag(struct)!r} is not in the requests tables"
    missing = [name for name in _fields(struct) if not _quoted(name, row)]
    assert not missing, f"request {_tag(struct)!r}: fields {missing} are not documented"


@pytest.mark.parametrize("struct", _members(protocol.ServerMessage), ids=_tag)
def test_every_reply_and_event_and_its_fields_are_documented(
    struct: type[msgspec.Struct],
) -> None:
    rows = {**_rows(REPLY_TABLE), **_rows(EVENT_TABLE)}
    row = rows.get(_tag(struct))
    assert row is not None, f"message {_tag(struct)!r} is in neither the replies nor the events"
    missing = [name for name in _fields(struct) if not _quoted(name, row)]
    assert not missing, f"message {_tag(struct)!r}: fields {missing} are not documented"


def test_the_final_replies_are_those_the_page_says_end_a_request() -> None:
    # Events are what ``llamactl``'s client keeps reading past; everything else ends a request.
    from llamactl.client import _EVENTS

    events = {_tag(struct) for struct in _EVENTS}
    assert events == set(_rows(EVENT_TABLE))
    assert set(_rows(REPLY_TABLE)) == {_tag(s) for s in _members(protocol.ServerMessage)} - events


# Shared structures: where the page describes them, and how strictly. A table
# names each field in backticks; prose may name them plainly ({code, signal}).
SHARED: list[tuple[type[msgspec.Struct], str, bool]] = [
    (protocol.ModelStatus, "ModelStatus", True),
    (protocol.ModelMemory, "ModelStatus", True),
    (protocol.PoolMemory, "ModelStatus", True),
    (protocol.WorkerStatus, "WorkerStatus", True),
    (protocol.WorkerDevice, "WorkerStatus", False),
    (protocol.Conversation, "Conversation and Message", True),
    (protocol.Message, "Conversation and Message", True),
    (protocol.ToolCall, "Conversation and Message", True),
    (protocol.ImagePart, "Conversation and Message", False),
    (protocol.TextPart, "Conversation and Message", False),
    (protocol.MessageStats, "Conversation and Message", False),
    (protocol.ExitInfo, "ModelStatus", False),
    (protocol.ChatOptions, "Requests (client → llamad)", True),
    (protocol.SearchHit, "Final replies (llamad → client)", False),
]


@pytest.mark.parametrize(
    ("struct", "heading", "quoted"), SHARED, ids=[s.__name__ for s, _, _ in SHARED]
)
def test_every_field_of_the_shared_structures_is_documented(
    struct: type[msgspec.Struct], heading: str, quoted: bool
) -> None:
    text = _section(heading)
    found = _quoted if quoted else _named
    missing = [name for name in _fields(struct) if not found(name, text)]
    assert not missing, f"{struct.__name__}: fields {missing} are not in {heading!r}"


def test_every_error_code_is_documented() -> None:
    documented = set(_rows(_section("Error codes")))
    codes = set(typing.get_args(protocol.ErrorCode))
    assert codes - documented == set(), "error codes missing from the table"
    assert documented - codes == set(), "the table lists codes llamad never sends"


def test_every_model_state_is_documented() -> None:
    states = _section("ModelStatus")
    for state in typing.get_args(protocol.ModelState):
        assert _quoted(state, states), state
