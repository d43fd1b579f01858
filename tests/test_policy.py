"""The restart policy and the supervisor state machine, with plain numbers for time."""

from __future__ import annotations

import signal

import pytest

from llamad.config import Supervision
from llamad.policy import (
    BecameReady,
    Blocked,
    CancelTimer,
    Exited,
    GiveUp,
    HealthProbed,
    ModelMachine,
    RestartAfter,
    RestartRequested,
    SetTimer,
    SignalGroup,
    Spawn,
    SpawnBlocked,
    Spawned,
    SpawnFailed,
    StartRequested,
    StayStopped,
    StopRequested,
    Timer,
    TimerFired,
    Unblocked,
    backoff_delay,
    decide_restart,
)

POLICY = Supervision(
    restart="on-failure",
    restart_sec=0.5,
    restart_max_delay_sec=4.0,
    start_limit_burst=3,
    start_limit_interval_sec=10.0,
    stable_after_sec=5.0,
    ready_timeout_sec=30.0,
    stop_timeout_sec=2.0,
    health_interval_sec=1.0,
    health_failures=3,
)


# ------------------------------------------------------------ decide_restart


def test_backoff_doubles_and_caps() -> None:
    delays = [backoff_delay(POLICY, n) for n in range(1, 7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_on_failure_ignores_clean_exit() -> None:
    decision = decide_restart(
        POLICY, failed=False, start_times=[0.0], consecutive_failures=0, now=1.0
    )
    assert decision == StayStopped()


def test_always_restarts_clean_exit() -> None:
    always = Supervision(restart="always", restart_sec=0.5)
    decision = decide_restart(
        always, failed=False, start_times=[0.0], consecutive_failures=0, now=1.0
    )
    assert decision == RestartAfter(0.5)


def test_no_never_restarts() -> None:
    never = Supervision(restart="no")
    decision = decide_restart(
        never, failed=True, start_times=[0.0], consecutive_failures=1, now=1.0
    )
    assert decision == StayStopped()


def test_crash_loop_gives_up_after_burst_starts_in_interval() -> None:
    decision = decide_restart(
        POLICY, failed=True, start_times=[0.0, 1.0, 2.0], consecutive_failures=3, now=3.0
    )
    assert isinstance(decision, GiveUp)
    assert "3 starts within 10 s" in decision.reason


def test_old_starts_fall_out_of_the_interval() -> None:
    decision = decide_restart(
        POLICY, failed=True, start_times=[0.0, 1.0, 20.0], consecutive_failures=3, now=21.0
    )
    assert decision == RestartAfter(2.0)


# ----------------------------------------------------------- the machine


def started(now: float = 0.0) -> ModelMachine:
    machine = ModelMachine(POLICY, now)
    actions = machine.handle(StartRequested(), now)
    assert actions[0] == Spawn()
    machine.handle(Spawned(100), now)
    return machine


def ready(now: float = 0.0) -> ModelMachine:
    machine = started(now)
    machine.handle(BecameReady(), now + 0.1)
    return machine


def test_start_spawns_and_arms_ready_timeout() -> None:
    machine = ModelMachine(POLICY, 0.0)
    actions = machine.handle(StartRequested(), 0.0)
    assert actions[0] == Spawn()
    assert isinstance(actions[1], SetTimer)
    assert actions[1].timer is Timer.READY_TIMEOUT
    assert actions[1].delay == 30.0
    assert machine.state == "starting"


def test_ready_records_load_time_and_cancels_timer() -> None:
    machine = started(10.0)
    actions = machine.handle(BecameReady(), 10.25)
    assert machine.state == "ready"
    assert machine.ready_seconds == pytest.approx(0.25)
    assert actions == [CancelTimer()]


def test_crash_goes_to_backoff_then_respawns() -> None:
    machine = ready()
    actions = machine.handle(Exited(signal=signal.SIGKILL), 1.0)
    assert machine.state == "backoff"
    assert "killed by SIGKILL" in machine.reason
    timer = actions[-1]
    assert isinstance(timer, SetTimer) and timer.timer is Timer.BACKOFF and timer.delay == 0.5
    actions = machine.handle(TimerFired(Timer.BACKOFF, timer.token), 1.5)
    assert machine.state == "starting"
    assert Spawn() in actions
    assert machine.restarts == 1


def test_stale_timer_is_ignored() -> None:
    machine = ready()
    actions = machine.handle(Exited(code=1), 1.0)
    timer = actions[-1]
    assert isinstance(timer, SetTimer)
    machine.handle(StopRequested(), 1.1)  # the user stops during backoff
    assert machine.state == "stopped"
    assert machine.handle(TimerFired(Timer.BACKOFF, timer.token), 1.5) == []
    assert machine.state == "stopped"


def test_repeated_crashes_end_in_failed() -> None:
    machine = ModelMachine(POLICY, 0.0)
    machine.handle(StartRequested(), 0.0)
    now = 0.0
    spawns = 1
    while machine.state != "failed":
        now += 0.1
        actions = machine.handle(Exited(code=1), now)
        for action in actions:
            if isinstance(action, SetTimer) and action.timer is Timer.BACKOFF:
                now += action.delay
                if Spawn() in machine.handle(TimerFired(action.timer, action.token), now):
                    spawns += 1
    assert spawns == POLICY.start_limit_burst
    assert "crash loop" in machine.reason
    assert "exited with code 1" in machine.reason
    # A user load recovers it, with a fresh start count.
    assert Spawn() in machine.handle(StartRequested(), now + 1)
    assert machine.state == "starting"
    assert machine.restarts == 0


def test_stable_run_resets_the_crash_count() -> None:
    machine = ModelMachine(POLICY, 0.0)
    now = 0.0
    machine.handle(StartRequested(), now)
    for _ in range(10):
        machine.handle(BecameReady(), now + 0.1)
        now += POLICY.stable_after_sec + 1  # each run stays up long enough
        actions = machine.handle(Exited(signal=signal.SIGKILL), now)
        timer = actions[-1]
        assert isinstance(timer, SetTimer)
        assert timer.delay == POLICY.restart_sec  # never escalates
        now += timer.delay
        machine.handle(TimerFired(timer.timer, timer.token), now)
        assert machine.state == "starting"


def test_user_stop_never_restarts() -> None:
    machine = ready()
    actions = machine.handle(StopRequested(), 1.0)
    assert machine.state == "stopping"
    assert SignalGroup(signal.SIGTERM) in actions
    actions = machine.handle(Exited(code=0), 1.2)
    assert machine.state == "stopped"
    assert Spawn() not in actions


def test_user_stop_with_crashing_exit_still_no_restart() -> None:
    machine = ready()
    machine.handle(StopRequested(), 1.0)
    machine.handle(Exited(signal=signal.SIGKILL), 1.2)
    assert machine.state == "stopped"


def test_stop_timeout_escalates_to_sigkill() -> None:
    machine = ready()
    actions = machine.handle(StopRequested(), 1.0)
    timer = actions[-1]
    assert isinstance(timer, SetTimer) and timer.timer is Timer.STOP_TIMEOUT and timer.delay == 2.0
    actions = machine.handle(TimerFired(timer.timer, timer.token), 3.0)
    assert actions == [SignalGroup(signal.SIGKILL)]
    assert "sent SIGKILL" in machine.reason


def test_health_watchdog_needs_consecutive_misses() -> None:
    machine = ready()
    assert machine.handle(HealthProbed(ok=False), 1.0) == []
    assert machine.handle(HealthProbed(ok=False), 2.0) == []
    assert machine.handle(HealthProbed(ok=True), 3.0) == []  # resets the count
    machine.handle(HealthProbed(ok=False), 4.0)
    machine.handle(HealthProbed(ok=False), 5.0)
    actions = machine.handle(HealthProbed(ok=False), 6.0)
    assert machine.state == "stopping"
    assert SignalGroup(signal.SIGTERM) in actions and SignalGroup(signal.SIGCONT) in actions
    actions = machine.handle(Exited(signal=signal.SIGTERM), 6.1)
    assert machine.state == "backoff"
    assert "health check failed 3 times" in machine.reason


def test_ready_timeout_counts_as_failure() -> None:
    machine = started()
    ready_timer = machine.handle(StartRequested(), 0.0)  # already starting: no-op
    assert ready_timer == []
    machine2 = ModelMachine(POLICY, 0.0)
    timer = machine2.handle(StartRequested(), 0.0)[1]
    assert isinstance(timer, SetTimer)
    machine2.handle(TimerFired(timer.timer, timer.token), 30.0)
    assert machine2.state == "stopping"
    machine2.handle(Exited(signal=signal.SIGTERM), 30.1)
    assert machine2.state == "backoff"
    assert "not ready after 30 s" in machine2.reason


def test_restart_request_stops_then_starts() -> None:
    machine = ready()
    machine.handle(RestartRequested(), 1.0)
    assert machine.state == "stopping"
    actions = machine.handle(Exited(code=0), 1.1)
    assert Spawn() in actions
    assert machine.state == "starting"


def test_spawn_failure_is_final() -> None:
    machine = ModelMachine(POLICY, 0.0)
    machine.handle(StartRequested(), 0.0)
    machine.handle(SpawnFailed("cannot run /nope: No such file"), 0.0)
    assert machine.state == "failed"
    assert "cannot run" in machine.reason


def test_clean_exit_under_on_failure_stays_stopped() -> None:
    machine = ready()
    machine.handle(Exited(code=0), 1.0)
    assert machine.state == "stopped"
    assert machine.last_exit is not None and machine.last_exit.code == 0


def test_pure_core_imports_no_io() -> None:
    """The policy module must stay importable without trio, sockets or processes."""
    import ast
    from pathlib import Path

    from llamad import policy

    tree = ast.parse(Path(policy.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert not imported & {"trio", "socket", "subprocess", "os", "httpx", "lmdb"}


def test_switch_stop_kills_at_once() -> None:
    machine = ready()
    actions = machine.handle(StopRequested("switching to b", graceful=False), 1.0)
    assert actions[0] == SignalGroup(signal.SIGKILL)
    assert SignalGroup(signal.SIGTERM) not in actions
    machine.handle(Exited(signal=signal.SIGKILL), 1.001)
    assert machine.state == "stopped"
    assert machine.reason == "switching to b"


# ------------------------------------------------- dependencies (workers, remotes)

LOST = "worker w2 (127.0.0.1:50112) went away (killed by SIGKILL)"


def test_a_lost_worker_kills_the_server_at_once_and_counts_a_failure() -> None:
    machine = ready()
    actions = machine.handle(Blocked(LOST), 1.0)
    assert machine.state == "stopping"
    assert actions[0] == SignalGroup(signal.SIGKILL)  # nothing to flush; a graceful exit hangs
    machine.handle(Exited(signal=signal.SIGKILL), 1.1)
    assert machine.state == "backoff"
    assert machine.reason.startswith(LOST)
    assert machine.restarts == 1


def test_while_blocked_the_backoff_waits_without_starting() -> None:
    machine = ready()
    machine.handle(Blocked(LOST), 1.0)
    timer = machine.handle(Exited(signal=signal.SIGKILL), 1.1)[-1]
    assert isinstance(timer, SetTimer)
    actions = machine.handle(TimerFired(Timer.BACKOFF, timer.token), 1.6)
    assert actions == []
    assert machine.state == "backoff"
    assert machine.reason == f"{LOST}; starting again when it answers"
    # An hour away costs no start: the crash-loop limit is not reached by waiting.
    assert machine.handle(Blocked("worker w2 is starting"), 3600.0) == []
    assert machine.reason == "worker w2 is starting; starting again when it answers"
    actions = machine.handle(Unblocked(), 3601.0)
    assert Spawn() in actions
    assert machine.state == "starting"
    assert machine.restarts == 1


def test_back_before_the_backoff_ends_starts_on_the_timer() -> None:
    machine = ready()
    machine.handle(Blocked(LOST), 1.0)
    timer = machine.handle(Exited(signal=signal.SIGKILL), 1.1)[-1]
    assert isinstance(timer, SetTimer)
    assert machine.handle(Unblocked(), 1.2) == []
    assert Spawn() in machine.handle(TimerFired(Timer.BACKOFF, timer.token), 1.6)


def test_a_start_while_blocked_waits_and_a_stop_ends_the_wait() -> None:
    machine = ModelMachine(POLICY, 0.0)
    machine.handle(Blocked(LOST), 0.0)
    assert machine.handle(StartRequested(), 1.0) == []
    assert machine.state == "backoff"
    machine.handle(StopRequested("unloaded"), 2.0)
    assert machine.state == "stopped"
    assert machine.handle(Unblocked(), 3.0) == []
    assert machine.state == "stopped"


def test_a_spawn_blocked_by_its_check_counts_as_a_failed_start() -> None:
    machine = ModelMachine(POLICY, 0.0)
    machine.handle(StartRequested(), 0.0)
    actions = machine.handle(SpawnBlocked("worker 10.0.0.2:50052 is not answering"), 0.1)
    assert machine.state == "backoff"
    assert CancelTimer() in actions
    assert machine.blocked == "worker 10.0.0.2:50052 is not answering"


def test_blocked_after_the_server_died_by_itself_waits_at_the_end_of_the_backoff() -> None:
    machine = ready()
    # llama-server noticed the lost worker first and aborted.
    timer = machine.handle(Exited(signal=signal.SIGABRT), 1.0)[-1]
    assert isinstance(timer, SetTimer)
    machine.handle(Blocked(LOST), 1.05)
    assert machine.handle(TimerFired(Timer.BACKOFF, timer.token), 1.5) == []
    assert machine.reason == f"{LOST}; starting again when it answers"


def test_a_clean_exit_before_ready_is_a_failure() -> None:
    machine = started()
    machine.handle(Exited(code=0, detail="Failed to create server socket"), 1.0)
    assert machine.state == "backoff"
    assert "exited with code 0 before it was ready: Failed to create server socket" in (
        machine.reason
    )


def test_a_dependency_found_missing_explains_the_missed_health_checks() -> None:
    machine = ready()
    for second in (1.0, 2.0, 3.0):
        machine.handle(HealthProbed(ok=False), second)
    assert machine.state == "stopping"
    machine.handle(Blocked("remote server http://far is not answering: connection refused"), 3.0)
    machine.handle(Exited(code=0), 3.1)
    assert machine.reason == (
        "remote server http://far is not answering: connection refused "
        "(health check failed 3 times in a row); restarting in 0.5 s"
    )
