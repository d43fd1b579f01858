"""The conversation layer: history in, a stored and published reply out.

One chat, in order:

1. ``prepare``: everything that can be refused is checked, then the user
   message (and an empty assistant placeholder marked ``incomplete``) are
   committed to LMDB in one transaction before anything goes upstream; only
   then is the chat acknowledged. An acknowledged message is never lost.
2. ``_reply`` (a task in the service's nursery, so a client that disconnects
   does not stop it): ``pool.acquire`` the conversation's model (its state
   changes and the queue position go to the conversation's watchers), fit the
   history into the model's context, and let ``llamad.generation`` stream the
   reply. Each piece is published to every watcher; the text so far is
   written to disk with the first piece and then at most every 0.5 s, so a
   crash of llamad keeps what was seen up to the last write.
3. At the end the reply is committed ``complete``, ``cancelled`` or ``error``
   with its stats and tool calls, and ``chat_done`` is published.

Every event goes through the hub under the conversation's id, so the client
that asked and any other client watching see the same stream.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from llamad.concurrency import in_thread
from llamad.errors import (
    ApprovalNotPending,
    BadRequest,
    ConversationBusy,
    EmptyMessage,
    HistoryWriteError,
    ImageError,
    LlamadError,
    UnknownTool,
)
from llamad.events import ChatEvent, EventHub
from llamad.generation import (
    UNFINISHED,
    GenerationRequest,
    assistant_calls,
    ended,
    generate,
    tool_result,
)
from llamad.history import HistoryStore
from llamad.images import MAX_IMAGES_PER_MESSAGE, data_uri, inspect_image
from llamad.pool import Lease, ModelPool, PoolEvent
from llamad.protocol import (
    Chat,
    ChatDelta,
    ChatDone,
    ChatStarted,
    ContextTrimmed,
    Conversation,
    ImagePart,
    Message,
    MessageStats,
    MessageStatus,
    ModelStatus,
    Part,
    QueuePosition,
    ServerMessage,
    StateChanged,
    TextPart,
    ToolCall,
    ToolCallEvent,
)
from llamad.tools import TOOL_NAMES
from llamad.upstream import context_size, count_tokens, template_overhead, turns_to_drop

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SEC = 0.5
# A tool marked confirm = true waits this long for a client to answer, then
# counts as denied: a reply must not hang forever on a closed terminal.
APPROVAL_TIMEOUT_SEC = 300.0


@dataclass
class Prepared:
    conversation: Conversation
    user: Message | None  # None for a retry
    reply: Message
    request: Chat
    model: str  # the model that answers


@dataclass
class _Running:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cancelled_by_user: bool = False


@dataclass
class _Approval:
    answered: trio.Event = field(default_factory=trio.Event)
    approved: bool = False


class _ReplySink:
    """The ``GenerationSink`` of a chat: published at once, written to disk as it grows."""

    def __init__(self, service: ChatService, prepared: Prepared) -> None:
        self.service = service
        self.conversation = prepared.conversation.id
        self.seq = prepared.reply.seq
        self.pieces: list[str] = []
        self.calls: list[ToolCall] = []
        self._last_flush: float | None = None

    async def text(self, piece: str) -> None:
        self.pieces.append(piece)
        self.service.publish(
            self.conversation,
            ChatDelta(id=0, conversation=self.conversation, seq=self.seq, text=piece),
        )
        now = time.monotonic()
        # The first piece at once, then at most every FLUSH_INTERVAL_SEC: what a
        # client saw is on disk at most one interval later, crash or not.
        if self._last_flush is None or now - self._last_flush >= FLUSH_INTERVAL_SEC:
            self._last_flush = now
            await self.flush()

    async def tool_call(self, index: int, call: ToolCall) -> None:
        if index == len(self.calls):
            self.calls.append(call)
        else:
            self.calls[index] = call
        self.service.publish(
            self.conversation,
            ToolCallEvent(id=0, conversation=self.conversation, seq=self.seq, call=call),
        )
        await self.flush()

    async def approve(self, index: int, call: ToolCall) -> bool:
        with self.service.awaiting_approval(self.conversation, call.id) as pending:
            await self.tool_call(index, call)  # after registering: an instant answer counts
            with trio.move_on_after(APPROVAL_TIMEOUT_SEC):
                await pending.answered.wait()
        return pending.approved

    async def flush(self) -> None:
        try:
            await in_thread(
                functools.partial(
                    self.service.store.update_message,
                    self.conversation,
                    self.seq,
                    parts=[TextPart(text="".join(self.pieces))],
                    tool_calls=list(self.calls),
                )
            )
        except HistoryWriteError as exc:
            log.error("%s", exc)  # noqa: TRY400 - a disk problem, not a bug; the final commit reports it


class ChatService:
    def __init__(self, pool: ModelPool, store: HistoryStore, hub: EventHub) -> None:
        self.pool = pool
        self.store = store
        self.hub = hub
        self._running: dict[str, _Running] = {}
        # Per model process: (context size, the template's cost per message).
        self._model_facts: dict[tuple[str, int | None], tuple[int, int]] = {}
        self._approvals: dict[tuple[str, str], _Approval] = {}
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
        """Commit the user message (and the reply placeholder); raises on bad input.

        Everything that can be refused is checked before anything is stored.
        """
        parts: list[Part] = (
            [TextPart(text=request.content)]
            if isinstance(request.content, str)
            else list(request.content)
        )
        parts, images = _checked_images(parts)
        has_text = any(isinstance(p, TextPart) and p.text.strip() for p in parts)
        if request.retry:
            parts, images = [], {}
        elif not images and not has_text:
            raise EmptyMessage
        if request.retry and request.edit:
            raise BadRequest("a chat is either a retry or an edit, not both")
        if request.model is not None:
            self.pool.resolve(request.model)  # unknown model: refuse before storing anything
        unknown = [t for t in request.options.tools or () if t not in TOOL_NAMES]
        if unknown:
            raise UnknownTool(unknown[0], TOOL_NAMES)
        existing: Conversation | None = None
        replace_from: int | None = None
        if request.conversation is not None:
            conversation_id = await in_thread(self.store.resolve, request.conversation)
            existing = await in_thread(self.store.get_conversation, conversation_id)
            if existing.id in self._running:
                raise ConversationBusy(existing.id)
            if request.retry or request.edit:
                replace_from = await self._last_user_seq(existing)
                if request.retry:
                    replace_from += 1  # keep the user message, answer it again
        elif request.retry or request.edit:
            raise BadRequest("retry and edit need the conversation they apply to")
        model = self._choose_model(request.model, existing)
        if images:
            self._check_vision(model)
        # One transaction: one fsync before the acknowledgement, and a full
        # disk leaves neither an empty conversation nor an unanswered message.
        conversation, user, reply = await in_thread(
            functools.partial(
                self.store.start_exchange,
                existing.id if existing is not None else None,
                parts=parts,
                images=images,
                model=model,
                system_prompt=request.options.system,
                replace_from=replace_from,
            )
        )
        return Prepared(conversation, user, reply, request, model)

    async def _last_user_seq(self, conversation: Conversation) -> int:
        messages = await in_thread(self.store.all_messages, conversation.id)
        users = [m.seq for m in messages if m.role == "user"]
        if not users:
            raise BadRequest(f"conversation {conversation.id[:13]} has no message to retry or edit")
        return users[-1]

    def _choose_model(self, requested: str | None, conversation: Conversation | None) -> str:
        """The model that answers: the one named, the conversation's own, then the default."""
        for candidate in (requested, conversation.model if conversation else None):
            if candidate is not None:
                with contextlib.suppress(LlamadError):
                    return self.pool.resolve(candidate).name
        return self.pool.default_model()

    def launch(self, prepared: Prepared) -> None:
        """Start generating; events go to the conversation's subscribers."""
        assert self._nursery is not None
        conversation = prepared.conversation.id
        running = _Running()
        self._running[conversation] = running
        self.publish(
            conversation,
            ChatStarted(
                id=0,
                conversation=prepared.conversation,
                user=prepared.user,
                reply_seq=prepared.reply.seq,
            ),
        )
        self._nursery.start_soon(self._reply, prepared, running)

    def _check_vision(self, model_name: str) -> None:
        server = self.pool.server(model_name)
        vision = server.status().vision
        # Before its server has said, a model with a projector is taken at its word.
        if vision is None:
            vision = server.model.mmproj is not None
        if not vision:
            raise ImageError(
                f"model {model_name!r} does not take images; give it its vision "
                'projector with mmproj = "PATH" in models.toml, or choose a vision model'
            )

    def answer_approval(self, conversation: str, call: str, *, approve: bool) -> None:
        """A client's answer to a call awaiting approval (the first answer counts)."""
        pending = self._approvals.get((conversation, call))
        if pending is None or pending.answered.is_set():
            raise ApprovalNotPending(conversation, call)
        pending.approved = approve
        pending.answered.set()

    def cancel(self, conversation: str) -> bool:
        running = self._running.get(conversation)
        if running is None:
            return False
        running.cancelled_by_user = True
        running.scope.cancel()
        return True

    def publish(self, conversation: str, message: ServerMessage) -> None:
        self.hub.publish(ChatEvent(conversation, message))

    @contextlib.contextmanager
    def awaiting_approval(self, conversation: str, call: str) -> Iterator[_Approval]:
        pending = _Approval()
        self._approvals[(conversation, call)] = pending
        try:
            yield pending
        finally:
            del self._approvals[(conversation, call)]

    # ---------------------------------------------------------- internals

    async def _reply(self, prepared: Prepared, running: _Running) -> None:
        conversation = prepared.conversation.id
        sink = _ReplySink(self, prepared)
        stats: MessageStats | None = None
        status: MessageStatus = "incomplete"
        error = ""
        options = prepared.request.options
        try:
            with running.scope:
                try:
                    async with self.pool.acquire(
                        prepared.model,
                        keep_alive=options.keep_alive,
                        on_event=functools.partial(self._pool_event, conversation),
                    ) as lease:
                        stats = await self._generate(prepared, lease, sink)
                    status = "complete"
                except LlamadError as exc:
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
                    prepared, sink, status=status, stats=stats, error=error
                )
                del self._running[conversation]
                self.publish(conversation, ChatDone(id=0, message=message))

    def _pool_event(self, conversation: str, event: PoolEvent) -> None:
        if isinstance(event, ModelStatus):
            self.publish(conversation, StateChanged(id=0, model=event))
        else:
            self.publish(
                conversation, QueuePosition(id=0, conversation=conversation, position=event)
            )

    async def _generate(self, prepared: Prepared, lease: Lease, sink: _ReplySink) -> MessageStats:
        options = prepared.request.options
        history = await self._fit(
            lease, prepared, await self._history_for_upstream(prepared)
        )
        messages: list[dict[str, Any]] = []
        if prepared.conversation.system_prompt:
            messages.append({"role": "system", "content": prepared.conversation.system_prompt})
        messages += await self._upstream_messages(history)
        params: dict[str, Any] = {}
        if options.temperature is not None:
            params["temperature"] = options.temperature
        if options.max_tokens is not None:
            params["max_tokens"] = options.max_tokens
        if options.seed is not None:
            params["seed"] = options.seed
        if options.ignore_eos:
            params["ignore_eos"] = True
        tools = list(options.tools if options.tools is not None else lease.config.tools)
        request = GenerationRequest(
            messages=messages,
            params=params,
            tools=tools,
            max_tool_rounds=lease.config.max_tool_rounds,
        )
        return await generate(
            lease.stream_chat, request, sink, tool_settings=self.pool.config.tool
        )

    async def _history_for_upstream(self, prepared: Prepared) -> list[Message]:
        if prepared.request.conversation is None and prepared.user is not None:
            return [prepared.user]  # a new conversation holds just this: no read
        messages = await in_thread(self.store.all_messages, prepared.conversation.id)
        # Everything before the reply being written, minus failed replies.
        return [
            m
            for m in messages
            if m.seq < prepared.reply.seq
            and m.status != "error"
            and (m.text or m.images or m.tool_calls)
        ]

    async def _upstream_messages(self, history: list[Message]) -> list[dict[str, Any]]:
        """Stored messages as OpenAI chat messages: tool rounds unfolded, images inlined."""
        messages: list[dict[str, Any]] = []
        for message in history:
            finished = [c for c in message.tool_calls if c.status not in UNFINISHED]
            for round_number in sorted({call.round for call in finished}):
                calls = [call for call in finished if call.round == round_number]
                messages.append(assistant_calls(calls))
                messages += [tool_result(call) for call in calls]
            if not message.images:
                if message.text or not finished:
                    messages.append({"role": message.role, "content": message.text})
                continue
            content: list[dict[str, Any]] = []
            if message.text:
                content.append({"type": "text", "text": message.text})
            for image in message.images:
                try:
                    data = await in_thread(self.store.get_image, image.digest)
                except KeyError:
                    content.append({"type": "text", "text": f"{image.label()} (no longer stored)"})
                    continue
                content.append(
                    {"type": "image_url", "image_url": {"url": data_uri(image.mime, data)}}
                )
            messages.append({"role": message.role, "content": content})
        return messages

    async def _fit(
        self, lease: Lease, prepared: Prepared, history: list[Message]
    ) -> list[Message]:
        """Leave out the oldest turns when the history does not fit the context."""
        client: httpx.AsyncClient = lease.client
        key = (lease.name, lease.server.status().pid)
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
            self.publish(
                prepared.conversation.id,
                ContextTrimmed(
                    id=0, conversation=prepared.conversation.id, dropped_turns=dropped, n_ctx=n_ctx
                ),
            )
        return [m for turn in turns[dropped:] for m in turn]

    async def _finish(
        self,
        prepared: Prepared,
        sink: _ReplySink,
        *,
        status: MessageStatus,
        stats: MessageStats | None,
        error: str,
    ) -> Message:
        conversation, seq = prepared.conversation.id, prepared.reply.seq
        text = "".join(sink.pieces)
        # A call cut off by a cancel or an error never finished.
        calls = [
            ended(call, "error", "stopped before it finished")
            if call.status in UNFINISHED
            else call
            for call in sink.calls
        ]
        try:
            return await in_thread(
                functools.partial(
                    self.store.update_message,
                    conversation,
                    seq,
                    parts=[TextPart(text=text)] if text else [],
                    status=status,
                    stats=stats,
                    model=prepared.model,
                    error=error,
                    tool_calls=calls,
                )
            )
        except HistoryWriteError as exc:
            log.error("%s", exc)  # noqa: TRY400 - a disk problem, not a bug
            return Message(
                conversation=conversation,
                seq=seq,
                role="assistant",
                parts=[TextPart(text=text)] if text else [],
                status="error",
                model=prepared.model,
                created=time.time(),
                stats=stats,
                error=str(exc),
                tool_calls=calls,
            )


def _checked_images(parts: list[Part]) -> tuple[list[Part], dict[str, bytes]]:
    """Image parts with their type and size read from the bytes; refuses bad ones."""
    images: dict[str, bytes] = {}
    checked: list[Part] = []
    count = 0
    for part in parts:
        if not isinstance(part, ImagePart):
            checked.append(part)
            continue
        count += 1
        if count > MAX_IMAGES_PER_MESSAGE:
            raise ImageError(f"a message can carry at most {MAX_IMAGES_PER_MESSAGE} images")
        name = " ".join(part.name.split())[:200]
        info = inspect_image(part.data, name or "the image")
        images[info.digest] = part.data
        checked.append(
            ImagePart(
                data=part.data,
                name=name,
                mime=info.mime,
                width=info.width,
                height=info.height,
                size=info.size,
                digest=info.digest,
            )
        )
    return checked, images
