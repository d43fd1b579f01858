"""Output helpers shared by llamactl's commands."""

from __future__ import annotations

import sys

import msgspec


def print_json(value: object) -> None:
    """``--json`` output: the protocol's own encoding, indented for people."""
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value).decode()) + "\n")
