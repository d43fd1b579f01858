"""Fan-out of daemon events to subscribed clients, with bounded memory.

Each subscriber gets its own bounded queue. A subscriber that falls so far
behind that its queue fills is cut off (its ``overflowed`` flag is set and its
channel closed) rather than slowing the daemon or the other subscribers: one
stuck client must never cost the others anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from llamad.protocol import LogTopic, ModelStatus


@dataclass(frozen=True)
class StateEvent:
    status: ModelStatus


@dataclass(frozen=True)
class LogEvent:
    model: str
    line: str


HubEvent = StateEvent | LogEvent


@dataclass(eq=False)
class Subscription:
    topics: frozenset[LogTopic]
    send: trio.MemorySendChannel[HubEvent]
    receive: trio.MemoryReceiveChannel[HubEvent]
    model: str | None = None  # only this model's events, when set
    overflowed: bool = field(default=False)


def _topic(event: HubEvent) -> LogTopic:
    return "state" if isinstance(event, StateEvent) else "log"


def _model(event: HubEvent) -> str:
    return event.status.name if isinstance(event, StateEvent) else event.model


class EventHub:
    def __init__(self, queue_size: int = 1024) -> None:
        self._queue_size = queue_size
        self._subscriptions: set[Subscription] = set()

    @contextlib.contextmanager
    def subscribe(
        self, topics: frozenset[LogTopic], model: str | None = None
    ) -> Iterator[Subscription]:
        send, receive = trio.open_memory_channel[HubEvent](self._queue_size)
        subscription = Subscription(topics, send, receive, model)
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)
            send.close()
            receive.close()

    def publish(self, event: HubEvent) -> None:
        topic, model = _topic(event), _model(event)
        for subscription in list(self._subscriptions):
            if topic not in subscription.topics:
                continue
            if subscription.model is not None and subscription.model != model:
                continue
            try:
                subscription.send.send_nowait(event)
            except trio.WouldBlock:
                subscription.overflowed = True
                self._subscriptions.discard(subscription)
                subscription.send.close()
            except trio.ClosedResourceError:
                self._subscriptions.discard(subscription)
