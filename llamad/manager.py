"""Which models run: load, switch, unload, reload, and the health verdict.

One model runs at a time for now. A switch happens under a lock: every other
model is drained (requests in flight get ``stop_drain_sec``) and stopped before
the new one is started, so two loads racing end in one consistent state and
never two servers. Waiting for the new model to become ready happens outside
the lock, so a later ``load`` can still change its mind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import attrs
import trio

from llamad.config import Config, ModelConfig
from llamad.errors import (
    LoadSuperseded,
    ModelFailed,
    ModelFileMissing,
    NoModelNamed,
    UnknownModelError,
)
from llamad.events import EventHub
from llamad.llama_server import ServerBinary
from llamad.protocol import HealthLevel, ModelStatus
from llamad.supervisor import ModelSupervisor

log = logging.getLogger(__name__)


def health_verdict(
    active: str | None,
    statuses: Mapping[str, ModelStatus],
    now: float,
    history_problem: str | None = None,
) -> tuple[HealthLevel, str]:
    """The monitoring verdict: ok, warning (in transition) or critical (down).

    ``active`` is the model the user (or ``default_model``) asked for; with none
    asked for, nothing is expected and an idle daemon is healthy. Running
    without chat history (``history_problem``) is at least a warning.
    """
    level, summary = _models_verdict(active, statuses, now)
    if history_problem is None:
        return level, summary
    return ("warning" if level == "ok" else level), f"{summary}; {history_problem}"


def _models_verdict(
    active: str | None, statuses: Mapping[str, ModelStatus], now: float
) -> tuple[HealthLevel, str]:
    if active is None:
        running = [s.name for s in statuses.values() if s.state != "stopped"]
        if running:
            return "warning", f"no model expected but {', '.join(running)} not stopped"
        return "ok", "llamad running, no model loaded"
    status = statuses[active]
    for_how_long = f"{max(now - status.since, 0.0):.1f} s"
    match status.state:
        case "ready":
            return "ok", f"{active} ready (pid {status.pid}, restarts {status.restarts})"
        case "starting":
            return "warning", f"{active} loading for {for_how_long}"
        case "stopping":
            return "warning", f"{active} stopping ({status.reason})"
        case "backoff":
            return "warning", f"{active} restarting: {status.reason}"
        case "failed":
            return "critical", f"{active} failed: {status.reason}"
        case "stopped":
            why = f": {status.reason}" if status.reason else ""
            return "critical", f"{active} expected but stopped{why}"


class ModelManager:
    def __init__(
        self,
        config: Config,
        binary: ServerBinary,
        sockets_dir: Path,
        hub: EventHub,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.binary = binary
        self.hub = hub
        self.active: str | None = None
        self.history_problem: str | None = None  # set by the daemon when history is unavailable
        self._sockets_dir = sockets_dir
        self._environ = environ
        self._supervisors: dict[str, ModelSupervisor] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._switch_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None

    # ----------------------------------------------------------- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for model in self.config.models.values():
                await self._add(model.name)
            task_status.started()
            await trio.sleep_forever()

    async def _add(self, name: str) -> None:
        assert self._nursery is not None
        model = self.config.models[name]
        supervisor = ModelSupervisor(
            model,
            self.binary,
            self._sockets_dir,
            self.hub,
            log_lines=self.config.daemon.log_lines,
            environ=self._environ,
        )
        scope = trio.CancelScope()

        async def run_supervisor(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await supervisor.run(task_status=task_status)

        await self._nursery.start(run_supervisor)
        self._supervisors[name] = supervisor
        self._scopes[name] = scope

    async def _remove(self, name: str) -> None:
        supervisor = self._supervisors.pop(name)
        await self._stop(supervisor, "removed from models.toml")
        self._scopes.pop(name).cancel()

    async def shutdown(self) -> None:
        """Stop every model gracefully (drain, SIGTERM, SIGKILL after the timeout)."""
        async with trio.open_nursery() as nursery:
            for supervisor in self._supervisors.values():
                nursery.start_soon(self._stop, supervisor, "llamad is shutting down")

    # ------------------------------------------------------------- queries

    def resolve(self, name: str) -> ModelSupervisor:
        try:
            model = self.config.resolve(name)
        except UnknownModelError:
            raise UnknownModelError(name, list(self._supervisors)) from None
        return self._supervisors[model.name]

    def target(self, name: str | None) -> ModelSupervisor:
        """The model a request names, or the active one when it names none."""
        if name is not None:
            return self.resolve(name)
        if self.active is None:
            raise NoModelNamed
        return self._supervisors[self.active]

    def statuses(self) -> dict[str, ModelStatus]:
        return {name: s.status() for name, s in self._supervisors.items()}

    def health(self) -> tuple[HealthLevel, str, ModelStatus | None]:
        statuses = self.statuses()
        # ModelStatus.since is wall-clock so clients can show it; compare like with like.
        level, summary = health_verdict(
            self.active, statuses, time.time(), self.history_problem
        )
        model = statuses.get(self.active) if self.active is not None else None
        return level, summary, model

    # ------------------------------------------------------------ commands

    async def _stop(self, supervisor: ModelSupervisor, why: str, *, graceful: bool = True) -> None:
        if supervisor.state in ("stopped", "failed") and not supervisor.in_flight:
            if supervisor.state == "failed":
                await supervisor.stop_and_wait(why)
            return
        await supervisor.drain(supervisor.model.supervision.stop_drain_sec, why)
        await supervisor.stop_and_wait(why, graceful=graceful)

    async def load(self, name: str, *, restart: bool = False) -> ModelSupervisor:
        """Make ``name`` the one running model and wait until it is ready.

        Raises ``ModelFailed`` when it ends failed or stopped (including when a
        later load superseded this one).
        """
        supervisor = self.resolve(name)
        model = supervisor.model
        if not model.path.is_file():
            raise ModelFileMissing(model.name, str(model.path))
        self.active = model.name
        async with self._switch_lock:
            if self.active != model.name:
                raise LoadSuperseded(model.name, self.active)
            others = [
                s
                for s in self._supervisors.values()
                if s is not supervisor and s.state != "stopped"
            ]
            async with trio.open_nursery() as nursery:
                for other in others:
                    # Drained first, so nothing is lost by not waiting for a graceful exit.
                    stop = functools.partial(self._stop, graceful=False)
                    nursery.start_soon(stop, other, f"switching to {model.name}")
            ticket = supervisor.restart() if restart else supervisor.start()
            # Hold the lock until the machine has taken the request: otherwise the
            # next load would still see this model "stopped" and leave it running.
            await supervisor.wait_handled(ticket)
        state = await supervisor.wait_settled(ticket)
        if state != "ready":
            if self.active != model.name:
                raise LoadSuperseded(model.name, self.active)
            raise ModelFailed(model.name, supervisor.reason or state)
        return supervisor

    async def restart(self, name: str | None) -> ModelSupervisor:
        supervisor = self.target(name)
        return await self.load(supervisor.model.name, restart=True)

    async def unload(self, name: str | None) -> list[str]:
        """Stop ``name``, or every model that is not stopped. Returns what was stopped."""
        if name is not None:
            chosen = [self.resolve(name)]
        else:
            chosen = [s for s in self._supervisors.values() if s.state != "stopped"]
        names = [s.model.name for s in chosen]
        if name is None or self.active in names:
            self.active = None  # nothing is expected to run any more
        async with self._switch_lock, trio.open_nursery() as nursery:
            for supervisor in chosen:
                nursery.start_soon(self._stop, supervisor, "unloaded")
        return names

    async def reload(self, new: Config) -> list[str]:
        """Apply a new configuration; models whose settings did not change keep running.

        Returns a short description per change for the log and the client.
        """
        changes: list[str] = []
        async with self._switch_lock:
            old = self.config
            self.config = new
            binary_changed = old.daemon.llama_server != new.daemon.llama_server
            for name in list(self._supervisors):
                if name not in new.models:
                    await self._remove(name)
                    changes.append(f"removed {name}")
                elif not binary_changed and _same_server(old.models[name], new.models[name]):
                    if old.models[name] != new.models[name]:
                        # Only what llamad itself reads changed (the tools):
                        # the running server stays.
                        self._supervisors[name].model = new.models[name]
                        changes.append(f"updated {name}'s tools")
                elif binary_changed or old.models[name] != new.models[name]:
                    was_running = self._supervisors[name].state not in ("stopped", "failed")
                    await self._remove(name)
                    await self._add(name)
                    changes.append(f"changed {name}")
                    if was_running and self.active == name:
                        self._supervisors[name].start()
            for name in new.models:
                if name not in self._supervisors:
                    await self._add(name)
                    changes.append(f"added {name}")
            if self.active is not None and self.active not in new.models:
                self.active = None
        return changes

    async def ensure_loaded(self, name: str | None) -> ModelSupervisor:
        """The model a request names (default: the active one), loaded if it is not.

        A model that is active and starting counts as loaded: ``serving()``
        waits for it to become ready.
        """
        supervisor = self.target(name)
        if self.active != supervisor.model.name or supervisor.state in ("stopped", "failed"):
            await self.load(supervisor.model.name)
        return supervisor

    @contextlib.asynccontextmanager
    async def use(self, name: str | None) -> AsyncIterator[ModelSupervisor]:
        """Hold a model for one request, loading it first when it is not the active one."""
        supervisor = await self.ensure_loaded(name)
        async with supervisor.serving():
            yield supervisor


def _same_server(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether two settings start the same llama-server (tools are llamad's business)."""
    return attrs.evolve(old, tools=new.tools, max_tool_rounds=new.max_tool_rounds) == new
