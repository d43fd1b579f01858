"""What the model pool needs of a model's server, whoever runs it.

A model is served either by a llama-server llamad supervises on this machine
(``llamad.supervisor.ModelSupervisor``) or by a server it does not run: another
llamad, a llama-server elsewhere, any OpenAI-compatible API
(``llamad.remote.RemoteServer``). The pool, the chat engine and the dispatcher
see both through ``ModelServer``, so a remote model loads, queues, drains and
reports like a local one.

``InFlight`` is the one piece both share outright: the requests being served,
counted so that nothing evicts a model under them, and cancelled with the
reason when the model must stop anyway.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

import httpx
import trio

from llamad.config import ModelConfig
from llamad.errors import RequestCancelled
from llamad.protocol import ModelState, ModelStatus


class Endpoint(Protocol):
    """Where a server answers, as requests address it and as people read it."""

    @property
    def base_url(self) -> str: ...

    def describe(self) -> str: ...


class ModelServer(Protocol):
    """One model's server as the pool uses it: a state, requests, start and stop."""

    model: ModelConfig
    output: deque[str]  # recent lines of its log (llama-server's, or llamad's about a remote)
    on_change: Callable[[], None] | None  # called after every change of state

    @property
    def endpoint(self) -> Endpoint: ...

    @property
    def state(self) -> ModelState: ...

    @property
    def reason(self) -> str: ...

    @property
    def ready_seconds(self) -> float | None: ...

    @property
    def in_flight(self) -> set[trio.CancelScope]: ...

    @property
    def client(self) -> httpx.AsyncClient:
        """The HTTP client for requests (a lease's): llama-server's OpenAI-style API."""
        ...

    def status(self) -> ModelStatus: ...

    def keep_lines(self, count: int) -> None:
        """Keep the last ``count`` lines of its log from now on."""

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Serve until cancelled; ``task_status.started()`` once it takes requests."""
        ...

    async def precheck(self) -> None:
        """Refuse, with the reason, a start that cannot work (before anything is evicted)."""
        ...

    def start(self) -> int: ...

    def restart(self) -> int: ...

    def stop(self, reason: str = ..., *, graceful: bool = ...) -> int: ...

    async def stop_and_wait(self, reason: str = ..., *, graceful: bool = ...) -> None: ...

    async def drain(self, seconds: float, why: str) -> None: ...

    def hold(self) -> contextlib.AbstractContextManager[trio.CancelScope]: ...

    def update_config(self, model: ModelConfig) -> None:
        """New settings that do not change the server (tools, restart policy, ttl)."""
        ...


class InFlight:
    """The requests a server is serving; ``drain`` lets them finish or cancels them."""

    def __init__(self, name: str, changed: Callable[[], None]) -> None:
        self.name = name
        self.scopes: set[trio.CancelScope] = set()
        self._changed = changed  # announces the new count
        self._why = ""
        self._empty = trio.Event()
        self._empty.set()

    @contextlib.contextmanager
    def hold(self) -> Iterator[trio.CancelScope]:
        """Count one request; the body runs in the yielded scope, cancelled by ``cancel``.

        ``RequestCancelled`` then tells the caller why.
        """
        with trio.CancelScope() as scope:
            if not self.scopes:
                self._empty = trio.Event()
            self.scopes.add(scope)
            self._changed()
            try:
                yield scope
            finally:
                self.scopes.discard(scope)
                if not self.scopes:
                    self._empty.set()
                self._changed()
        if scope.cancelled_caught:
            raise RequestCancelled(
                f"request cancelled: model {self.name!r} was stopped ({self._why})"
            )

    def cancel(self, why: str) -> None:
        """Cancel every request in flight, telling each ``why``."""
        self._why = why
        for scope in list(self.scopes):
            scope.cancel()

    async def drain(self, seconds: float, why: str) -> None:
        """Give requests in flight ``seconds`` to finish, then cancel the rest."""
        with trio.move_on_after(seconds):
            await self._empty.wait()
        self.cancel(why)
