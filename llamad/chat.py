"""The chat engine: commit, stream from llama-server, fan out, commit again.

One chat, in order:

1. ``prepare``: the user message (and an empty assistant placeholder marked
   ``incomplete``) are committed to LMDB before anything goes upstream; only
   then is the chat acknowledged. An acknowledged message is never lost.
2. ``_generate`` (a task in the engine's nursery, so a client that disconnects
   does not stop it): wait for the model (its state events go to the
   conversation's watchers), wait for a free slot (FIFO, positions reported),
   fit the history into the context, stream ``/v1/chat/completions``,
   publish each delta, flush the partial text to disk at most every 0.5 s.
3. On the end the reply is committed ``complete``, ``cancelled`` or ``error``
   with its stats, and ``chat_done`` is published.

Every event goes through the hub under the conversation's id, so the client
that asked and any other client watching see the same stream.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from llamad.concurrency import beside, in_thread
from llamad.errors import LlamadError
from llamad.events import ChatEvent, EventHub, StateEvent
from llamad.history import HistoryStore, HistoryWriteError
from llamad.manager import ModelManager
from llamad.protocol import (
    Chat,
    ChatDelta,
    ChatDone,
    ChatStarted,
    ContextTrimmed,
    Conversation,
    Message,
    MessageStats,
    MessageStatus,
    QueuePosition,
    ServerMessage,
    StateChanged,
    TextPart,
)
from llamad.supervisor import ModelSupervisor, RequestCancelled, http_client
from llamad.upstream import (
    UpstreamError,
    context_size,
    count_tokens,
    stream_chat,
    template_overhead,
    turns_to_drop,
)

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SEC = 0.5


class ConversationBusy(LlamadError):
    def __init__(self, conversation: str) -> None:
        super().__init__(
            f"a reply is already being generated in conversation {conversation[:13]}; "
            "wait for it or cancel it first"
        )


class SlotQueue:
    """A FIFO of chats waiting for one of a model's ``parallel`` slots."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = slots
        self._waiting: deque[tuple[trio.Event, Callable[[int], None]]] = deque()

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
            granted, _ = self._waiting.popleft()
            granted.set()  # the slot passes straight to the next in line
            self._announce()
        else:
            self._free += 1


@dataclass
class Prepared:
    conversation: Conversation
    user: Message
    reply: Message
    request: Chat


@dataclass
class _Running:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cancelled_by_user: bool = False


class ChatEngine:
    def __init__(self, manager: ModelManager, store: HistoryStore, hub: EventHub) -> None:
        self.manager = manager
        self.store = store
        self.hub = hub
        self._running: dict[str, _Running] = {}
        self._slot_queues: dict[str, SlotQueue] = {}
        # Per model process: (context size, the template's cost per message).
        self._model_facts: dict[tuple[str, int | None], tuple[int, int]] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------------ public

    def is_generating(self, conversation: str) -> bool:
        return conversation in self._running

    async def prepare(self, request: Chat) -> Prepared:
        """Commit the user message (and the reply placeholder); raises on bad input."""
        parts = (
            [TextPart(text=request.content)]
            if isinstance(request.content, str)
            else request.content
        )
        if not any(part.text.strip() for part in parts):
            raise LlamadError("the message is empty; type something to send")
        if request.model is not None:
            self.manager.resolve(request.model)  # unknown model: refuse before storing anything
        if request.conversation is None:
            conversation = await in_thread(
                self.store.create_conversation,
                model=request.model,
                system_prompt=request.options.system,
            )
        else:
            conversation_id = await in_thread(self.store.resolve, request.conversation)
            conversation = await in_thread(self.store.get_conversation, conversation_id)
        if conversation.id in self._running:
            raise ConversationBusy(conversation.id)
        user = await in_thread(self.store.append_message, conversation.id, role="user", parts=parts)
        reply = await in_thread(
            self.store.append_message,
            conversation.id,
            role="assistant",
            parts=[],
            status="incomplete",
            model=request.model,
        )
        conversation = await in_thread(self.store.get_conversation, conversation.id)
        return Prepared(conversation, user, reply, request)

    def launch(self, prepared: Prepared) -> None:
        """Start generating; events go to the conversation's subscribers."""
        assert self._nursery is not None
        conversation = prepared.conversation.id
        running = _Running()
        self._running[conversation] = running
        self._publish(
            conversation,
            ChatStarted(
                id=0,
                conversation=prepared.conversation,
                user=prepared.user,
                reply_seq=prepared.reply.seq,
            ),
        )
        self._nursery.start_soon(self._generate, prepared, running)

    def cancel(self, conversation: str) -> bool:
        running = self._running.get(conversation)
        if running is None:
            return False
        running.cancelled_by_user = True
        running.scope.cancel()
        return True

    # ---------------------------------------------------------- internals

    def _publish(self, conversation: str, message: ServerMessage) -> None:
        self.hub.publish(ChatEvent(conversation, message))

    def _choose_model(self, prepared: Prepared) -> str | None:
        return (
            prepared.request.model
            or self.manager.active
            or prepared.conversation.model
            or self.manager.config.daemon.default_model
        )

    async def _generate(self, prepared: Prepared, running: _Running) -> None:
        conversation = prepared.conversation.id
        text: list[str] = []
        stats: MessageStats | None = None
        model_name = self._choose_model(prepared)
        status: MessageStatus = "incomplete"
        error = ""
        try:
            with running.scope:
                try:
                    model = await self._with_model_events(conversation, model_name)
                    async with model.serving():
                        queue = self._slot_queue(model)
                        report = functools.partial(self._report_position, conversation)
                        async with queue.slot(report):
                            stats = await self._stream(prepared, model, text)
                    status = "complete"
                except (LlamadError, UpstreamError, RequestCancelled) as exc:
                    status, error = "error", str(exc)
                    log.info("chat in %s failed: %s", conversation[:13], exc)
                except Exception:
                    log.exception("internal error in a chat")
                    status, error = "error", "internal error in llamad; see its log"
            if running.scope.cancelled_caught:
                status = "cancelled" if running.cancelled_by_user else "incomplete"
        finally:
            # Shielded: the final state must reach the disk even while llamad stops.
            with trio.CancelScope(shield=True):
                message = await self._finish(
                    prepared,
                    text="".join(text),
                    status=status,
                    stats=stats,
                    error=error,
                    model=model_name,
                )
                del self._running[conversation]
                self._publish(conversation, ChatDone(id=0, message=message))

    async def _with_model_events(self, conversation: str, name: str | None) -> ModelSupervisor:
        """The model, loaded if needed; its state changes meanwhile go to the conversation."""
        supervisor = self.manager.target(name)
        with self.hub.subscribe(frozenset({"state"}), key=supervisor.model.name) as states:

            async def forward() -> None:
                async for event in states.receive:
                    if isinstance(event, StateEvent):
                        self._publish(conversation, StateChanged(id=0, model=event.status))

            return await beside(functools.partial(self.manager.ensure_loaded, name), forward)

    def _slot_queue(self, model: ModelSupervisor) -> SlotQueue:
        queue = self._slot_queues.get(model.model.name)
        if queue is None or queue.slots != model.model.parallel:
            queue = SlotQueue(model.model.parallel)
            self._slot_queues[model.model.name] = queue
        return queue

    def _report_position(self, conversation: str, position: int) -> None:
        self._publish(
            conversation, QueuePosition(id=0, conversation=conversation, position=position)
        )

    async def _history_for_upstream(self, prepared: Prepared) -> list[Message]:
        messages = await in_thread(self.store.all_messages, prepared.conversation.id)
        # Everything before the reply being written, minus failed replies.
        return [
            m for m in messages if m.seq < prepared.reply.seq and m.status != "error" and m.text
        ]

    async def _fit(
        self,
        client: httpx.AsyncClient,
        model: ModelSupervisor,
        prepared: Prepared,
        history: list[Message],
    ) -> list[Message]:
        """Leave out the oldest turns when the history does not fit the context."""
        key = (model.model.name, model.status().pid)
        if key not in self._model_facts:
            # Both measured before either is stored: chats run concurrently, and
            # one must never see half of what another is still measuring.
            facts = (await context_size(client), await template_overhead(client))
            self._model_facts[key] = facts
        n_ctx, per_message = self._model_facts[key]
        max_tokens = prepared.request.options.max_tokens
        # Room kept for the reply; capped so a huge max_tokens still leaves the
        # history a place (llama-server stops at the context's end anyway).
        reserve = min(max_tokens if max_tokens is not None else n_ctx // 8, n_ctx // 2)
        budget = n_ctx - reserve
        system = prepared.conversation.system_prompt or ""
        texts = [system, *(m.text for m in history)] if system else [m.text for m in history]
        # A token covers at least one byte of text, so bytes bound tokens from
        # above: when they fit, no tokenizer round trip is needed.
        if sum(len(text.encode()) + per_message for text in texts) <= budget:
            return history
        turns: list[list[Message]] = []
        for message in history:
            if message.role == "user" or not turns:
                turns.append([])
            turns[-1].append(message)
        turn_tokens = []
        for turn in turns:
            tokens = 0
            for message in turn:
                tokens += await count_tokens(client, message.text) + per_message
            turn_tokens.append(tokens)
        fixed = (await count_tokens(client, system) + per_message) if system else 0
        dropped = turns_to_drop(turn_tokens, fixed, budget)
        if dropped:
            self._publish(
                prepared.conversation.id,
                ContextTrimmed(
                    id=0, conversation=prepared.conversation.id, dropped_turns=dropped, n_ctx=n_ctx
                ),
            )
        return [m for turn in turns[dropped:] for m in turn]

    async def _stream(
        self, prepared: Prepared, model: ModelSupervisor, text: list[str]
    ) -> MessageStats:
        conversation = prepared.conversation.id
        seq = prepared.reply.seq
        options = prepared.request.options
        timeout = httpx.Timeout(None, connect=10.0)
        async with http_client(model.endpoint, timeout=10.0, keepalive=False) as client:
            client.timeout = timeout
            history = await self._fit(
                client, model, prepared, await self._history_for_upstream(prepared)
            )
            messages: list[dict[str, Any]] = []
            if prepared.conversation.system_prompt:
                messages.append({"role": "system", "content": prepared.conversation.system_prompt})
            messages += [{"role": m.role, "content": m.text} for m in history]
            payload: dict[str, Any] = {"messages": messages, "stream": True}
            if options.temperature is not None:
                payload["temperature"] = options.temperature
            if options.max_tokens is not None:
                payload["max_tokens"] = options.max_tokens
            if options.seed is not None:
                payload["seed"] = options.seed
            if options.ignore_eos:
                payload["ignore_eos"] = True
            began = time.monotonic()
            first_token: float | None = None
            last_flush = began
            finish_reason: str | None = None
            timings: dict[str, Any] = {}
            usage: dict[str, Any] = {}
            async for chunk in stream_chat(client, payload):
                if chunk.text:
                    if first_token is None:
                        first_token = time.monotonic()
                    text.append(chunk.text)
                    self._publish(
                        conversation,
                        ChatDelta(id=0, conversation=conversation, seq=seq, text=chunk.text),
                    )
                finish_reason = chunk.finish_reason or finish_reason
                timings = chunk.timings or timings
                usage = chunk.usage or usage
                now = time.monotonic()
                if now - last_flush >= FLUSH_INTERVAL_SEC:
                    last_flush = now
                    await self._flush(conversation, seq, "".join(text))
        ended = time.monotonic()
        return MessageStats(
            finish_reason=finish_reason,
            prompt_tokens=timings.get("prompt_n") or usage.get("prompt_tokens"),
            completion_tokens=timings.get("predicted_n") or usage.get("completion_tokens"),
            tokens_per_second=timings.get("predicted_per_second"),
            time_to_first_token_ms=(first_token - began) * 1000 if first_token else None,
            duration_ms=(ended - began) * 1000,
        )

    async def _flush(self, conversation: str, seq: int, text: str) -> None:
        try:
            await in_thread(
                self.store.update_message, conversation, seq, parts=[TextPart(text=text)]
            )
        except HistoryWriteError as exc:
            log.error("%s", exc)  # noqa: TRY400 - a disk problem, not a bug; the final commit reports it

    async def _finish(
        self,
        prepared: Prepared,
        *,
        text: str,
        status: MessageStatus,
        stats: MessageStats | None,
        error: str,
        model: str | None,
    ) -> Message:
        conversation, seq = prepared.conversation.id, prepared.reply.seq
        try:
            return await in_thread(
                self.store.update_message,
                conversation,
                seq,
                parts=[TextPart(text=text)] if text else [],
                status=status,
                stats=stats,
                model=model,
                error=error,
            )
        except HistoryWriteError as exc:
            log.error("%s", exc)  # noqa: TRY400 - a disk problem, not a bug
            return Message(
                conversation=conversation,
                seq=seq,
                role="assistant",
                parts=[TextPart(text=text)] if text else [],
                status="error",
                model=model,
                created=time.time(),
                stats=stats,
                error=str(exc),
            )
