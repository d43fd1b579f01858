"""The model pool in-process: several resident models, eviction, drains, idle unload.

The servers are ``tests/fake_llama_server.py`` (it answers /health and can
crash on demand); memory figures are injected, so every budget is exact.
The same rules with the real llama-server are in tests/test_pool_daemon.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from llamad.config import ModelConfig, parse_config
from llamad.errors import (
    DoesNotFit,
    LoadTimeout,
    ModelFailed,
    ModelFileMissing,
    QueueFull,
    RequestCancelled,
)
from llamad.events import EventHub
from llamad.llama_server import ServerBinary
from llamad.placement import MIB, Memory
from llamad.pool import ModelPool, health_verdict, with_workers
from llamad.protocol import ModelStatus, WorkerStatus
from tests.conftest import FAKE_SERVER, short_tempdir

GGUF = b"GGUF\x03\x00\x00\x00"


def _config(tmp: Path, models: dict[str, str], daemon: str = "") -> str:
    text = (
        f'[daemon]\nruntime_dir = "{tmp}"\nstop_drain_sec = 0.3\nstop_timeout_sec = 2\n{daemon}\n'
    )
    for name, extra in models.items():
        path = tmp / f"{name}.gguf"
        if not path.exists():
            path.write_bytes(GGUF)
        text += f'[models.{name}]\npath = "{path}"\n{extra}\n'
    return text


@asynccontextmanager
async def running_pool(
    models: dict[str, str],
    daemon: str = "",
    *,
    sizes: dict[str, int] | None = None,
    state_path: Path | None = None,
    tmp: Path | None = None,
) -> AsyncIterator[ModelPool]:
    tmp = tmp or short_tempdir()
    config = parse_config(_config(tmp, models, daemon), source=tmp / "models.toml", env=os.environ)
    sockets = tmp / "models"
    sockets.mkdir(exist_ok=True)
    sizes = sizes or {}

    def estimate(model: ModelConfig) -> Memory:
        return Memory(host=sizes.get(model.name, 100) * MIB)

    pool = ModelPool(
        config,
        ServerBinary(FAKE_SERVER, "test"),
        sockets,
        EventHub(),
        estimate=estimate,
        measure=lambda pids: {},
        state_path=state_path,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            yield pool
        finally:
            with trio.move_on_after(10):
                await pool.shutdown()
            nursery.cancel_scope.cancel()


def states(pool: ModelPool) -> dict[str, str]:
    return {name: status.state for name, status in pool.statuses().items()}


async def wait_state(pool: ModelPool, name: str, state: str) -> None:
    with pool.hub.subscribe(frozenset({"state"}), key=name) as events:
        while states(pool)[name] != state:
            await events.receive.receive()


async def test_models_stay_resident_side_by_side() -> None:
    async with running_pool({"a": "", "b": ""}) as pool:
        with trio.fail_after(10):
            await pool.load("a")
            await pool.load("b")
        assert states(pool) == {"a": "ready", "b": "ready"}
        assert all(s.expected for s in pool.statuses().values())


async def test_a_third_model_evicts_the_least_recently_used() -> None:
    models = {"a": "", "b": "", "c": ""}
    async with running_pool(models, 'memory_budget = "250MiB"') as pool:
        with trio.fail_after(10):
            await pool.load("a")
            await pool.load("b")
            async with pool.acquire("a"):
                pass  # a is now the more recently used
            await pool.load("c")
        assert states(pool) == {"a": "ready", "b": "stopped", "c": "ready"}
        status = pool.statuses()["b"]
        assert status.reason == "evicted for c"
        assert not status.expected


async def test_a_model_with_a_request_in_flight_is_not_evicted() -> None:
    models = {"a": "", "b": "", "c": ""}
    async with running_pool(models, 'memory_budget = "250MiB"') as pool:
        with trio.fail_after(10):
            await pool.load("b")
            await pool.load("a")
            async with pool.acquire("b"):  # b is busy (and now most recently used)
                await pool.load("c")
                assert states(pool)["a"] == "stopped"
                assert states(pool)["b"] == "ready"


async def test_a_load_waits_for_requests_in_flight_then_evicts() -> None:
    async with running_pool({"a": "", "b": ""}, 'memory_budget = "150MiB"') as pool:
        with trio.fail_after(10):
            await pool.load("a")
        finished: list[str] = []

        async def busy() -> None:
            async with pool.acquire("a"):
                await trio.sleep(0.5)
            finished.append("a request")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy)
            await trio.sleep(0.05)
            with trio.fail_after(10):
                await pool.load("b")
            finished.append("load b")
        assert finished == ["a request", "load b"]
        assert states(pool) == {"a": "stopped", "b": "ready"}


async def test_a_load_gives_up_after_load_timeout_sec() -> None:
    daemon = 'memory_budget = "150MiB"\nload_timeout_sec = 0.5'
    async with running_pool({"a": "", "b": ""}, daemon) as pool:
        with trio.fail_after(10):
            await pool.load("a")
            async with pool.acquire("a"):
                with pytest.raises(LoadTimeout, match="waited"):
                    await pool.load("b")
        assert states(pool)["a"] == "ready"


async def test_pinned_models_stay_and_the_refusal_has_the_figures() -> None:
    models = {"embed": "pinned = true", "big": ""}
    sizes = {"embed": 200, "big": 300}
    async with running_pool(models, 'memory_budget = "400MiB"', sizes=sizes) as pool:
        await pool.restore()
        with trio.fail_after(10):
            await wait_state(pool, "embed", "ready")
        with pytest.raises(DoesNotFit) as refused:
            await pool.load("big")
        assert str(refused.value) == (
            "big needs about 300 MiB of memory; 200 MiB free now; pinned: embed (200 MiB)"
        )
        assert states(pool) == {"embed": "ready", "big": "stopped"}


async def test_a_bad_file_is_refused_before_anything_is_evicted() -> None:
    tmp = short_tempdir()
    (tmp / "corrupt.gguf").write_bytes(os.urandom(4096))
    models = {"a": "", "corrupt": "", "gone": ""}
    async with running_pool(models, 'memory_budget = "150MiB"', tmp=tmp) as pool:
        (tmp / "gone.gguf").unlink()
        with trio.fail_after(10):
            await pool.load("a")
        with pytest.raises(ModelFailed, match="is not a GGUF model file"):
            await pool.load("corrupt")
        with pytest.raises(ModelFileMissing):
            await pool.load("gone")
        assert states(pool)["a"] == "ready"


async def test_models_evicted_for_one_that_fails_come_back() -> None:
    models = {"a": "", "broken": 'args = ["--fake-crash"]\nrestart = "no"'}
    async with running_pool(models, 'memory_budget = "150MiB"') as pool:
        with trio.fail_after(10):
            await pool.load("a")
        with pytest.raises(ModelFailed, match="before it was ready"):
            await pool.load("broken")
        with trio.fail_after(10):
            await wait_state(pool, "a", "ready")
        assert pool.statuses()["a"].expected


async def test_idle_models_unload_after_ttl() -> None:
    async with running_pool({"a": "ttl_sec = 0.3"}) as pool:
        with trio.fail_after(10):
            await pool.load("a")
            status = pool.statuses()["a"]
            assert status.unload_at is not None
            await wait_state(pool, "a", "stopped")
        assert pool.statuses()["a"].reason == "idle for 0.3 s"
        assert not pool.statuses()["a"].expected


async def test_keep_alive_of_a_request_overrides_ttl() -> None:
    async with running_pool({"a": "ttl_sec = 100"}) as pool:
        with trio.fail_after(10):
            async with pool.acquire("a", keep_alive=0):
                pass
            await wait_state(pool, "a", "stopped")


async def test_unload_drains_then_cancels_requests_in_flight() -> None:
    async with running_pool({"a": "parallel = 2"}) as pool:
        with trio.fail_after(10):
            await pool.load("a")
        outcome: list[str] = []

        async def long_request() -> None:
            try:
                async with pool.acquire("a"):
                    await trio.sleep(30)
                outcome.append("finished")
            except RequestCancelled as exc:
                outcome.append(str(exc))

        async def short_request() -> None:
            async with pool.acquire("a"):
                await trio.sleep(0.1)
            outcome.append("short finished")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_request)
            nursery.start_soon(short_request)
            await trio.sleep(0.05)
            assert pool.statuses()["a"].in_flight == 2
            began = trio.current_time()
            await pool.unload(["a"])
            took = trio.current_time() - began
        assert outcome[0] == "short finished"  # finished within the drain window
        assert "request cancelled: model 'a' was stopped (unloaded)" in outcome[1]
        assert 0.3 <= took < 3


async def test_alternating_requests_load_each_model_once() -> None:
    # Room for one model; 20 requests alternating a, b arrive together.
    starts: list[str] = []
    async with running_pool({"a": "", "b": ""}, 'memory_budget = "150MiB"') as pool:
        with pool.hub.subscribe(frozenset({"state"})) as events:

            async def request(name: str) -> None:
                async with pool.acquire(name):
                    await trio.sleep(0.01)

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for name in ["a", "b"] * 10:
                        nursery.start_soon(request, name)
                        await trio.lowlevel.checkpoint()
            while True:
                try:
                    event = events.receive.receive_nowait()
                except trio.WouldBlock:
                    break
                status = getattr(event, "status", None)
                starting = isinstance(status, ModelStatus) and status.state == "starting"
                if starting and (not starts or starts[-1] != status.name):
                    starts.append(status.name)
    assert starts == ["a", "b"]  # one load each, not one per request


async def test_max_concurrent_refuses_with_queue_full() -> None:
    async with running_pool({"a": "max_concurrent = 1"}) as pool:
        with trio.fail_after(10):
            async with pool.acquire("a"):
                with pytest.raises(QueueFull, match="max_concurrent"):
                    async with pool.acquire("a"):
                        pass


async def test_what_was_loaded_comes_back_after_a_restart() -> None:
    tmp = short_tempdir()
    state = tmp / "pool.json"
    async with running_pool({"a": "", "b": ""}, state_path=state, tmp=tmp) as pool:
        with trio.fail_after(10):
            await pool.load("b")
    async with running_pool({"a": "", "b": ""}, state_path=state, tmp=tmp) as pool:
        await pool.restore()
        with trio.fail_after(10):
            await wait_state(pool, "b", "ready")
        assert states(pool)["a"] == "stopped"
        assert pool.default_model() == "b"


def _status(name: str, state: str, expected: bool = True, reason: str = "") -> ModelStatus:
    return ModelStatus(
        name=name,
        state=state,  # type: ignore[arg-type]
        since=100.0,
        reason=reason,
        pid=5,
        expected=expected,
    )


@pytest.mark.parametrize(
    ("state", "level"),
    [
        ("ready", "ok"),
        ("starting", "warning"),
        ("backoff", "warning"),
        ("stopping", "warning"),
        ("failed", "critical"),
        ("stopped", "critical"),
    ],
)
def test_health_verdict_of_an_expected_model(state: str, level: str) -> None:
    verdict, summary = health_verdict({"demo": _status("demo", state, reason="why")}, now=101.5)
    assert verdict == level
    if state == "starting":
        assert summary == "demo loading for 1.5 s"


def test_an_eviction_or_unload_is_never_critical() -> None:
    statuses = {
        "a": _status("a", "stopped", expected=False, reason="evicted for b"),
        "b": _status("b", "starting"),
    }
    assert health_verdict(statuses, now=101)[0] == "warning"
    statuses["b"] = _status("b", "ready")
    assert health_verdict(statuses, now=101) == ("ok", "b ready (pid 5, restarts 0)")


def test_health_names_every_model_that_is_not_ok() -> None:
    statuses = {
        "a": _status("a", "failed", reason="crash loop"),
        "b": _status("b", "starting"),
        "c": _status("c", "ready"),
    }
    level, summary = health_verdict(statuses, now=101)
    assert level == "critical"
    assert summary == "a failed: crash loop; b loading for 1.0 s"


def test_health_without_history_is_at_least_a_warning() -> None:
    problem = "chat history is unavailable (read-only)"
    ready = {"demo": _status("demo", "ready")}
    assert health_verdict(ready, 101.5) == ("ok", "demo ready (pid 5, restarts 0)")
    level, summary = health_verdict(ready, 101.5, history_problem=problem)
    assert level == "warning"
    assert summary == f"demo ready (pid 5, restarts 0); {problem}"
    failed = {"demo": _status("demo", "failed", reason="crash loop")}
    assert health_verdict(failed, 101.5, problem)[0] == "critical"


def _worker(name: str, state: str, reason: str = "", local: bool = True) -> WorkerStatus:
    return WorkerStatus(
        name=name, address=f"{name}:1", local=local, state=state, since=0.0, reason=reason
    )  # type: ignore[arg-type]


def test_health_counts_the_workers_this_llamad_runs() -> None:
    ready = [_worker("a", "ready"), _worker("b", "ready")]
    assert with_workers("ok", "", ready, alone=True) == ("ok", "workers a, b ready")
    assert with_workers("ok", "demo ready (pid 1, restarts 0)", ready) == (
        "ok",
        "demo ready (pid 1, restarts 0)",
    )
    failed = [*ready, _worker("c", "failed", "crash loop: 5 starts within 60 s")]
    assert with_workers("ok", "demo ready", failed) == (
        "critical",
        "worker c failed: crash loop: 5 starts within 60 s; demo ready",
    )
    restarting = [_worker("a", "backoff", "killed by SIGKILL; restarting in 0.1 s")]
    assert with_workers("ok", "", restarting, alone=True) == (
        "warning",
        "worker a backoff: killed by SIGKILL; restarting in 0.1 s",
    )
    # A worker on another machine is its models' business, not this llamad's health.
    elsewhere = [_worker("gpu-box:50052", "backoff", "is not answering", local=False)]
    assert with_workers("ok", "no model", elsewhere) == ("ok", "no model")
