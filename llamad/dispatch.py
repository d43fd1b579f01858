"""Turns requests into replies and events, for any transport.

A transport decodes a request, hands it to ``Dispatcher.dispatch`` with a
``Peer`` that can send messages back, and knows nothing of what the request
means. Errors a user can cause become one ``Error`` reply with a code; an
unexpected bug is logged with its traceback and answered ``internal``, and the
daemon carries on.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, Protocol, TypeVar, assert_never

import msgspec
import trio

from llamad import __version__
from llamad.concurrency import beside, consists_of, in_thread
from llamad.conversations import ChatService
from llamad.errors import (
    BadRequest,
    ConfigError,
    ConversationBusy,
    LlamadError,
    NothingGenerating,
)
from llamad.events import ChatEvent, LogEvent, StateEvent, Subscription, WorkerEvent
from llamad.pool import ModelPool
from llamad.protocol import (
    ApproveTool,
    Cancel,
    Chat,
    ChatDone,
    ConversationReply,
    Conversations,
    DeleteConversation,
    Error,
    ExportConversation,
    Exported,
    GetConversation,
    Health,
    HealthReply,
    ListConversations,
    Load,
    Loaded,
    LogLine,
    LogLines,
    Logs,
    Ok,
    Reload,
    RenameConversation,
    Request,
    Restart,
    SearchHistory,
    SearchResults,
    ServerMessage,
    StateChanged,
    Status,
    StatusReply,
    Subscribe,
    Unload,
    Watch,
    WorkerChanged,
    conversation_handle,
    one_line,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")


class Peer(Protocol):
    """The sending half of one client connection."""

    async def send(self, message: ServerMessage) -> None:
        """Send one message; raises ``PeerGone`` when the client has gone."""


class PeerGone(Exception):
    """The client went away; raised by ``Peer.send``, ends that connection only."""


class SubscriberTooSlow(Exception):
    """The client did not read its events fast enough and is disconnected."""


# A client whose socket takes no bytes for this long is stuck, not slow: its
# connection is closed so its task and buffers are freed at once, rather than
# when (if ever) it reads again.
SEND_TIMEOUT_SEC = 10.0


def _page_limit(limit: int) -> int:
    # The history store raises ValueError for limit < 1, which came back as
    # ``internal`` with a logged traceback (found by tests/test_fuzz_transports.py;
    # also `llamactl history list -n 0`).
    if limit < 1:
        raise BadRequest(f"limit must be at least 1, not {limit}")
    return limit


# How a client disappearing shows up; worth a debug line, nothing more.
DISCONNECTS: tuple[type[BaseException], ...] = (
    PeerGone,
    SubscriberTooSlow,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
)


async def contain_client(
    serve: Callable[[], Awaitable[None]],
    what: str,
    disconnects: tuple[type[BaseException], ...] = DISCONNECTS,
) -> None:
    """Run one client's connection; whatever it does, the daemon carries on."""
    try:
        await serve()
    except Exception as exc:
        if consists_of(exc, disconnects):
            log.debug("%s went away: %r", what, exc)
        else:
            log.exception("%s failed", what)


_MAX_MESSAGE = 1000  # characters of an error reply's line


def _message(exc: LlamadError) -> str:
    """The error reply's text: one line (config errors: one per problem), bounded.

    Messages quote what the client sent (``unknown model '...'``); a 5,000-character
    model name came back whole (found by tests/test_fuzz_transports.py).
    """
    if isinstance(exc, ConfigError):
        return "\n".join(one_line(problem, _MAX_MESSAGE) for problem in exc.problems)
    return one_line(str(exc), _MAX_MESSAGE)


class Dispatcher:
    def __init__(
        self,
        pool: ModelPool,
        chat: ChatService,
        background: trio.Nursery,
        reload: Callable[[], Awaitable[str]],
        websocket: str | None = None,
    ) -> None:
        self.pool = pool
        self.chat = chat
        self.store = chat.store
        self.websocket = websocket
        self.http: str | None = None  # "host:port" of the HTTP API, when it listens
        self.api_key_file: str | None = None  # where llamad's own API key is, when keys are used
        self._background = background
        self._reload = reload
        self._started = time.monotonic()

    async def dispatch(self, request: Request, peer: Peer) -> None:
        try:
            await self._handle(request, peer)
        except LlamadError as exc:
            await peer.send(Error(id=request.id, code=exc.code, message=_message(exc)))
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
        pool = self.pool
        match request:
            case Status(id=rid):
                await peer.send(self.status_reply(rid))
            case Load(id=rid, model=name, wait=wait, only=only):
                await self._load(rid, name, wait, peer, restart=False, only=only)
            case Restart(id=rid, model=name, wait=wait):
                target = pool.resolve(name).name if name is not None else pool.default_model()
                await self._load(rid, target, wait, peer, restart=True, only=False)
            case Unload(id=rid, model=name):
                stopped = await pool.unload([name] if name is not None else None)
                message = f"stopped {', '.join(stopped)}" if stopped else "nothing was running"
                await peer.send(Ok(id=rid, message=message))
            case Health(id=rid, model=name):
                level, summary, models = pool.health(name)
                await peer.send(HealthReply(id=rid, level=level, summary=summary, models=models))
            case Logs(id=rid, model=name, lines=count, follow=follow):
                worker = pool.workers.supervisors.get(name) if name is not None else None
                if worker is not None:  # names are unique across models and workers
                    model, output = worker.name, worker.output
                else:
                    model = pool.resolve(name).name if name is not None else pool.default_model()
                    output = pool.server(model).output
                tail = list(output)[-count:] if count > 0 else []
                if not follow:
                    await peer.send(LogLines(id=rid, model=model, lines=tail))
                    return
                with pool.hub.subscribe(frozenset({"log"}), key=model) as subscription:
                    await peer.send(LogLines(id=rid, model=model, lines=tail))
                    await self._forward(rid, subscription, peer)
            case Reload(id=rid):
                # What changed, what was applied, and which keys need a restart.
                await peer.send(Ok(id=rid, message=await self._reload()))
            case Subscribe(id=rid, topics=topics):
                with pool.hub.subscribe(frozenset(topics)) as subscription:
                    await peer.send(Ok(id=rid, message="subscribed"))
                    await self._forward(rid, subscription, peer)
            case Chat(id=rid):
                await self._chat(request, peer)
            case Cancel(id=rid, conversation=prefix):
                conversation = await self._resolve(prefix)
                if not self.chat.cancel(conversation):
                    raise NothingGenerating(conversation)
                await peer.send(Ok(id=rid, message="cancelled"))
            case ApproveTool(id=rid, conversation=prefix, call=call, approve=approve):
                conversation = await self._resolve(prefix)
                self.chat.answer_approval(conversation, call, approve=approve)
                await peer.send(Ok(id=rid, message="approved" if approve else "denied"))
            case Watch(id=rid, conversation=prefix):
                conversation = await self._resolve(prefix)
                with pool.hub.subscribe(frozenset({"chat"}), key=conversation) as subscription:
                    await peer.send(Ok(id=rid, message=f"watching {conversation}"))
                    await self._forward(rid, subscription, peer)
            case ListConversations(id=rid, limit=limit, before=before):
                page, cursor = await in_thread(
                    self.store.list_conversations, _page_limit(limit), before
                )
                await peer.send(Conversations(id=rid, conversations=page, next=cursor))
            case GetConversation(id=rid, conversation=prefix, limit=limit, before=before):
                _page_limit(limit)
                conversation_id = await self._resolve(prefix)
                stored = await in_thread(self.store.get_conversation, conversation_id)
                messages, more = await in_thread(
                    self.store.get_messages, conversation_id, limit, before
                )
                await peer.send(
                    ConversationReply(id=rid, conversation=stored, messages=messages, more=more)
                )
            case RenameConversation(id=rid, conversation=prefix, title=title):
                conversation_id = await self._resolve(prefix)
                await in_thread(self.store.rename, conversation_id, title)
                handle = conversation_handle(conversation_id)
                await peer.send(Ok(id=rid, message=f"renamed {handle}"))
            case DeleteConversation(id=rid, conversation=prefix):
                conversation_id = await self._resolve(prefix)
                if self.chat.is_generating(conversation_id):
                    raise ConversationBusy(conversation_id)
                await in_thread(self.store.delete, conversation_id)
                handle = conversation_handle(conversation_id)
                await peer.send(Ok(id=rid, message=f"deleted {handle}"))
            case SearchHistory(id=rid, text=text, limit=limit):
                hits = await in_thread(self.store.search, text, _page_limit(limit))
                await peer.send(SearchResults(id=rid, hits=hits))
            case ExportConversation(id=rid, conversation=prefix, format=fmt):
                conversation_id = await self._resolve(prefix)
                export = self.store.export_markdown if fmt == "md" else self.store.export_json
                content = await in_thread(export, conversation_id)
                await peer.send(Exported(id=rid, format=fmt, content=content))
            case _:
                # A request type added to the protocol without a case here used to
                # fall through with no reply at all, leaving the client waiting
                # (met by tests/test_fuzz_transports.py). mypy checks this is
                # unreachable; at run time it becomes an ``internal`` reply.
                assert_never(request)

    async def _resolve(self, prefix: str) -> str:
        return await in_thread(self.store.resolve, prefix)

    async def _chat(self, request: Chat, peer: Peer) -> None:
        prepared = await self.chat.prepare(request)
        conversation = prepared.conversation_id
        with self.pool.hub.subscribe(frozenset({"chat"}), key=conversation) as subscription:
            self.chat.launch(prepared)
            reply = await prepared.wait_committed()  # a storage error is the answer
            async for batch in subscription.batches():
                for event in batch:
                    message = _event_message(request.id, event)
                    await peer.send(message)
                    if isinstance(message, ChatDone) and message.message.seq == reply.seq:
                        return
            if subscription.overflowed:
                raise SubscriberTooSlow

    def status_reply(self, request_id: int) -> StatusReply:
        config = self.pool.config
        return StatusReply(
            id=request_id,
            version=__version__,
            pid=os.getpid(),
            uptime=time.monotonic() - self._started,
            config_path=str(config.source or ""),
            models=list(self.pool.statuses().values()),
            websocket=self.websocket,
            http=self.http,
            api_key_file=self.api_key_file,
            memory=self.pool.pool_memory(),
            history=self.pool.history_problem,
            default_model=self.pool.default_model_or_none(),
            workers=self.pool.worker_statuses(),
        )

    async def _forward(self, request_id: int, subscription: Subscription, peer: Peer) -> None:
        async for batch in subscription.batches():
            for event in batch:
                await peer.send(_event_message(request_id, event))
        if subscription.overflowed:
            raise SubscriberTooSlow

    async def _load(
        self, rid: int, name: str, wait: bool, peer: Peer, *, restart: bool, only: bool
    ) -> None:
        model = self.pool.resolve(name).name
        if not wait:
            self._background.start_soon(self.load_in_background, model, restart, only)
            await peer.send(Ok(id=rid, message=f"loading {model}"))
            return
        began = trio.current_time()
        with self.pool.hub.subscribe(frozenset({"state"})) as subscription:
            try:
                await beside(
                    functools.partial(self.pool.load, model, restart=restart, only=only),
                    functools.partial(self._forward, rid, subscription, peer),
                )
            except LlamadError:
                await self._flush_queued(rid, subscription, peer)
                raise
            await self._flush_queued(rid, subscription, peer)
        supervisor = self.pool.server(model)
        await peer.send(
            Loaded(
                id=rid,
                model=model,
                seconds=trio.current_time() - began,
                ready_seconds=supervisor.ready_seconds or 0.0,
            )
        )

    async def _flush_queued(self, rid: int, subscription: Subscription, peer: Peer) -> None:
        """Events published just before the load ended are still queued; send them first."""
        while True:
            try:
                event = subscription.receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            await peer.send(_event_message(rid, event))

    async def load_in_background(self, model: str, restart: bool, only: bool = False) -> None:
        try:
            await self.pool.load(model, restart=restart, only=only)
        except LlamadError as exc:
            # Clients learn of it from the state events and `status`.
            log.warning("background load of %s: %s", model, exc)


def _event_message(
    request_id: int, event: StateEvent | WorkerEvent | LogEvent | ChatEvent
) -> ServerMessage:
    match event:
        case StateEvent(status):
            return StateChanged(id=request_id, model=status)
        case WorkerEvent(status):
            return WorkerChanged(id=request_id, worker=status)
        case LogEvent(model, line):
            return LogLine(id=request_id, model=model, line=line)
        case ChatEvent(_, message):
            return msgspec.structs.replace(message, id=request_id)
