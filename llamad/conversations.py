"""The conversation layer: history in, a stored and published reply out.

One chat, in order:

1. ``prepare``: everything that can be refused is checked (and the history
   read) before anything is written.
2. ``_reply`` (a task in the service's nursery, so a client that disconnects
   does not stop it) does two things at once. It commits the user message and
   an empty reply marked ``incomplete`` in one LMDB transaction; only then is
   the chat acknowledged (``chat_started``), so an acknowledged message is
   never lost. Meanwhile it ``pool.acquire``s the model (its state changes and
   the queue position go to the conversation's watchers), fits the history
   into its context and lets ``llamad.generation`` start the reply, so the
   fsync hides behind the model's prompt processing: nothing of the reply is
   published or written before the commit is on disk, and a failed commit
   cancels the reply and is the chat's answer. Each piece is published to
   every watcher; the text so far is written with the first piece and then at
   most every 0.5 s, so a crash of llamad keeps what was seen up to the last
   write.
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

from llamad.concurrency import ThreadCall, in_thread
from llamad.errors import (
    ApprovalNotPending,
    BadRequest,
    ConversationBusy,
    EmptyMessage,
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
from llamad.llama_server import check_model_file
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
from llamad.sampling import request_defaults, system_prompt
from llamad.tools import TOOL_NAMES
from llamad.upstream import context_size, count_tokens, template_overhead, turns_to_drop

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SEC = 0.5
# A tool marked confirm = true waits this long for a client to answer, then
# counts as denied: a reply must not hang forever on a closed terminal.
APPROVAL_TIMEOUT_SEC = 300.0


@dataclass(eq=False)
class Prepared:
    """A chat checked and ready to go; the commit fills in what the store made."""

    request: Chat
    model: str  # the model that answers
    conversation_id: str  # known before the commit, so watchers can subscribe first
    existing: Conversation | None  # None for a new conversation
    parts: list[Part]  # the user message (empty for a retry)
    images: dict[str, bytes]
    replace_from: int | None  # a retry or edit replaces the messages from here on
    history: list[Message]  # what the model is sent, oldest first, the new message last
    committed: trio.Event = field(default_factory=trio.Event)
    commit_error: LlamadError | None = None
    # The commit, started in a thread by ``launch``.
    stored: ThreadCall[tuple[Conversation, Message | None, Message]] | None = None
    conversation: Conversation | None = None
    user: Message | None = None  # None for a retry
    reply: Message | None = None

    @property
    def system_prompt(self) -> str | None:
        if self.existing is not None:
            return self.existing.system_prompt
        return self.request.options.system

    async def wait_committed(self) -> Message:
        """The stored reply placeholder, once on disk; the commit's error otherwise."""
        await self.committed.wait()
        if self.commit_error is not None:
            raise self.commit_error
        assert self.reply is not None
        return self.reply


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
        self.prepared = prepared
        self.conversation = prepared.conversation_id
        self.seq = 0  # the reply's, known once committed
        self.pieces: list[str] = []
        self.calls: list[ToolCall] = []
        self._held: list[ServerMessage] = []  # what came before the commit, in order
        self._last_flush: float | None = None

    def publish(self, message: ServerMessage) -> None:
        """To every watcher of the conversation; held until the chat is acknowledged."""
        if self.seq:
            self.service.publish(self.conversation, message)
        else:
            self._held.append(message)

    def committed(self, reply_seq: int) -> None:
        """The exchange is on disk: what came meanwhile goes out now, the text as one piece."""
        self.seq = reply_seq
        for message in self._held:
            self.service.publish(self.conversation, message)
        self._held = []
        if self.pieces:
            text = "".join(self.pieces)
            self.service.publish(
                self.conversation,
                ChatDelta(id=0, conversation=self.conversation, seq=self.seq, text=text),
            )
            self._last_flush = time.monotonic()  # the commit's task writes it at once

    def pool_event(self, event: PoolEvent) -> None:
        """The model's state while the chat waits for it, or the chat's place in line."""
        if isinstance(event, ModelStatus):
            self.publish(StateChanged(id=0, model=event))
        else:
            self.publish(QueuePosition(id=0, conversation=self.conversation, position=event))

    async def text(self, piece: str) -> None:
        self.pieces.append(piece)
        if not self.seq:
            return  # held until the user message is on disk
        self.service.publish(
            self.conversation,
            ChatDelta(id=0, conversation=self.conversation, seq=self.seq, text=piece),
        )
        now = time.monotonic()
        # The first piece at once, then at most every FLUSH_INTERVAL_SEC: what a
        # client saw is on disk at most one interval later, crash or not.
        if self._last_flush is None or now - self._last_flush >= FLUSH_INTERVAL_SEC:
            if self._last_flush is None:
                # Let the connections send the first piece before the write
                # takes its trip to a worker thread (0.2-0.3 ms of CPU here):
                # the first token is what the user waits for.
                await trio.lowlevel.checkpoint()
            self._last_flush = now
            await self.flush()

    async def tool_call(self, index: int, call: ToolCall) -> None:
        await self.prepared.committed.wait()
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
        await self.prepared.committed.wait()
        with self.service.awaiting_approval(self.conversation, call.id) as pending:
            await self.tool_call(index, call)  # after registering: an instant answer counts
            with trio.move_on_after(APPROVAL_TIMEOUT_SEC):
                await pending.answered.wait()
        return pending.approved

    async def flush(self) -> None:
        if not self.seq:
            return
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
        except LlamadError as exc:  # a disk problem, not a bug; the final commit reports it
            log.error("%s", exc)  # noqa: TRY400


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
        """Check a chat and read what the model will be sent; writes nothing.

        Everything that can be refused is refused here, before anything is
        stored.
        """
        parts: list[Part] = (
            [TextPart(text=request.content)]
            if isinstance(request.content, str)
            else list(request.content)
        )
        parts, images = _checked_images(parts)
        has_text = any(isinstance(p, TextPart) and p.text.strip() for p in parts)
        if request.retry and request.edit:
            raise BadRequest("a chat is either a retry or an edit, not both")
        if request.retry:
            parts, images = [], {}
        elif not images and not has_text:
            raise EmptyMessage
        if request.model is not None:
            self.pool.resolve(request.model)  # unknown model: refuse before storing anything
        unknown = [t for t in request.options.tools or () if t not in TOOL_NAMES]
        if unknown:
            raise UnknownTool(unknown[0], TOOL_NAMES)
        existing: Conversation | None = None
        replace_from: int | None = None
        stored: list[Message] = []
        if request.conversation is not None:
            # One trip to a worker thread, not three: each costs 0.2-0.3 ms of
            # CPU here, taken from the model's prompt processing on a small machine.
            found, stored = await in_thread(self._read_conversation, request.conversation)
            if found.id in self._running:
                raise ConversationBusy(found.id)
            existing, conversation_id = found, found.id
            if request.retry or request.edit:
                replace_from = _last_user_seq(found, stored)
                if request.retry:
                    replace_from += 1  # keep the user message, answer it again
        elif request.retry or request.edit:
            raise BadRequest("retry and edit need the conversation they apply to")
        else:
            # A read of one key (about 20 µs): cheaper here than a trip to a
            # worker thread, which would cost ten times that before the
            # request can go upstream.
            conversation_id = self.store.new_conversation_id()
        model = self._choose_model(request.model, existing)
        # A model whose file is missing or not a GGUF cannot answer: say so
        # now rather than store a chat that can only end in that error. One
        # that runs has its file mapped already (the pool checks the same way).
        if self.pool.server(model).state not in ("starting", "ready"):
            check_model_file(self.pool.resolve(model))
        if images:
            self._check_vision(model)
        kept = [
            m
            for m in stored
            if (replace_from is None or m.seq < replace_from)
            and m.status != "error"
            and (m.text or m.images or m.tool_calls)
        ]
        if parts:  # the new message as it will be stored (images with their bytes)
            kept.append(Message(conversation=conversation_id, seq=0, role="user", parts=parts))
        return Prepared(
            request=request,
            model=model,
            conversation_id=conversation_id,
            existing=existing,
            parts=parts,
            images=images,
            replace_from=replace_from,
            history=kept,
        )

    def _read_conversation(self, handle: str) -> tuple[Conversation, list[Message]]:
        """The conversation ``handle`` names and its messages (in a worker thread)."""
        conversation = self.store.get_conversation(self.store.resolve(handle))
        return conversation, self.store.all_messages(conversation.id)

    def _choose_model(self, requested: str | None, conversation: Conversation | None) -> str:
        """The model that answers: the one named, the conversation's own, then the default."""
        for candidate in (requested, conversation.model if conversation else None):
            if candidate is not None:
                with contextlib.suppress(LlamadError):
                    return self.pool.resolve(candidate).name
        return self.pool.default_model()

    def launch(self, prepared: Prepared) -> None:
        """Commit and generate; events go to the conversation's subscribers.

        ``prepared.wait_committed()`` tells when the chat is acknowledged (or
        why it could not be stored).
        """
        assert self._nursery is not None
        conversation = prepared.conversation_id
        if conversation in self._running:  # another chat got there since prepare
            raise ConversationBusy(conversation)
        running = _Running()
        self._running[conversation] = running
        # The commit's thread starts now: its fsync runs while the reply's
        # task starts, takes the model and sends the request.
        prepared.stored = ThreadCall(
            functools.partial(
                self.store.start_exchange,
                prepared.existing.id if prepared.existing is not None else None,
                parts=prepared.parts,
                images=prepared.images,
                model=prepared.model,
                system_prompt=prepared.request.options.system,
                replace_from=prepared.replace_from,
                new_id=prepared.conversation_id,
            )
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
        conversation = prepared.conversation_id
        sink = _ReplySink(self, prepared)
        stats: MessageStats | None = None
        status: MessageStatus = "incomplete"
        error = ""
        options = prepared.request.options
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._commit, prepared, sink, running)
                with running.scope:
                    try:
                        async with self.pool.acquire(
                            prepared.model,
                            keep_alive=options.keep_alive,
                            on_event=sink.pool_event,
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
                await prepared.committed.wait()
                if prepared.commit_error is None:
                    message = await self._finish(
                        prepared, sink, status=status, stats=stats, error=error
                    )
                    self.publish(conversation, ChatDone(id=0, message=message))
                del self._running[conversation]

    async def _commit(self, prepared: Prepared, sink: _ReplySink, running: _Running) -> None:
        """One transaction, one fsync: then the chat is acknowledged, and the reply may show."""
        try:
            try:
                assert prepared.stored is not None
                conversation, user, reply = await prepared.stored.result()
            except Exception as exc:
                # Nothing was stored: the reply is dropped and the error is the answer.
                if isinstance(exc, LlamadError):
                    prepared.commit_error = exc
                else:
                    log.exception("internal error storing a chat")
                    prepared.commit_error = LlamadError(
                        "internal error in llamad while storing the chat; see its log"
                    )
                running.scope.cancel()
                return
            prepared.conversation, prepared.user, prepared.reply = conversation, user, reply
            self.publish(
                conversation.id,
                ChatStarted(id=0, conversation=conversation, user=user, reply_seq=reply.seq),
            )
            sink.committed(reply.seq)
        finally:
            prepared.committed.set()
        await sink.flush()

    async def _generate(self, prepared: Prepared, lease: Lease, sink: _ReplySink) -> MessageStats:
        options = prepared.request.options
        # The conversation's own system prompt, else the answering model's default.
        system = system_prompt(lease.config, prepared.system_prompt)
        history = await self._fit(lease, prepared, sink, system, prepared.history)
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages += await self._upstream_messages(history)
        # The model's generation defaults (and its reply cap) where the chat sets none.
        params = request_defaults(lease.config, options)
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
        return await generate(lease.stream_chat, request, sink, tool_settings=self.pool.config.tool)

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
                    # The new message's own images are at hand (and may not be
                    # committed yet); stored ones are read by digest.
                    data = image.data or await in_thread(self.store.get_image, image.digest)
                except KeyError:
                    content.append({"type": "text", "text": f"{image.label()} (no longer stored)"})
                    continue
                content.append(
                    {"type": "image_url", "image_url": {"url": data_uri(image.mime, data)}}
                )
            messages.append({"role": message.role, "content": content})
        return messages

    async def _fit(
        self,
        lease: Lease,
        prepared: Prepared,
        sink: _ReplySink,
        system: str | None,
        history: list[Message],
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
        system = system or ""
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
            conversation = prepared.conversation_id
            sink.publish(
                ContextTrimmed(id=0, conversation=conversation, dropped_turns=dropped, n_ctx=n_ctx)
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
        conversation, seq = prepared.conversation_id, sink.seq
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
        except LlamadError as exc:  # a disk problem, or the conversation went: not a bug
            log.error("%s", exc)  # noqa: TRY400
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


def _last_user_seq(conversation: Conversation, messages: list[Message]) -> int:
    users = [m.seq for m in messages if m.role == "user"]
    if not users:
        raise BadRequest(f"conversation {conversation.id[:13]} has no message to retry or edit")
    return users[-1]
