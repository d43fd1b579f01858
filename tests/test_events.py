"""The event hub's pure part: merging a burst of deltas into one."""

from __future__ import annotations

import trio

from llamad.events import ChatEvent, EventHub, LogEvent, coalesce
from llamad.protocol import ChatDelta, ChatDone, Message


def delta(text: str, seq: int = 2, conversation: str = "c") -> ChatEvent:
    return ChatEvent(conversation, ChatDelta(id=0, conversation=conversation, seq=seq, text=text))


def test_runs_of_deltas_of_one_reply_merge_and_order_is_kept() -> None:
    done = ChatEvent(
        "c", ChatDone(id=0, message=Message(conversation="c", seq=2, role="assistant", parts=[]))
    )
    log = LogEvent("demo", "line")
    merged = coalesce(
        [delta("He"), delta("llo"), log, delta(" wor"), delta("ld"), delta("x", seq=4), done]
    )
    assert merged == [delta("Hello"), log, delta(" world"), delta("x", seq=4), done]
    assert coalesce([delta("a", conversation="c"), delta("b", conversation="d")]) == [
        delta("a", conversation="c"),
        delta("b", conversation="d"),
    ]


async def test_a_busy_reader_gets_the_burst_as_one_batch() -> None:
    hub = EventHub(queue_size=8)
    with hub.subscribe(frozenset({"chat"})) as subscription:
        for piece in "abcdef":
            hub.publish(delta(piece))
        batches = subscription.batches()
        assert await batches.__anext__() == [delta("abcdef")]
        assert not subscription.overflowed
        for piece in "0123456789":  # more than the queue holds before the reader runs
            hub.publish(delta(piece))
        assert subscription.overflowed  # a reader that never runs is cut off
        with trio.move_on_after(1):
            rest = [event async for batch in batches for event in batch]
        assert rest == [delta("01234567")]
