"""The model manager in-process: switching, the drain rule, waiting requests."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from llamad.config import parse_config
from llamad.errors import LlamadError
from llamad.events import EventHub
from llamad.llama_server import ServerBinary
from llamad.manager import ModelManager, health_verdict
from llamad.protocol import ModelStatus
from llamad.errors import RequestCancelled
from tests.conftest import FAKE_SERVER, short_tempdir


def _manager(tmp: Path, drain: float = 0.3) -> ModelManager:
    model = tmp / "fake.gguf"
    model.write_bytes(b"GGUF")
    text = (
        f'[daemon]\nruntime_dir = "{tmp}"\nstop_drain_sec = {drain}\nstop_timeout_sec = 2\n'
        f'[models.a]\npath = "{model}"\n[models.b]\npath = "{model}"\n'
    )
    config = parse_config(text, source=tmp / "models.toml", env=os.environ)
    sockets = tmp / "models"
    sockets.mkdir()
    return ModelManager(config, ServerBinary(FAKE_SERVER, "test"), sockets, EventHub())


async def test_switch_drains_then_cancels_requests_in_flight() -> None:
    tmp = short_tempdir()
    manager = _manager(tmp, drain=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await manager.load("a")
        outcome: list[str] = []

        async def long_request() -> None:
            try:
                async with manager.use("a"):
                    await trio.sleep(30)
                outcome.append("finished")
            except RequestCancelled as exc:
                outcome.append(str(exc))

        async def short_request() -> None:
            async with manager.use("a"):
                await trio.sleep(0.1)
            outcome.append("short finished")

        nursery.start_soon(long_request)
        nursery.start_soon(short_request)
        await trio.sleep(0.05)
        assert manager.statuses()["a"].in_flight == 2
        began = trio.current_time()
        await manager.load("b")
        took = trio.current_time() - began
        assert outcome[0] == "short finished"  # finished within the drain window
        assert "request cancelled: model 'a' was stopped" in outcome[1]
        assert "switching to b" in outcome[1]
        assert 0.3 <= took < 3
        await manager.shutdown()
        nursery.cancel_scope.cancel()


async def test_requests_during_a_switch_wait_for_the_model() -> None:
    tmp = short_tempdir()
    manager = _manager(tmp)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await manager.load("a")
        served: list[str] = []
        done = trio.Event()

        async def request_for_b() -> None:
            async with manager.use("b") as supervisor:
                served.append(supervisor.model.name)
            done.set()

        nursery.start_soon(manager.load, "b")
        await trio.lowlevel.checkpoint()
        nursery.start_soon(request_for_b)
        with trio.fail_after(10):
            await done.wait()
        assert served == ["b"]
        assert manager.statuses()["a"].state == "stopped"
        await manager.shutdown()
        nursery.cancel_scope.cancel()


def _status(state: str, reason: str = "") -> ModelStatus:
    return ModelStatus(name="demo", state=state, since=100.0, reason=reason, pid=5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("active", "state", "level"),
    [
        ("demo", "ready", "ok"),
        ("demo", "starting", "warning"),
        ("demo", "backoff", "warning"),
        ("demo", "stopping", "warning"),
        ("demo", "failed", "critical"),
        ("demo", "stopped", "critical"),
        (None, "stopped", "ok"),
        (None, "ready", "warning"),
    ],
)
def test_health_verdict(active: str | None, state: str, level: str) -> None:
    verdict, summary = health_verdict(active, {"demo": _status(state, "why")}, now=101.5)
    assert verdict == level
    assert summary
    if state == "starting":
        assert summary == "demo loading for 1.5 s"


def test_health_without_history_is_at_least_a_warning() -> None:
    problem = "chat history is unavailable (read-only)"
    ready = {"demo": _status("ready")}
    assert health_verdict("demo", ready, 101.5) == ("ok", "demo ready (pid 5, restarts 0)")
    level, summary = health_verdict("demo", ready, 101.5, history_problem=problem)
    assert level == "warning"
    assert summary == f"demo ready (pid 5, restarts 0); {problem}"
    failed = {"demo": _status("failed", "crash loop")}
    assert health_verdict("demo", failed, 101.5, problem)[0] == "critical"


async def test_loads_started_in_the_same_tick_leave_one_server() -> None:
    tmp = short_tempdir()
    manager = _manager(tmp)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)

        async def load(name: str) -> None:
            with contextlib.suppress(LlamadError):
                await manager.load(name)

        for _ in range(5):
            async with trio.open_nursery() as racers:
                for name in ("a", "b", "a", "b"):
                    racers.start_soon(load, name)
            states = manager.statuses()
            running = [n for n, s in states.items() if s.state != "stopped"]
            assert running == [manager.active], states
            assert states[running[0]].state == "ready"
        await manager.shutdown()
        nursery.cancel_scope.cancel()
