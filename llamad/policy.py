"""The supervisor's brain, without any I/O.

``decide_restart`` is the restart policy as a pure function of why the process
ended and when it was started. ``ModelMachine`` is the state machine of one
supervised llama-server: it takes events (``Spawned``, ``Exited``,
``TimerFired``…) with the current monotonic time and returns the actions the
I/O shell (``llamad.supervisor``) must carry out. Time is always passed in,
never read, so every rule here is tested with plain numbers.

The meanings follow systemd's: ``on-failure`` restarts after a non-zero exit,
a death by signal, a ready timeout or a failed health watchdog; a stop the
user asked for never restarts; more than ``start_limit_burst`` starts within
``start_limit_interval_sec`` is a crash loop and ends in ``failed`` until the
user loads or restarts the model.

A server may also depend on something it does not run: the RPC workers a
model is split over, or the remote server a model stands for. ``Blocked``
says such a dependency went away: a running server is stopped (it could only
fail or hang) and counted as a failure; while blocked, the machine waits in
``backoff`` without starting, and ``Unblocked`` starts it again. Waiting
costs no start, so a worker that is away for a minute does not end in a
crash loop.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, assert_never

from llamad.config import Supervision
from llamad.protocol import ExitInfo, ModelState

# ----------------------------------------------------------- restart policy


@dataclass(frozen=True)
class RestartAfter:
    delay: float


@dataclass(frozen=True)
class GiveUp:
    reason: str


@dataclass(frozen=True)
class StayStopped:
    pass


RestartDecision = RestartAfter | GiveUp | StayStopped


def backoff_delay(policy: Supervision, consecutive_failures: int) -> float:
    """``restart_sec`` doubled per consecutive failure, capped."""
    exponent = max(consecutive_failures - 1, 0)
    # Cap the exponent so a long-lived crash counter cannot overflow the float.
    delay = policy.restart_sec * (2.0 ** min(exponent, 62))
    return min(delay, policy.restart_max_delay_sec)


def decide_restart(
    policy: Supervision,
    *,
    failed: bool,
    start_times: Sequence[float],
    consecutive_failures: int,
    now: float,
) -> RestartDecision:
    """What to do after the process ended without the user asking.

    ``start_times`` are the monotonic times of the starts counted against the
    start limit; ``consecutive_failures`` counts this failure too.
    """
    if policy.restart == "no" or (policy.restart == "on-failure" and not failed):
        return StayStopped()
    recent = [t for t in start_times if now - t < policy.start_limit_interval_sec]
    if len(recent) >= policy.start_limit_burst:
        return GiveUp(
            f"crash loop: {len(recent)} starts within "
            f"{policy.start_limit_interval_sec:g} s; restarting stopped"
        )
    return RestartAfter(backoff_delay(policy, consecutive_failures))


# ------------------------------------------------------------- health probes

HEALTH_PROBE_TIMEOUT_MAX_SEC = 2.0


def health_probe_timeout(policy: Supervision) -> float:
    """How long one ``/health`` probe may take: half the interval, at most 2 s.

    Shorter than the interval, so probes keep their beat when the server hangs.
    """
    return min(policy.health_interval_sec / 2, HEALTH_PROBE_TIMEOUT_MAX_SEC)


def hang_detection_bound(policy: Supervision) -> float:
    """Seconds from a server hanging to llamad deciding to replace it (at most).

    ``health_failures`` probes must miss; the last one ends when its timeout
    does. The stop that follows takes up to ``stop_timeout_sec`` more.
    """
    return policy.health_interval_sec * policy.health_failures + health_probe_timeout(policy)


# ------------------------------------------------------------ state machine


class Timer(Enum):
    READY_TIMEOUT = "ready_timeout"
    BACKOFF = "backoff"
    STOP_TIMEOUT = "stop_timeout"


# Events, fed to ModelMachine.handle by the shell.


@dataclass(frozen=True)
class StartRequested:
    """The user asked for the model (load). Clears a failed state."""


@dataclass(frozen=True)
class RestartRequested:
    """The user asked for a fresh process."""


@dataclass(frozen=True)
class StopRequested:
    """The user asked for the model to stop; it will not be restarted.

    ``graceful=False`` is for a server already drained for a switch: it has
    nothing left to flush, and llama-server's graceful exit is a fixed ~110 ms
    wait (its HTTP library's poll interval) that every switch would pay.
    """

    reason: str = "stop requested"
    graceful: bool = True


@dataclass(frozen=True)
class Spawned:
    pid: int


@dataclass(frozen=True)
class SpawnFailed:
    reason: str


@dataclass(frozen=True)
class BecameReady:
    pass


@dataclass(frozen=True)
class HealthProbed:
    ok: bool


@dataclass(frozen=True)
class Exited:
    code: int | None = None
    signal: int | None = None
    detail: str = ""  # the server's own last error line, when it died starting


@dataclass(frozen=True)
class TimerFired:
    timer: Timer
    token: int


@dataclass(frozen=True)
class Blocked:
    """Something the server needs went away; ``reason`` names it (``worker X is not ...``)."""

    reason: str


@dataclass(frozen=True)
class Unblocked:
    """Everything the server needs answers again."""


@dataclass(frozen=True)
class SpawnBlocked:
    """The process was not started: the check before spawning found ``reason``."""

    reason: str


Event = (
    StartRequested
    | RestartRequested
    | StopRequested
    | Spawned
    | SpawnFailed
    | BecameReady
    | HealthProbed
    | Exited
    | TimerFired
    | Blocked
    | Unblocked
    | SpawnBlocked
)


# Actions, returned to the shell.


@dataclass(frozen=True)
class Spawn:
    pass


@dataclass(frozen=True)
class SignalGroup:
    signal: int


@dataclass(frozen=True)
class SetTimer:
    """Replace the single pending timer; fire ``TimerFired(timer, token)`` after ``delay``."""

    timer: Timer
    delay: float
    token: int


@dataclass(frozen=True)
class CancelTimer:
    pass


Action = Spawn | SignalGroup | SetTimer | CancelTimer

_AfterStop = Literal["stay", "start", "policy"]


@dataclass
class ModelMachine:
    """One llama-server's lifecycle. Not thread-safe; owned by one supervisor task."""

    policy: Supervision
    now: float
    state: ModelState = "stopped"
    reason: str = ""
    pid: int | None = None
    restarts: int = 0
    last_exit: ExitInfo | None = None
    started_at: float | None = None
    ready_at: float | None = None
    ready_seconds: float | None = None
    since: float = field(init=False)
    _start_times: list[float] = field(default_factory=list)
    _consecutive_failures: int = 0
    _health_misses: int = 0
    _after_stop: _AfterStop = "stay"
    _failure_reason: str = ""
    _timer_token: int = 0
    blocked: str = ""  # why a dependency is missing; "" when everything answers
    _waiting: bool = False  # in backoff, waiting for Unblocked rather than a timer

    def __post_init__(self) -> None:
        self.since = self.now

    # -- helpers

    def _enter(self, state: ModelState, now: float, reason: str = "") -> None:
        self.state = state
        self.since = now
        self.reason = reason

    def _timer(self, timer: Timer, delay: float) -> SetTimer:
        self._timer_token += 1
        return SetTimer(timer, delay, self._timer_token)

    def _cancel_timer(self) -> CancelTimer:
        # Bumping the token turns an already-fired, still-queued timer event stale.
        self._timer_token += 1
        return CancelTimer()

    def _wait_unblocked(self, now: float) -> list[Action]:
        self._waiting = True
        self._enter("backoff", now, f"{self.blocked}; starting again when it answers")
        return []

    def _spawn(self, now: float, reason: str = "") -> list[Action]:
        if self.blocked:
            return self._wait_unblocked(now)
        self._waiting = False
        self._start_times.append(now)
        self.started_at = now
        self.ready_at = None
        self.pid = None
        self._health_misses = 0
        self._enter("starting", now, reason)
        return [Spawn(), self._timer(Timer.READY_TIMEOUT, self.policy.ready_timeout_sec)]

    def _terminate(
        self, now: float, after: _AfterStop, reason: str, *, graceful: bool = True
    ) -> list[Action]:
        self._after_stop = after
        self._enter("stopping", now, reason)
        if not graceful:
            return [
                SignalGroup(signal.SIGKILL),
                self._timer(Timer.STOP_TIMEOUT, self.policy.stop_timeout_sec),
            ]
        # SIGCONT lets a SIGSTOPped (hung) server act on the SIGTERM it was sent.
        return [
            SignalGroup(signal.SIGTERM),
            SignalGroup(signal.SIGCONT),
            self._timer(Timer.STOP_TIMEOUT, self.policy.stop_timeout_sec),
        ]

    def _reset_failures(self) -> None:
        self._start_times.clear()
        self._consecutive_failures = 0
        self.restarts = 0

    def _after_failure(self, now: float, what: str, *, failed: bool) -> list[Action]:
        """The process is gone without the user asking: apply the policy."""
        self.pid = None
        if self.ready_at is not None and now - self.ready_at >= self.policy.stable_after_sec:
            # A run that stayed up for a while was healthy: forget the old crashes.
            self._reset_failures()
        if failed:
            self._consecutive_failures += 1
        decision = decide_restart(
            self.policy,
            failed=failed,
            start_times=self._start_times,
            consecutive_failures=self._consecutive_failures,
            now=now,
        )
        match decision:
            case StayStopped():
                self._enter("stopped", now, what)
                return []
            case GiveUp(reason):
                self._enter("failed", now, f"{reason}; last: {what}")
                return []
            case RestartAfter(delay):
                self.restarts += 1
                self._enter("backoff", now, f"{what}; restarting in {delay:.3g} s")
                return [self._timer(Timer.BACKOFF, delay)]
            case _:
                assert_never(decision)

    # -- the transition function

    def handle(self, event: Event, now: float) -> list[Action]:
        match event:
            case StartRequested():
                if self.state in ("stopped", "failed", "backoff"):
                    self._reset_failures()
                    cancel = [self._cancel_timer()] if self.state == "backoff" else []
                    return cancel + self._spawn(now)
                if self.state == "stopping":
                    self._after_stop = "start"
                return []
            case RestartRequested():
                if self.state in ("starting", "ready"):
                    self._reset_failures()
                    return self._terminate(now, "start", "restart requested")
                return self.handle(StartRequested(), now)
            case StopRequested(reason, graceful):
                if self.state in ("starting", "ready"):
                    return self._terminate(now, "stay", reason, graceful=graceful)
                if self.state == "stopping":
                    self._after_stop = "stay"
                    return []
                if self.state in ("backoff", "failed"):
                    self._waiting = False
                    self._enter("stopped", now, reason)
                    return [self._cancel_timer()]
                return []
            case Blocked(reason):
                self.blocked = reason
                if self.state in ("starting", "ready"):
                    # Nothing to flush: a server whose worker is gone can only fail
                    # or hang, and its graceful exit would wait on the lost worker.
                    self._failure_reason = reason
                    return self._terminate(now, "policy", reason, graceful=False)
                if self.state == "stopping" and self._after_stop == "policy":
                    # Found while stopping for a failure (missed health checks): the cause.
                    self._failure_reason = f"{reason} ({self._failure_reason})"
                if self._waiting:
                    return self._wait_unblocked(now)
                return []
            case Unblocked():
                self.blocked = ""
                if self.state == "backoff" and self._waiting:
                    return self._spawn(now, self.reason)
                return []
            case SpawnBlocked(reason):
                self.blocked = reason
                if self.state != "starting" or self.pid is not None:
                    return []
                return [self._cancel_timer(), *self._after_failure(now, reason, failed=True)]
            case Spawned(pid):
                self.pid = pid
                return []
            case SpawnFailed(reason):
                if self.state != "starting":
                    return []
                # A start that cannot work on a retry either: a binary that cannot
                # be executed, a port another process holds, a runtime dir not ours.
                self.pid = None
                self._enter("failed", now, reason)
                return [self._cancel_timer()]
            case BecameReady():
                if self.state != "starting":
                    return []
                self.ready_at = now
                if self.started_at is not None:
                    self.ready_seconds = now - self.started_at
                self._enter("ready", now)
                return [self._cancel_timer()]
            case HealthProbed(ok):
                if self.state != "ready":
                    return []
                if ok:
                    self._health_misses = 0
                    return []
                self._health_misses += 1
                if self._health_misses < self.policy.health_failures:
                    return []
                self._failure_reason = f"health check failed {self._health_misses} times in a row"
                return self._terminate(now, "policy", self._failure_reason)
            case Exited(code, sig, detail):
                return self._on_exit(ExitInfo(code=code, signal=_signal_name(sig)), now, detail)
            case TimerFired(timer, token):
                if token != self._timer_token:
                    return []  # superseded while it was on its way
                return self._on_timer(timer, now)
            case _:
                assert_never(event)

    def _on_exit(self, exit_info: ExitInfo, now: float, detail: str = "") -> list[Action]:
        self.last_exit = exit_info
        what = exit_info.describe()
        match self.state:
            case "stopping":
                cancel = self._cancel_timer()
                after = self._after_stop
                self._after_stop = "stay"
                self.pid = None
                if after == "start":
                    return [cancel, *self._spawn(now)]
                if after == "policy":
                    return [cancel, *self._after_failure(now, self._failure_reason, failed=True)]
                self._enter("stopped", now, self.reason)
                return [cancel]
            case "starting" | "ready":
                # Gone before it served at all is a failure whatever the code (rpc-server
                # exits 0 when its port is taken).
                failed = (
                    exit_info.signal is not None or exit_info.code != 0 or self.state == "starting"
                )
                if self.state == "starting":
                    what = f"{what} before it was ready"
                    if detail:
                        what = f"{what}: {detail}"
                return [self._cancel_timer(), *self._after_failure(now, what, failed=failed)]
            case "stopped" | "backoff" | "failed":
                return []  # no process of ours was running; nothing to react to
            case _:
                assert_never(self.state)

    def _on_timer(self, timer: Timer, now: float) -> list[Action]:
        match timer:
            case Timer.READY_TIMEOUT if self.state == "starting":
                self._failure_reason = (
                    f"not ready after {self.policy.ready_timeout_sec:g} s (ready_timeout_sec)"
                )
                return self._terminate(now, "policy", self._failure_reason)
            case Timer.BACKOFF if self.state == "backoff":
                return self._spawn(now, self.reason)
            case Timer.STOP_TIMEOUT if self.state == "stopping":
                self.reason = (
                    f"{self.reason}; still running after "
                    f"{self.policy.stop_timeout_sec:g} s, sent SIGKILL"
                )
                return [SignalGroup(signal.SIGKILL)]
            case _:
                return []


def _signal_name(number: int | None) -> str | None:
    if number is None:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
