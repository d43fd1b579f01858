"""One reply from a model: the request, the stream, the tool loop.

Knows nothing of conversations or LMDB: it gets the messages to send (already
fitted to the context), streams ``/v1/chat/completions`` through the
``StreamChat`` it is handed (a lease's), and tells a ``GenerationSink`` about
every piece of text and every change of a tool call. When the model asks for
tools instead of answering, each call runs (after the sink's approval where
the tool wants it, in a worker thread with a timeout) and the model is asked
again with the results, up to ``max_tool_rounds``; the round after the last
allowed one must answer in words.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import trio

from llamad.config import ToolConfig
from llamad.protocol import MessageStats, ToolCall, ToolCallStatus
from llamad.tools import openai_tools, run_tool
from llamad.upstream import AssembledCall, Chunk, ToolCallAssembler

YIELD_EVERY_CHUNKS = 32
UNFINISHED: frozenset[ToolCallStatus] = frozenset({"running", "awaiting_approval"})


class GenerationSink(Protocol):
    """Where a reply goes while it is produced (the conversation layer stores and publishes)."""

    async def text(self, piece: str) -> None:
        """The next piece of the reply's text."""

    async def tool_call(self, index: int, call: ToolCall) -> None:
        """Call number ``index`` of the reply started, waits for approval, or ended."""

    async def approve(self, index: int, call: ToolCall) -> bool:
        """Ask whoever is watching to allow call ``index`` (status ``awaiting_approval``).

        Announces the call itself (as ``tool_call`` does) once an answer can
        be taken, so that an instant answer is not lost. False when denied or
        unanswered.
        """


@dataclass
class GenerationRequest:
    messages: list[dict[str, Any]]  # OpenAI chat messages, fitted to the context
    params: dict[str, Any] = field(default_factory=dict)  # temperature, max_tokens, seed…
    tools: list[str] = field(default_factory=list)  # llamad tools offered to the model
    max_tool_rounds: int = 5


StreamChat = Callable[[dict[str, Any]], AsyncGenerator[Chunk]]


async def generate(
    stream_chat: StreamChat,
    request: GenerationRequest,
    sink: GenerationSink,
    *,
    tool_settings: Callable[[str], ToolConfig],
) -> MessageStats:
    """Stream one reply (with its tool rounds) into ``sink``; returns its stats."""
    payload: dict[str, Any] = {"messages": request.messages, "stream": True, **request.params}
    tools = request.tools
    if tools:
        payload["tools"] = openai_tools(tools)
    began = time.monotonic()
    first_token: float | None = None
    finish_reason: str | None = None
    timings: dict[str, Any] = {}
    usage: dict[str, Any] = {}
    completion_tokens = 0
    chunks = 0
    calls: list[ToolCall] = []
    for round_number in range(1, request.max_tool_rounds + 2):
        last_round = round_number > request.max_tool_rounds
        if tools and last_round:
            payload["tool_choice"] = "none"
        assembler = ToolCallAssembler()
        timings, usage = {}, {}
        # aclosing: a cancel or a failing sink closes the upstream socket now, not at GC.
        async with aclosing(stream_chat(payload)) as stream:
            async for chunk in stream:
                if chunk.text:
                    if first_token is None:
                        first_token = time.monotonic()
                    await sink.text(chunk.text)
                assembler.feed(chunk.tool_calls)
                chunks += 1
                if chunks % YIELD_EVERY_CHUNKS == 0:
                    # A reader that finds data at once does not yield; let the
                    # connections forward what is queued.
                    await trio.lowlevel.checkpoint()
                finish_reason = chunk.finish_reason or finish_reason
                timings = chunk.timings or timings
                usage = chunk.usage or usage
        completion_tokens += timings.get("predicted_n") or usage.get("completion_tokens") or 0
        wanted = assembler.calls()
        if not tools or not wanted or last_round:
            break
        done = await _run_tools(
            round_number=round_number,
            wanted=wanted,
            offered=tools,
            calls=calls,
            sink=sink,
            tool_settings=tool_settings,
        )
        payload["messages"] = [
            *payload["messages"],
            assistant_calls(done),
            *(tool_result(call) for call in done),
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
    *,
    round_number: int,
    wanted: list[AssembledCall],
    offered: list[str],
    calls: list[ToolCall],
    sink: GenerationSink,
    tool_settings: Callable[[str], ToolConfig],
) -> list[ToolCall]:
    """Run one round's calls in order; the sink hears of each change."""
    done: list[ToolCall] = []
    for asked in wanted:
        index = len(calls)

        async def show(call: ToolCall, index: int = index) -> ToolCall:
            calls[index] = call
            await sink.tool_call(index, call)
            return call

        settings = tool_settings(asked.name)
        confirm = settings.confirm and asked.name in offered
        call = ToolCall(
            id=asked.id,
            name=asked.name,
            arguments=asked.arguments,
            status="awaiting_approval" if confirm else "running",
            round=round_number,
        )
        calls.append(call)
        if asked.name not in offered:
            await show(call)
            call = ended(call, "error", f"there is no tool {asked.name!r} in this chat")
        elif confirm:
            if await sink.approve(index, call):
                call = await show(msgspec.structs.replace(call, status="running"))
                call = await _run_one(call, settings)
            else:
                call = ended(call, "denied", "the user did not allow this call")
        else:
            call = await _run_one(await show(call), settings)
        done.append(await show(call))
    return done


async def _run_one(call: ToolCall, settings: ToolConfig) -> ToolCall:
    run = functools.partial(run_tool, call.name, call.arguments, search_roots=settings.roots)
    with trio.move_on_after(settings.timeout_sec):
        # Abandoned on timeout: the tools bound their own work, so the thread
        # ends soon after on its own.
        outcome = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
        return ended(call, "ok" if outcome.ok else "error", outcome.text)
    return ended(call, "timeout", f"the tool did not finish within {settings.timeout_sec:g} s")


def ended(call: ToolCall, status: ToolCallStatus, result: str) -> ToolCall:
    return msgspec.structs.replace(call, status=status, result=result)


def assistant_calls(calls: list[ToolCall]) -> dict[str, Any]:
    """The assistant message that made ``calls``, as OpenAI's API spells it."""
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ],
    }


def tool_result(call: ToolCall) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": call.result}
