"""Output helpers shared by llamactl's commands."""

from __future__ import annotations

import sys

import msgspec

from llamad.protocol import ModelStatus, PoolMemory


def print_json(value: object) -> None:
    """``--json`` output: the protocol's own encoding, indented for people."""
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value).decode()) + "\n")


def size(count: int | None) -> str:
    """Bytes for people: ``1.2 GiB``, ``98 MiB``; ``-`` when unknown."""
    if count is None:
        return "-"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}" if unit == "GiB" else f"{count / scale:.0f} {unit}"
    return f"{count} B"


def memory_line(memory: PoolMemory) -> str:
    """``memory 310 MiB of 12.0 GiB`` (and GPU, and the model limit, when set)."""
    budget = size(memory.budget_host) if memory.budget_host is not None else "no limit"
    line = f"memory {size(memory.used_host)} used of {budget}"
    if memory.budget_gpu is not None:
        line += f"; GPU {size(memory.used_gpu)} used of {size(memory.budget_gpu)}"
    if memory.max_models is not None:
        line += f"; at most {memory.max_models} models"
    return line


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
