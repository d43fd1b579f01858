"""Output helpers shared by llamactl's commands."""

from __future__ import annotations

import sys

import msgspec

from llamad.protocol import ModelStatus


def print_json(value: object) -> None:
    """``--json`` output: the protocol's own encoding, indented for people."""
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value).decode()) + "\n")


class StateLines:
    """Prints a model's states as it enters them, each entry once.

    llamad sends a model's status again when other things change (its pid,
    requests waiting): the same state, entered at the same time (``since``
    is computed at each send, so it differs by microseconds). A new start is
    a new entry, with a new ``since``, and is printed.
    """

    SAME_ENTRY_SECONDS = 0.001

    def __init__(self) -> None:
        self._printed: dict[tuple[str, str, str], list[float]] = {}

    def show(self, status: ModelStatus) -> None:
        entries = self._printed.setdefault((status.name, status.state, status.reason), [])
        if any(abs(status.since - since) < self.SAME_ENTRY_SECONDS for since in entries):
            return
        entries.append(status.since)
        reason = f" ({status.reason})" if status.reason else ""
        print(f"{status.name}: {status.state}{reason}", file=sys.stderr)
