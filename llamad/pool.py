"""The model pool: several models resident under a memory budget.

Every user of a model (a chat, the HTTP API, ``load``) goes through
``ModelPool.acquire``: it queues a request, and one planner task asks the pure
``llamad.placement.plan`` what to do with the whole queue (start a model,
evict an idle one, admit a request, refuse one, look again at a given time)
and carries it out on the model servers. Once admitted, a request waits for
one of its model's ``parallel`` slots (FIFO) and holds a ``Lease`` until it is
done; the model counts it in flight meanwhile, so no eviction can cut it.

What the planner sees of each model is its supervisor's state plus what the
pool knows: memory (estimated from the GGUF before start, measured from the
process once it runs), requests in flight, last use, pinned, idle time. The
set of *expected* models (what should be running: loaded by the user or on
demand, pinned, preloaded, and not since unloaded or evicted) is what
``health`` judges, and is remembered across restarts of llamad in the data
directory.

A model is served by a llama-server of ours (``ModelSupervisor``) or by a
server elsewhere (``RemoteServer``); the pool sees both as a ``ModelServer``
(``llamad.server``). A remote one costs no local memory. A model split over
RPC workers is checked before anything is evicted for it (each worker must
answer, and a worker serves one model at a time), and watched while it runs:
a worker that goes away stops it (``backoff``, naming the worker) until the
worker answers again.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import attrs
import httpx
import msgspec
import trio

from llamad import memory, rpc
from llamad.config import Config, ModelConfig, budget_bytes
from llamad.errors import (
    DoesNotFit,
    LlamadError,
    LoadTimeout,
    ModelFailed,
    NoModelNamed,
    QueueFull,
    RemoteUnavailable,
    UnknownModelError,
    WorkerUnavailable,
)
from llamad.events import EventHub
from llamad.gguf_info import GGUFInfo, estimate_for_model, read_gguf_cached
from llamad.llama_server import Endpoint, ServerBinary, find_server_binary
from llamad.placement import (
    HOLDING,
    Admit,
    Budget,
    Evict,
    Memory,
    ModelView,
    Refuse,
    Start,
    Waiting,
    WakeAt,
    plan,
    size_text,
)
from llamad.protocol import HealthLevel, ModelMemory, ModelStatus, PoolMemory, WorkerStatus
from llamad.remote import RemoteServer
from llamad.server import ModelServer
from llamad.supervisor import ModelSupervisor
from llamad.upstream import (
    Chunk,
    UpstreamResponse,
    exchange_direct,
    exchange_httpx,
    stream_chat,
    stream_chat_direct,
)
from llamad.workers import Layers, Workers, local_share, read_layers, remote_weight

log = logging.getLogger(__name__)

MEASURE_INTERVAL_SEC = 2.0
WATCH_INTERVAL_SEC = 1.0  # how often a split model's connections to its workers are read
STATE_FILE = "pool.json"

# What a queued request hears while it waits: its model's status, or its place in line.
PoolEvent = ModelStatus | int
Estimator = Callable[[ModelConfig], Memory]
Measurer = Callable[[list[int]], dict[int, memory.Measured]]


# Once text flows, llama-server is read at most once per this window: a fast
# model's tokens then come out of one read together (one wake-up, one delta,
# one send for several tokens) instead of one each; a token waits at most this
# long, far below what a reader can see. Batching starts only where it pays
# (tokens under half a window apart, over 400 a second): with 2 ms, a model at
# 700 tokens/s was never batched and llamad spent 210-263 µs of CPU on each
# token; with 5 ms, 158-193 (bench/README.md). A slower model sees no difference.
BATCH_WINDOW_SEC = 0.005


@dataclass
class Lease:
    """One request's hold on a model: ready, a slot taken, counted in flight."""

    name: str
    config: ModelConfig
    client: httpx.AsyncClient
    scope: trio.CancelScope
    server: ModelServer

    def stream_chat(self, payload: dict[str, Any]) -> AsyncGenerator[Chunk]:
        """A streamed chat completion from this model's server.

        Straight off a socket of its own, without httpx's layers: the per-token
        path of every chat (see bench/README.md, "Where the relay's time goes").
        """
        endpoint = self.server.endpoint
        if isinstance(endpoint, Endpoint):
            return stream_chat_direct(endpoint, payload, batch_window=BATCH_WINDOW_SEC)
        # Served elsewhere: through its client, which carries the key, the remote
        # model's name and TLS.
        return stream_chat(self.client, payload)

    def exchange(
        self, method: str, target: str, body: bytes, headers: Mapping[str, str]
    ) -> AbstractAsyncContextManager[UpstreamResponse]:
        """Any request to this model's server (the HTTP API's relay), the same two ways."""
        endpoint = self.server.endpoint
        if isinstance(endpoint, Endpoint):
            return exchange_direct(
                endpoint, method, target, body, headers, batch_window=BATCH_WINDOW_SEC
            )
        return exchange_httpx(self.client, method, target, body, headers)


@dataclass(eq=False)
class _Request:
    ticket: int
    model: str
    since: float
    deadline: float
    starts_seen: int
    decided: trio.Event = field(default_factory=trio.Event)
    admitted: bool = False
    error: LlamadError | None = None


class SlotQueue:
    """A FIFO of requests waiting for one of a model's ``parallel`` slots."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = slots
        self._waiting: list[tuple[trio.Event, Callable[[int], None]]] = []

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _announce(self) -> None:
        for position, (_, report) in enumerate(self._waiting, start=1):
            report(position)

    @contextlib.asynccontextmanager
    async def slot(self, report_position: Callable[[int], None]) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            granted = trio.Event()
            entry = (granted, report_position)
            self._waiting.append(entry)
            report_position(len(self._waiting))
            try:
                await granted.wait()
            except BaseException:
                if granted.is_set():
                    self._release()  # handed a slot just as we were cancelled
                else:
                    self._waiting.remove(entry)
                    self._announce()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        if self._waiting:
            granted, _ = self._waiting.pop(0)
            granted.set()  # the slot passes straight to the next in line
            self._announce()
        else:
            self._free += 1


def gguf_estimate(model: ModelConfig) -> Memory:
    """What ``model``'s llama-server will take, from its GGUF's own header.

    Weights, KV cache, compute buffers and the process, by llama.cpp's rules
    (``llamad.gguf_info``); a file that cannot be read gets ``rough_estimate``.
    """
    if model.path is None:
        return Memory()
    info = read_gguf_cached(model.path)
    if not isinstance(info, GGUFInfo):
        return rough_estimate(model)
    projector = read_gguf_cached(model.mmproj) if model.mmproj is not None else None
    estimate = estimate_for_model(
        info, model, projector if isinstance(projector, GGUFInfo) else None
    )
    return Memory(host=estimate.host, gpu=estimate.gpu)


def rough_estimate(model: ModelConfig) -> Memory:
    """A stand-in estimate when the GGUF cannot be read: the file plus a margin."""
    if model.path is None:
        return Memory()  # served elsewhere
    try:
        size = model.path.stat().st_size
    except OSError:
        size = 0
    return Memory(host=size + 64 * 1024 * 1024)


def health_verdict(
    statuses: Mapping[str, ModelStatus], now: float, history_problem: str | None = None
) -> tuple[HealthLevel, str]:
    """OK when every expected model is ready; a planned change is never CRITICAL.

    ``ModelStatus.expected`` marks the models that should be running: loaded
    (by a user or on demand), pinned or preloaded, and not since unloaded or
    evicted on purpose. The summary names each model that is not OK. Running
    without chat history (``history_problem``) is at least a warning.
    """
    level, summary = _models_verdict(statuses, now)
    if history_problem is None:
        return level, summary
    return ("warning" if level == "ok" else level), f"{summary}; {history_problem}"


def _models_verdict(statuses: Mapping[str, ModelStatus], now: float) -> tuple[HealthLevel, str]:
    expected = [s for s in statuses.values() if s.expected]
    if not expected:
        return "ok", "llamad running, no model loaded"
    critical: list[str] = []
    warning: list[str] = []
    for status in expected:
        for_how_long = f"{max(now - status.since, 0.0):.1f} s"
        match status.state:
            case "ready":
                continue
            case "starting":
                warning.append(f"{status.name} loading for {for_how_long}")
            case "stopping":
                warning.append(f"{status.name} stopping ({status.reason})")
            case "backoff":
                warning.append(f"{status.name} restarting: {status.reason}")
            case "failed":
                critical.append(f"{status.name} failed: {status.reason}")
            case "stopped":
                why = f": {status.reason}" if status.reason else ""
                critical.append(f"{status.name} expected but stopped{why}")
    if critical:
        return "critical", "; ".join(critical + warning)
    if warning:
        return "warning", "; ".join(warning)
    ready = [s for s in expected if s.state == "ready"]
    if len(ready) == 1:
        only = ready[0]
        return "ok", f"{only.name} ready (pid {only.pid}, restarts {only.restarts})"
    return "ok", f"{len(ready)} models ready: {', '.join(s.name for s in ready)}"


def with_workers(
    level: HealthLevel, summary: str, workers: list[WorkerStatus], *, alone: bool = False
) -> tuple[HealthLevel, str]:
    """A verdict with the workers this llamad runs: failed is CRITICAL, restarting WARNING.

    ``alone``: the verdict is the workers' only (``health WORKER``, or no model configured).
    """
    critical: list[str] = []
    warning: list[str] = []
    ready: list[str] = []
    for worker in (w for w in workers if w.local):
        why = f": {worker.reason}" if worker.reason else ""
        match worker.state:
            case "ready":
                ready.append(worker.name)
            case "failed" | "stopped":
                critical.append(f"worker {worker.name} {worker.state}{why}")
            case _:
                warning.append(f"worker {worker.name} {worker.state}{why}")
    if critical:
        level = "critical"
    elif warning and level == "ok":
        level = "warning"
    problems = critical + warning
    if alone:
        parts = problems or [f"worker{'s' if len(ready) > 1 else ''} {', '.join(ready)} ready"]
        return level, "; ".join(parts)
    if level == "ok" or not problems:
        return level, summary
    return level, "; ".join([*problems, summary] if summary else problems)


class ModelPool:
    """Which models run, and every request's way to one of them."""

    def __init__(
        self,
        config: Config,
        binary: ServerBinary | None,
        sockets_dir: Path,
        hub: EventHub,
        environ: Mapping[str, str] | None = None,
        *,
        estimate: Estimator | None = None,
        measure: Measurer = memory.measure,
        state_path: Path | None = None,
        workers: Workers | None = None,
    ) -> None:
        self.config = config
        self.binary = binary  # None until a model llamad runs needs it
        self.hub = hub
        # The daemon's running workers; otherwise only workers elsewhere can be used.
        self.workers = workers or Workers(config, sockets_dir.parent / "workers", hub)
        self.last_loaded: str | None = None  # the model a `load` named last
        self.history_problem: str | None = None  # set by the daemon when history is unavailable
        self._sockets_dir = sockets_dir
        self._environ = environ
        self._estimate = estimate or gguf_estimate
        self._measure = measure
        self._state_path = state_path
        self._servers: dict[str, ModelServer] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._slots: dict[str, SlotQueue] = {}
        self._estimates: dict[str, Memory] = {}
        self._whole: dict[str, Memory] = {}  # a split model's estimate before the split
        self._layers: dict[str, Layers | None] = {}
        self._measured: dict[str, memory.Measured] = {}
        self._queue: dict[int, _Request] = {}
        self._tickets = itertools.count(1)
        self._admitted: dict[str, int] = {}  # requests admitted and not finished, per model
        self._last_used: dict[str, float] = {}
        self._keep_alive: dict[str, float | None] = {}  # the last request's keep_alive
        self._ready_since: dict[str, float] = {}
        self._was_ready: dict[str, bool] = {}
        self._starts: dict[str, int] = {}
        self._expected: dict[str, float] = {}  # name -> when it became expected (monotonic)
        self._evicted_for: dict[str, list[str]] = {}  # a starting model -> what made room
        self._unloading: set[str] = set()
        self._budget = Budget()
        self._dirty = trio.Event()
        self._nursery: trio.Nursery | None = None

    # ----------------------------------------------------------- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._budget = await trio.to_thread.run_sync(self._read_budget)
        log.info("memory budget: %s", _budget_text(self._budget))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for model in self.config.models.values():
                await self._add(model.name)
            nursery.start_soon(self._planner)
            nursery.start_soon(self._measure_forever)
            task_status.started()
            await trio.sleep_forever()

    def _read_budget(self) -> Budget:
        daemon = self.config.daemon
        return memory.resolve_budget(
            budget_bytes(daemon.memory_budget),
            budget_bytes(daemon.gpu_memory_budget),
            daemon.max_models,
        )

    def _reread_budget(self, old: Config) -> Budget:
        """The budget after a reload: "auto" is not read again where its setting did not change.

        Free memory now excludes the resident models, which placement counts
        already: reading "auto" again would count them twice.
        """
        fresh = self._read_budget()
        was, now = old.daemon, self.config.daemon
        return Budget(
            host=self._budget.host if was.memory_budget == now.memory_budget else fresh.host,
            gpu=self._budget.gpu if was.gpu_memory_budget == now.gpu_memory_budget else fresh.gpu,
            max_models=fresh.max_models,
        )

    def _server_for(self, model: ModelConfig) -> ModelServer:
        log_lines = self.config.daemon.log_lines
        if model.remote:
            return RemoteServer(model, self.hub, log_lines=log_lines)
        if self.binary is None:
            self.binary = find_server_binary(self.config.daemon.llama_server)
        addresses = self.config.rpc_addresses(model)
        preflight = functools.partial(self._workers_problem, model) if addresses else None
        return ModelSupervisor(
            model,
            self.binary,
            self._sockets_dir,
            self.hub,
            log_lines=log_lines,
            environ=self._environ,
            rpc=addresses,
            preflight=preflight,
        )

    async def _add(self, name: str) -> None:
        assert self._nursery is not None
        model = self.config.models[name]
        server = self._server_for(model)
        server.on_change = functools.partial(self._on_change, name)
        scope = trio.CancelScope()

        async def run_server(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                if isinstance(server, ModelSupervisor) and server.preflight is not None:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(functools.partial(server.run))
                        nursery.start_soon(self._watch_workers, server)
                        task_status.started()
                else:
                    await server.run(task_status=task_status)

        await self._nursery.start(run_server)
        self._servers[name] = server
        self._scopes[name] = scope
        self._starts.setdefault(name, 0)
        self._admitted.setdefault(name, 0)
        self._estimates[name] = await trio.to_thread.run_sync(self._estimate, model)
        if self.config.rpc_addresses(model) and model.path is not None:
            self._whole[name] = self._estimates[name]
            self._layers[name] = await trio.to_thread.run_sync(read_layers, model.path)
            self._estimates[name] = self._split_estimate(model)

    async def _remove(self, name: str) -> None:
        supervisor = self._servers.pop(name)
        self._expected.pop(name, None)
        await self._stop(supervisor, "removed from models.toml")
        self._scopes.pop(name).cancel()
        self._poke()

    async def shutdown(self) -> None:
        """Stop every model gracefully (drain, SIGTERM, SIGKILL after the timeout)."""
        async with trio.open_nursery() as nursery:
            for supervisor in self._servers.values():
                nursery.start_soon(self._stop, supervisor, "llamad is shutting down")

    async def restore(self) -> None:
        """Bring back, at start, what should run: pinned, preloaded, and what was loaded."""
        daemon = self.config.daemon
        wanted: list[str] = [m.name for m in self.config.models.values() if m.pinned]
        wanted += [self._name(n) for n in daemon.preload if self._known(n)]
        if daemon.default_model is not None and self._known(daemon.default_model):
            wanted.append(self._name(daemon.default_model))
        remembered = await trio.to_thread.run_sync(self._read_state)
        wanted += [n for n in remembered if n in self.config.models]
        if remembered:
            self.last_loaded = next((n for n in reversed(remembered) if self._known(n)), None)
        for name in dict.fromkeys(wanted):
            assert self._nursery is not None
            self._nursery.start_soon(self._load_quietly, name)

    async def _load_quietly(self, name: str) -> None:
        try:
            await self.load(name, remember=False)
        except RemoteUnavailable as exc:
            # Costs nothing here: it waits, and comes back when its server answers.
            log.warning("%s: %s; it starts when the server answers", name, exc.reason)
            server = self._servers.get(name)
            if isinstance(server, RemoteServer):
                self._expected.setdefault(name, trio.current_time())
                server.block(exc.reason)
                server.start()
        except LlamadError as exc:
            log.warning("could not bring back %s: %s", name, exc)
        except Exception:
            # A background load has nobody to answer: log the bug, keep the pool up.
            log.exception("internal error bringing back %s", name)

    # ------------------------------------------------------------- queries

    def _known(self, name: str) -> bool:
        try:
            self.config.resolve(name)
        except UnknownModelError:
            return False
        return True

    def _name(self, name: str) -> str:
        return self.resolve(name).name

    def resolve(self, name: str) -> ModelConfig:
        """A model by name or alias; ``UnknownModelError`` lists the configured names."""
        return self.config.resolve(name)

    def server(self, name: str) -> ModelServer:
        """``name``'s server; a model whose server a reload is replacing says so."""
        config = self.resolve(name)
        server = self._servers.get(config.name)
        if server is None:
            raise ModelFailed(config.name, "it is being reconfigured (reload); try again")
        return server

    def default_model(self) -> str:
        """The model for a request that names none: the last loaded, else the default."""
        for candidate in (self.last_loaded, self.config.daemon.default_model):
            if candidate is not None and self._known(candidate):
                return self._name(candidate)
        resident = [n for n, s in self._servers.items() if s.state == "ready"]
        if len(resident) == 1:
            return resident[0]
        raise NoModelNamed

    def default_model_or_none(self) -> str | None:
        try:
            return self.default_model()
        except NoModelNamed:
            return None

    @property
    def budget(self) -> Budget:
        return self._budget

    def statuses(self) -> dict[str, ModelStatus]:
        return {name: self._status(name) for name in self._servers}

    def pool_memory(self) -> PoolMemory:
        used = sum(
            (
                self._figure(n)
                for n, s in self._servers.items()
                if s.state in HOLDING and not s.model.remote
            ),
            Memory(),
        )
        return PoolMemory(
            budget_host=self._budget.host,
            budget_gpu=self._budget.gpu,
            max_models=self._budget.max_models,
            used_host=used.host,
            used_gpu=used.gpu,
        )

    def _status(self, name: str) -> ModelStatus:
        supervisor = self._servers[name]
        status = supervisor.status()
        estimate = self._estimates.get(name, Memory())
        measured = self._measured.get(name) if status.pid is not None else None
        now = trio.current_time()
        wall = time.time() - now
        last_used = self._last_used.get(name)
        unload_at = self._unload_at(name)
        slots = self._slots.get(name)
        config = supervisor.model
        return msgspec.structs.replace(
            status,
            memory=ModelMemory(
                estimated_host=estimate.host,
                estimated_gpu=estimate.gpu,
                measured_rss=measured.rss if measured else None,
                measured_pss=measured.pss if measured else None,
                measured_gpu=measured.gpu if measured else None,
            ),
            waiting=sum(1 for r in self._queue.values() if r.model == name)
            + (slots.waiting if slots else 0),
            last_used=wall + last_used if last_used is not None else None,
            unload_at=wall + unload_at if unload_at is not None else None,
            pinned=config.pinned,
            expected=name in self._expected,
            ctx_size=config.ctx_size,
            parallel=config.parallel,
        )

    def _unload_at(self, name: str) -> float | None:
        idle = self._idle_after(name)
        supervisor = self._servers[name]
        if idle is None or supervisor.state != "ready" or supervisor.model.pinned:
            return None
        if self._admitted.get(name) or any(r.model == name for r in self._queue.values()):
            return None
        return self._last_used.get(name, trio.current_time()) + idle

    def _idle_after(self, name: str) -> float | None:
        """Seconds idle before unloading: the last request's keep_alive, else ttl_sec."""
        if name in self._keep_alive and self._keep_alive[name] is not None:
            keep = self._keep_alive[name]
            assert keep is not None
            return None if keep < 0 else keep
        ttl = self._servers[name].model.supervision.ttl_sec
        return ttl if ttl > 0 else None

    def _figure(self, name: str) -> Memory:
        """What a model holds: the estimate, raised to what its running server was measured at.

        Not lowered: right after a load, the KV cache's pages are mostly not
        touched yet, so the process grows as conversations fill the context.
        """
        estimate = self._estimates.get(name, Memory())
        measured = self._measured.get(name)
        if measured is None:
            return estimate
        return Memory(host=max(estimate.host, measured.pss), gpu=max(estimate.gpu, measured.gpu))

    def health(self, model: str | None = None) -> tuple[HealthLevel, str, list[ModelStatus]]:
        workers = self.worker_statuses()
        if model is not None and model in self.config.workers:
            level, summary = with_workers(
                "ok", "", [w for w in workers if w.local and w.name == model], alone=True
            )
            return level, summary, []
        statuses = self.statuses()
        if model is not None:
            status = statuses[self._name(model)]
            if not status.expected and status.state == "stopped":
                # Not loaded on purpose (never asked for, unloaded, evicted, idle).
                why = f" ({status.reason})" if status.reason else ""
                return "warning", f"{status.name} is not loaded{why}", [status]
            statuses = {status.name: msgspec.structs.replace(status, expected=True)}
        # ModelStatus.since is wall-clock so clients can show it; compare like with like.
        level, summary = health_verdict(statuses, time.time(), self.history_problem)
        if model is None and any(w.local for w in workers):
            alone = not self.config.models
            level, summary = with_workers(level, summary, workers, alone=alone)
        shown = [s for s in statuses.values() if s.expected and s.state != "ready"]
        return level, summary, shown

    # ------------------------------------------------------------ planning

    def _poke(self) -> None:
        self._dirty.set()

    def _on_change(self, name: str) -> None:
        supervisor = self._servers.get(name)
        if supervisor is None:
            return
        state = supervisor.state
        now = trio.current_time()
        if state == "ready" and not self._was_ready.get(name):
            self._ready_since[name] = now
            self._last_used.setdefault(name, now)
            self._evicted_for.pop(name, None)
        if state in ("failed", "stopped") and name in self._evicted_for:
            self._bring_back(self._evicted_for.pop(name), f"{name} did not start")
        self._was_ready[name] = state == "ready"
        self._poke()

    def _bring_back(self, names: list[str], why: str) -> None:
        """Models evicted for one that then failed to start come back."""
        assert self._nursery is not None
        for evicted in names:
            if evicted in self._servers and self._servers[evicted].state == "stopped":
                log.info("bringing %s back: %s", evicted, why)
                self._nursery.start_soon(self._load_quietly, evicted)

    def _views(self) -> dict[str, ModelView]:
        return {
            name: ModelView(
                name=name,
                # Being unloaded: on its way out, as far as admitting requests goes.
                state="stopping" if name in self._unloading else supervisor.state,
                memory=self._figure(name),
                last_used=self._last_used.get(name, 0.0),
                in_flight=self._admitted.get(name, 0),
                pinned=supervisor.model.pinned,
                counted=not supervisor.model.remote,
                ready_since=self._ready_since.get(name) if supervisor.state == "ready" else None,
                idle_unload_after=self._idle_after(name),
                starts=self._starts.get(name, 0),
                reason=supervisor.reason,
            )
            for name, supervisor in self._servers.items()
        }

    async def _planner(self) -> None:
        while True:
            self._dirty = trio.Event()
            waiting = [
                Waiting(r.ticket, r.model, r.since, r.deadline, r.starts_seen)
                for r in self._queue.values()
            ]
            actions = plan(self._views(), waiting, self._budget, trio.current_time())
            wake = math.inf
            for action in actions:
                match action:
                    case Start(name):
                        self._start(name)
                    case Evict(name, reason):
                        self._evict(name, reason)
                    case Admit(ticket):
                        self._admit(ticket)
                    case Refuse(ticket, kind, message):
                        self._refuse(ticket, kind, message)
                    case WakeAt(when):
                        wake = min(wake, when)
            with trio.move_on_at(wake):
                await self._dirty.wait()

    def _start(self, name: str) -> None:
        supervisor = self._servers[name]
        self._starts[name] = self._starts.get(name, 0) + 1
        self._expected.setdefault(name, trio.current_time())
        self._keep_alive.pop(name, None)
        log.info("%s: loading (needs about %s)", name, size_text(self._figure(name).host))
        supervisor.start()
        self._save_state()

    def _evict(self, name: str, reason: str) -> None:
        self._expected.pop(name, None)
        if reason.startswith("evicted for "):
            self._evicted_for.setdefault(reason.removeprefix("evicted for "), []).append(name)
        log.info("%s: %s", name, reason)
        supervisor = self._servers[name]
        # Idle, so nothing to flush: a drained server's graceful exit is a fixed
        # wait every swap would pay. An idle unload has no one waiting: graceful.
        graceful = not reason.startswith("evicted")
        supervisor.stop(reason, graceful=graceful)
        self._save_state()

    def _admit(self, ticket: int) -> None:
        request = self._queue.pop(ticket, None)
        if request is not None:
            self._admit_now(request)

    def _admit_now(self, request: _Request) -> None:
        request.admitted = True
        self._admitted[request.model] = self._admitted.get(request.model, 0) + 1
        request.decided.set()

    def _leaving(self, name: str) -> bool:
        """Whether an idle unload of ``name`` is due (the planner would evict it now)."""
        unload_at = self._unload_at(name)
        return unload_at is not None and unload_at <= trio.current_time()

    def _refuse(self, ticket: int, kind: str, message: str) -> None:
        request = self._queue.pop(ticket, None)
        if request is None:
            return
        match kind:
            case "does_not_fit":
                request.error = DoesNotFit(request.model, message)
            case "timeout":
                request.error = LoadTimeout(request.model, message)
            case _:
                request.error = ModelFailed(request.model, message)
        request.decided.set()

    # ------------------------------------------------------------- workers

    def _holders(self, address: str, excluding: str = "") -> list[str]:
        """Our models with a llama-server that is (or may be) connected to ``address``."""
        return [
            name
            for name, server in self._servers.items()
            if name != excluding
            and server.state in ("starting", "ready", "stopping")
            and address in self.config.rpc_addresses(server.model)
        ]

    async def _workers_problem(self, model: ModelConfig) -> str | None:
        """Why ``model`` cannot start on its workers now, or None (the check before a spawn).

        Takes the server's own settings: during a reload ``self.config`` may
        already be the new one, without this model.
        """
        name = model.name
        for address in self.config.rpc_addresses(model):
            holders = self._holders(address, excluding=name)
            if holders:
                return (
                    f"worker {self.workers.name(address)} is serving model {holders[0]} "
                    "(an rpc-server serves one model at a time)"
                )
            problem = await self.workers.check(address)
            if problem is not None:
                return problem
        return None

    async def _precheck(self, config: ModelConfig) -> None:
        """Refuse a model that cannot start, before anything is evicted for it.

        The server's own check (its file; a remote server reachable and
        serving the model), then every worker it is split over: each must
        answer; another of our models holding one is stopped if it is idle
        (a worker serves one model at a time), else the load is refused.
        """
        server = self.server(config.name)
        if server.state in ("starting", "ready"):
            return  # it runs (its file mmapped, its workers watched): nothing to check per request
        await server.precheck()
        addresses = self.config.rpc_addresses(config)
        if not addresses or server.state in ("starting", "ready", "stopping"):
            return  # its own llama-server may be connected: the check before a spawn decides
        holders: dict[str, list[str]] = {a: self._holders(a, config.name) for a in addresses}
        for address in addresses:
            if not holders[address]:  # held by a model of ours: alive, and freed below
                problem = await self.workers.check(address)
                if problem is not None:
                    raise WorkerUnavailable(config.name, problem)
        if isinstance(server, ModelSupervisor):
            server.unblock()
        others = sorted({n for names in holders.values() for n in names})
        busy = [n for n in others if self._admitted.get(n) or self._servers[n].in_flight]
        if busy:
            shared = next(a for a in addresses if busy[0] in holders[a])
            raise WorkerUnavailable(
                config.name,
                f"worker {self.workers.name(shared)} is serving model {busy[0]}, which has "
                "requests in flight (an rpc-server serves one model at a time); try again when "
                "they finish",
            )
        if others:
            await self.unload(others, f"evicted for {config.name} (it needs the same workers)")
        self._estimates[config.name] = self._split_estimate(config)

    def _split_estimate(self, model: ModelConfig) -> Memory:
        """The local share of a split model's estimate, by its workers' reported memory."""
        whole = self._whole.get(model.name, self._estimates.get(model.name, Memory()))
        reports = [self.workers.report(a) for a in self.config.rpc_addresses(model)]
        devices = sum(len(r.devices) if r is not None and r.devices else 1 for r in reports)
        if model.devices and all(d.upper().startswith("RPC") for d in model.devices):
            weight = 1.0  # only RPC devices were named
        else:
            rpc_free = sum(r.free for r in reports if r is not None)
            # The GPU budget ("auto": free at start) stands for this machine's GPUs.
            weight = remote_weight(model.tensor_split, devices, rpc_free, self._budget.gpu or 0)
        return local_share(whole, self._layers.get(model.name), model.n_gpu_layers, weight)

    async def _watch_workers(self, server: ModelSupervisor) -> None:
        """Stop a split model whose worker went away; let it start when all answer again.

        Workers we run are judged by their supervisors (their exit is seen at
        once). For one elsewhere, while the model runs, its llama-server's own
        connection tells (closed by the worker's end); while the model waits,
        a handshake every ``WATCH_INTERVAL_SEC``.
        """
        name = server.model.name
        while True:
            await self.workers.wait_changed(WATCH_INTERVAL_SEC)
            addresses = self.config.rpc_addresses(server.model)
            if server.state in ("starting", "ready"):
                problem = next(
                    (p for p in map(self.workers.local_problem, addresses) if p is not None),
                    None,
                )
                elsewhere = [a for a in addresses if self.workers.local(a) is None]
                pid = server.pid
                if problem is None and elsewhere and pid is not None:
                    gone = await trio.to_thread.run_sync(rpc.connection_closed, pid, elsewhere)
                    if gone is not None:
                        problem = f"worker {gone} closed its connection (it stopped or restarted)"
                        self.workers.saw_gone(gone, "closed its connection")
                if problem is not None and server.state in ("starting", "ready"):
                    log.warning("%s: %s", name, problem)
                    server.block(problem)
            elif server.state == "backoff" and server.blocked:
                problem = await self._workers_problem(server.model)
                if problem is None:
                    server.unblock()
                elif server.state == "backoff":
                    server.block(problem)

    def worker_statuses(self) -> list[WorkerStatus]:
        """Every worker we run or a model names, with the model of ours using each."""
        serving: dict[str, str] = {}
        for name, server in self._servers.items():
            if server.state in ("starting", "ready", "stopping"):
                for address in self.config.rpc_addresses(server.model):
                    serving.setdefault(address, name)
        return self.workers.statuses(serving)

    # ------------------------------------------------------------ requests

    @contextlib.asynccontextmanager
    async def acquire(
        self,
        name: str,
        *,
        keep_alive: float | None = None,
        on_event: Callable[[PoolEvent], None] | None = None,
        slot: bool = True,
    ) -> AsyncIterator[Lease]:
        """Wait for ``name`` to be resident and a slot free; hold it until the block ends.

        Raises ``UnknownModelError``, ``ModelFileMissing``, ``ModelFailed``
        (a bad file, or a start that failed), ``DoesNotFit``, ``LoadTimeout``,
        ``QueueFull``, or ``RequestCancelled`` (the model had to stop under the
        request). With ``slot=False`` the request only waits for the model
        (``load`` does that) and takes none of its slots.
        """
        config = self.resolve(name)
        name = config.name
        await self._precheck(config)
        slots = self._slot_queue(config)
        busy = self._admitted.get(name, 0) + sum(1 for r in self._queue.values() if r.model == name)
        if slot and busy >= config.max_concurrent:
            raise QueueFull(name, config.max_concurrent)
        now = trio.current_time()
        request = _Request(
            ticket=next(self._tickets),
            model=name,
            since=now,
            deadline=now + self.config.daemon.load_timeout_sec,
            starts_seen=self._starts.get(name, 0),
        )
        if (
            self.server(name).state == "ready"
            and not self._queue
            and not self._leaving(name)
            and name not in self._unloading
        ):
            # What the planner would decide at once (nothing waits, nothing is
            # being made room for), without a round trip through its task.
            self._admit_now(request)
        else:
            self._queue[request.ticket] = request
            self._poke()
            try:
                await self._wait_decided(request, on_event)
            except BaseException:
                if request.admitted:
                    self._release(name, keep_alive)
                elif self._queue.pop(request.ticket, None) is not None:
                    self._poke()
                raise
        if request.error is not None:
            raise request.error
        try:
            supervisor = self.server(name)
            if not slot:
                with supervisor.hold() as scope:
                    yield Lease(name, config, supervisor.client, scope, supervisor)
                return
            report = on_event if on_event is not None else _ignore
            async with slots.slot(report):
                with supervisor.hold() as scope:
                    yield Lease(name, config, supervisor.client, scope, supervisor)
        finally:
            self._release(name, keep_alive)

    async def _wait_decided(
        self, request: _Request, on_event: Callable[[PoolEvent], None] | None
    ) -> None:
        if on_event is None:
            await request.decided.wait()
            return
        with self.hub.subscribe(frozenset({"state"}), key=request.model) as states:
            async with trio.open_nursery() as nursery:
                # Changes of state only: a request waiting for a model that is
                # loading wants to see it load, not every change of its counts.
                # (Read now: the planner may start the model before forward runs.)
                last = (self._servers[request.model].state, self._servers[request.model].reason)

                async def forward() -> None:
                    nonlocal last
                    async for event in states.receive:
                        status = getattr(event, "status", None)
                        if not isinstance(status, ModelStatus):
                            continue
                        if (status.state, status.reason) != last:
                            last = (status.state, status.reason)
                            on_event(self._status(status.name))

                nursery.start_soon(forward)
                await request.decided.wait()
                nursery.cancel_scope.cancel()

    def _release(self, name: str, keep_alive: float | None) -> None:
        self._admitted[name] = max(self._admitted.get(name, 0) - 1, 0)
        self._last_used[name] = trio.current_time()
        if keep_alive is not None:
            self._keep_alive[name] = keep_alive
        self._poke()

    def _slot_queue(self, config: ModelConfig) -> SlotQueue:
        queue = self._slots.get(config.name)
        if queue is None or queue.slots != config.parallel:
            queue = SlotQueue(config.parallel)
            self._slots[config.name] = queue
        return queue

    # ------------------------------------------------------------ commands

    async def load(
        self,
        name: str,
        *,
        only: bool = False,
        restart: bool = False,
        remember: bool = True,
        on_event: Callable[[PoolEvent], None] | None = None,
    ) -> ModelServer:
        """Make ``name`` resident (evicting idle models as needed) and wait until ready.

        ``only`` unloads every other model first. ``restart`` gives a ready
        model a fresh process. Raises as ``acquire`` does.
        """
        config = self.resolve(name)
        name = config.name
        await self._precheck(config)  # before --only stops anything
        if only:
            await self.unload([n for n in self._servers if n != name], "unloaded by load --only")
        supervisor = self.server(name)
        if restart and supervisor.state in ("starting", "ready", "backoff"):
            self._expected.setdefault(name, trio.current_time())
            supervisor.restart()
        self._unloading.discard(name)
        async with self.acquire(name, slot=False, on_event=on_event):
            pass
        if remember:  # only a load that worked makes the model new chats' default
            self.last_loaded = name
        self._expected.setdefault(name, trio.current_time())
        self._save_state()
        return supervisor

    async def unload(self, names: list[str] | None, why: str = "unloaded") -> list[str]:
        """Stop ``names`` (default: every model not stopped); returns what was stopped."""
        if names is None:
            chosen = [
                n for n, s in self._servers.items() if s.state != "stopped" or n in self._expected
            ]
        else:
            chosen = [self._name(n) for n in names]
        stopped: list[str] = []
        for name in chosen:
            self._expected.pop(name, None)
            if self._servers[name].state != "stopped":
                stopped.append(name)
        if self.last_loaded in chosen:
            self.last_loaded = None
        self._save_state()
        # Requests already in flight get the drain; new ones are not let in
        # meanwhile only to be cut when it ends (they wait, and load it again).
        self._unloading.update(chosen)
        self._poke()
        try:
            async with trio.open_nursery() as nursery:
                for name in chosen:
                    nursery.start_soon(self._stop, self._servers[name], why)
        finally:
            self._unloading.difference_update(chosen)
            self._poke()
        return stopped

    async def _stop(self, supervisor: ModelServer, why: str) -> None:
        if supervisor.state in ("stopped", "failed") and not supervisor.in_flight:
            if supervisor.state == "failed":
                await supervisor.stop_and_wait(why)
            return
        await supervisor.drain(supervisor.model.supervision.stop_drain_sec, why)
        await supervisor.stop_and_wait(why)

    async def reload(self, new: Config) -> list[str]:
        """Apply a new configuration; models whose server settings did not change keep running.

        Returns a short description per change for the log and the client.
        """
        changes: list[str] = []
        old = self.config
        self.config = new
        # Workers first: a model whose worker moved restarts onto the new one.
        changes += await self.workers.reload(new)
        binary_changed = old.daemon.llama_server != new.daemon.llama_server
        for name in list(self._servers):
            if name not in new.models:
                await self._remove(name)
                changes.append(f"removed {name}")
            elif (
                not binary_changed
                and _same_server(old.models[name], new.models[name])
                and old.rpc_addresses(old.models[name]) == new.rpc_addresses(new.models[name])
            ):
                if old.models[name] != new.models[name]:
                    # Only what llamad itself reads changed: the running server stays.
                    self._servers[name].update_config(new.models[name])
                    keys = _changed_keys(old.models[name], new.models[name])
                    changes.append(f"updated {name} ({', '.join(keys)}), server kept")
            elif binary_changed or old.models[name] != new.models[name]:
                was_running = self._servers[name].state not in ("stopped", "failed")
                await self._remove(name)
                await self._add(name)
                changes.append(f"changed {name}")
                if was_running:
                    self._expected[name] = trio.current_time()
                    self._servers[name].start()
        for name in new.models:
            if name not in self._servers:
                await self._add(name)
                changes.append(f"added {name}")
        budget_keys = ("memory_budget", "gpu_memory_budget", "max_models")
        if any(getattr(old.daemon, k) != getattr(new.daemon, k) for k in budget_keys):
            self._budget = await trio.to_thread.run_sync(self._reread_budget, old)
            changes.append(f"memory budget {_budget_text(self._budget)}")
        self._poke()
        return changes

    # ------------------------------------------------------- memory, state

    async def _measure_forever(self) -> None:
        while True:
            running = {
                name: s.status().pid
                for name, s in self._servers.items()
                if s.state in ("ready", "starting")
            }
            pids = {name: pid for name, pid in running.items() if pid is not None}
            # Nothing running: not even nvidia-smi is asked.
            found = (
                await trio.to_thread.run_sync(self._measure, list(pids.values())) if pids else {}
            )
            for name, pid in pids.items():
                if pid in found:
                    self._measured[name] = found[pid]
            for name in list(self._measured):
                if name not in pids:
                    del self._measured[name]
            await trio.sleep(MEASURE_INTERVAL_SEC)

    def _read_state(self) -> list[str]:
        if self._state_path is None:
            return []
        try:
            data = json.loads(self._state_path.read_text())
            return [str(n) for n in data.get("loaded", [])]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring %s: %s", self._state_path, exc)
            return []

    def _save_state(self) -> None:
        """Remember what should be running, for the next start of llamad."""
        if self._state_path is None:
            return
        loaded = sorted(self._expected, key=lambda n: self._expected[n])
        if self.last_loaded in loaded:  # last, so it is `last_loaded` again after a restart
            loaded.remove(self.last_loaded)
            loaded.append(self.last_loaded)
        tmp = self._state_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"loaded": loaded}))
            os.replace(tmp, self._state_path)
        except OSError as exc:
            log.debug("cannot save %s: %s", self._state_path, exc)


def _ignore(_event: PoolEvent) -> None:
    pass


def _budget_text(budget: Budget) -> str:
    parts = [
        f"host {size_text(budget.host)}" if budget.host is not None else "host unlimited",
    ]
    if budget.gpu is not None:
        parts.append(f"GPU {size_text(budget.gpu)}")
    if budget.max_models is not None:
        parts.append(f"at most {budget.max_models} models")
    return ", ".join(parts)


def _changed_keys(old: ModelConfig, new: ModelConfig) -> list[str]:
    keys = [
        field.name
        for field in attrs.fields(ModelConfig)
        if field.name != "supervision" and getattr(old, field.name) != getattr(new, field.name)
    ]
    keys += [
        field.name
        for field in attrs.fields(type(old.supervision))
        if getattr(old.supervision, field.name) != getattr(new.supervision, field.name)
    ]
    return keys


def _same_server(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether two settings start the same llama-server (the rest is llamad's business)."""
    same = attrs.evolve(
        old,
        tools=new.tools,
        max_tool_rounds=new.max_tool_rounds,
        pinned=new.pinned,
        max_concurrent=new.max_concurrent,
        aliases=new.aliases,
        supervision=new.supervision,
    )
    return same == new
