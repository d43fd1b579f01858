"""Turns requests into replies and events, for any transport.

A transport decodes a request, hands it to ``Dispatcher.dispatch`` with a
``Peer`` that can send messages back, and knows nothing of what the request
means. Errors a user can cause become one ``Error`` reply with a code; an
unexpected bug is logged with its traceback and answered ``internal``, and the
daemon carries on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from llamad import __version__
from llamad.config import Config
from llamad.errors import (
    ConfigError,
    LlamadError,
    ModelFailed,
    ModelFileMissing,
    UnknownModelError,
)
from llamad.events import LogEvent, StateEvent, Subscription
from llamad.manager import ModelManager
from llamad.protocol import (
    Error,
    ErrorCode,
    Health,
    HealthReply,
    Load,
    Loaded,
    LogLine,
    LogLines,
    Logs,
    Ok,
    Reload,
    Request,
    Restart,
    ServerMessage,
    StateChanged,
    Status,
    StatusReply,
    Subscribe,
    Unload,
)

log = logging.getLogger(__name__)


class Peer(Protocol):
    """The sending half of one client connection."""

    async def send(self, message: ServerMessage) -> None:
        """Send one message; raises ``PeerGone`` when the client has gone."""


class PeerGone(Exception):
    """The client went away; raised by ``Peer.send``, ends that connection only."""


class SubscriberTooSlow(Exception):
    """The client did not read its events fast enough and is disconnected."""


def error_code(exc: LlamadError) -> ErrorCode:
    match exc:
        case UnknownModelError():
            return "unknown_model"
        case ModelFileMissing():
            return "model_file_missing"
        case ModelFailed():
            return "model_failed"
        case ConfigError():
            return "config_error"
        case _:
            return "not_found"


class Dispatcher:
    def __init__(
        self,
        manager: ModelManager,
        background: trio.Nursery,
        reload_config: Callable[[], Awaitable[Config]],
    ) -> None:
        self.manager = manager
        self._background = background
        self._reload_config = reload_config
        self._started = time.monotonic()

    async def dispatch(self, request: Request, peer: Peer) -> None:
        try:
            await self._handle(request, peer)
        except LlamadError as exc:
            await peer.send(Error(id=request.id, code=error_code(exc), message=str(exc)))
        except (PeerGone, SubscriberTooSlow):
            raise
        except Exception:
            log.exception("internal error handling %s", type(request).__name__)
            await peer.send(
                Error(
                    id=request.id,
                    code="internal",
                    message="internal error in llamad; see `journalctl --user -u llamad`",
                )
            )

    async def _handle(self, request: Request, peer: Peer) -> None:
        manager = self.manager
        match request:
            case Status(id=rid):
                await peer.send(self.status_reply(rid))
            case Load(id=rid, model=name, wait=wait):
                await self._load(rid, name, wait, peer, restart=False)
            case Restart(id=rid, model=name, wait=wait):
                target = manager.target(name).model.name
                await self._load(rid, target, wait, peer, restart=True)
            case Unload(id=rid, model=name):
                stopped = await manager.unload(name)
                message = f"stopped {', '.join(stopped)}" if stopped else "nothing was running"
                await peer.send(Ok(id=rid, message=message))
            case Health(id=rid):
                level, summary, status = manager.health()
                await peer.send(HealthReply(id=rid, level=level, summary=summary, model=status))
            case Logs(id=rid, model=name, lines=count, follow=follow):
                supervisor = manager.target(name)
                model = supervisor.model.name
                tail = list(supervisor.output)[-count:] if count > 0 else []
                if not follow:
                    await peer.send(LogLines(id=rid, model=model, lines=tail))
                    return
                with manager.hub.subscribe(frozenset({"log"}), model=model) as subscription:
                    await peer.send(LogLines(id=rid, model=model, lines=tail))
                    await self._forward(rid, subscription, peer)
            case Reload(id=rid):
                config = await self._reload_config()
                changes = await manager.reload(config)
                summary = "; ".join(changes) if changes else "no model changed"
                await peer.send(Ok(id=rid, message=f"reloaded {config.source}: {summary}"))
            case Subscribe(id=rid, topics=topics):
                with manager.hub.subscribe(frozenset(topics)) as subscription:
                    await peer.send(Ok(id=rid, message="subscribed"))
                    await self._forward(rid, subscription, peer)

    def status_reply(self, request_id: int) -> StatusReply:
        config = self.manager.config
        return StatusReply(
            id=request_id,
            version=__version__,
            pid=os.getpid(),
            uptime=time.monotonic() - self._started,
            config_path=str(config.source or ""),
            active=self.manager.active,
            models=list(self.manager.statuses().values()),
        )

    async def _forward(self, request_id: int, subscription: Subscription, peer: Peer) -> None:
        async for event in subscription.receive:
            await peer.send(_event_message(request_id, event))
        if subscription.overflowed:
            raise SubscriberTooSlow

    async def _load(self, rid: int, name: str, wait: bool, peer: Peer, *, restart: bool) -> None:
        supervisor = self.manager.resolve(name)
        model = supervisor.model.name
        if not wait:
            self._background.start_soon(self.load_in_background, model, restart)
            await peer.send(Ok(id=rid, message=f"loading {model}"))
            return
        began = trio.current_time()
        # Errors are kept out of the nursery: trio would wrap them in an
        # ExceptionGroup, and the client deserves the plain error reply.
        failure: Exception | None = None
        with self.manager.hub.subscribe(frozenset({"state"}), model=model) as subscription:
            async with trio.open_nursery() as nursery:

                async def forward() -> None:
                    nonlocal failure
                    try:
                        await self._forward(rid, subscription, peer)
                    except (PeerGone, SubscriberTooSlow) as exc:
                        failure = exc
                        nursery.cancel_scope.cancel()

                nursery.start_soon(forward)
                try:
                    await self.manager.load(model, restart=restart)
                except LlamadError as exc:
                    failure = exc
                finally:
                    nursery.cancel_scope.cancel()
            # Events published just before the load ended are still queued; the
            # client sees them before the final reply.
            while failure is None or isinstance(failure, LlamadError):
                try:
                    event = subscription.receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                await peer.send(_event_message(rid, event))
        if failure is not None:
            raise failure
        await peer.send(
            Loaded(
                id=rid,
                model=model,
                seconds=trio.current_time() - began,
                ready_seconds=supervisor.ready_seconds or 0.0,
            )
        )

    async def load_in_background(self, model: str, restart: bool) -> None:
        try:
            await self.manager.load(model, restart=restart)
        except LlamadError as exc:
            # Clients learn of it from the state events and `status`.
            log.warning("background load of %s: %s", model, exc)


def _event_message(request_id: int, event: StateEvent | LogEvent) -> ServerMessage:
    if isinstance(event, StateEvent):
        return StateChanged(id=request_id, model=event.status)
    return LogLine(id=request_id, model=event.model, line=event.line)
