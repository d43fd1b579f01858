"""Chat history kept in LMDB: conversations and their messages.

A synchronous store. The daemon calls each method through
``trio.to_thread.run_sync``; that is why every write transaction begins and
commits inside one method call (an LMDB write transaction belongs to the thread
that began it) and why nothing here imports trio.

Key layout (one LMDB environment, five named databases)::

    conversations   key: conv_uuid (16 raw bytes)
                    val: 0x01 + msgpack(_ConversationRecord)
    messages        key: conv_uuid (16) | seq (8, big-endian)
                    val: 0x01 + msgpack(_MessageRecord)
    by_updated      key: updated_ns (8, big-endian) | conv_uuid (16)
                    val: b""  (an index: walk it backwards for newest first)
    meta            b"schema_version" -> msgpack(int), currently 1
    images          key: sha256 of the image (32 raw bytes)
                    val: 0x01 + refcount (8, big-endian) + the image bytes
    handles         key: handle (6 ASCII bytes) | conv_uuid (16)
                    val: b""  (an index: a conversation's short name -> its id)

An image is stored once however often it is sent: a message keeps only its
``ImagePart`` (digest, type, size), the bytes live in ``images`` with a count
of the messages that use them, and deleting the last such message frees them.
Listing and searching conversations never reads an image.

    messages, in key order:
    ┌──────────── conv A ─────────────┐┌──────── conv B ────────┐
    A|0000000000000001  A|...0002  ...  B|...0001  B|...0002  ...

Conversation ids are UUIDv7, so the 16 raw bytes sort by creation time and a
cursor range over one conversation's prefix yields its messages in ``seq``
order; ``get_messages`` starts a reverse cursor at ``conv|before_seq`` and reads
only the page it returns.

Because of that time order, recent ids share long prefixes; a conversation's
*handle* (``llamad.protocol.conversation_handle``: six base32 characters from
the id's random tail) is what people type. A new conversation whose handle is
taken gets another id, so handles are unique; the ``handles`` index is rebuilt
at open when its count disagrees with ``conversations`` (a store written
before it existed).

Every value starts with a record-version byte so a later release can migrate
records lazily as it reads them; ``meta.schema_version`` guards the layout as a
whole and an environment written by a newer llamad is refused at open.

Durability: LMDB's default ``sync``/``metasync`` stay on, so a message is on
disk when ``append_message``/``update_message`` returns. A reply cut off by a
crash stays stored with status ``incomplete``; opening the store never rewrites
anything.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, TypeVar

import lmdb
import msgspec

from llamad.errors import (
    AmbiguousConversation,
    ConversationNotFound,
    HistoryError,
    HistoryOpenError,
    HistoryWriteError,
    MessageNotFound,
)
from llamad.protocol import (
    HANDLE_CHARS,
    Conversation,
    ImagePart,
    Message,
    MessageStats,
    MessageStatus,
    Part,
    Role,
    SearchHit,
    TextPart,
    ToolCall,
    conversation_handle,
)

SCHEMA_VERSION: Final = 1
RECORD_VERSION: Final = 1
_RECORD_PREFIX: Final = bytes([RECORD_VERSION])

TITLE_CHARS: Final = 60
SNIPPET_CONTEXT: Final = 40

_U64 = struct.Struct(">Q")
_SEQ_MAX: Final = 2**64 - 1
_T = TypeVar("_T")


# -------------------------------------------------------------- key layout


def new_conversation_id(now_ms: int, rand: bytes) -> str:
    """A UUIDv7 string (RFC 9562) from a Unix time in ms and 10 random bytes.

    Layout: 48-bit ms timestamp, version 7, 12 bits ``rand_a``, variant 0b10,
    62 bits ``rand_b``; the 74 random bits are the low bits of ``rand``.
    """
    if not 0 <= now_ms < 2**48:
        raise ValueError(f"timestamp {now_ms} ms does not fit in 48 bits")
    if len(rand) < 10:
        raise ValueError("need 10 random bytes")
    return _uuid7(now_ms, int.from_bytes(rand[:10], "big") & (2**74 - 1))


def _uuid7(ms: int, counter: int) -> str:
    rand_a = counter >> 62
    rand_b = counter & (2**62 - 1)
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))


class _Uuid7Clock:
    """Monotonic UUIDv7 within this process (RFC 9562 §6.2, method 3).

    Two ids in the same millisecond (or after the clock stepped back) continue
    from the previous one's random bits plus one, so ids sort in creation order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_counter = 0

    def next(self) -> str:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            counter = int.from_bytes(os.urandom(10), "big") & (2**74 - 1)
            if ms <= self._last_ms:
                ms = self._last_ms
                counter = self._last_counter + 1
                if counter >= 2**74:
                    ms, counter = ms + 1, 0
            self._last_ms, self._last_counter = ms, counter
            return _uuid7(ms, counter)


_clock = _Uuid7Clock()


def generate_conversation_id() -> str:
    """A fresh UUIDv7 from the wall clock, monotonic within this process."""
    return _clock.next()


def conversation_key(conversation_id: str) -> bytes:
    """The 16 raw bytes of a conversation id (raises ValueError if not a UUID)."""
    return uuid.UUID(conversation_id).bytes


def message_key(conversation_id: str, seq: int) -> bytes:
    """``uuid (16) | seq (8, big-endian)``: a conversation's messages sort by seq."""
    return conversation_key(conversation_id) + _U64.pack(seq)


def updated_key(updated_ns: int, conversation_id: str) -> bytes:
    """``updated_ns (8, big-endian) | uuid (16)``: newest last, so walk backwards."""
    return _U64.pack(updated_ns) + conversation_key(conversation_id)


def _id_of(raw: bytes) -> str:
    return str(uuid.UUID(bytes=bytes(raw)))


def _handle_key(conversation_id: str) -> bytes:
    """``handle | uuid (16)``: the handle index's key for a conversation."""
    return conversation_handle(conversation_id).encode() + conversation_key(conversation_id)


_HANDLE_TYPOS = str.maketrans({"o": "0", "i": "1", "l": "1"})  # as Crockford's base32 reads them
_HANDLE_PATTERN = re.compile(rf"[0-9a-hjkmnp-tv-z]{{{HANDLE_CHARS}}}")


def _normal_handle(text: str) -> str | None:
    """``text`` as a handle (case and look-alike letters forgiven), or None if it cannot be one."""
    candidate = text.strip().lower().translate(_HANDLE_TYPOS)
    return candidate if _HANDLE_PATTERN.fullmatch(candidate) else None


# ---------------------------------------------------------------- records

# Stored records are private Structs, not the wire types: the wire may grow
# fields freely, and times are kept as integer ns so the by_updated key of a
# conversation can be rebuilt exactly from its record.


class _ConversationRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    title: str = ""
    model: str | None = None
    system_prompt: str | None = None
    created_ns: int = 0
    updated_ns: int = 0
    message_count: int = 0


class _MessageRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Role
    parts: list[Part]
    status: MessageStatus = "complete"
    model: str | None = None
    created_ns: int = 0
    stats: MessageStats | None = None
    error: str = ""
    tool_calls: list[ToolCall] = []


class _SearchView(msgspec.Struct):
    """Just what search needs of a message; other fields are skipped unread."""

    role: Role
    parts: list[Part]


class _Export(msgspec.Struct, frozen=True, kw_only=True):
    conversation: Conversation
    messages: list[Message]


_encoder = msgspec.msgpack.Encoder()
_conv_decoder = msgspec.msgpack.Decoder(_ConversationRecord)
_msg_decoder = msgspec.msgpack.Decoder(_MessageRecord)
_search_decoder = msgspec.msgpack.Decoder(_SearchView)
_int_decoder = msgspec.msgpack.Decoder(int)


def _pack(record: msgspec.Struct) -> bytes:
    return _RECORD_PREFIX + _encoder.encode(record)


def _unpack(raw: bytes, decoder: msgspec.msgpack.Decoder[_T]) -> _T:
    if not raw or raw[0] != RECORD_VERSION:
        version = raw[0] if raw else None
        raise HistoryError(f"chat history record has unknown version {version}")
    return decoder.decode(memoryview(raw)[1:])


def _to_conversation(conversation_id: str, rec: _ConversationRecord) -> Conversation:
    return Conversation(
        id=conversation_id,
        title=rec.title,
        handle=conversation_handle(conversation_id),
        model=rec.model,
        system_prompt=rec.system_prompt,
        created=rec.created_ns / 1e9,
        updated=rec.updated_ns / 1e9,
        message_count=rec.message_count,
    )


def _to_message(conversation_id: str, seq: int, rec: _MessageRecord) -> Message:
    return Message(
        conversation=conversation_id,
        seq=seq,
        role=rec.role,
        parts=rec.parts,
        status=rec.status,
        model=rec.model,
        created=rec.created_ns / 1e9,
        stats=rec.stats,
        error=rec.error,
        tool_calls=rec.tool_calls,
    )


def _new_record(
    role: Role,
    parts: list[Part],
    *,
    images: dict[str, bytes] | None,
    status: MessageStatus,
    model: str | None,
    stats: MessageStats | None,
    error: str,
) -> _MessageRecord:
    """A message record to store: images by reference, each one's bytes at hand."""
    stored_parts = [_without_data(part) for part in parts]
    for part in stored_parts:
        if isinstance(part, ImagePart) and part.digest not in (images or {}):
            raise ValueError(f"no bytes given for image {part.digest}")
    return _MessageRecord(
        role=role, parts=stored_parts, status=status, model=model, stats=stats, error=error
    )


def _without_data(part: Part) -> Part:
    """What a message record keeps of a part: images by reference only."""
    if isinstance(part, ImagePart) and part.data:
        return msgspec.structs.replace(part, data=b"")
    return part


def _text_of(parts: list[Part]) -> str:
    return "".join(part.text for part in parts if isinstance(part, TextPart))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def title_from(text: str) -> str:
    """A conversation title from a user message: single line, about 60 characters."""
    line = _one_line(text)
    if len(line) <= TITLE_CHARS:
        return line
    cut = line[:TITLE_CHARS]
    # Prefer ending on a word boundary when one is reasonably close.
    space = cut.rfind(" ")
    if space >= TITLE_CHARS * 2 // 3:
        cut = cut[:space]
    return cut.rstrip() + "…"


# ------------------------------------------------------------------ search

# The only characters outside ASCII whose str.lower() contains an ASCII letter:
# U+0130 (İ -> i + combining dot) and U+212A (Kelvin sign -> k). A record that
# contains either is decoded even when the byte prefilter says no.
_FOLDS_TO_ASCII: Final = (b"\xc4\xb0", b"\xe2\x84\xaa")


class _Prefilter:
    """A cheap test on raw msgpack bytes that every record with a match passes.

    msgpack stores text as UTF-8, so the longest ASCII run of the lowered
    needle appears in ``raw.lower()`` (which folds ASCII only) for any record
    whose lowered text contains the needle; the exceptions are the characters
    in ``_FOLDS_TO_ASCII``, so a record holding one of those that could matter
    (an ``i`` or ``k`` in the run) always passes. False positives are fine:
    the decoded text is checked properly afterwards.
    """

    def __init__(self, needle: str) -> None:
        runs: list[str] = re.findall(r"[\x00-\x7f]+", needle)
        run = max(runs, key=len) if runs else ""
        self.usable = bool(run)
        self.run = run.encode("ascii")
        self.specials = tuple(
            special for special, letter in zip(_FOLDS_TO_ASCII, "ik", strict=True) if letter in run
        )

    def may_match(self, raw: bytes) -> bool:
        if self.run in raw.lower():
            return True
        return any(special in raw for special in self.specials)


def _find_folded(text: str, needle: str) -> tuple[int, int] | None:
    """``(start, end)`` in ``text`` of the first case-insensitive match of ``needle``.

    ``needle`` is already lowered. ``str.lower`` can lengthen a few characters
    (İ), so when it did, positions are mapped back character by character.
    """
    lowered = text.lower()
    if len(lowered) == len(text):
        start = lowered.find(needle)
        return None if start < 0 else (start, start + len(needle))
    origin: list[int] = []
    for index, char in enumerate(text):
        origin.extend([index] * len(char.lower()))
    start = lowered.find(needle)
    if start < 0:
        return None
    return origin[start], origin[start + len(needle) - 1] + 1


def _snippet(text: str, start: int, end: int) -> str:
    left = max(0, start - SNIPPET_CONTEXT)
    right = min(len(text), end + SNIPPET_CONTEXT)
    snippet = _one_line(text[left:right])
    return ("…" if left > 0 else "") + snippet + ("…" if right < len(text) else "")


# --------------------------------------------------------------- the store


class _ResizeGate:
    """Shared for every transaction, exclusive for ``set_mapsize``.

    LMDB allows changing the map size only while this process has no
    transaction open, and the daemon runs reads and writes on several threads.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _now_ns() -> int:
    return time.time_ns()


if TYPE_CHECKING:
    # Only the stubs make Transaction generic; at run time it is not subscriptable.
    _Txn = lmdb.Transaction[bytes]


class HistoryStore:
    """Conversations and messages in an LMDB environment at ``path`` (a directory).

    Thread-safe: each method runs its own transaction, so the daemon may call
    any of them from worker threads concurrently.
    """

    def __init__(self, path: Path, map_size: int = 64 * 2**20) -> None:
        self.path = Path(path)
        self._gate = _ResizeGate()
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._env = lmdb.open(
                str(self.path),
                subdir=True,
                max_dbs=8,
                map_size=map_size,
                mode=0o700,  # the directory; LMDB drops the x bits for its files
            )
        except (lmdb.Error, OSError) as exc:
            raise HistoryOpenError(f"cannot open chat history at {self.path}: {exc}") from exc
        try:
            # Frees reader slots left by processes that died mid-read.
            self._env.reader_check()
            with self._env.begin(write=True) as txn:
                self._conversations = self._env.open_db(b"conversations", txn=txn)
                self._messages = self._env.open_db(b"messages", txn=txn)
                self._by_updated = self._env.open_db(b"by_updated", txn=txn)
                self._meta = self._env.open_db(b"meta", txn=txn)
                self._images = self._env.open_db(b"images", txn=txn)
                self._handles = self._env.open_db(b"handles", txn=txn)
                self._check_schema(txn)
                self._index_handles(txn)
        except HistoryError:
            self._env.close()
            raise
        except (lmdb.Error, OSError) as exc:
            self._env.close()
            raise HistoryOpenError(f"cannot open chat history at {self.path}: {exc}") from exc

    def _check_schema(self, txn: _Txn) -> None:
        raw = txn.get(b"schema_version", db=self._meta)
        if raw is None:
            txn.put(b"schema_version", _encoder.encode(SCHEMA_VERSION), db=self._meta)
            return
        version = _int_decoder.decode(raw)
        if version > SCHEMA_VERSION:
            raise HistoryOpenError(
                f"chat history at {self.path} has schema version {version}, but this "
                f"llamad understands only up to {SCHEMA_VERSION}; upgrade llamad"
            )

    def _index_handles(self, txn: _Txn) -> None:
        """Rebuild the handle index if it does not cover every conversation."""
        conversations = txn.stat(self._conversations)["entries"]
        if txn.stat(self._handles)["entries"] == conversations:
            return
        txn.drop(self._handles, delete=False)
        cursor = txn.cursor(db=self._conversations)
        for key in cursor.iternext(keys=True, values=False):
            txn.put(_handle_key(_id_of(key)), b"", db=self._handles)

    def _with_handle(self, txn: _Txn, handle: str) -> list[bytes]:
        """The raw ids of the conversations whose handle is ``handle``."""
        prefix = handle.encode()
        found: list[bytes] = []
        cursor = txn.cursor(db=self._handles)
        if cursor.set_range(prefix):
            for key in cursor.iternext(keys=True, values=False):
                if key[: len(prefix)] != prefix:
                    break
                found.append(bytes(key[len(prefix) :]))
        return found

    # ------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close the environment; waits for transactions in other threads."""
        with self._gate.exclusive():
            self._env.close()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def map_size(self) -> int:
        """The current size of the memory map in bytes (grows on demand)."""
        with self._gate.shared():
            return self._env.info()["map_size"]

    def _grow(self, seen: int) -> None:
        with self._gate.exclusive():
            current = self._env.info()["map_size"]
            if current == seen:  # another thread may have grown it meanwhile
                self._env.set_mapsize(current * 2)

    def _adopt_resize(self) -> None:
        # Another process grew the map: adopt its size (0 means "as on disk").
        with self._gate.exclusive():
            self._env.set_mapsize(0)

    def _write(self, change: Callable[[_Txn], _T]) -> _T:
        """Run ``change`` in one write transaction and commit it.

        A full map is grown (doubled) and the change retried from scratch; any
        other LMDB or OS failure aborts the transaction, so nothing is changed,
        and raises ``HistoryWriteError``.
        """
        while True:
            size = 0
            try:
                with self._gate.shared():
                    # Read inside the gate: env info is not safe during a resize.
                    size = self._env.info()["map_size"]
                    txn = self._env.begin(write=True)
                    try:
                        result = change(txn)
                        txn.commit()
                    except BaseException:
                        txn.abort()
                        raise
                    return result
            except lmdb.MapFullError:
                try:
                    self._grow(size)
                except (lmdb.Error, OSError) as exc:
                    raise HistoryWriteError(self.path, _reason(exc)) from exc
            except lmdb.MapResizedError:
                self._adopt_resize()
            except (lmdb.Error, OSError) as exc:
                raise HistoryWriteError(self.path, _reason(exc)) from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[_Txn]:
        while True:
            with self._gate.shared():
                try:
                    txn = self._env.begin()
                except lmdb.MapResizedError:
                    pass
                else:
                    with txn:
                        yield txn
                    return
            self._adopt_resize()

    def _get_record(self, txn: _Txn, conversation_id: str) -> tuple[bytes, _ConversationRecord]:
        try:
            key = conversation_key(conversation_id)
        except ValueError:
            raise ConversationNotFound(conversation_id) from None
        raw = txn.get(key, db=self._conversations)
        if raw is None:
            raise ConversationNotFound(conversation_id)
        return key, _unpack(raw, _conv_decoder)

    def _touch(self, txn: _Txn, key: bytes, rec: _ConversationRecord, now_ns: int) -> None:
        """Set ``rec.updated_ns`` and move the conversation's by_updated entry."""
        txn.delete(_U64.pack(rec.updated_ns) + key, db=self._by_updated)
        # Never move backwards (clock steps) so the index order stays consistent.
        rec.updated_ns = max(now_ns, rec.updated_ns + 1)
        txn.put(_U64.pack(rec.updated_ns) + key, b"", db=self._by_updated)
        txn.put(key, _pack(rec), db=self._conversations)

    # --------------------------------------------------------------- writes

    def create_conversation(
        self, *, model: str | None, system_prompt: str | None, title: str = ""
    ) -> Conversation:
        """Start an empty conversation; its title comes from the first user message."""
        return self._write(
            lambda txn: self._create(txn, model=model, system_prompt=system_prompt, title=title)
        )

    def _create(
        self, txn: _Txn, *, model: str | None, system_prompt: str | None, title: str
    ) -> Conversation:
        conversation_id = generate_conversation_id()
        while self._with_handle(txn, conversation_handle(conversation_id)):
            conversation_id = generate_conversation_id()  # the next id has another tail
        key = conversation_key(conversation_id)
        now = _now_ns()
        rec = _ConversationRecord(
            title=_one_line(title),
            model=model,
            system_prompt=system_prompt,
            created_ns=now,
            updated_ns=now,
        )
        txn.put(key, _pack(rec), db=self._conversations)
        txn.put(_U64.pack(now) + key, b"", db=self._by_updated)
        txn.put(_handle_key(conversation_id), b"", db=self._handles)
        return _to_conversation(conversation_id, rec)

    def append_message(
        self,
        conversation_id: str,
        *,
        role: Role,
        parts: list[Part],
        status: MessageStatus = "complete",
        model: str | None = None,
        stats: MessageStats | None = None,
        error: str = "",
        images: dict[str, bytes] | None = None,
    ) -> Message:
        """Store the next message (seq = message_count + 1); durable on return.

        ``images`` maps each ``ImagePart.digest`` in ``parts`` to its bytes;
        they are committed in the same transaction as the message.
        """
        record = _new_record(
            role, parts, images=images, status=status, model=model, stats=stats, error=error
        )
        return self._write(lambda txn: self._append(txn, conversation_id, record, images or {}))

    def start_exchange(
        self,
        conversation_id: str | None,
        *,
        parts: list[Part],
        images: dict[str, bytes] | None = None,
        model: str | None = None,
        system_prompt: str | None = None,
        replace_from: int | None = None,
    ) -> tuple[Conversation, Message | None, Message]:
        """A user message and its empty reply (``incomplete``) in one transaction.

        With ``conversation_id`` None a new conversation is created in the same
        transaction. One commit (one fsync) before a chat is acknowledged, and
        a failure leaves nothing behind: no empty conversation, no unanswered
        message. ``model`` becomes the conversation's model.

        ``replace_from`` first deletes the messages from that seq on (an edit of
        the last turn, or a retry of the last reply); with empty ``parts`` no
        user message is added (a retry), and the user message returned is None.
        """
        images = images or {}
        user_record = _new_record(
            "user", parts, images=images, status="complete", model=None, stats=None, error=""
        )
        reply_record = _new_record(
            "assistant", [], images={}, status="incomplete", model=model, stats=None, error=""
        )

        def change(txn: _Txn) -> tuple[Conversation, Message | None, Message]:
            target = conversation_id
            if target is None:
                created = self._create(txn, model=model, system_prompt=system_prompt, title="")
                target = created.id
            else:
                key, conv = self._get_record(txn, target)
                if replace_from is not None:
                    self._truncate(txn, key, conv, replace_from)
                if model is not None and conv.model != model:
                    conv.model = model
                    txn.put(key, _pack(conv), db=self._conversations)
            user = self._append(txn, target, user_record, images) if parts else None
            reply = self._append(txn, target, reply_record, {})
            _, conv = self._get_record(txn, target)
            return _to_conversation(target, conv), user, reply

        return self._write(change)

    def _append(
        self, txn: _Txn, conversation_id: str, template: _MessageRecord, images: dict[str, bytes]
    ) -> Message:
        key, conv = self._get_record(txn, conversation_id)
        now = _now_ns()
        seq = conv.message_count + 1
        for part in template.parts:
            if isinstance(part, ImagePart):
                self._reference_image(txn, part.digest, images[part.digest])
        rec = msgspec.structs.replace(template, created_ns=now)
        txn.put(key + _U64.pack(seq), _pack(rec), db=self._messages)
        conv.message_count = seq
        if not conv.title and rec.role == "user":
            conv.title = title_from(_text_of(rec.parts))
        self._touch(txn, key, conv, now)
        return _to_message(conversation_id, seq, rec)

    def _truncate(self, txn: _Txn, key: bytes, conv: _ConversationRecord, first: int) -> None:
        """Delete the messages from seq ``first`` on (their images released)."""
        for seq in range(max(first, 1), conv.message_count + 1):
            message_key_bytes = key + _U64.pack(seq)
            raw = txn.get(message_key_bytes, db=self._messages)
            if raw is None:
                continue
            for part in _unpack(raw, _msg_decoder).parts:
                if isinstance(part, ImagePart):
                    self._release_image(txn, part.digest)
            txn.delete(message_key_bytes, db=self._messages)
        conv.message_count = min(conv.message_count, max(first - 1, 0))
        txn.put(key, _pack(conv), db=self._conversations)

    def update_message(
        self,
        conversation_id: str,
        seq: int,
        *,
        parts: list[Part] | None = None,
        status: MessageStatus | None = None,
        stats: MessageStats | None = None,
        model: str | None = None,
        error: str | None = None,
        tool_calls: list[ToolCall] | None = None,
    ) -> Message:
        """Rewrite the given fields of a stored message (streaming flushes, finishing).

        Replies are text and tool calls; ``parts`` here must not add images.
        """

        def change(txn: _Txn) -> Message:
            key, conv = self._get_record(txn, conversation_id)
            mkey = key + _U64.pack(seq) if 0 <= seq <= _SEQ_MAX else b""
            raw = txn.get(mkey, db=self._messages) if mkey else None
            if raw is None:
                raise MessageNotFound(conversation_id, seq)
            rec = _unpack(raw, _msg_decoder)
            if parts is not None:
                rec.parts = list(parts)
            if status is not None:
                rec.status = status
            if stats is not None:
                rec.stats = stats
            if model is not None:
                rec.model = model
            if error is not None:
                rec.error = error
            if tool_calls is not None:
                rec.tool_calls = list(tool_calls)
            txn.put(mkey, _pack(rec), db=self._messages)
            if not conv.title and rec.role == "user":
                conv.title = title_from(_text_of(rec.parts))
            self._touch(txn, key, conv, _now_ns())
            return _to_message(conversation_id, seq, rec)

        return self._write(change)

    def rename(self, conversation_id: str, title: str) -> Conversation:
        """Set the title (made single-line). Does not change ``updated``."""

        def change(txn: _Txn) -> Conversation:
            key, conv = self._get_record(txn, conversation_id)
            conv.title = _one_line(title)
            txn.put(key, _pack(conv), db=self._conversations)
            return _to_conversation(conversation_id, conv)

        return self._write(change)

    def delete(self, conversation_id: str) -> None:
        """Remove a conversation, its messages and its index entry, in one transaction."""

        def change(txn: _Txn) -> None:
            key, conv = self._get_record(txn, conversation_id)
            txn.delete(key, db=self._conversations)
            txn.delete(_U64.pack(conv.updated_ns) + key, db=self._by_updated)
            txn.delete(_handle_key(conversation_id), db=self._handles)
            cursor = txn.cursor(db=self._messages)
            if cursor.set_range(key):
                while cursor.key()[:16] == key:
                    for part in _unpack(cursor.value(), _msg_decoder).parts:
                        if isinstance(part, ImagePart):
                            self._release_image(txn, part.digest)
                    if not cursor.delete():  # delete() moves to the next record
                        break

        self._write(change)

    def _reference_image(self, txn: _Txn, digest: str, data: bytes) -> None:
        key = bytes.fromhex(digest)
        raw = txn.get(key, db=self._images)
        count = _U64.unpack_from(raw, 1)[0] if raw is not None else 0
        value = memoryview(raw)[9:] if raw is not None else data
        txn.put(key, _RECORD_PREFIX + _U64.pack(count + 1) + bytes(value), db=self._images)

    def _release_image(self, txn: _Txn, digest: str) -> None:
        key = bytes.fromhex(digest)
        raw = txn.get(key, db=self._images)
        if raw is None:
            return
        (count,) = _U64.unpack_from(raw, 1)
        if count <= 1:
            txn.delete(key, db=self._images)
        else:
            txn.put(key, _RECORD_PREFIX + _U64.pack(count - 1) + raw[9:], db=self._images)

    def get_image(self, digest: str) -> bytes:
        """The bytes of a stored image; ``KeyError`` when no message uses it any more."""
        try:
            key = bytes.fromhex(digest)
        except ValueError:
            raise KeyError(digest) from None
        with self._read() as txn:
            raw = txn.get(key, db=self._images)
            if raw is None:
                raise KeyError(digest)
            return bytes(raw[9:])

    def image_count(self) -> int:
        with self._read() as txn:
            return int(txn.stat(self._images)["entries"])

    # ---------------------------------------------------------------- reads

    def get_conversation(self, conversation_id: str) -> Conversation:
        """The conversation with this full id; raises ``ConversationNotFound``."""
        with self._read() as txn:
            _, rec = self._get_record(txn, conversation_id)
        return _to_conversation(conversation_id, rec)

    def resolve(self, prefix: str) -> str:
        """The full id of the conversation with this handle, or whose id starts with ``prefix``.

        Case-insensitive; dashes are optional. A handle wins over an id prefix
        (six characters of a time-ordered id name hours of conversations).
        Raises ``ConversationNotFound`` or ``AmbiguousConversation``.
        """
        handle = _normal_handle(prefix)
        if handle is not None:
            with self._read() as txn:
                named = self._with_handle(txn, handle)
            if len(named) == 1:
                return _id_of(named[0])
            if len(named) > 1:  # only in a store written by hand or by another program
                raise AmbiguousConversation(prefix, len(named))
        digits = prefix.strip().lower().replace("-", "")
        if not digits or len(digits) > 32 or not re.fullmatch(r"[0-9a-f]+", digits):
            raise ConversationNotFound(prefix)
        low = bytes.fromhex(digits.ljust(32, "0"))
        high = bytes.fromhex(digits.ljust(32, "f"))
        found: list[bytes] = []
        with self._read() as txn:
            cursor = txn.cursor(db=self._conversations)
            if cursor.set_range(low):
                for key in cursor.iternext(keys=True, values=False):
                    if key > high:
                        break
                    found.append(key)
        if not found:
            raise ConversationNotFound(prefix)
        if len(found) > 1:
            raise AmbiguousConversation(prefix, len(found))
        return _id_of(found[0])

    def list_conversations(
        self, limit: int = 50, before: str | None = None
    ) -> tuple[list[Conversation], str | None]:
        """Up to ``limit`` conversations, most recently updated first.

        The second element is the cursor for the next page (pass it as
        ``before``), or None when there is nothing older.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        start: bytes | None = None
        if before is not None:
            try:
                start = bytes.fromhex(before)
            except ValueError:
                start = None
            if start is None or len(start) != 24:
                raise HistoryError(f"invalid page cursor {before!r}")
        page: list[Conversation] = []
        more = False
        last_key = b""
        with self._read() as txn:
            cursor = txn.cursor(db=self._by_updated)
            positioned = cursor.set_range(start) if start is not None else False
            # set_range lands on the first key >= start; the page is what lies below it.
            positioned = cursor.prev() if positioned else cursor.last()
            if not positioned:
                return [], None
            for key in cursor.iterprev(keys=True, values=False):
                if len(page) == limit:
                    more = True
                    break
                conv_key = key[8:]
                raw = txn.get(conv_key, db=self._conversations)
                if raw is None:  # cannot happen: both change in one transaction
                    continue
                page.append(_to_conversation(_id_of(conv_key), _unpack(raw, _conv_decoder)))
                last_key = key
        return page, (last_key.hex() if more else None)

    def get_messages(
        self, conversation_id: str, limit: int = 100, before_seq: int | None = None
    ) -> tuple[list[Message], bool]:
        """The last ``limit`` messages (those before ``before_seq`` if given), oldest first.

        The bool says whether older messages exist. Reads only the page, with
        a reverse cursor starting at ``conv|before_seq``.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        upper_seq = _SEQ_MAX if before_seq is None else max(0, min(before_seq, _SEQ_MAX))
        newest_first: list[Message] = []
        more = False
        with self._read() as txn:
            key, _ = self._get_record(txn, conversation_id)
            cursor = txn.cursor(db=self._messages)
            positioned = cursor.set_range(key + _U64.pack(upper_seq))
            positioned = cursor.prev() if positioned else cursor.last()
            if positioned:
                for mkey, raw in cursor.iterprev():
                    if mkey[:16] != key:
                        break
                    if len(newest_first) == limit:
                        more = True
                        break
                    (seq,) = _U64.unpack_from(mkey, 16)
                    newest_first.append(
                        _to_message(conversation_id, seq, _unpack(raw, _msg_decoder))
                    )
        newest_first.reverse()
        return newest_first, more

    def all_messages(self, conversation_id: str) -> list[Message]:
        """Every message of the conversation in order."""
        with self._read() as txn:
            key, _ = self._get_record(txn, conversation_id)
            return self._messages_in(txn, key, conversation_id)

    def _messages_in(self, txn: _Txn, key: bytes, conversation_id: str) -> list[Message]:
        messages: list[Message] = []
        cursor = txn.cursor(db=self._messages)
        if cursor.set_range(key):
            for mkey, raw in cursor:
                if mkey[:16] != key:
                    break
                (seq,) = _U64.unpack_from(mkey, 16)
                messages.append(_to_message(conversation_id, seq, _unpack(raw, _msg_decoder)))
        return messages

    def search(self, text: str, limit: int = 50) -> list[SearchHit]:
        """Messages containing ``text``, case-insensitively; newest conversations first.

        At most one hit per message, and a match lies within one part. The
        snippet is the match with about 40 characters either side, on one line.
        """
        needle = text.lower()
        if not needle or limit < 1:
            return []
        prefilter = _Prefilter(needle)
        hits: list[SearchHit] = []
        with self._read() as txn:
            conversations = txn.cursor(db=self._by_updated)
            messages = txn.cursor(db=self._messages)
            if not conversations.last():
                return []
            for index_key in conversations.iterprev(keys=True, values=False):
                key = index_key[8:]
                end = key + b"\xff" * 8
                if not messages.set_range(key):
                    continue
                keys: list[bytes] = []
                raws: list[bytes] = []
                for mkey, raw in messages:
                    if mkey > end:
                        break
                    keys.append(mkey)
                    raws.append(raw)
                # One prefilter over the whole conversation first: most of them
                # are ruled out with a single lower() and substring search.
                if prefilter.usable and not prefilter.may_match(b"\x00".join(raws)):
                    continue
                title: str | None = None
                for mkey, raw in zip(keys, raws, strict=True):
                    if prefilter.usable and not prefilter.may_match(raw):
                        continue
                    view = _unpack(raw, _search_decoder)
                    for part in view.parts:
                        if not isinstance(part, TextPart):
                            continue
                        span = _find_folded(part.text, needle)
                        if span is None:
                            continue
                        if title is None:
                            conv = _unpack(
                                txn.get(key, db=self._conversations) or b"", _conv_decoder
                            )
                            title = conv.title
                        (seq,) = _U64.unpack_from(mkey, 16)
                        hits.append(
                            SearchHit(
                                conversation=_id_of(key),
                                title=title,
                                seq=seq,
                                role=view.role,
                                snippet=_snippet(part.text, *span),
                            )
                        )
                        if len(hits) >= limit:
                            return hits
                        break
        return hits

    # --------------------------------------------------------------- export

    def export_json(self, conversation_id: str) -> str:
        """``{"conversation": {...}, "messages": [...]}`` as JSON text."""
        conversation, messages = self._snapshot(conversation_id)
        return msgspec.json.encode(_Export(conversation=conversation, messages=messages)).decode()

    def export_markdown(self, conversation_id: str) -> str:
        """A readable Markdown transcript: title, details, then each message."""
        conversation, messages = self._snapshot(conversation_id)
        lines = [f"# {conversation.title or 'Untitled conversation'}", ""]
        lines.append(f"- Conversation: `{conversation.id}`")
        if conversation.model:
            lines.append(f"- Model: {conversation.model}")
        lines.append(f"- Started: {_when(conversation.created)}")
        lines.append(f"- Messages: {conversation.message_count}")
        lines.append("")
        if conversation.system_prompt:
            lines += ["## System prompt", "", conversation.system_prompt.strip(), ""]
        for message in messages:
            heading = f"## {message.role.capitalize()}"
            if message.model:
                heading += f" ({message.model})"
            heading += f" · {_when(message.created)}"
            lines += [heading, ""]
            lines += [f"- `{call.summary()}`" for call in message.tool_calls]
            lines += [image.label() for image in message.images]
            if message.tool_calls or message.images:
                lines.append("")
            lines += [message.text.strip() or "_(no text)_", ""]
            if message.status == "incomplete":
                lines += ["_(incomplete: the reply was cut off)_", ""]
            elif message.status == "cancelled":
                lines += ["_(cancelled)_", ""]
            elif message.status == "error":
                lines += [f"_(error: {message.error or 'unknown'})_", ""]
        return "\n".join(lines).rstrip("\n") + "\n"

    def _snapshot(self, conversation_id: str) -> tuple[Conversation, list[Message]]:
        """The conversation and all its messages, from one read transaction."""
        with self._read() as txn:
            key, rec = self._get_record(txn, conversation_id)
            messages = self._messages_in(txn, key, conversation_id)
        return _to_conversation(conversation_id, rec), messages


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


__all__ = [
    "SCHEMA_VERSION",
    "HistoryStore",
    "conversation_key",
    "generate_conversation_id",
    "message_key",
    "new_conversation_id",
    "title_from",
    "updated_key",
]
