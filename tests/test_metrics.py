"""Metrics: transitions counted from state events, chats from ChatDone, scrape-time gauges.

Rendered output is read back with prometheus_client's own parser, as Prometheus would.
"""

from __future__ import annotations

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from llamad.events import ChatEvent, EventHub, StateEvent
from llamad.metrics import Metrics, memory_figures, transition
from llamad.openai_api import Usage
from llamad.protocol import (
    ChatDone,
    Message,
    MessageStats,
    ModelMemory,
    ModelState,
    ModelStatus,
    TextPart,
)


def status(name: str, state: ModelState, reason: str = "", **extra: object) -> ModelStatus:
    return ModelStatus(name=name, state=state, since=0.0, reason=reason, **extra)  # type: ignore[arg-type]


class Source:
    def __init__(self) -> None:
        self.current: dict[str, ModelStatus] = {}

    def statuses(self) -> dict[str, ModelStatus]:
        return dict(self.current)


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = metrics.render().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


@pytest.mark.parametrize(
    ("previous", "state", "reason", "expected"),
    [
        ("starting", "ready", "", "load"),
        ("ready", "ready", "", None),  # in-flight count changed, nothing else
        ("stopped", "ready", "", None),
        ("ready", "backoff", "exited with code 1", "restart"),
        ("backoff", "backoff", "", None),
        ("starting", "failed", "crash loop: 5 starts within 60 s", "crash_loop"),
        ("starting", "failed", "file missing", None),
        ("ready", "stopping", "evicted for qwen (needs 4 GiB)", "eviction"),
        ("ready", "stopping", "idle for 300 s", "idle_unload"),
        ("ready", "stopping", "unloaded", None),
        ("ready", "stopped", "evicted for b", "eviction"),  # too quick to show stopping
        ("stopping", "stopped", "evicted for b", None),  # counted at stopping
        ("ready", "stopped", "idle for 5 min", "idle_unload"),
        (None, "starting", "", None),
    ],
)
def test_transitions(
    previous: ModelState | None, state: ModelState, reason: str, expected: str | None
) -> None:
    assert transition(previous, status("m", state, reason)) == expected


def test_state_events_move_the_counters() -> None:
    metrics = Metrics(Source())
    for event in [
        status("a", "starting"),
        status("a", "ready", ready_seconds=0.25),
        status("a", "ready", in_flight=1),  # not a second load
        status("a", "backoff", "exited"),
        status("a", "starting"),
        status("a", "failed", "crash loop: 5 starts"),
        status("a", "starting"),
        status("a", "ready", ready_seconds=0.5),
        status("a", "stopping", "evicted for b"),
        status("a", "stopped"),
        status("a", "starting"),
        status("a", "ready", ready_seconds=0.1),
        status("a", "stopping", "idle for 60 s"),
    ]:
        metrics.observe(StateEvent(event))
    assert value(metrics, "llamad_model_loads_total", model="a") == 3
    assert value(metrics, "llamad_model_load_seconds_count", model="a") == 3
    assert value(metrics, "llamad_model_load_seconds_sum", model="a") == pytest.approx(0.85)
    assert value(metrics, "llamad_model_restarts_total", model="a") == 1
    assert value(metrics, "llamad_model_crash_loops_total", model="a") == 1
    assert value(metrics, "llamad_model_evictions_total", model="a") == 1
    assert value(metrics, "llamad_model_idle_unloads_total", model="a") == 1


def test_chats_over_the_protocol_count_like_http_requests() -> None:
    metrics = Metrics(Source())
    reply = Message(
        conversation="c",
        seq=2,
        role="assistant",
        parts=[TextPart(text="hi")],
        model="demo",
        stats=MessageStats(
            prompt_tokens=10,
            completion_tokens=24,
            tokens_per_second=1450.0,
            time_to_first_token_ms=4.0,
        ),
    )
    metrics.observe(ChatEvent("c", ChatDone(id=0, message=reply)))
    metrics.request_done("demo", "chat_completions", "200", Usage(5, 7, 900.0), 0.02)
    metrics.request_done("demo", "chat_completions", "499")
    assert value(metrics, "llamad_requests_total", model="demo", endpoint="llamad_chat",
                 status="complete") == 1  # fmt: skip
    assert value(metrics, "llamad_requests_total", model="demo", endpoint="chat_completions",
                 status="200") == 1  # fmt: skip
    assert value(metrics, "llamad_requests_total", model="demo", endpoint="chat_completions",
                 status="499") == 1  # fmt: skip
    assert value(metrics, "llamad_tokens_total", model="demo", direction="in") == 15
    assert value(metrics, "llamad_tokens_total", model="demo", direction="out") == 31
    assert value(metrics, "llamad_time_to_first_token_seconds_count", model="demo") == 2
    assert value(metrics, "llamad_time_to_first_token_seconds_sum", model="demo") == pytest.approx(
        0.024
    )
    assert value(metrics, "llamad_generation_tokens_per_second_count", model="demo") == 2


def test_gauges_are_read_at_scrape_time() -> None:
    source = Source()
    metrics = Metrics(source)
    memory = ModelMemory(estimated_host=3_000_000, measured_rss=2_000_000)
    source.current = {"a": status("a", "ready", in_flight=2, waiting=3, memory=memory)}
    assert value(metrics, "llamad_model_state", model="a", state="ready") == 1
    assert value(metrics, "llamad_model_state", model="a", state="stopped") == 0
    assert value(metrics, "llamad_model_requests_in_flight", model="a") == 2
    assert value(metrics, "llamad_model_requests_waiting", model="a") == 3
    assert value(metrics, "llamad_model_memory_bytes", model="a", kind="measured_rss") == 2e6
    assert value(metrics, "llamad_model_memory_bytes", model="a", kind="estimated_host") == 3e6
    assert value(metrics, "process_resident_memory_bytes") > 1e6  # llamad's own
    source.current = {"a": status("a", "stopped")}
    assert value(metrics, "llamad_model_state", model="a", state="stopped") == 1
    assert ("llamad_model_memory_bytes", frozenset({("model", "a"), ("kind", "measured_rss")})) \
        not in samples(metrics)  # fmt: skip


def test_memory_figures_are_those_the_status_knows() -> None:
    memory = ModelMemory(estimated_host=100, estimated_gpu=0, measured_rss=90)
    figures = memory_figures(status("a", "ready", memory=memory))
    assert figures == {"estimated_host": 100.0, "estimated_gpu": 0.0, "measured_rss": 90.0}


async def test_follow_counts_what_the_hub_publishes() -> None:
    hub = EventHub()
    metrics = Metrics(Source())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(metrics.follow, hub)
        await trio.testing.wait_all_tasks_blocked()
        hub.publish(StateEvent(status("a", "starting")))
        hub.publish(StateEvent(status("a", "ready", ready_seconds=0.2)))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert value(metrics, "llamad_model_loads_total", model="a") == 1
