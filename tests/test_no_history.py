"""The stand-in store that refuses everything when the history cannot be opened."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamad.errors import HistoryUnavailable
from llamad.history import HistoryStore
from llamad.no_history import NoHistory

REASON = "chat history is unavailable (read-only); make it writable"


def test_every_method_of_the_store_raises_history_unavailable() -> None:
    store = NoHistory(Path("/nowhere"), REASON)
    public = [
        name
        for name in dir(HistoryStore)
        if not name.startswith("_") and callable(getattr(HistoryStore, name))
    ]
    assert "start_exchange" in public and "list_conversations" in public
    for name in public:
        if name == "close":
            continue
        method = getattr(store, name)
        with pytest.raises(HistoryUnavailable) as refused:
            method("x", 1)
        assert str(refused.value) == REASON
        assert refused.value.code == "history_unavailable"
    with pytest.raises(HistoryUnavailable):
        _ = store.map_size
    store.close()  # shutting down is fine
    assert isinstance(store, HistoryStore)
