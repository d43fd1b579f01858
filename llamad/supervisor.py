"""The I/O shell of the programs llamad supervises: llama-server and ggml-rpc-server.

``Supervisor`` feeds events into the pure ``ModelMachine`` (llamad.policy) and
carries out the actions it returns: spawn a process, signal its group, arm a
timer. Per process it runs three tasks: one waits on a pidfd for the exit,
one probes readiness and then the watchdog, one reads the output into a ring
buffer and the log (at DEBUG: ``llamactl logs`` has it). Nothing here decides
policy. What differs between the
programs (command line, probe, which output lines matter) is a ``ServerKind``;
``ModelSupervisor`` is llama-server's, with the requests a model serves.

Before a server is declared ready, llamad checks that what answered is its own
child: a private socket in the verified runtime directory, or, on a TCP port,
a listening socket that is one of the child's descriptors (another user may
have bound the port first).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol, TypedDict

import httpx
import trio

from llamad.config import ModelConfig, Supervision
from llamad.events import EventHub, HubEvent, LogEvent, StateEvent
from llamad.gguf_info import GGUFInfo, model_warnings, read_gguf_cached
from llamad.llama_server import (
    Endpoint,
    ServerBinary,
    build_command,
    check_model_file,
    endpoint_for,
    signal_group,
    spawn,
    write_pidfile,
)
from llamad.ownership import UntrustedPath, ensure_private_dir, owned_by, port_served_by
from llamad.policy import (
    BecameReady,
    Blocked,
    CancelTimer,
    Event,
    Exited,
    HealthProbed,
    ModelMachine,
    RestartRequested,
    SetTimer,
    SignalGroup,
    Spawn,
    SpawnBlocked,
    Spawned,
    SpawnFailed,
    StartRequested,
    StopRequested,
    TimerFired,
    Unblocked,
    health_probe_timeout,
)
from llamad.protocol import ExitInfo, ModelState, ModelStatus
from llamad.server import InFlight

log = logging.getLogger(__name__)

READY_POLL_SEC = 0.01  # well under the 20 ms the readiness promise allows
# How late a change of the requests in flight alone may be announced (several
# changes within it are announced once).
COUNTS_REPORT_SEC = 0.05
# llama-server's output is read this long after it starts coming, so that
# the lines it writes for each request (about nine, most while it processes
# the prompt) take one read instead of waking llamad for each, and that read
# comes after the first token. The pipe is enlarged so that its writes do not
# block meanwhile, and a read that fills its buffer is followed at once.
LLAMA_OUTPUT_DELAY_SEC = 0.05
_PIPE_SIZE = 1 << 20  # /proc/sys/fs/pipe-max-size's default
_OUTPUT_READ_BYTES = 65536
# A dead server's output ends at once (its group is killed), unless a process
# outside the group holds the pipe: then what was read must do.
OUTPUT_DRAIN_SEC = 1.0
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


class Probe(Protocol):
    """Readiness and the watchdog for one process, as its kind of server answers them."""

    async def wait_ready(self) -> None:
        """Return once the freshly spawned server serves (poll; it may not listen yet).

        Only readiness: nothing else is asked before it is known to be our own child.
        """

    async def on_ready(self) -> None:
        """Learn what the server offers, once it is known to be ours and ready."""

    async def healthy(self) -> bool:
        """One watchdog probe while ready."""


class ServerKind(Protocol):
    """What differs between the programs llamad supervises: the seam of ``Supervisor``.

    llama-server's (``LlamaServerKind``) is below; ggml-rpc-server's is in
    ``llamad.workers``. Everything else (the state machine, spawning into its
    own process group tied to llamad's life, pid files, the exit watch, the
    output ring buffer, stops and timers) is the same for every program.
    """

    def command(self) -> list[str]:
        """The argv to start it."""

    def env(self) -> Mapping[str, str]:
        """Variables added to its environment."""

    def before_spawn(self) -> None:
        """Clear what a killed predecessor may have left (a stale socket)."""

    def probe(self) -> contextlib.AbstractAsyncContextManager[Probe]:
        """The probe for one process, open while it runs."""

    def impostor(self, pid: int) -> str | None:
        """Why what answered may not be process ``pid`` (another user's), or None."""

    def keep_line(self, line: str) -> bool:
        """Whether an output line goes into the ring buffer and ``llamactl logs``."""

    @property
    def output_delay(self) -> float:
        """Seconds to let its output gather before reading it (0: as it comes)."""


class MachineShell:
    """Carries out a ``ModelMachine``'s timers and the user's requests; no process.

    ``Supervisor`` adds a process; ``llamad.remote.RemoteServer`` a server it
    does not run. Subclasses carry out ``Spawn`` and ``SignalGroup`` and say
    what event announces a change of state.
    """

    def __init__(self, name: str, policy: Supervision, hub: EventHub, *, log_lines: int) -> None:
        self.name = name
        self.hub = hub
        self.output: deque[str] = deque(maxlen=log_lines)
        # Called after every change of state (the pool plans again on it).
        self.on_change: Callable[[], None] | None = None
        self._machine = ModelMachine(policy, trio.current_time())
        self._events_send, self._events_receive = trio.open_memory_channel[Event](math.inf)
        self._changed = trio.Event()
        self._timer_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._posted = 0  # user requests posted / handled: lets waiters skip stale states
        self._handled = 0
        self._counts_changed = trio.Event()

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

    @property
    def last_exit(self) -> ExitInfo | None:
        return self._machine.last_exit

    @property
    def blocked(self) -> str:
        """Why a dependency (a worker, the remote server) is missing; "" when none is."""
        return self._machine.blocked

    def _wall_since(self) -> float:
        return time.time() - (trio.current_time() - self._machine.since)

    # --------------------------------------------------------------- commands

    def _post_request(self, event: Event) -> int:
        """Apply a user request at once, so whoever asked sees the new state now.

        (The pool decides from states: a start still queued would look
        "stopped" to it and be asked for twice.)
        """
        self._posted += 1
        self._apply(event)
        return self._posted

    def start(self) -> int:
        return self._post_request(StartRequested())

    def restart(self) -> int:
        return self._post_request(RestartRequested())

    def stop(self, reason: str = "stop requested", *, graceful: bool = True) -> int:
        return self._post_request(StopRequested(reason, graceful))

    def block(self, reason: str) -> None:
        """A dependency went away (``reason`` names it): stop, and wait for ``unblock``."""
        if reason != self._machine.blocked:
            self._apply(Blocked(reason))

    def unblock(self) -> None:
        """Every dependency answers again; a server waiting for them starts."""
        if self._machine.blocked:
            self._apply(Unblocked())

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

    # ---------------------------------------------------------- the event loop

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._report_counts)
                task_status.started()
                async for event in self._events_receive:
                    self._apply(event)
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()

    async def _cleanup(self) -> None:
        """What must not outlive the shell (a process, a client)."""

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
                    self._signal(sig)
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
                log.info("%s: %s%s", self.name, self._machine.state, reason)
            self._publish()
        else:
            self._wake()  # a handled request may be all a waiter needs

    def _spawn(self) -> None:
        raise NotImplementedError

    def _signal(self, sig: int) -> None:
        raise NotImplementedError

    def _event(self) -> HubEvent:
        """What announces this server's new state on the hub."""
        raise NotImplementedError

    def _snapshot(self) -> tuple[object, ...]:
        machine = self._machine
        return (machine.state, machine.pid, machine.reason, machine.restarts)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        if self.on_change is not None:
            self.on_change()

    def _publish(self) -> None:
        self._wake()
        self.hub.publish(self._event())

    def _count_changed(self) -> None:
        """A count (requests in flight) changed: announced within ``COUNTS_REPORT_SEC``.

        Not at once: a chat's start would pay for building and delivering the
        status (and for waking every watcher) before its request reached the
        model, and its end before ``chat_done``. Drains and the pool's plans
        do not wait for this; they use the counts themselves.
        """
        self._counts_changed.set()

    async def _report_counts(self) -> None:
        while True:
            await self._counts_changed.wait()
            await trio.sleep(COUNTS_REPORT_SEC)
            self._counts_changed = trio.Event()
            self.hub.publish(self._event())

    async def _fire_after(self, scope: trio.CancelScope, delay: float, event: TimerFired) -> None:
        with scope:
            await trio.sleep(delay)
            self._events_send.send_nowait(event)

    def keep_lines(self, count: int) -> None:
        """Keep the last ``count`` output lines from now on (``[daemon] log_lines``)."""
        if count != self.output.maxlen:
            self.output = deque(self.output, maxlen=count)

    def _record_line(self, line: str, *, keep: bool = True) -> None:
        # DEBUG: its chatter would drown llamad's own lines; `llamactl logs` keeps them.
        log.debug("[%s] %s", self.name, line)
        if keep:
            self.output.append(line)
            self.hub.publish(LogEvent(self.name, line))


# Checks before a spawn: a problem (e.g. a worker that does not answer), or None.
Preflight = Callable[[], Awaitable[str | None]]


class Supervisor(MachineShell):
    """Keeps one program (llama-server, ggml-rpc-server) in the state the user asked for."""

    def __init__(
        self,
        name: str,
        kind: ServerKind,
        *,
        binary: Path,
        policy: Supervision,
        pidfile: Path,
        hub: EventHub,
        log_lines: int = 1000,
        environ: Mapping[str, str] | None = None,
        preflight: Preflight | None = None,
    ) -> None:
        super().__init__(name, policy, hub, log_lines=log_lines)
        self.kind = kind
        self.binary = binary
        self.pidfile = pidfile
        self.preflight = preflight
        self._environ = environ if environ is not None else os.environ
        self._process: subprocess.Popen[bytes] | None = None
        self._spawns = 0  # tells a preflight that finished too late from the current one

    @property
    def pid(self) -> int | None:
        return self._machine.pid

    async def _cleanup(self) -> None:
        # Shutdown without a graceful stop (cancellation, a crash): never leave
        # a server behind. A graceful stop already reaped it.
        if self._process is not None and self._process.poll() is None:
            signal_group(self._process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
        self.pidfile.unlink(missing_ok=True)

    def _signal(self, sig: int) -> None:
        if self._process is not None and self._process.poll() is None:
            signal_group(self._process.pid, sig)

    # ------------------------------------------------------- the process itself

    def _spawn(self) -> None:
        assert self._nursery is not None
        self._spawns += 1
        if self.preflight is None:
            self._start_process()
        else:
            self._nursery.start_soon(self._check_then_start, self._spawns)

    async def _check_then_start(self, spawn: int) -> None:
        assert self.preflight is not None
        problem = await self.preflight()
        if spawn != self._spawns or self.state != "starting" or self.pid is not None:
            return  # stopped or restarted meanwhile
        if problem is not None:
            self._events_send.send_nowait(SpawnBlocked(problem))
        else:
            self._start_process()

    def _start_process(self) -> None:
        assert self._nursery is not None
        command = self.kind.command()
        try:
            # The socket and the pid file go there: it must still be ours alone.
            # (Inside the runtime directory verified at start: a mode that lets
            # others in is fixed, a directory of someone else's refused.)
            ensure_private_dir(self.pidfile.parent, repair=True)
        except (UntrustedPath, OSError) as exc:
            self._events_send.send_nowait(SpawnFailed(str(exc)))
            return
        self.kind.before_spawn()
        log.info("%s: starting %s", self.name, " ".join(command))
        try:
            process = spawn(command, self._environ, self.kind.env())
        except OSError as exc:
            self._events_send.send_nowait(
                SpawnFailed(f"cannot run {self.binary}: {exc.strerror or exc}")
            )
            return
        self._process = process
        write_pidfile(self.pidfile, process)
        self._events_send.send_nowait(Spawned(process.pid))
        assert process.stdout is not None
        output = trio.lowlevel.FdStream(os.dup(process.stdout.fileno()))
        process.stdout.close()
        probes = trio.CancelScope()
        output_read = trio.Event()
        self._nursery.start_soon(self._read_output, output, output_read)
        self._nursery.start_soon(self._probe_health, process, probes)
        self._nursery.start_soon(self._wait_exit, process, probes, output_read)

    async def _wait_exit(
        self, process: subprocess.Popen[bytes], probes: trio.CancelScope, output_read: trio.Event
    ) -> None:
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
        # Why a server died before it was ready is in its own output (e.g.
        # "invalid magic characters"); the exit code alone says nothing.
        detail = ""
        if self.state == "starting":
            with trio.move_on_after(OUTPUT_DRAIN_SEC):  # its last lines may be unread yet
                await output_read.wait()
            detail = failure_line(self.output)
        if returncode < 0:
            self._events_send.send_nowait(Exited(signal=-returncode, detail=detail))
        else:
            self._events_send.send_nowait(Exited(code=returncode, detail=detail))

    async def _probe_health(
        self, process: subprocess.Popen[bytes], scope: trio.CancelScope
    ) -> None:
        policy = self._machine.policy
        with scope:
            async with self.kind.probe() as probe:
                await probe.wait_ready()
                impostor = self.kind.impostor(process.pid)
                if impostor is not None:
                    # Whatever answered is not our child: never send it a request.
                    signal_group(process.pid, signal.SIGKILL)
                    self._events_send.send_nowait(SpawnFailed(impostor))
                    return
                self._events_send.send_nowait(BecameReady())
                await probe.on_ready()
                await watch_health(
                    probe.healthy,
                    lambda ok: self._events_send.send_nowait(HealthProbed(ok)),
                    interval=policy.health_interval_sec,
                    probe_timeout=health_probe_timeout(policy),
                )

    async def _read_output(self, stream: trio.lowlevel.FdStream, done: trio.Event) -> None:
        pending = b""
        try:
            async with stream:
                with contextlib.suppress(OSError):
                    fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
                full = False  # more is waiting: no reason to let it gather
                while True:
                    await trio.lowlevel.wait_readable(stream.fileno())
                    if self.kind.output_delay and not full:
                        await trio.sleep(self.kind.output_delay)
                    chunk = await stream.receive_some(_OUTPUT_READ_BYTES)
                    if not chunk:
                        break
                    full = len(chunk) == _OUTPUT_READ_BYTES
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        self._line(raw)
            if pending:
                self._line(pending)
        finally:
            done.set()

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self._record_line(line, keep=self.kind.keep_line(line))


@dataclass
class LlamaServerKind:
    """llama-server: its command line, and ``/health`` for readiness and the watchdog."""

    model: ModelConfig
    binary: Path
    endpoint: Endpoint
    rpc: tuple[str, ...] = ()  # the RPC workers its layers are split over
    vision: bool | None = None  # from the running server's /props
    output_delay: float = LLAMA_OUTPUT_DELAY_SEC

    def command(self) -> list[str]:
        return build_command(self.binary, self.model, self.endpoint, self.rpc)

    def env(self) -> Mapping[str, str]:
        return self.model.env

    def before_spawn(self) -> None:
        if self.endpoint.socket_path is not None:
            # A socket left by a killed server would make the new one fail to bind.
            self.endpoint.socket_path.unlink(missing_ok=True)

    @contextlib.asynccontextmanager
    async def probe(self) -> AsyncIterator[Probe]:
        timeout = health_probe_timeout(self.model.supervision)
        async with http_client(self.endpoint, timeout=timeout) as client:
            self.vision = None
            yield _HealthProbe(self, client)

    def impostor(self, pid: int) -> str | None:
        if self.endpoint.port is not None:
            return port_served_by(pid, self.endpoint.port)
        path = self.endpoint.socket_path
        if path is not None and not owned_by(path):
            return f"{path} is not a socket of yours; not using it"
        return None

    def keep_line(self, line: str) -> bool:
        return True


@dataclass
class _HealthProbe:
    kind: LlamaServerKind
    client: httpx.AsyncClient

    async def wait_ready(self) -> None:
        # Readiness: 503 while loading, connection refused before it binds.
        while not await _healthy(self.client):  # noqa: ASYNC110 - polling another process
            await trio.sleep(READY_POLL_SEC)

    async def on_ready(self) -> None:
        self.kind.vision = await _accepts_images(self.client)

    async def healthy(self) -> bool:
        return await _healthy(self.client)


class _FileFields(TypedDict, total=False):
    """The ``ModelStatus`` fields that come from the model's file and its entry."""

    source: str
    ctx_size: int
    mmproj: str
    size: int
    quantization: str
    context_length: int | None
    warnings: list[str]


class ModelSupervisor(Supervisor):
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
        rpc: tuple[str, ...] = (),
        preflight: Preflight | None = None,
    ) -> None:
        self.model = model
        self.endpoint = endpoint_for(model, runtime_dir)
        self.llama = LlamaServerKind(model, binary.path, self.endpoint, rpc)
        super().__init__(
            model.name,
            self.llama,
            binary=binary.path,
            policy=model.supervision,
            pidfile=runtime_dir / f"{model.name}.pid",
            hub=hub,
            log_lines=log_lines,
            environ=environ,
            preflight=preflight,
        )
        self.requests = InFlight(model.name, self._count_changed)
        self._client: httpx.AsyncClient | None = None
        self._file_memo: tuple[object, object, ModelConfig, _FileFields] | None = None
        self._file_status()  # read the GGUF header now, not on the first status reply

    # ---------------------------------------------------------------- queries

    @property
    def in_flight(self) -> set[trio.CancelScope]:
        return self.requests.scopes

    @property
    def vision(self) -> bool | None:
        return self.llama.vision

    def status(self) -> ModelStatus:
        machine = self._machine
        path = self.model.path
        return ModelStatus(
            name=self.model.name,
            state=machine.state,
            since=self._wall_since(),
            reason=machine.reason,
            pid=machine.pid,
            restarts=machine.restarts,
            last_exit=machine.last_exit,
            ready_seconds=machine.ready_seconds,
            in_flight=len(self.in_flight),
            path=str(path or ""),
            file_exists=path is not None and path.is_file(),
            aliases=list(self.model.aliases),
            endpoint=self.endpoint.describe(),
            tools=list(self.model.tools),
            vision=self.vision if machine.state == "ready" else None,
            rpc=list(self.llama.rpc),
            **self._file_status(),
        )

    def _file_status(self) -> _FileFields:
        """What the GGUF file says, for ``status`` (read once, again when the file changes)."""
        model = self.model
        info = read_gguf_cached(model.path) if model.path is not None else None
        projector = read_gguf_cached(model.mmproj) if model.mmproj else None
        # The reads return the same objects while the files are unchanged.
        memo = self._file_memo
        if memo is not None and memo[0] is info and memo[1] is projector and memo[2] == model:
            return memo[3]
        fields: _FileFields = {"source": model.source, "ctx_size": model.ctx_size}
        if model.mmproj is not None:
            fields["mmproj"] = str(model.mmproj)
        if isinstance(info, GGUFInfo):
            fields["size"] = info.file_size
            fields["quantization"] = info.quantization
            fields["context_length"] = info.context_length
            fields["warnings"] = model_warnings(info, model)
        elif info is not None:
            fields["warnings"] = [info.reason]
        self._file_memo = (info, projector, model, fields)
        return fields

    def _start_process(self) -> None:
        for warning in self._file_status().get("warnings", []):
            log.warning("%s: %s", self.model.name, warning)
        super()._start_process()

    def _event(self) -> HubEvent:
        return StateEvent(self.status())

    # --------------------------------------------------------------- commands

    def update_config(self, model: ModelConfig) -> None:
        """New settings that do not change the server (tools, restart policy, ttl)."""
        self.model = model
        self.llama.model = model
        self._machine.policy = model.supervision

    async def precheck(self) -> None:
        """The model file is there and is a GGUF (the pool checks its workers)."""
        check_model_file(self.model)

    def block(self, reason: str) -> None:
        if reason != self.blocked and self.state in ("starting", "ready"):
            # They get the reason, not a broken connection when the server is killed.
            self.requests.cancel(reason)
        super().block(reason)

    async def drain(self, seconds: float, why: str) -> None:
        """Give requests in flight ``seconds`` to finish, then cancel the rest."""
        await self.requests.drain(seconds, why)

    def hold(self) -> contextlib.AbstractContextManager[trio.CancelScope]:
        """Count one request in flight; ``drain`` cancels its scope when the model stops.

        The body runs inside the yielded cancel scope; ``RequestCancelled``
        then tells the caller why.
        """
        return self.requests.hold()

    @property
    def client(self) -> httpx.AsyncClient:
        """The HTTP client to this server for requests (a lease's), one per supervisor.

        No read timeout: a reply may take minutes; the caller's cancel scope
        bounds it. No kept-alive connections: llama-server may close one after a
        streamed reply, and reusing it would fail the next request.
        """
        if self._client is None:
            self._client = http_client(self.endpoint, timeout=10.0, keepalive=False)
            self._client.timeout = httpx.Timeout(None, connect=10.0)
        return self._client

    async def _cleanup(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        await super()._cleanup()


async def _accepts_images(client: httpx.AsyncClient) -> bool | None:
    """``/props`` says whether the loaded model takes images (``--mmproj`` loaded)."""
    try:
        response = await client.get("/props")
        modalities = response.json().get("modalities") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return bool(modalities.get("vision")) if isinstance(modalities, dict) else None


async def watch_health(
    probe: Callable[[], Awaitable[bool]],
    report: Callable[[bool], None],
    *,
    interval: float,
    probe_timeout: float,
) -> NoReturn:
    """Probe every ``interval`` seconds on a fixed beat; each probe gets ``probe_timeout``.

    ``probe_timeout`` is shorter than ``interval``: a probe that hangs counts
    as a miss when its timeout ends and does not delay the next one, so
    ``health_failures`` misses in a row are reported within
    ``interval * failures + probe_timeout`` of the hang.
    """
    next_probe = trio.current_time()
    while True:
        next_probe = max(next_probe + interval, trio.current_time())
        await trio.sleep_until(next_probe)
        ok = False
        with trio.move_on_after(probe_timeout):
            ok = await probe()
        report(ok)


async def _healthy(client: httpx.AsyncClient) -> bool:
    try:
        response = await client.get("/health")
    except httpx.HTTPError:
        return False
    return response.status_code == 200


_FAILURE_WORDS = ("error", "failed", "invalid", "cannot", "unable", "not found", "no such")


def failure_line(output: Iterable[str], look_back: int = 40) -> str:
    """The last line of llama-server's output that says what went wrong, or ""."""
    lines = list(output)[-look_back:]
    for line in reversed(lines):
        lowered = line.lower()
        if any(word in lowered for word in _FAILURE_WORDS):
            return " ".join(line.split())[:300]
    return ""
