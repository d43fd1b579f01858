"""Chat history at scale: ``llamad.history.HistoryStore`` used directly, in a temp dir.

- Append one message (durable: LMDB's fsync on commit), p50 and p99, against a
  bare LMDB put + commit of the same bytes (the floor of a durable write).
- The event loop while appending: a trio task that wakes every 1 ms records how
  late it wakes while another task appends through ``llamad.concurrency.in_thread``
  (the path the daemon uses); baseline: the same ticker with nothing else to do.
- A store of 10,000 conversations and 100,000 messages (one conversation of
  10,000): open its last 100 messages, list the first page of conversations,
  search every message for a string that is not there (the whole scan). Each
  against a bare LMDB cursor over the same records, without decoding.

The store has no batch write, and 100,000 fsynced appends would take minutes,
so the big store is written in one unsynced LMDB transaction with the store's
own key layout and record types, then opened with ``HistoryStore``.

    .venv/bin/python -m bench --only history
"""

from __future__ import annotations

import functools
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import trio

from bench.common import Figure, Goal, percentile
from llamad.concurrency import in_thread
from llamad.history import (
    HistoryStore,
    _ConversationRecord,
    _MessageRecord,
    _pack,
    conversation_key,
    generate_conversation_id,
    message_key,
    title_from,
    updated_key,
)
from llamad.protocol import Part, Role, TextPart

VOCABULARY = (
    "the model reply token context stream socket daemon server history message "
    "conversation search python trio lmdb cursor write commit disk memory thread "
    "event loop latency budget figure median spread round baseline ratio goal "
    "apple river mountain window garden letter yellow quiet simple random"
)
WORDS = VOCABULARY.split(" ")


def _texts(count: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(20, 80))) for _ in range(count)]


def _timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1000


# ------------------------------------------------------------------ appends


def appends(work: Path, count: int, rounds: int) -> list[Figure]:
    rng = random.Random(1)
    texts = _texts(200, rng)
    store = HistoryStore(work / "append")
    bare_env = lmdb.open(str(work / "bare"), map_size=256 * 2**20)  # sync on, as the store
    conversation = store.create_conversation(model=None, system_prompt=None)
    store_ms: list[float] = []
    bare_ms: list[float] = []
    idle_stall: list[float] = []
    busy_stall: list[float] = []
    try:
        for n in range(count):
            parts: list[Part] = [TextPart(text=texts[n % len(texts)])]
            role: Role = "user" if n % 2 == 0 else "assistant"
            store_ms.append(
                _timed(
                    functools.partial(store.append_message, conversation.id, role=role, parts=parts)
                )
            )
            payload = _pack(_MessageRecord(role=role, parts=parts))

            def bare(n: int = n, payload: bytes = payload) -> None:
                with bare_env.begin(write=True) as txn:
                    txn.put(n.to_bytes(8, "big"), payload)

            bare_ms.append(_timed(bare))

        per_round = max(1, count // rounds)

        async def measure() -> None:
            for _ in range(rounds):
                worst, took = await _stall_while(store, conversation.id, texts, per_round)
                busy_stall.append(worst)
                idle_stall.append((await _stall_while(None, conversation.id, texts, 0, took))[0])

        trio.run(measure)
    finally:
        store.close()
        bare_env.close()
    size = max(1, count // rounds)
    chunks = [store_ms[i : i + size] for i in range(0, count, size)]
    bare_chunks = [bare_ms[i : i + size] for i in range(0, count, size)]
    return [
        Figure(
            "history append p50",
            "ms",
            [percentile(c, 50) for c in chunks],
            baseline=[percentile(c, 50) for c in bare_chunks],
            baseline_name="bare LMDB put+commit",
            note=f"{count} appends interleaved with bare commits, p50 per {size}; fsync on commit",
        ),
        Figure(
            "history append p99",
            "ms",
            [percentile(c, 99) for c in chunks],
            baseline=[percentile(c, 99) for c in bare_chunks],
            baseline_name="bare LMDB put+commit",
            goal=Goal("value", "<=", 5.0),
            note=f"p99 per {size} appends; overall p99 {percentile(store_ms, 99):.2f} ms, "
            f"max {max(store_ms):.2f} ms",
        ),
        Figure(
            "event-loop max stall while appending",
            "ms",
            busy_stall,
            baseline=idle_stall,
            baseline_name="same ticker, idle",
            note=f"1 ms ticker, {rounds} rounds x {per_round} appends via in_thread; "
            "per-round max lateness",
        ),
    ]


async def _stall_while(
    store: HistoryStore | None,
    conversation: str,
    texts: list[str],
    count: int,
    idle_seconds: float = 0.0,
) -> tuple[float, float]:
    """Max lateness (ms) of a 1 ms ticker while ``count`` appends run, and how long they took.

    With no store, the ticker runs alone for ``idle_seconds``.
    """
    worst = 0.0
    took = 0.0
    done = trio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            due = time.perf_counter() + 0.001
            await trio.sleep(0.001)
            worst = max(worst, time.perf_counter() - due)

    async def work() -> None:
        nonlocal took
        if store is None:
            await trio.sleep(idle_seconds)
        else:
            began = time.perf_counter()
            for n in range(count):
                await in_thread(
                    store.append_message,
                    conversation,
                    role="user",
                    parts=[TextPart(text=texts[n % len(texts)])],
                )
            took = time.perf_counter() - began
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        nursery.start_soon(work)
    return worst * 1000, took


# ------------------------------------------------------------- big store


def build(path: Path, conversations: int, messages: int, big: int) -> tuple[str, int]:
    """Write the store in one unsynced transaction; returns (big conversation id, messages)."""
    HistoryStore(path).close()  # the named databases and the schema version
    rng = random.Random(2)
    texts = _texts(2000, rng)
    env = lmdb.open(str(path), subdir=True, max_dbs=8, map_size=4 * 2**30, sync=False)
    dbs = {name: env.open_db(name) for name in (b"conversations", b"messages", b"by_updated")}
    rest = messages - big
    per_conv, extra = divmod(rest, conversations - 1)
    now = time.time_ns() - 10**12
    big_id = ""
    total = 0
    with env.begin(write=True) as txn:
        for c in range(conversations):
            conversation_id = generate_conversation_id()
            count = big if c == 0 else per_conv + (1 if c <= extra else 0)
            if c == 0:
                big_id = conversation_id
            for seq in range(1, count + 1):
                now += 1000
                text = f"{texts[(c * 7 + seq) % len(texts)]} (#{total})"
                record = _MessageRecord(
                    role="user" if seq % 2 else "assistant",
                    parts=[TextPart(text=text)],
                    created_ns=now,
                )
                txn.put(message_key(conversation_id, seq), _pack(record), db=dbs[b"messages"])
                total += 1
            now += 1000
            conv = _ConversationRecord(
                title=title_from(texts[c % len(texts)]),
                created_ns=now,
                updated_ns=now,
                message_count=count,
            )
            key = conversation_key(conversation_id)
            txn.put(key, _pack(conv), db=dbs[b"conversations"])
            txn.put(updated_key(now, conversation_id), b"", db=dbs[b"by_updated"])
    env.sync(True)
    env.close()
    return big_id, total


def scale(
    work: Path, rounds: int, conversations: int = 10_000, messages: int = 100_000, big: int = 10_000
) -> list[Figure]:
    began = time.perf_counter()
    big_id, total = build(work / "big", conversations, messages, big)
    built = time.perf_counter() - began
    store = HistoryStore(work / "big")
    env = store._env  # the bare-cursor baselines read the very same environment
    messages_db, index_db = store._messages, store._by_updated
    conversations_db = store._conversations
    key = conversation_key(big_id)
    absent = "zebra-quokka-absent"
    samples: dict[str, list[float]] = {k: [] for k in ("open", "list", "search")}
    bare: dict[str, list[float]] = {k: [] for k in ("open", "list", "search")}

    def bare_open() -> None:
        with env.begin() as txn:
            cursor = txn.cursor(db=messages_db)
            cursor.set_range(key + b"\xff" * 8)
            cursor.prev()
            got = [v for _, (_, v) in zip(range(100), cursor.iterprev(), strict=False)]
            assert len(got) == 100

    def bare_list() -> None:
        with env.begin() as txn:
            cursor = txn.cursor(db=index_db)
            cursor.last()
            for _, k in zip(range(50), cursor.iterprev(values=False), strict=False):
                txn.get(k[8:], db=conversations_db)

    def bare_search() -> None:
        needle = absent.encode()
        with env.begin() as txn:
            for _, value in txn.cursor(db=messages_db):
                if needle in value.lower():
                    break

    def open_last() -> None:
        store.get_conversation(big_id)
        page, more = store.get_messages(big_id, 100)
        assert len(page) == 100 and more

    def list_first() -> None:
        page, cursor = store.list_conversations(50)
        assert len(page) == 50 and cursor

    def search() -> None:
        assert store.search(absent, 50) == []

    try:
        for _ in range(rounds):
            for name, real, floor in (
                ("open", open_last, bare_open),
                ("list", list_first, bare_list),
                ("search", search, bare_search),
            ):
                samples[name].append(_timed(real))
                bare[name].append(_timed(floor))
    finally:
        store.close()
    base = "bare LMDB cursor, no decoding"
    return [
        Figure(
            f"history open last 100 of {big:,} messages",
            "ms",
            samples["open"],
            baseline=bare["open"],
            baseline_name=base,
            goal=Goal("value", "<=", 20.0),
            note="get_conversation + get_messages(limit=100)",
        ),
        Figure(
            f"history list first page of {conversations:,} conversations",
            "ms",
            samples["list"],
            baseline=bare["list"],
            baseline_name=base,
            goal=Goal("value", "<=", 20.0),
            note="list_conversations(limit=50)",
        ),
        Figure(
            f"history search {total:,} messages",
            "ms",
            samples["search"],
            baseline=bare["search"],
            baseline_name="bare cursor + bytes.lower() scan",
            goal=Goal("value", "<=", 300.0),
            note=f"absent string (whole scan); store built in {built:.1f} s (one txn)",
        ),
    ]


def run(quick: bool = False) -> list[Figure]:
    work = Path(tempfile.mkdtemp(prefix="llamad-bench-history-", dir="/tmp"))
    try:
        figures = appends(work, count=300 if quick else 1000, rounds=3 if quick else 5)
        figures += scale(work, rounds=5 if quick else 15)
        return figures
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    for figure in run():
        print(figure.name, figure.median, figure.spread(), figure.ratio, figure.met)
