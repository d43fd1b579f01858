"""Tests for the LMDB chat-history store (``llamad.history``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamad import errors, history
from llamad.errors import (
    AmbiguousConversation,
    ConversationNotFound,
    HistoryOpenError,
    HistoryWriteError,
    MessageNotFound,
)
from llamad.history import (
    HistoryStore,
    message_key,
    new_conversation_id,
    updated_key,
)
from llamad.protocol import (
    Conversation,
    Message,
    MessageStats,
    TextPart,
    conversation_handle,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(tmp_path / "history") as opened:
        yield opened


def _text(text: str) -> list[TextPart]:
    return [TextPart(text=text)]


def _conv(store: HistoryStore, title: str = "") -> Conversation:
    return store.create_conversation(model="m", system_prompt=None, title=title)


# -------------------------------------------------------------- key layout


def test_new_conversation_id_is_uuid7_with_the_time() -> None:
    conv_id = new_conversation_id(1_700_000_000_123, bytes(range(10)))
    parsed = uuid.UUID(conv_id)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert int.from_bytes(parsed.bytes[:6], "big") == 1_700_000_000_123
    assert str(parsed) == conv_id


@given(
    st.integers(0, 2**48 - 1),
    st.integers(0, 2**48 - 1),
    st.binary(min_size=10, max_size=10),
    st.binary(min_size=10, max_size=10),
)
def test_uuid7_sorts_by_time(ms_a: int, ms_b: int, rand_a: bytes, rand_b: bytes) -> None:
    a = uuid.UUID(new_conversation_id(ms_a, rand_a))
    b = uuid.UUID(new_conversation_id(ms_b, rand_b))
    assert a.version == b.version == 7
    if ms_a < ms_b:
        assert a.bytes < b.bytes
        assert str(a) < str(b)


def test_generated_ids_are_monotonic() -> None:
    ids = [history.generate_conversation_id() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids)


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_message_keys_sort_by_seq_within_a_conversation(seq_a: int, seq_b: int) -> None:
    conv = new_conversation_id(1, bytes(10))
    ka, kb = message_key(conv, seq_a), message_key(conv, seq_b)
    assert len(ka) == 24
    assert ka[:16] == uuid.UUID(conv).bytes
    assert (ka < kb) == (seq_a < seq_b)


def test_message_keys_group_by_conversation() -> None:
    early = new_conversation_id(1, bytes(10))
    late = new_conversation_id(2, bytes(10))
    keys = [message_key(late, 1), message_key(early, 2**40), message_key(early, 3)]
    assert sorted(keys) == [message_key(early, 3), message_key(early, 2**40), message_key(late, 1)]


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_updated_keys_sort_by_time(ns_a: int, ns_b: int) -> None:
    conv_a = new_conversation_id(5, b"\xff" * 10)
    conv_b = new_conversation_id(1, bytes(10))
    ka, kb = updated_key(ns_a, conv_a), updated_key(ns_b, conv_b)
    assert len(ka) == 24
    if ns_a != ns_b:
        assert (ka < kb) == (ns_a < ns_b)


def test_only_two_non_ascii_characters_lower_to_ascii() -> None:
    # The search prefilter relies on this list being complete.
    found = set()
    for code in range(0x80, 0x110000):
        if 0xD800 <= code < 0xE000:
            continue
        char = chr(code)
        if any(ord(c) < 0x80 for c in char.lower()):
            found.add(char.encode())
    assert found == set(history._FOLDS_TO_ASCII)


def test_title_from_is_one_line_and_short() -> None:
    assert history.title_from("  hello\n  world ") == "hello world"
    long = "word " * 40
    title = history.title_from(long)
    assert len(title) <= 61
    assert title.endswith("…")
    assert "\n" not in title


# ---------------------------------------------------------- basic behaviour


def test_create_and_get(store: HistoryStore) -> None:
    conv = store.create_conversation(model="llama", system_prompt="be brief")
    assert conv.message_count == 0
    assert conv.created == conv.updated > 0
    assert store.get_conversation(conv.id) == conv
    with pytest.raises(ConversationNotFound, match="llamactl history list"):
        store.get_conversation(str(uuid.uuid4()))
    with pytest.raises(ConversationNotFound):
        store.get_conversation("not-a-uuid")


def test_append_and_page_from_the_end(store: HistoryStore) -> None:
    conv = _conv(store)
    other = _conv(store)
    for i in range(1, 251):
        message = store.append_message(conv.id, role="user", parts=_text(f"m{i}"))
        assert message.seq == i
        store.append_message(other.id, role="user", parts=_text(f"other {i}"))
    assert store.get_conversation(conv.id).message_count == 250

    page, more = store.get_messages(conv.id, limit=100)
    assert [m.seq for m in page] == list(range(151, 251))
    assert more
    assert all(m.conversation == conv.id for m in page)
    page, more = store.get_messages(conv.id, limit=100, before_seq=151)
    assert [m.seq for m in page] == list(range(51, 151))
    assert more
    page, more = store.get_messages(conv.id, limit=100, before_seq=51)
    assert [m.text for m in page] == [f"m{i}" for i in range(1, 51)]
    assert not more
    page, more = store.get_messages(conv.id, limit=50, before_seq=51)
    assert len(page) == 50
    assert not more
    assert store.get_messages(conv.id, before_seq=1) == ([], False)

    everything = store.all_messages(conv.id)
    assert [m.seq for m in everything] == list(range(1, 251))
    assert everything[0] == store.get_messages(conv.id, limit=1, before_seq=2)[0][0]


def test_get_messages_of_empty_and_unknown(store: HistoryStore) -> None:
    empty = _conv(store)
    # An empty conversation whose neighbour (later id) has messages.
    later = _conv(store)
    store.append_message(later.id, role="user", parts=_text("x"))
    assert store.get_messages(empty.id) == ([], False)
    assert store.all_messages(empty.id) == []
    with pytest.raises(ConversationNotFound):
        store.get_messages(str(uuid.uuid4()))
    with pytest.raises(ConversationNotFound):
        store.append_message(str(uuid.uuid4()), role="user", parts=_text("x"))


def test_message_fields_round_trip(store: HistoryStore) -> None:
    conv = _conv(store)
    stats = MessageStats(finish_reason="stop", completion_tokens=12, tokens_per_second=30.5)
    stored = store.append_message(
        conv.id,
        role="assistant",
        parts=_text("hi"),
        status="error",
        model="qwen",
        stats=stats,
        error="server died",
    )
    (read,), _ = store.get_messages(conv.id)
    assert read == stored
    assert read.stats == stats
    assert read.model == "qwen"
    assert read.error == "server died"
    assert read.created > 0


def test_title_comes_from_the_first_user_message(store: HistoryStore) -> None:
    conv = _conv(store)
    store.append_message(conv.id, role="system", parts=_text("system text"))
    assert store.get_conversation(conv.id).title == ""
    store.append_message(conv.id, role="user", parts=_text("How do I\nboil an egg? " * 10))
    store.append_message(conv.id, role="user", parts=_text("second question"))
    title = store.get_conversation(conv.id).title
    assert title.startswith("How do I boil an egg?")
    assert "\n" not in title
    assert len(title) <= 61

    named = _conv(store, title="Kept")
    store.append_message(named.id, role="user", parts=_text("not the title"))
    assert store.get_conversation(named.id).title == "Kept"


def test_update_message_streaming_then_finish(store: HistoryStore) -> None:
    conv = _conv(store)
    store.append_message(conv.id, role="user", parts=_text("tell me a story"))
    reply = store.append_message(
        conv.id, role="assistant", parts=_text(""), status="incomplete", model="m"
    )
    before = store.get_conversation(conv.id).updated
    flushed = store.update_message(conv.id, reply.seq, parts=_text("Once upon"))
    assert flushed.status == "incomplete"
    assert flushed.text == "Once upon"
    assert store.get_conversation(conv.id).updated > before
    stats = MessageStats(finish_reason="stop", completion_tokens=3)
    done = store.update_message(
        conv.id, reply.seq, parts=_text("Once upon a time."), status="complete", stats=stats
    )
    (_, last), _ = store.get_messages(conv.id)
    assert last == done
    assert last.text == "Once upon a time."
    assert last.status == "complete"
    assert last.stats == stats
    assert last.model == "m"
    assert store.get_conversation(conv.id).message_count == 2
    with pytest.raises(MessageNotFound):
        store.update_message(conv.id, 3, status="complete")


def test_list_newest_first_with_cursor_paging(store: HistoryStore) -> None:
    made = [_conv(store, title=f"c{i}") for i in range(1000)]
    # Touching an old conversation moves it to the front.
    store.append_message(made[10].id, role="user", parts=_text("bump"))
    expected = [made[10].id] + [c.id for c in reversed(made) if c.id != made[10].id]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = store.list_conversations(limit=64, before=cursor)
        pages += 1
        seen += [c.id for c in page]
        if cursor is None:
            break
    assert seen == expected
    assert pages == 16
    updated = [store.get_conversation(i).updated for i in seen[:50]]
    assert updated == sorted(updated, reverse=True)

    exact, cursor = store.list_conversations(limit=1000)
    assert len(exact) == 1000
    assert cursor is None


def test_list_empty_and_bad_cursor(store: HistoryStore) -> None:
    assert store.list_conversations() == ([], None)
    with pytest.raises(errors.HistoryError, match="cursor"):
        store.list_conversations(before="zz")


# ------------------------------------------------------------------- search


def test_search_case_insensitive_with_snippet(store: HistoryStore) -> None:
    convs = [_conv(store) for _ in range(1000)]
    for i, conv in enumerate(convs):
        store.append_message(conv.id, role="user", parts=_text(f"question number {i}"))
        store.append_message(conv.id, role="assistant", parts=_text(f"plain answer {i}"))
    long_text = ("lorem ipsum dolor " * 10) + "The NEEDLE\nis here" + (" sit amet" * 10)
    target = convs[500]
    store.append_message(target.id, role="assistant", parts=_text(long_text))
    store.append_message(convs[3].id, role="user", parts=_text("needle again"))

    hits = store.search("needle")
    assert [(h.conversation, h.seq) for h in hits] == [(convs[3].id, 3), (target.id, 3)]
    snippet = hits[1].snippet
    assert "NEEDLE is here" in snippet
    assert "\n" not in snippet
    assert snippet.startswith("…")
    assert snippet.endswith("…")
    assert len(snippet) <= len("NEEDLE") + 2 * 40 + 2
    assert hits[1].role == "assistant"
    assert hits[1].title == "question number 500"

    assert len(store.search("ANSWER")) == 50
    assert len(store.search("answer", limit=2000)) == 1000
    assert store.search("answer 999", limit=5)[0].conversation == convs[999].id
    assert store.search("no such words") == []
    assert store.search("") == []


def test_search_non_ascii(store: HistoryStore) -> None:
    for i in range(1000):
        store.append_message(_conv(store).id, role="user", parts=_text(f"filler {i}"))
    conv = _conv(store)
    store.append_message(conv.id, role="user", parts=_text("Je vais à l'école demain"))
    store.append_message(conv.id, role="assistant", parts=_text("L'ÉCOLE est fermée"))
    store.append_message(conv.id, role="assistant", parts=_text("日本語のテキスト"))
    store.append_message(conv.id, role="assistant", parts=_text("İstanbul and 5 \u212aelvin"))

    hits = store.search("ÉCOLE")
    assert [h.seq for h in hits] == [1, 2]
    assert "école" in hits[0].snippet
    assert "ÉCOLE" in hits[1].snippet
    assert [h.seq for h in store.search("本語")] == [3]
    # Characters whose lower case is ASCII still match (prefilter exceptions).
    assert [h.seq for h in store.search("kelvin")] == [4]
    istanbul = store.search("i̇stanbul")
    assert [h.seq for h in istanbul] == [4]
    assert istanbul[0].snippet.startswith("İstanbul")


# ------------------------------------------------------- rename, delete, ids


def test_rename_and_delete(store: HistoryStore) -> None:
    keep = _conv(store)
    gone = _conv(store)
    store.append_message(keep.id, role="user", parts=_text("keep this unicorn"))
    for i in range(20):
        store.append_message(gone.id, role="user", parts=_text(f"unicorn {i}"))

    renamed = store.rename(gone.id, "New\nname")
    assert renamed.title == "New name"
    assert store.get_conversation(gone.id).title == "New name"

    store.delete(gone.id)
    with pytest.raises(ConversationNotFound):
        store.get_conversation(gone.id)
    with pytest.raises(ConversationNotFound):
        store.get_messages(gone.id)
    with pytest.raises(ConversationNotFound):
        store.delete(gone.id)
    assert [c.id for c in store.list_conversations()[0]] == [keep.id]
    assert [h.conversation for h in store.search("unicorn")] == [keep.id]
    assert len(store.all_messages(keep.id)) == 1
    # No message records of the deleted conversation remain.
    with store._env.begin() as txn:
        cursor = txn.cursor(db=store._messages)
        keys = [key for key, _ in cursor]
    assert keys == [message_key(keep.id, 1)]


def test_resolve(store: HistoryStore) -> None:
    a = store.create_conversation(model=None, system_prompt=None)
    assert store.resolve(a.id) == a.id
    assert store.resolve(a.id.upper()) == a.id
    assert store.resolve(a.id.replace("-", "")) == a.id
    # Ids created together share their time prefix.
    others = [_conv(store) for _ in range(2)]
    ids = [a.id, *(c.id for c in others)]
    common = a.id[: next(n for n in range(37) if len({i[: n + 1] for i in ids}) > 1)]
    with pytest.raises(AmbiguousConversation, match=f"'{common}' matches 3 conversations"):
        store.resolve(common)
    unique = next(
        a.id[:n]
        for n in range(1, 37)
        if not any(c.id.startswith(a.id[:n]) for c in others) and a.id[n - 1] != "-"
    )
    assert store.resolve(unique) == a.id
    assert store.resolve(unique.upper()) == a.id
    with pytest.raises(ConversationNotFound, match="no conversation matches 'abc'"):
        store.resolve("abc")
    for bad in ("", "xyz", "0" * 33):
        with pytest.raises(ConversationNotFound):
            store.resolve(bad)


def test_resolve_odd_length_prefix(store: HistoryStore) -> None:
    conv = _conv(store)
    for n in range(1, 33):
        prefix = conv.id.replace("-", "")[:n]
        assert store.resolve(prefix) == conv.id


# ----------------------------------------------------------------- handles


def test_handles_are_short_unique_and_resolve(store: HistoryStore) -> None:
    made = [_conv(store) for _ in range(300)]  # many in the same millisecond
    handles = [c.handle for c in made]
    assert len(set(handles)) == len(handles)
    assert all(len(c.handle) == 6 and c.handle == conversation_handle(c.id) for c in made)
    assert all(not set(h) & set("ilou") for h in handles)  # nothing to misread
    for conversation in made[::37]:
        assert store.resolve(conversation.handle) == conversation.id
        assert store.resolve(conversation.handle.upper()) == conversation.id
    listed, _ = store.list_conversations(limit=5)
    assert [c.handle for c in listed] == [c.handle for c in made[::-1][:5]]


def test_handle_look_alike_letters_are_forgiven(store: HistoryStore) -> None:
    conv = _conv(store)
    typed = conv.handle.replace("0", "o").replace("1", "l")
    assert store.resolve(typed) == conv.id


def test_a_taken_handle_gets_a_new_id(store: HistoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _conv(store)
    clash = str(uuid.UUID(int=uuid.UUID(first.id).int + (1 << 80)))  # other time, same tail
    assert conversation_handle(clash) == first.handle
    fresh = iter([clash])
    real = history.generate_conversation_id
    monkeypatch.setattr(history, "generate_conversation_id", lambda: next(fresh, None) or real())
    second = _conv(store)
    assert second.id != clash and second.handle != first.handle
    assert store.resolve(first.handle) == first.id


def test_deleted_conversations_free_their_handle(store: HistoryStore) -> None:
    conv = _conv(store)
    store.delete(conv.id)
    with pytest.raises(ConversationNotFound):
        store.resolve(conv.handle)


def test_a_store_without_the_handle_index_gets_one_at_open(tmp_path: Path) -> None:
    with HistoryStore(tmp_path / "h") as store:
        made = [_conv(store) for _ in range(5)]
        with store._env.begin(write=True) as txn:  # as written before handles existed
            txn.drop(store._handles, delete=False)
    with HistoryStore(tmp_path / "h") as store:
        assert [store.resolve(c.handle) for c in made] == [c.id for c in made]


# ------------------------------------------------------------------ export


def test_export_markdown_and_json(store: HistoryStore) -> None:
    conv = store.create_conversation(model="llama", system_prompt="Be kind.")
    store.append_message(conv.id, role="user", parts=_text("What is 2+2?"))
    store.append_message(conv.id, role="assistant", parts=_text("4"), model="llama")
    store.append_message(conv.id, role="assistant", parts=_text("and"), status="incomplete")

    md = store.export_markdown(conv.id)
    assert md.startswith("# What is 2+2?\n")
    assert "Be kind." in md
    assert "## User ·" in md
    assert "## Assistant (llama) ·" in md
    assert "What is 2+2?" in md
    assert "incomplete" in md
    assert conv.id in md
    assert md.index("What is 2+2?\n\n## Assistant") < md.index("incomplete")

    data: dict[str, Any] = json.loads(store.export_json(conv.id))
    assert set(data) == {"conversation", "messages"}
    assert data["conversation"]["id"] == conv.id
    assert data["conversation"]["message_count"] == 3
    assert [m["parts"][0]["text"] for m in data["messages"]] == ["What is 2+2?", "4", "and"]
    decoded = msgspec.json.decode(json.dumps(data["messages"]), type=list[Message])
    assert decoded == store.all_messages(conv.id)
    with pytest.raises(ConversationNotFound):
        store.export_markdown(str(uuid.uuid4()))


# ----------------------------------------------------- durability, failures


def test_map_grows_when_full(tmp_path: Path) -> None:
    path = tmp_path / "history"
    with HistoryStore(path, map_size=64 * 1024) as store:
        conv = _conv(store)
        for i in range(400):
            store.append_message(conv.id, role="user", parts=_text(f"{i} " + "x" * 1000))
        assert store.map_size >= 8 * 64 * 1024  # grew at least three times
    with HistoryStore(path, map_size=64 * 1024) as store:
        messages = store.all_messages(conv.id)
        assert [m.text.split()[0] for m in messages] == [str(i) for i in range(400)]
        assert store.get_conversation(conv.id).message_count == 400


def test_directory_is_private(tmp_path: Path) -> None:
    path = tmp_path / "history"
    HistoryStore(path).close()
    assert path.stat().st_mode & 0o777 == 0o700
    assert (path / "data.mdb").stat().st_mode & 0o077 == 0


class _FailingEnv:
    """Wraps an lmdb Environment; write transactions fail as configured."""

    def __init__(self, env: lmdb.Environment, fail_at: str) -> None:
        self._env = env
        self.fail_at = fail_at

    def begin(self, write: bool = False) -> Any:
        if not write:
            return self._env.begin()
        if self.fail_at == "begin":
            raise lmdb.ReadonlyError("mdb_txn_begin: Permission denied", 13)
        return _FailingTxn(self._env.begin(write=True), self.fail_at)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)


class _FailingTxn:
    def __init__(self, txn: lmdb.Transaction[bytes], fail_at: str) -> None:
        self._txn = txn
        self.fail_at = fail_at
        self.puts = 0

    def put(self, *args: Any, **kwargs: Any) -> bool:
        self.puts += 1
        if self.fail_at == "second-put" and self.puts == 2:
            raise lmdb.DiskError("mdb_put: No space left on device", 28)
        return self._txn.put(*args, **kwargs)

    def commit(self) -> None:
        if self.fail_at == "commit":
            self._txn.abort()
            raise OSError(28, "No space left on device")
        self._txn.commit()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


@pytest.mark.parametrize("fail_at", ["begin", "second-put", "commit"])
def test_failed_write_changes_nothing(
    store: HistoryStore, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    conv = _conv(store)
    store.append_message(conv.id, role="user", parts=_text("first"))
    before = (store.get_conversation(conv.id), store.all_messages(conv.id))

    monkeypatch.setattr(store, "_env", _FailingEnv(store._env, fail_at))
    with pytest.raises(HistoryWriteError) as caught:
        store.append_message(conv.id, role="assistant", parts=_text("second"))
    message = str(caught.value)
    assert message.startswith(f"cannot write chat history to {store.path}: ")
    assert message.endswith("; nothing already stored was changed")
    if fail_at == "commit":
        assert "No space left on device" in message
    with pytest.raises(HistoryWriteError):
        store.create_conversation(model=None, system_prompt=None)

    # Still readable, unchanged, and usable once the disk recovers.
    assert (store.get_conversation(conv.id), store.all_messages(conv.id)) == before
    assert [c.id for c in store.list_conversations()[0]] == [conv.id]
    monkeypatch.undo()
    store.append_message(conv.id, role="assistant", parts=_text("second"))
    assert store.get_conversation(conv.id).message_count == 2


def test_acknowledged_message_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "history"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from llamad.history import HistoryStore
        from llamad.protocol import TextPart

        store = HistoryStore(Path({str(path)!r}))
        conv = store.create_conversation(model="m", system_prompt=None)
        store.append_message(conv.id, role="user", parts=[TextPart(text="hello")])
        store.append_message(
            conv.id, role="assistant", parts=[TextPart(text="partial")], status="incomplete"
        )
        print(conv.id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == -9, result.stderr
    conv_id = result.stdout.strip()
    with HistoryStore(path) as store:
        messages = store.all_messages(conv_id)
        assert [m.text for m in messages] == ["hello", "partial"]
        # A reply cut off by the crash stays marked incomplete.
        assert messages[1].status == "incomplete"
        assert store.get_conversation(conv_id).title == "hello"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history"
    HistoryStore(path).close()
    with lmdb.open(str(path), max_dbs=8) as env:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"schema_version", msgspec.msgpack.encode(2), db=meta)
    with pytest.raises(HistoryOpenError, match="schema version 2") as caught:
        HistoryStore(path)
    assert "upgrade llamad" in str(caught.value)


def test_reopen_keeps_schema_and_data(tmp_path: Path) -> None:
    path = tmp_path / "history"
    with HistoryStore(path) as store:
        conv = _conv(store, title="t")
    with HistoryStore(path) as store:
        assert store.get_conversation(conv.id).title == "t"
        with store._env.begin() as txn:
            raw = txn.get(b"schema_version", db=store._meta)
        assert raw is not None
        assert msgspec.msgpack.decode(raw) == history.SCHEMA_VERSION


def test_concurrent_threads_while_the_map_grows(tmp_path: Path) -> None:
    # The daemon calls the store from worker threads; growing the map must wait
    # for every open transaction, and readers must never see a torn state.
    import threading

    errors: list[BaseException] = []
    with HistoryStore(tmp_path / "history", map_size=64 * 1024) as store:
        convs = [_conv(store) for _ in range(4)]
        stop = threading.Event()

        def writer(conv: Conversation) -> None:
            try:
                for i in range(60):
                    store.append_message(conv.id, role="user", parts=_text(f"{i} " + "y" * 800))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def reader() -> None:
            try:
                while not stop.is_set():
                    for conv in convs:
                        page, _ = store.get_messages(conv.id, limit=10)
                        assert [m.seq for m in page] == sorted(m.seq for m in page)
                    store.search("yyy", limit=5)
                    store.list_conversations()
                    # A busy loop would hog the GIL and starve the writers'
                    # fsyncs (a Python convoy, not the store); the daemon's
                    # readers are requests, not spinning threads.
                    time.sleep(0.001)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(c,)) for c in convs]
        readers = [threading.Thread(target=reader) for _ in range(2)]
        for thread in threads + readers:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        for thread in readers:
            thread.join()
        assert errors == []
        assert store.map_size > 64 * 1024
        for conv in convs:
            assert [m.seq for m in store.all_messages(conv.id)] == list(range(1, 61))


def test_images_are_stored_once_by_digest_and_freed_with_the_last_message(
    tmp_path: Path,
) -> None:
    import hashlib

    from llamad.protocol import ImagePart, ToolCall

    data = b"\x89PNG fake bytes for the store"
    digest = hashlib.sha256(data).hexdigest()
    part = ImagePart(
        data=data,
        name="cat.png",
        mime="image/png",
        width=2,
        height=3,
        size=len(data),
        digest=digest,
    )
    with HistoryStore(tmp_path / "h") as store:
        first = store.create_conversation(model=None, system_prompt=None)
        second = store.create_conversation(model=None, system_prompt=None)
        for conversation in (first.id, second.id):
            stored = store.append_message(
                conversation,
                role="user",
                parts=[TextPart(text="look"), part],
                images={digest: data},
            )
            assert stored.images == [msgspec.structs.replace(part, data=b"")]  # no bytes inline
        assert store.image_count() == 1
        assert store.get_image(digest) == data
        reply = store.append_message(first.id, role="assistant", parts=[], status="incomplete")
        call = ToolCall(
            id="c1", name="calculator", arguments='{"expression":"2+2"}', status="ok", result="4"
        )
        store.update_message(first.id, reply.seq, tool_calls=[call], status="complete")
        assert store.all_messages(first.id)[-1].tool_calls == [call]
        assert "- `calculator(2+2) → 4`" in store.export_markdown(first.id)
        assert "[image: cat.png 2×3]" in store.export_markdown(first.id)
        store.delete(first.id)
        assert store.get_image(digest) == data  # the second conversation still uses it
        store.delete(second.id)
        assert store.image_count() == 0
        with pytest.raises(KeyError):
            store.get_image(digest)


def test_an_exchange_starts_in_one_transaction(tmp_path: Path) -> None:
    from llamad.protocol import ImagePart

    with HistoryStore(tmp_path / "h") as store:
        conversation, user, reply = store.start_exchange(
            None, parts=[TextPart(text="hello")], model="demo", system_prompt="be brief"
        )
        assert (conversation.title, conversation.message_count) == ("hello", 2)
        assert (conversation.model, conversation.system_prompt) == ("demo", "be brief")
        assert (user.seq, reply.seq, reply.status, reply.model) == (1, 2, "incomplete", "demo")
        again, user2, reply2 = store.start_exchange(conversation.id, parts=[TextPart(text="more")])
        assert (again.id, user2.seq, reply2.seq) == (conversation.id, 3, 4)
        # An image without its bytes is refused before anything is written.
        with pytest.raises(ValueError, match="no bytes given"):
            store.start_exchange(None, parts=[ImagePart(digest="ab" * 32, mime="image/png")])
        assert len(store.list_conversations(50, None)[0]) == 1


# ------------------------------------------------------------ why a write failed


def test_an_io_error_on_a_full_disk_is_called_a_full_disk(tmp_path: Path) -> None:
    eio = lmdb.Error("mdb_txn_commit: Input/output error")
    full = history._reason(eio, tmp_path, free_bytes=lambda _: 12 * 1024)
    assert full == (
        "the disk is full (0.0 MiB free where the history is stored); free some space "
        "(mdb_txn_commit: Input/output error)"
    )
    # With room to spare it is a real I/O error, and says so.
    roomy = history._reason(eio, tmp_path, free_bytes=lambda _: 10 * 2**30)
    assert roomy == "mdb_txn_commit: Input/output error"
    enospc = OSError(28, "No space left on device")
    assert history._reason(enospc, tmp_path, free_bytes=lambda _: 0).startswith("the disk is full")

    # Other errors are left as they are; free space is not even looked at.
    def never(_: Path) -> int:
        raise AssertionError("looked at free space")

    assert history._reason(OSError(13, "Permission denied"), tmp_path, never) == (
        "Permission denied"
    )
