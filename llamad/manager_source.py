"""The HTTP API's model source over today's single-model ``ModelManager``.

Stands in for ``llamad.pool.ModelPool`` (issue 12) until it lands, and is
deleted then: the pool has the same ``resolve`` / ``statuses`` / ``acquire``.
With one model at a time, a request for another model switches (requests in
flight on the old one get ``stop_drain_sec`` to finish); ``keep_alive`` and
``max_concurrent`` are the pool's and are ignored here.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import trio

from llamad.config import Config, ModelConfig
from llamad.llama_server import Endpoint
from llamad.manager import ModelManager
from llamad.protocol import ModelStatus
from llamad.supervisor import http_client


@dataclass
class ManagerLease:
    name: str
    config: ModelConfig
    client: httpx.AsyncClient
    scope: trio.CancelScope


class ManagerSource:
    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager
        self._clients: dict[Endpoint, httpx.AsyncClient] = {}

    @property
    def config(self) -> Config:
        return self._manager.config

    def resolve(self, name: str) -> ModelConfig:
        return self._manager.resolve(name).model

    def statuses(self) -> dict[str, ModelStatus]:
        return self._manager.statuses()

    @contextlib.asynccontextmanager
    async def acquire(
        self, name: str, *, keep_alive: float | None = None, slot: bool = True
    ) -> AsyncIterator[ManagerLease]:
        del keep_alive, slot  # the pool's business: llama-server queues for its slots here
        supervisor = await self._manager.ensure_loaded(name)
        async with supervisor.serving() as scope:
            endpoint = supervisor.endpoint
            client = self._clients.get(endpoint)
            if client is None:
                # No keep-alive: llama-server may close a connection after a stream.
                client = http_client(endpoint, 10.0, keepalive=False)
                self._clients[endpoint] = client
            yield ManagerLease(supervisor.model.name, supervisor.model, client, scope)
