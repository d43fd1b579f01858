"""Prometheus metrics, per model (label ``model``), served at ``GET /metrics``.

Three sources, kept apart so nothing else in llamad knows metrics exist:

- **at scrape time**, a collector reads ``statuses()`` (the pool's, or any
  source with that method): each model's state, requests in flight and
  waiting, and memory (estimated and measured, as the status carries them);
- **the event hub**: ``follow`` subscribes to the ``state`` topic and counts
  transitions (``transition`` is pure: a load is starting → ready and its
  ``ready_seconds``; backoff is a restart; failed with "crash loop"; stopping
  with a reason starting "evicted" or "idle"), and to the ``chat`` topic for
  chats over llamad's own protocol (``ChatDone``'s stats);
- **the HTTP relay** calls ``request_done`` with each request's outcome.

The registry is llamad's own (not the library's global one); the process
collector adds llamad's CPU, memory and open files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Literal, Protocol

import msgspec
import prometheus_client
import trio
import trio.lowlevel
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llamad.events import ChatEvent, EventHub, HubEvent, StateEvent
from llamad.openai_api import Usage
from llamad.protocol import ChatDone, ModelState, ModelStatus

log = logging.getLogger(__name__)

# The _created series double every counter's lines and say little here.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
STATES: tuple[ModelState, ...] = ("stopped", "starting", "ready", "stopping", "backoff", "failed")
CHAT_ENDPOINT = "llamad_chat"  # the endpoint label of chats over llamad's own protocol

Transition = Literal["load", "restart", "crash_loop", "eviction", "idle_unload"]


class StatusSource(Protocol):
    def statuses(self) -> dict[str, ModelStatus]: ...


def transition(previous: ModelState | None, status: ModelStatus) -> Transition | None:
    """What a state event means for the counters, given the model's previous state.

    Events also come for changes within a state (requests in flight); only a
    change of state counts.
    """
    if status.state == previous:
        return None
    # A stop may show as stopping then stopped, or (quick enough) stopped alone.
    stopping = status.state in ("stopping", "stopped") and previous not in ("stopping", "stopped")
    match status.state:
        case "ready" if previous == "starting":
            return "load"
        case "backoff":
            return "restart"
        case "failed" if "crash loop" in status.reason:
            return "crash_loop"
        case _ if stopping and status.reason.startswith("evicted"):
            return "eviction"
        case _ if stopping and status.reason.startswith("idle"):
            return "idle_unload"
    return None


def memory_figures(status: ModelStatus) -> dict[str, float]:
    """A status's memory figures by kind (``estimated_host``, ``measured_rss``…).

    Every number the status's ``memory`` carries (the pool estimates them from
    the GGUF and measures the running server); a figure not known is left out.
    """
    return dict(_numbers(msgspec.to_builtins(status.memory), ""))


def _numbers(value: object, prefix: str) -> Iterator[tuple[str, float]]:
    """Every number in nested mappings, named by its path: ``estimated_host``."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _numbers(inner, f"{prefix}_{key}" if prefix else str(key))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield prefix, float(value)


class _StatusCollector(Collector):
    def __init__(self, source: StatusSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        statuses = self._source.statuses()
        state = GaugeMetricFamily(
            "llamad_model_state",
            "1 for the state each model is in, 0 for the others",
            labels=["model", "state"],
        )
        in_flight = GaugeMetricFamily(
            "llamad_model_requests_in_flight",
            "requests being served by the model (chats and HTTP)",
            labels=["model"],
        )
        waiting = GaugeMetricFamily(
            "llamad_model_requests_waiting",
            "requests waiting for the model to load or for a slot",
            labels=["model"],
        )
        memory = GaugeMetricFamily(
            "llamad_model_memory_bytes",
            "the model's memory: estimated before start, measured while running",
            labels=["model", "kind"],
        )
        for name, status in statuses.items():
            for candidate in STATES:
                state.add_metric([name, candidate], 1.0 if status.state == candidate else 0.0)
            in_flight.add_metric([name], float(status.in_flight))
            waiting.add_metric([name], float(status.waiting))
            for kind, value in memory_figures(status).items():
                memory.add_metric([name, kind], value)
        yield from (state, in_flight, waiting, memory)


class Metrics:
    """llamad's metrics and the registry ``GET /metrics`` renders."""

    def __init__(self, source: StatusSource) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_StatusCollector(source))
        registry = self.registry
        self.loads = Counter(
            "llamad_model_loads", "loads that reached ready", ["model"], registry=registry
        )
        self.load_seconds = Histogram(
            "llamad_model_load_seconds",
            "llama-server's spawn to ready, per load",
            ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=registry,
        )
        self.restarts = Counter(
            "llamad_model_restarts", "automatic restarts after a failure", ["model"],
            registry=registry,
        )  # fmt: skip
        self.crash_loops = Counter(
            "llamad_model_crash_loops", "times the model was given up as a crash loop", ["model"],
            registry=registry,
        )  # fmt: skip
        self.evictions = Counter(
            "llamad_model_evictions", "unloads to make room for another model", ["model"],
            registry=registry,
        )  # fmt: skip
        self.idle_unloads = Counter(
            "llamad_model_idle_unloads", "unloads after the model sat idle", ["model"],
            registry=registry,
        )  # fmt: skip
        self.requests = Counter(
            "llamad_requests",
            "requests by model, endpoint and outcome (HTTP status; a chat's final status; "
            "499: the client went away)",
            ["model", "endpoint", "status"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "llamad_time_to_first_token_seconds",
            "request received to first token",
            ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.tokens = Counter(
            "llamad_tokens",
            "tokens in (prompt) and out (generated)",
            ["model", "direction"],
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "llamad_generation_tokens_per_second",
            "generation speed per reply, as llama-server measured it",
            ["model"],
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
            registry=registry,
        )
        self._counters: Mapping[Transition, Counter] = {
            "load": self.loads,
            "restart": self.restarts,
            "crash_loop": self.crash_loops,
            "eviction": self.evictions,
            "idle_unload": self.idle_unloads,
        }
        self._states: dict[str, ModelState] = {}

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    # ------------------------------------------------------------- observing

    def request_done(
        self,
        model: str,
        endpoint: str,
        status: str,
        usage: Usage | None = None,
        first_token_seconds: float | None = None,
    ) -> None:
        """One request's outcome; ``usage`` and the first-token time when known."""
        self.requests.labels(model, endpoint, status).inc()
        if first_token_seconds is not None:
            self.time_to_first_token.labels(model).observe(first_token_seconds)
        if usage is None:
            return
        if usage.prompt_tokens:
            self.tokens.labels(model, "in").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self.tokens.labels(model, "out").inc(usage.completion_tokens)
        if usage.tokens_per_second:
            self.tokens_per_second.labels(model).observe(usage.tokens_per_second)

    def observe(self, event: HubEvent) -> None:
        """One hub event: a state change, or a finished chat."""
        if isinstance(event, StateEvent):
            status = event.status
            kind = transition(self._states.get(status.name), status)
            self._states[status.name] = status.state
            if kind is None:
                return
            self._counters[kind].labels(status.name).inc()
            if kind == "load" and status.ready_seconds is not None:
                self.load_seconds.labels(status.name).observe(status.ready_seconds)
        elif isinstance(event, ChatEvent) and isinstance(event.message, ChatDone):
            reply = event.message.message
            stats = reply.stats
            model = reply.model or "unknown"
            usage = None
            ttft = None
            if stats is not None:
                usage = Usage(stats.prompt_tokens, stats.completion_tokens, stats.tokens_per_second)
                if stats.time_to_first_token_ms is not None:
                    ttft = stats.time_to_first_token_ms / 1000
            self.request_done(model, CHAT_ENDPOINT, reply.status, usage, ttft)

    async def follow(self, hub: EventHub) -> None:
        """Count state changes and finished chats for as long as llamad runs."""
        while True:
            with hub.subscribe(frozenset({"state", "chat"})) as subscription:
                receive = subscription.receive
                # Every chat delta comes here too: drain what is queued per
                # wake-up, without batches()' merging of deltas nobody reads.
                async for event in receive:
                    self.observe(event)
                    while True:
                        try:
                            self.observe(receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                if not subscription.overflowed:
                    return
            # Cut off for falling behind (a burst of deltas): count on from here.
            log.warning("metrics fell behind the event hub; some events were not counted")
            await trio.lowlevel.checkpoint()
