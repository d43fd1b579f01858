"""A stand-in for the history store when it cannot be opened.

Supervising llama-server does not need the chat history, so a data directory
that cannot be written (read-only, a full disk at start, a newer schema) must
not stop llamad. The daemon then runs with ``NoHistory``: every method raises
``HistoryUnavailable`` with the reason and the fix, which the dispatcher turns
into an ``error`` reply (``history_unavailable``) like any other user-facing
error. Chats are refused before anything reaches llama-server, because the
first thing a chat does is store the user message. No other code changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from llamad.errors import HistoryUnavailable
from llamad.history import HistoryStore


class NoHistory(HistoryStore):
    """Has the store's interface; every call but ``close`` raises ``HistoryUnavailable``."""

    def __init__(self, path: Path, reason: str) -> None:  # no store is opened
        self.path = path
        self.reason = reason

    def close(self) -> None:
        pass

    def _refuse(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise HistoryUnavailable(self.reason)

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_") and name not in ("path", "reason", "close"):
            attribute = getattr(HistoryStore, name, None)
            if isinstance(attribute, property):
                raise HistoryUnavailable(object.__getattribute__(self, "reason"))
            if callable(attribute):
                return object.__getattribute__(self, "_refuse")
        return object.__getattribute__(self, name)
