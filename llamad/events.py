"""Fan-out of daemon events to subscribed clients, with bounded memory.

Each subscriber gets its own bounded queue. A subscriber that falls so far
behind that its queue fills is cut off (its ``overflowed`` flag is set and its
channel closed) rather than slowing the daemon or the other subscribers: one
stuck client must never cost the others anything.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Literal

import msgspec
import trio

from llamad.protocol import ChatDelta, ModelStatus, ServerMessage, WorkerStatus

Topic = Literal["state", "log", "chat", "workers"]


@dataclass(frozen=True)
class StateEvent:
    status: ModelStatus


@dataclass(frozen=True)
class WorkerEvent:
    status: WorkerStatus


@dataclass(frozen=True)
class LogEvent:
    model: str
    line: str


@dataclass(frozen=True)
class ChatEvent:
    """A chat event for one conversation; ``message.id`` is set per recipient."""

    conversation: str
    message: ServerMessage


HubEvent = StateEvent | WorkerEvent | LogEvent | ChatEvent


@dataclass(eq=False)
class Subscription:
    topics: frozenset[Topic]
    send: trio.MemorySendChannel[HubEvent]
    receive: trio.MemoryReceiveChannel[HubEvent]
    key: str | None = None  # only this model's or conversation's events, when set
    overflowed: bool = field(default=False)

    async def batches(self) -> AsyncIterator[list[HubEvent]]:
        """Everything queued each time the reader gets to run, deltas merged.

        A fast model can publish hundreds of deltas between two runs of a
        connection's task; sending them as one merged delta keeps a reader
        that is merely busy (not stuck) far from the queue limit, and costs
        one write instead of hundreds.
        """
        async for first in self.receive:
            batch = [first]
            while True:
                try:
                    batch.append(self.receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            yield coalesce(batch)


def coalesce(events: list[HubEvent]) -> list[HubEvent]:
    """Join runs of ``ChatDelta`` of the same reply into one; keep everything else in order."""
    if len(events) == 1:  # the usual batch while a reader keeps up: nothing to join
        return events
    merged: list[HubEvent] = []
    for key, group in itertools.groupby(events, _delta_key):
        run = list(group)
        first = run[0]
        if key is None or len(run) == 1 or not isinstance(first, ChatEvent):
            merged += run
            continue
        text = "".join(
            e.message.text
            for e in run
            if isinstance(e, ChatEvent) and isinstance(e.message, ChatDelta)
        )
        merged.append(
            ChatEvent(first.conversation, msgspec.structs.replace(first.message, text=text))
        )
    return merged


def _delta_key(event: HubEvent) -> tuple[str, int] | None:
    """Which reply a delta belongs to; None for every other event."""
    if isinstance(event, ChatEvent) and isinstance(event.message, ChatDelta):
        return event.message.conversation, event.message.seq
    return None


def _topic_and_key(event: HubEvent) -> tuple[Topic, str]:
    if type(event) is ChatEvent:  # the hot case first: a plain type test, no pattern
        return "chat", event.conversation
    match event:
        case StateEvent(status):
            return "state", status.name
        case WorkerEvent(status):
            return "workers", status.name
        case LogEvent(model, _):
            return "log", model
        case ChatEvent(conversation, _):
            return "chat", conversation


class EventHub:
    def __init__(self, queue_size: int = 1024) -> None:
        self._queue_size = queue_size
        self._subscriptions: set[Subscription] = set()
        # Who gets a topic's events, rebuilt on every (rare) subscribe and
        # unsubscribe, so that publishing (once per token while a reply
        # streams) looks at the subscribers of that topic only, without a copy.
        self._by_topic: dict[Topic, tuple[Subscription, ...]] = {}

    @contextlib.contextmanager
    def subscribe(self, topics: frozenset[Topic], key: str | None = None) -> Iterator[Subscription]:
        send, receive = trio.open_memory_channel[HubEvent](self._queue_size)
        subscription = Subscription(topics, send, receive, key)
        self._subscriptions.add(subscription)
        self._reindex()
        try:
            yield subscription
        finally:
            self._drop(subscription)
            send.close()
            receive.close()

    def publish(self, event: HubEvent) -> None:
        topic, key = _topic_and_key(event)
        for subscription in self._by_topic.get(topic, ()):
            if subscription.key is not None and subscription.key != key:
                continue
            try:
                subscription.send.send_nowait(event)
            except trio.WouldBlock:
                subscription.overflowed = True
                self._drop(subscription)
                subscription.send.close()
            except trio.ClosedResourceError:
                self._drop(subscription)

    def _drop(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.discard(subscription)
            self._reindex()

    def _reindex(self) -> None:
        topics: dict[Topic, list[Subscription]] = {}
        for subscription in self._subscriptions:
            for topic in subscription.topics:
                topics.setdefault(topic, []).append(subscription)
        self._by_topic = {topic: tuple(subs) for topic, subs in topics.items()}
