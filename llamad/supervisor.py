"""The I/O shell of one supervised llama-server.

``ModelSupervisor`` feeds events into the pure ``ModelMachine`` (llamad.policy)
and carries out the actions it returns: spawn a process, signal its group, arm
a timer. Per process it runs three tasks: one waits on a pidfd for the exit,
one polls ``/health`` (readiness at 10 ms, then the watchdog), one reads the
output into a ring buffer and the log. Nothing here decides policy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TypedDict

import httpx
import trio

from llamad.config import ModelConfig
from llamad.errors import RequestCancelled
from llamad.events import EventHub, LogEvent, StateEvent
from llamad.gguf_info import (
    GGUFInfo,
    estimate_for_model,
    model_warnings,
    read_gguf_cached,
)
from llamad.llama_server import (
    Endpoint,
    ServerBinary,
    build_command,
    endpoint_for,
    signal_group,
    spawn,
    write_pidfile,
)
from llamad.policy import (
    BecameReady,
    CancelTimer,
    Event,
    Exited,
    HealthProbed,
    ModelMachine,
    RestartRequested,
    SetTimer,
    SignalGroup,
    Spawn,
    Spawned,
    SpawnFailed,
    StartRequested,
    StopRequested,
    TimerFired,
)
from llamad.protocol import MemoryUse, ModelState, ModelStatus

log = logging.getLogger(__name__)

READY_POLL_SEC = 0.01  # well under the 20 ms the readiness promise allows
SETTLED: frozenset[ModelState] = frozenset({"ready", "failed", "stopped"})


def http_client(endpoint: Endpoint, timeout: float, *, keepalive: bool = True) -> httpx.AsyncClient:
    # llama-server may close a kept-alive connection after a streamed reply;
    # clients that stream pass keepalive=False rather than risk reusing one.
    limits = httpx.Limits(max_keepalive_connections=None if keepalive else 0)
    # verify=False: llama-server is plain HTTP on this machine, and the default
    # loads the CA bundle on every client (about 20 ms, blocking the event loop
    # on every chat and every model start; found by bench/relay.py).
    transport = (
        httpx.AsyncHTTPTransport(uds=str(endpoint.socket_path), limits=limits, verify=False)
        if endpoint.socket_path is not None
        else httpx.AsyncHTTPTransport(limits=limits, verify=False)
    )
    return httpx.AsyncClient(transport=transport, base_url=endpoint.base_url, timeout=timeout)


class _FileFields(TypedDict, total=False):
    """The ``ModelStatus`` fields that come from the model's file and its entry."""

    source: str
    ctx_size: int
    mmproj: str
    size: int
    quantization: str
    context_length: int | None
    memory_estimate: MemoryUse
    warnings: list[str]


class ModelSupervisor:
    """Keeps one model's llama-server in the state the user asked for."""

    def __init__(
        self,
        model: ModelConfig,
        binary: ServerBinary,
        runtime_dir: Path,
        hub: EventHub,
        *,
        log_lines: int = 1000,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model
        self.binary = binary
        self.hub = hub
        self.endpoint = endpoint_for(model, runtime_dir)
        self.pidfile = runtime_dir / f"{model.name}.pid"
        self.output: deque[str] = deque(maxlen=log_lines)
        self.waiting = 0
        self.in_flight: set[trio.CancelScope] = set()
        self._environ = environ if environ is not None else os.environ
        self._machine = ModelMachine(model.supervision, trio.current_time())
        self._events_send, self._events_receive = trio.open_memory_channel[Event](math.inf)
        self._changed = trio.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._timer_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._drain_reason = ""
        self._posted = 0  # user requests posted / handled: lets waiters skip stale states
        self._handled = 0
        self.vision: bool | None = None  # from the running server's /props
        self._file_memo: tuple[object, object, ModelConfig, _FileFields] | None = None
        self._file_status()  # read the GGUF header now, not on the first status reply

    # ---------------------------------------------------------------- queries

    @property
    def state(self) -> ModelState:
        return self._machine.state

    @property
    def reason(self) -> str:
        return self._machine.reason

    @property
    def ready_seconds(self) -> float | None:
        return self._machine.ready_seconds

    def _file_status(self) -> _FileFields:
        """What the GGUF file says, for ``status`` (read once, again when the file changes)."""
        info = read_gguf_cached(self.model.path)
        projector = read_gguf_cached(self.model.mmproj) if self.model.mmproj else None
        # The reads return the same objects while the files are unchanged.
        memo = self._file_memo
        if memo is not None and memo[0] is info and memo[1] is projector and memo[2] == self.model:
            return memo[3]
        fields: _FileFields = {"source": self.model.source, "ctx_size": self.model.ctx_size}
        if self.model.mmproj is not None:
            fields["mmproj"] = str(self.model.mmproj)
        if isinstance(info, GGUFInfo):
            estimate = estimate_for_model(
                info, self.model, projector if isinstance(projector, GGUFInfo) else None
            )
            fields["size"] = info.file_size
            fields["quantization"] = info.quantization
            fields["context_length"] = info.context_length
            fields["memory_estimate"] = MemoryUse(host=estimate.host, gpu=estimate.gpu)
            fields["warnings"] = model_warnings(info, self.model)
        elif info is not None:
            fields["warnings"] = [info.reason]
        self._file_memo = (info, projector, self.model, fields)
        return fields

    def status(self) -> ModelStatus:
        machine = self._machine
        wall_since = time.time() - (trio.current_time() - machine.since)
        return ModelStatus(
            name=self.model.name,
            state=machine.state,
            since=wall_since,
            reason=machine.reason,
            pid=machine.pid,
            restarts=machine.restarts,
            last_exit=machine.last_exit,
            ready_seconds=machine.ready_seconds,
            waiting=self.waiting,
            in_flight=len(self.in_flight),
            path=str(self.model.path),
            file_exists=self.model.path.is_file(),
            aliases=list(self.model.aliases),
            endpoint=self.endpoint.describe(),
            tools=list(self.model.tools),
            vision=self.vision if machine.state == "ready" else None,
            **self._file_status(),
        )

    # --------------------------------------------------------------- commands

    def _post_request(self, event: Event) -> int:
        self._posted += 1
        self._events_send.send_nowait(event)
        return self._posted

    def start(self) -> int:
        return self._post_request(StartRequested())

    def restart(self) -> int:
        return self._post_request(RestartRequested())

    def stop(self, reason: str = "stop requested", *, graceful: bool = True) -> int:
        return self._post_request(StopRequested(reason, graceful))

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def wait_handled(self, ticket: int) -> None:
        """Wait until request ``ticket`` has reached the state machine."""
        await self.wait_until(lambda: self._handled >= ticket)

    async def wait_settled(self, ticket: int) -> ModelState:
        """Wait until request ``ticket`` was handled and the state is final."""
        await self.wait_until(lambda: self._handled >= ticket and self.state in SETTLED)
        return self.state

    async def stop_and_wait(self, reason: str = "stop requested", *, graceful: bool = True) -> None:
        await self.wait_settled(self.stop(reason, graceful=graceful))

    async def drain(self, seconds: float, why: str) -> None:
        """Give requests in flight ``seconds`` to finish, then cancel the rest."""
        with trio.move_on_after(seconds):
            await self.wait_until(lambda: not self.in_flight)
        self._drain_reason = why
        for scope in list(self.in_flight):
            scope.cancel()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[trio.CancelScope]:
        """Hold the model for one request: waits for ready, counts as in flight.

        The body runs inside the yielded cancel scope; ``drain`` cancels it when
        the model has to stop. ``RequestCancelled`` then tells the caller why.
        """
        self.waiting += 1
        self._publish()
        try:
            await self.wait_until(lambda: self.state in ("ready", "failed", "stopped"))
        finally:
            self.waiting -= 1
        if self.state != "ready":
            self._publish()
            raise RequestCancelled(f"model {self.model.name!r} is {self.state}: {self.reason}")
        with trio.CancelScope() as scope:
            self.in_flight.add(scope)
            self._publish()
            try:
                yield scope
            finally:
                self.in_flight.discard(scope)
                self._publish()
        if scope.cancelled_caught:
            raise RequestCancelled(
                f"request cancelled: model {self.model.name!r} was stopped ({self._drain_reason})"
            )

    # ---------------------------------------------------------- the event loop

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                async for event in self._events_receive:
                    self._apply(event)
        finally:
            # Shutdown without a graceful stop (cancellation, a crash): never leave
            # a server behind. A graceful stop already reaped it.
            if self._process is not None and self._process.poll() is None:
                signal_group(self._process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._process.wait(timeout=5)
            self.pidfile.unlink(missing_ok=True)

    def _apply(self, event: Event) -> None:
        before = self._snapshot()
        actions = self._machine.handle(event, trio.current_time())
        if isinstance(event, StartRequested | RestartRequested | StopRequested):
            self._handled += 1
        for action in actions:
            match action:
                case Spawn():
                    self._spawn()
                case SignalGroup(sig):
                    if self._process is not None and self._process.poll() is None:
                        signal_group(self._process.pid, sig)
                case SetTimer(timer, delay, token):
                    self._timer_scope.cancel()
                    self._timer_scope = trio.CancelScope()
                    assert self._nursery is not None
                    self._nursery.start_soon(
                        self._fire_after, self._timer_scope, delay, TimerFired(timer, token)
                    )
                case CancelTimer():
                    self._timer_scope.cancel()
        if self._snapshot() != before:
            if self._machine.state != before[0] or self._machine.reason != before[2]:
                reason = f" ({self._machine.reason})" if self._machine.reason else ""
                log.info("%s: %s%s", self.model.name, self._machine.state, reason)
            self._publish()
        else:
            self._wake()  # a handled request may be all a waiter needs

    def _snapshot(self) -> tuple[object, ...]:
        machine = self._machine
        return (machine.state, machine.pid, machine.reason, machine.restarts)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _publish(self) -> None:
        self._wake()
        self.hub.publish(StateEvent(self.status()))

    async def _fire_after(self, scope: trio.CancelScope, delay: float, event: TimerFired) -> None:
        with scope:
            await trio.sleep(delay)
            self._events_send.send_nowait(event)

    # ------------------------------------------------------- the process itself

    def _spawn(self) -> None:
        assert self._nursery is not None
        command = build_command(self.binary.path, self.model, self.endpoint)
        if self.endpoint.socket_path is not None:
            # A socket left by a killed server would make the new one fail to bind.
            self.endpoint.socket_path.unlink(missing_ok=True)
        log.info("%s: starting %s", self.model.name, " ".join(command))
        for warning in self._file_status().get("warnings", []):
            log.warning("%s: %s", self.model.name, warning)
        try:
            process = spawn(command, self._environ, dict(self.model.env))
        except OSError as exc:
            self._events_send.send_nowait(
                SpawnFailed(f"cannot run {self.binary.path}: {exc.strerror or exc}")
            )
            return
        self._process = process
        write_pidfile(self.pidfile, process)
        self._events_send.send_nowait(Spawned(process.pid))
        assert process.stdout is not None
        output = trio.lowlevel.FdStream(os.dup(process.stdout.fileno()))
        process.stdout.close()
        probes = trio.CancelScope()
        self._nursery.start_soon(self._read_output, output)
        self._nursery.start_soon(self._probe_health, probes)
        self._nursery.start_soon(self._wait_exit, process, probes)

    async def _wait_exit(self, process: subprocess.Popen[bytes], probes: trio.CancelScope) -> None:
        pidfd = os.pidfd_open(process.pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        # The server is gone, but processes it forked may live on in its group
        # (they ignored the SIGTERM, or the server crashed): with the leader
        # dead they have nothing left to serve, and once it is reaped no stop
        # would reach them. Kill them now, while the unreaped leader still
        # holds the group id, so this can only ever hit our own group.
        signal_group(process.pid, signal.SIGKILL)
        returncode = process.wait()
        probes.cancel()
        if self._process is process:
            self._process = None
            self.pidfile.unlink(missing_ok=True)
        if returncode < 0:
            self._events_send.send_nowait(Exited(signal=-returncode))
        else:
            self._events_send.send_nowait(Exited(code=returncode))

    async def _probe_health(self, scope: trio.CancelScope) -> None:
        supervision = self.model.supervision
        with scope:
            async with http_client(
                self.endpoint, timeout=supervision.health_interval_sec
            ) as client:
                # Readiness: 503 while loading, connection refused before it binds.
                self.vision = None
                while not await _healthy(client):  # noqa: ASYNC110 - polling another process
                    await trio.sleep(READY_POLL_SEC)
                self._events_send.send_nowait(BecameReady())
                self.vision = await _accepts_images(client)
                while True:
                    await trio.sleep(supervision.health_interval_sec)
                    self._events_send.send_nowait(HealthProbed(await _healthy(client)))

    async def _read_output(self, stream: trio.lowlevel.FdStream) -> None:
        name = self.model.name
        pending = b""
        async with stream:
            while chunk := await stream.receive_some(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    self._record_line(name, raw)
        if pending:
            self._record_line(name, pending)

    def _record_line(self, name: str, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.output.append(line)
        log.info("[%s] %s", name, line)
        self.hub.publish(LogEvent(name, line))


async def _accepts_images(client: httpx.AsyncClient) -> bool | None:
    """``/props`` says whether the loaded model takes images (``--mmproj`` loaded)."""
    try:
        response = await client.get("/props")
        modalities = response.json().get("modalities") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return bool(modalities.get("vision")) if isinstance(modalities, dict) else None


async def _healthy(client: httpx.AsyncClient) -> bool:
    try:
        response = await client.get("/health")
    except httpx.HTTPError:
        return False
    return response.status_code == 200
