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
   When the model asks for tools instead of answering, ``_run_tools`` runs
   each call (after the client's approval where the tool wants it, in a
   worker thread with a timeout), stores and publishes it, and asks the model
   again with the results, up to the model's ``max_tool_rounds``.
3. On the end the reply is committed ``complete``, ``cancelled`` or ``error``
   with its stats and tool calls, and ``chat_done`` is published.

Every event goes through the hub under the conversation's id, so the client
that asked and any other client watching see the same stream.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import trio

from llamad.concurrency import beside, in_thread
from llamad.errors import (
    ApprovalNotPending,
    ConversationBusy,
    EmptyMessage,
    ImageError,
    LlamadError,
    RequestCancelled,
    UnknownTool,
    UpstreamError,
)
from llamad.events import ChatEvent, EventHub, StateEvent
from llamad.errors import HistoryWriteError
from llamad.history import HistoryStore
from llamad.images import MAX_IMAGES_PER_MESSAGE, data_uri, inspect_image
from llamad.manager import ModelManager
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
    Part,
    QueuePosition,
    ServerMessage,
    StateChanged,
    TextPart,
    ToolCall,
    ToolCallEvent,
    ToolCallStatus,
)
from llamad.supervisor import ModelSupervisor, http_client
from llamad.tools import TOOL_NAMES, openai_tools, run_tool
from llamad.upstream import (
    AssembledCall,
    ToolCallAssembler,
    context_size,
    count_tokens,
    stream_chat_direct,
    template_overhead,
    turns_to_drop,
)

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SEC = 0.5
YIELD_EVERY_CHUNKS = 32
# Once text flows, read llama-server at most once per this window: a fast
# model's tokens then come out of one read together (one wake-up, one delta,
# one send for several tokens) instead of one each; a token waits at most
# this long. Slower than one token per window, nothing changes.
BATCH_WINDOW_SEC = 0.002
# A tool marked confirm = true waits this long for a client to answer, then
# counts as denied: a reply must not hang forever on a closed terminal.
APPROVAL_TIMEOUT_SEC = 300.0


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


@dataclass
class _Reply:
    """What a reply has produced so far: what is flushed and finally committed."""

    text: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)


@dataclass
class _Approval:
    answered: trio.Event = field(default_factory=trio.Event)
    approved: bool = False


class ChatEngine:
    def __init__(self, manager: ModelManager, store: HistoryStore, hub: EventHub) -> None:
        self.manager = manager
        self.store = store
        self.hub = hub
        self._running: dict[str, _Running] = {}
        self._slot_queues: dict[str, SlotQueue] = {}
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
        if not images and not any(isinstance(p, TextPart) and p.text.strip() for p in parts):
            raise EmptyMessage
        if request.model is not None:
            self.manager.resolve(request.model)  # unknown model: refuse before storing anything
        unknown = [t for t in request.options.tools or () if t not in TOOL_NAMES]
        if unknown:
            raise UnknownTool(unknown[0], TOOL_NAMES)
        existing: Conversation | None = None
        if request.conversation is not None:
            conversation_id = await in_thread(self.store.resolve, request.conversation)
            existing = await in_thread(self.store.get_conversation, conversation_id)
            if existing.id in self._running:
                raise ConversationBusy(existing.id)
        if images:
            self._check_vision(
                self._choose_model(request.model, existing.model if existing else None)
            )
        # One transaction: one fsync before the acknowledgement, and a full
        # disk leaves neither an empty conversation nor an unanswered message.
        conversation, user, reply = await in_thread(
            functools.partial(
                self.store.start_exchange,
                existing.id if existing is not None else None,
                parts=parts,
                images=images,
                model=request.model,
                system_prompt=request.options.system,
            )
        )
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

    def _check_vision(self, model_name: str | None) -> None:
        if model_name is None:
            return  # no model at all: generating reports that, with the fix
        supervisor = self.manager.resolve(model_name)
        vision = supervisor.status().vision
        # Before its server has said, a model with a projector is taken at its word.
        if vision is None:
            vision = supervisor.model.mmproj is not None
        if not vision:
            raise ImageError(
                f"model {supervisor.model.name!r} does not take images; give it its vision "
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

    # ---------------------------------------------------------- internals

    def _publish(self, conversation: str, message: ServerMessage) -> None:
        self.hub.publish(ChatEvent(conversation, message))

    def _choose_model(self, requested: str | None, conversation: str | None) -> str | None:
        """The model a chat goes to: the one it names, the active one, the conversation's."""
        return (
            requested
            or self.manager.active
            or conversation
            or self.manager.config.daemon.default_model
        )

    async def _generate(self, prepared: Prepared, running: _Running) -> None:
        conversation = prepared.conversation.id
        reply = _Reply()
        stats: MessageStats | None = None
        model_name = self._choose_model(prepared.request.model, prepared.conversation.model)
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
                            stats = await self._stream(prepared, model, reply)
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
                    prepared,
                    reply,
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
        if prepared.request.conversation is None:
            # A new conversation holds only the message just stored: no read.
            return [prepared.user]
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
            finished = [c for c in message.tool_calls if c.status not in _UNFINISHED]
            for round_number in sorted({call.round for call in finished}):
                calls = [call for call in finished if call.round == round_number]
                messages.append(_assistant_calls(calls))
                messages += [_tool_result(call) for call in calls]
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
        self,
        model: ModelSupervisor,
        prepared: Prepared,
        history: list[Message],
    ) -> list[Message]:
        """Leave out the oldest turns when the history does not fit the context.

        An HTTP client is made only when llama-server must be asked something
        (its facts, once per process; token counts, when bytes do not settle it).
        """
        async with contextlib.AsyncExitStack() as stack:
            client: httpx.AsyncClient | None = None

            async def ask() -> httpx.AsyncClient:
                nonlocal client
                if client is None:
                    client = await stack.enter_async_context(
                        http_client(model.endpoint, timeout=10.0)
                    )
                return client

            return await self._fit_with(ask, model, prepared, history)

    async def _fit_with(
        self,
        ask: Callable[[], Any],
        model: ModelSupervisor,
        prepared: Prepared,
        history: list[Message],
    ) -> list[Message]:
        key = (model.model.name, model.status().pid)
        if key not in self._model_facts:
            # Both measured before either is stored: chats run concurrently, and
            # one must never see half of what another is still measuring.
            client = await ask()
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
        client = await ask()
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
        self, prepared: Prepared, model: ModelSupervisor, reply: _Reply
    ) -> MessageStats:
        conversation = prepared.conversation.id
        seq = prepared.reply.seq
        options = prepared.request.options
        tools = list(options.tools if options.tools is not None else model.model.tools)
        text = reply.text
        history = await self._fit(model, prepared, await self._history_for_upstream(prepared))
        messages: list[dict[str, Any]] = []
        if prepared.conversation.system_prompt:
            messages.append({"role": "system", "content": prepared.conversation.system_prompt})
        messages += await self._upstream_messages(history)
        payload: dict[str, Any] = {"messages": messages, "stream": True}
        if tools:
            payload["tools"] = openai_tools(tools)
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
        completion_tokens = 0
        chunks = 0
        for round_number in range(1, model.model.max_tool_rounds + 2):
            # The round after the last allowed one must answer in words.
            last_round = round_number > model.model.max_tool_rounds
            if tools and last_round:
                payload["tool_choice"] = "none"
            assembler = ToolCallAssembler()
            timings, usage = {}, {}
            async for chunk in stream_chat_direct(
                model.endpoint, payload, batch_window=BATCH_WINDOW_SEC
            ):
                if chunk.text:
                    if first_token is None:
                        first_token = time.monotonic()
                    text.append(chunk.text)
                    self._publish(
                        conversation,
                        ChatDelta(id=0, conversation=conversation, seq=seq, text=chunk.text),
                    )
                assembler.feed(chunk.tool_calls)
                chunks += 1
                if chunks % YIELD_EVERY_CHUNKS == 0:
                    # httpx hands over every chunk already read without
                    # yielding; let the connections forward what is queued.
                    await trio.lowlevel.checkpoint()
                finish_reason = chunk.finish_reason or finish_reason
                timings = chunk.timings or timings
                usage = chunk.usage or usage
                now = time.monotonic()
                if now - last_flush >= FLUSH_INTERVAL_SEC:
                    last_flush = now
                    await self._flush(conversation, seq, reply)
            completion_tokens += timings.get("predicted_n") or usage.get("completion_tokens") or 0
            wanted = assembler.calls()
            if not tools or not wanted or last_round:
                break
            done = await self._run_tools(prepared, round_number, wanted, tools, reply)
            payload["messages"] = [
                *payload["messages"],
                _assistant_calls(done),
                *(_tool_result(call) for call in done),
            ]
        ended = time.monotonic()
        return MessageStats(
            finish_reason=finish_reason,
            prompt_tokens=timings.get("prompt_n") or usage.get("prompt_tokens"),
            completion_tokens=completion_tokens or None,
            tokens_per_second=timings.get("predicted_per_second"),
            time_to_first_token_ms=(first_token - began) * 1000 if first_token else None,
            duration_ms=(ended - began) * 1000,
        )

    async def _run_tools(
        self,
        prepared: Prepared,
        round_number: int,
        wanted: list[AssembledCall],
        offered: list[str],
        reply: _Reply,
    ) -> list[ToolCall]:
        """Run one round's calls in order; each is stored and published as it changes."""
        conversation, seq = prepared.conversation.id, prepared.reply.seq
        done: list[ToolCall] = []
        for asked in wanted:
            index = len(reply.calls)

            async def show(call: ToolCall, index: int = index) -> ToolCall:
                reply.calls[index] = call
                await self._tool_progress(conversation, seq, reply, call)
                return call

            settings = self.manager.config.tool(asked.name)
            confirm = settings.confirm and asked.name in offered
            call = ToolCall(
                id=asked.id,
                name=asked.name,
                arguments=asked.arguments,
                status="awaiting_approval" if confirm else "running",
                round=round_number,
            )
            reply.calls.append(call)
            if asked.name not in offered:
                await show(call)
                call = _ended(call, "error", f"there is no tool {asked.name!r} in this chat")
            elif confirm:
                with self._awaiting_approval(conversation, call.id) as pending:
                    await show(call)  # after registering, so an instant answer finds it
                    with trio.move_on_after(APPROVAL_TIMEOUT_SEC):
                        await pending.answered.wait()
                if pending.approved:
                    call = await show(msgspec.structs.replace(call, status="running"))
                    call = await self._run_one(call, settings.timeout_sec)
                else:
                    call = _ended(call, "denied", "the user did not allow this call")
            else:
                call = await self._run_one(await show(call), settings.timeout_sec)
            done.append(await show(call))
        return done

    async def _run_one(self, call: ToolCall, timeout_sec: float) -> ToolCall:
        run = functools.partial(
            run_tool,
            call.name,
            call.arguments,
            search_roots=self.manager.config.tool("file_search").roots,
        )
        with trio.move_on_after(timeout_sec):
            # Abandoned on timeout: the tools bound their own work, so the
            # thread ends soon after on its own.
            outcome = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
            return _ended(call, "ok" if outcome.ok else "error", outcome.text)
        return _ended(call, "timeout", f"the tool did not finish within {timeout_sec:g} s")

    @contextlib.contextmanager
    def _awaiting_approval(self, conversation: str, call: str) -> Iterator[_Approval]:
        pending = _Approval()
        self._approvals[(conversation, call)] = pending
        try:
            yield pending
        finally:
            del self._approvals[(conversation, call)]

    async def _tool_progress(
        self, conversation: str, seq: int, reply: _Reply, call: ToolCall
    ) -> None:
        self._publish(
            conversation, ToolCallEvent(id=0, conversation=conversation, seq=seq, call=call)
        )
        await self._flush(conversation, seq, reply)

    async def _flush(self, conversation: str, seq: int, reply: _Reply) -> None:
        try:
            await in_thread(
                functools.partial(
                    self.store.update_message,
                    conversation,
                    seq,
                    parts=[TextPart(text="".join(reply.text))],
                    tool_calls=list(reply.calls),
                )
            )
        except HistoryWriteError as exc:
            log.error("%s", exc)  # noqa: TRY400 - a disk problem, not a bug; the final commit reports it

    async def _finish(
        self,
        prepared: Prepared,
        reply: _Reply,
        *,
        status: MessageStatus,
        stats: MessageStats | None,
        error: str,
        model: str | None,
    ) -> Message:
        conversation, seq = prepared.conversation.id, prepared.reply.seq
        text = "".join(reply.text)
        # A call cut off by a cancel or an error never finished.
        calls = [
            _ended(call, "error", "stopped before it finished")
            if call.status in _UNFINISHED
            else call
            for call in reply.calls
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
                    model=model,
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
                model=model,
                created=time.time(),
                stats=stats,
                error=str(exc),
                tool_calls=calls,
            )


_UNFINISHED = frozenset({"running", "awaiting_approval"})


def _ended(call: ToolCall, status: ToolCallStatus, result: str) -> ToolCall:
    return msgspec.structs.replace(call, status=status, result=result)


def _assistant_calls(calls: list[ToolCall]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ],
    }


def _tool_result(call: ToolCall) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": call.result}


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
