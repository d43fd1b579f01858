"""Fault drills for the supervisor: crashes, kills, hangs, stubborn and forking children.

Each drill asserts what a user would notice (is the model back, how soon, what
does `llamactl health` say, is anything left running), with bounds derived from
the model's configuration plus a generous allowance for a busy CI machine.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from llamad.config import Supervision
from llamad.policy import hang_detection_bound
from llamad.protocol import (
    Chat,
    ChatDone,
    ChatOptions,
    ModelStatus,
    StateChanged,
    Subscribe,
    Unload,
)
from tests.conftest import FAKE_SERVER, Llamad, ready_daemon
from tests.faults.util import (
    SLACK,
    MakeLlamad,
    fake_model,
    live_children,
    pid_gone,
    wait_until,
)

pytestmark = pytest.mark.server


class StateRecorder:
    """Every state a model passes through, from a `subscribe` connection."""

    def __init__(self, daemon: Llamad, model: str) -> None:
        self.states: list[str] = []
        self._client = daemon.client(timeout=None)
        self._stream = self._client.events(lambda i: Subscribe(id=i, topics=["state"]))
        next(self._stream)  # Ok: subscribed
        self._model = model
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        try:
            for message in self._stream:
                if isinstance(message, StateChanged) and message.model.name == self._model:
                    self.states.append(message.model.state)
        except Exception:
            pass

    def close(self) -> None:
        self._client.close()
        self._thread.join(timeout=5)


def chat_works(daemon: Llamad) -> None:
    with daemon.client(timeout=30) as client:
        messages = list(
            client.stream(
                lambda i: Chat(id=i, content="still there?", options=ChatOptions(max_tokens=4))
            )
        )
    done = messages[-1]
    assert isinstance(done, ChatDone) and done.message.status == "complete", done


# ------------------------------------------------------------ crash loop


def test_crash_loop_stops_after_burst_and_load_recovers(
    make_llamad: MakeLlamad, tmp_path: Path
) -> None:
    burst = 4
    starts = tmp_path / "starts"
    crash_flag = tmp_path / "crash"
    crash_flag.touch()
    daemon = make_llamad(
        f'[models.crashy]\npath = "{fake_model(tmp_path)}"\n'
        f'args = ["--fake-start-log", "{starts}", "--fake-crash-if", "{crash_flag}"]\n'
        f"restart_sec = 0.02\nstart_limit_burst = {burst}\nstart_limit_interval_sec = 60\n",
        binary=FAKE_SERVER,
    )
    daemon.start()
    result = daemon.ctl("load", "crashy")
    assert result.returncode == 1
    # The states as they pass, then the reason in one line.
    *states, error = result.stderr.splitlines()
    assert sum(line.startswith("crashy: starting") for line in states) == burst
    assert error.startswith(f"llamactl: model 'crashy' failed: crash loop: {burst} starts within")
    assert error.endswith("last: exited with code 1 before it was ready")
    status = daemon.status("crashy")
    assert status.state == "failed"
    assert status.pid is None and status.last_exit is not None and status.last_exit.code == 1
    # Failed means failed: no more starts, even after 50 times restart_sec.
    time.sleep(1.0)
    assert len(starts.read_text().splitlines()) == burst
    assert daemon.status("crashy").state == "failed"
    health = daemon.ctl("health")
    assert health.returncode == 2
    assert health.stdout.startswith("CRITICAL: crashy failed: crash loop")
    assert not live_children(daemon)
    # The user fixes the cause and loads again: the failed state is cleared.
    crash_flag.unlink()
    loaded = daemon.ctl("load", "crashy")
    assert loaded.returncode == 0, loaded.stderr
    assert "crashy ready in" in loaded.stdout
    assert len(starts.read_text().splitlines()) == burst + 1
    status = daemon.status("crashy")
    assert status.state == "ready" and status.restarts == 0
    assert daemon.ctl("health").returncode == 0


# --------------------------------------------------- random SIGKILLs of the child


def test_server_killed_at_random_is_always_back_and_never_failed(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    # A realistic policy, scaled down in time: 3 starts within 2.5 s is a crash
    # loop. The kills below are at least 1.5 s apart, so no 2.5 s window ever
    # holds 3 starts: the model must never be marked failed. stable_after_sec
    # is long so no earlier crash is forgotten: the start limit alone decides.
    interval, burst, max_delay = 2.5, 3, 0.3
    daemon = ready_daemon(
        make_llamad,
        demo_models,
        restart_sec=0.05,
        restart_max_delay_sec=max_delay,
        start_limit_burst=burst,
        start_limit_interval_sec=interval,
        stable_after_sec=600,
    )
    recorder = StateRecorder(daemon, "demo")
    rng = random.Random(os.getpid())
    kills = 10
    try:
        for n in range(1, kills + 1):
            time.sleep(rng.uniform(1.5, 4.5))  # a random moment in the server's life
            old = daemon.status("demo").pid
            assert old is not None
            os.kill(old, signal.SIGKILL)
            began = time.monotonic()
            status = daemon.wait_for(
                "demo",
                lambda s: s.state == "ready" and s.pid not in (None, old),  # noqa: B023
                timeout=max_delay + SLACK * 2,
            )
            took = time.monotonic() - began
            # Back within the (capped) backoff plus a start, on a busy machine.
            assert took < max_delay + SLACK, f"kill {n}: back after {took:.2f} s"
            assert status.restarts == n
            assert status.last_exit is not None and status.last_exit.signal == "SIGKILL"
            assert pid_gone(old)
            assert [p.pid for p in live_children(daemon)] == [status.pid]
            chat_works(daemon)  # back means usable, not just "ready"
        assert "failed" not in recorder.states
        assert recorder.states.count("backoff") == kills
        assert daemon.ctl("health").returncode == 0
        # The same policy does catch a real crash loop: kill it as soon as it is up.
        for _ in range(burst + 1):
            status = daemon.wait_for("demo", lambda s: s.state in ("ready", "failed"))
            if status.state == "failed":
                break
            assert status.pid is not None
            os.kill(status.pid, signal.SIGKILL)
            daemon.wait_for("demo", lambda s: s.state != "ready")
        status = daemon.wait_for("demo", lambda s: s.state in ("ready", "failed"))
        assert status.state == "failed"
        assert f"starts within {interval:g} s" in status.reason
        assert daemon.ctl("health").returncode == 2
    finally:
        recorder.close()
    assert daemon.ctl("load", "demo").returncode == 0
    assert daemon.ctl("health").returncode == 0


# -------------------------------------------------------------- SIGSTOP


def test_sigstopped_server_is_replaced_within_the_watchdog_bound(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    interval, failures, stop_timeout, restart = 1.0, 3, 1.0, 0.05
    daemon = ready_daemon(
        make_llamad,
        demo_models,
        health_interval_sec=interval,
        health_failures=failures,
        stop_timeout_sec=stop_timeout,
        restart_sec=restart,
    )
    policy = Supervision(health_interval_sec=interval, health_failures=failures)
    first = daemon.status("demo").pid
    assert first is not None
    with daemon.client(timeout=None) as watcher:
        events = watcher.events(lambda i: Subscribe(id=i, topics=["state"]))
        next(events)  # subscribed
        hung_at = time.time()
        began = time.monotonic()
        os.kill(first, signal.SIGSTOP)
        # When llamad decided to replace it, by its own clock: the state's `since`.
        decided = next(
            m.model
            for m in events
            if isinstance(m, StateChanged)
            and m.model.name == "demo"
            and m.model.state == "stopping"
            and "health check failed" in m.model.reason
        )
    noticed = decided.since - hung_at
    # The documented bound: health_interval_sec x health_failures plus one probe
    # timeout (half the interval, at most 2 s); 0.5 s for the scheduling of a busy
    # machine. A probe that waited a whole interval made this 2 x interval x failures.
    assert noticed <= hang_detection_bound(policy) + 0.5, f"noticed after {noticed:.2f} s"
    assert noticed >= interval * (failures - 1)  # fewer misses are not enough
    status = daemon.wait_for(
        "demo", lambda s: s.state == "ready" and s.pid not in (None, first), timeout=60
    )
    took = time.monotonic() - began
    bound = hang_detection_bound(policy) + stop_timeout + restart + SLACK
    assert took < bound, f"replaced after {took:.2f} s (bound {bound:g} s)"
    assert status.restarts == 1
    assert pid_gone(first)
    assert f"health check failed {failures} times in a row" in daemon.log()
    assert [p.pid for p in live_children(daemon)] == [status.pid]
    assert daemon.ctl("health").returncode == 0
    chat_works(daemon)


# ------------------------------------------------ a child that ignores SIGTERM


def test_child_ignoring_sigterm_is_killed_after_stop_timeout(
    make_llamad: MakeLlamad, tmp_path: Path
) -> None:
    stop_timeout = 1.5
    daemon = make_llamad(
        f'[models.stubborn]\npath = "{fake_model(tmp_path)}"\n'
        f'args = ["--fake-ignore-sigterm"]\nstop_timeout_sec = {stop_timeout}\n',
        binary=FAKE_SERVER,
    )
    daemon.start()
    assert daemon.ctl("load", "stubborn").returncode == 0
    pid = daemon.status("stubborn").pid
    assert pid is not None
    with daemon.client() as client:
        began = time.monotonic()
        reply = client.call(lambda i: Unload(id=i, model="stubborn"))
        took = time.monotonic() - began
    assert reply.message == "stopped stubborn"  # type: ignore[union-attr]
    assert stop_timeout <= took < stop_timeout + 1.0, f"stop took {took:.2f} s"
    assert pid_gone(pid, timeout=1)
    status = daemon.status("stubborn")
    assert status.state == "stopped"
    assert status.last_exit is not None and status.last_exit.signal == "SIGKILL"
    assert f"still running after {stop_timeout:g} s, sent SIGKILL" in status.reason


# ------------------------------------------------ a child with children of its own


def _group(daemon: Llamad, model: str, size: int) -> tuple[ModelStatus, list[int]]:
    status = daemon.wait_for(model, lambda s: s.state == "ready")
    pids: list[int] = []

    def complete() -> bool:
        pids[:] = sorted(p.pid for p in live_children(daemon))
        return len(pids) == size

    wait_until(complete, SLACK, f"{size} processes of {model}")
    assert status.pid in pids
    return status, pids


def test_forking_child_leaves_nothing_after_stop_restart_or_crash(
    make_llamad: MakeLlamad, tmp_path: Path
) -> None:
    daemon = make_llamad(
        f'[models.forky]\npath = "{fake_model(tmp_path)}"\n'
        'args = ["--fake-children", "2"]\nstop_timeout_sec = 1\nrestart_sec = 0.05\n',
        binary=FAKE_SERVER,
    )
    daemon.start()
    assert daemon.ctl("load", "forky").returncode == 0
    _, first = _group(daemon, "forky", 3)  # the server and its two children
    # A user restart: the whole old group goes, a whole new one comes.
    assert daemon.ctl("restart", "forky").returncode == 0
    status, second = _group(daemon, "forky", 3)
    assert all(pid_gone(pid) for pid in first)
    assert not set(first) & set(second)
    # A crash of the server alone (its children keep running): the supervisor
    # restarts it and must not leave the crashed server's children behind.
    assert status.pid is not None
    os.kill(status.pid, signal.SIGKILL)
    daemon.wait_for("forky", lambda s: s.state == "ready" and s.pid not in (None, status.pid))
    assert all(pid_gone(pid) for pid in second), "children of a crashed server left running"
    _, third = _group(daemon, "forky", 3)
    # Unload: nothing at all is left.
    assert daemon.ctl("unload").returncode == 0
    assert all(pid_gone(pid) for pid in third)
    assert not live_children(daemon)


# ------------------------------------------------------ llamad itself SIGKILLed


def test_llamad_sigkilled_leaves_no_server(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    child = daemon.status("demo").pid
    assert child is not None
    time.sleep(11)  # past trio's idle worker-thread lifetime: PDEATHSIG must not fire early
    assert daemon.status("demo").pid == child
    daemon.stop(signal.SIGKILL)
    assert pid_gone(child, timeout=5)
    # A new llamad on the same runtime dir starts cleanly and loads again.
    daemon.start()
    status = daemon.wait_for("demo", lambda s: s.state == "ready")
    assert status.pid != child
    assert [p.pid for p in live_children(daemon)] == [status.pid]
    assert daemon.ctl("health").returncode == 0
