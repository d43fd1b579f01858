"""The event hub's pure part: merging a burst of deltas into one."""

from __future__ import annotations

import trio

from llamad.events import (
    ChatEvent,
    EventHub,
    HubEvent,
    LogEvent,
    StateEvent,
    Subscription,
    coalesce,
)
from llamad.protocol import ChatDelta, ChatDone, Message, ModelStatus


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


def _drain(subscription: Subscription) -> list[HubEvent]:
    got: list[HubEvent] = []
    while True:
        try:
            got.append(subscription.receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return got


async def test_each_subscriber_gets_its_topics_and_key_only() -> None:
    hub = EventHub(queue_size=4)
    state = StateEvent(ModelStatus(name="demo", state="ready", since=0.0))
    log = LogEvent("demo", "line")
    with (
        hub.subscribe(frozenset({"chat"}), key="c") as only_c,
        hub.subscribe(frozenset({"chat", "log"})) as chats_and_logs,
        hub.subscribe(frozenset({"state"}), key="other") as other_model,
    ):
        with hub.subscribe(frozenset({"chat"})) as gone:
            pass
        for event in (delta("a"), delta("b", conversation="d"), log, state):
            hub.publish(event)
        assert _drain(only_c) == [delta("a")]
        assert _drain(chats_and_logs) == [delta("a"), delta("b", conversation="d"), log]
        assert _drain(other_model) == []
        assert _drain(gone) == []
        # One that falls behind is cut off; the others keep getting events.
        for piece in "0123456789":
            hub.publish(delta(piece))
        assert only_c.overflowed and chats_and_logs.overflowed
        with hub.subscribe(frozenset({"chat"}), key="c") as fresh:
            hub.publish(delta("z"))
            assert _drain(fresh) == [delta("z")]
        assert len(_drain(only_c)) == 4  # what fit before the cut, nothing after


def test_a_batch_of_one_is_passed_as_it_is() -> None:
    one: list[HubEvent] = [delta("x")]
    assert coalesce(one) == [delta("x")]
