"""Talking to llama-server's OpenAI-style API.

The decisions are pure and tested alone: ``SSEDecoder`` turns bytes into event
payloads, ``interpret_chunk`` reads one streamed chunk, ``turns_to_drop``
decides how much old history to leave out, ``refusal_message`` turns an HTTP
error into one line for the user. The async functions below them only move
bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from llamad.errors import ContextOverflow, UpstreamError

# Slack on top of the measured template overhead (tokens can merge differently
# at message boundaries than in isolation).
TEMPLATE_SLACK_TOKENS = 4


class SSEDecoder:
    """Sans-I/O server-sent events: feed bytes, get the ``data:`` payloads."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        events: list[bytes] = []
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:  # a blank line ends an event
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                self._data.append(line[5:].lstrip(b" "))
            # comments (":") and other fields are not used by llama-server
        return events


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed tool call: the first carries id and name, all carry arguments."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class Chunk:
    text: str = ""
    finish_reason: str | None = None
    timings: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    done: bool = False  # the [DONE] sentinel
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass
class AssembledCall:
    id: str
    name: str
    arguments: str


class ToolCallAssembler:
    """Joins streamed ``ToolCallDelta`` pieces into whole calls, in index order."""

    def __init__(self) -> None:
        self._calls: dict[int, AssembledCall] = {}

    def feed(self, deltas: Sequence[ToolCallDelta]) -> None:
        for delta in deltas:
            call = self._calls.setdefault(delta.index, AssembledCall("", "", ""))
            call.id = call.id or delta.id
            call.name += delta.name
            call.arguments += delta.arguments

    def calls(self) -> list[AssembledCall]:
        """Every call so far; a call the model left without an id gets a stable one."""
        return [
            AssembledCall(call.id or f"call_{index}", call.name, call.arguments)
            for index, call in sorted(self._calls.items())
        ]


_json = msgspec.json.Decoder()


def interpret_chunk(payload: bytes) -> Chunk:
    """One streamed chunk of ``/v1/chat/completions``."""
    if payload.strip() == b"[DONE]":
        return Chunk(done=True)
    try:
        data = _json.decode(payload)
    except msgspec.DecodeError:
        raise UpstreamError("llama-server sent a chunk that is not JSON") from None
    if not isinstance(data, dict):
        raise UpstreamError("llama-server sent an unexpected chunk")
    if "error" in data:
        raise UpstreamError(f"llama-server: {_error_text(data)}")
    text = ""
    finish = None
    calls: tuple[ToolCallDelta, ...] = ()
    choices = data.get("choices") or []
    if choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta") or {}
        text = delta.get("content") or ""
        finish = choices[0].get("finish_reason")
        calls = _tool_call_deltas(delta.get("tool_calls"))
    return Chunk(
        text=text,
        finish_reason=finish,
        timings=data.get("timings"),
        usage=data.get("usage"),
        tool_calls=calls,
    )


def _tool_call_deltas(raw: Any) -> tuple[ToolCallDelta, ...]:
    if not isinstance(raw, list):
        return ()
    deltas = []
    for position, item in enumerate(raw):
        if not isinstance(item, dict):
            raise UpstreamError("llama-server sent a malformed tool call")
        function = item.get("function") or {}
        index = item.get("index", position)
        deltas.append(
            ToolCallDelta(
                index=index if isinstance(index, int) else position,
                id=_text(item.get("id")),
                name=_text(function.get("name")) if isinstance(function, dict) else "",
                arguments=_text(function.get("arguments")) if isinstance(function, dict) else "",
            )
        )
    return tuple(deltas)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _error_text(data: Any) -> str:
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or data)


def refusal_message(status: int, body: bytes) -> UpstreamError:
    """An HTTP error from llama-server as one actionable line (never the raw body)."""
    try:
        data = _json.decode(body)
        text = _error_text(data)
        kind = data.get("error", {}).get("type", "") if isinstance(data, dict) else ""
    except (msgspec.DecodeError, AttributeError):
        text, kind = " ".join(body[:200].decode("utf-8", "replace").split()), ""
    if "context" in kind or "context" in text.lower():
        return ContextOverflow(
            "the message does not fit in the model's context even with older turns left "
            "out; start a new conversation or raise ctx_size in models.toml"
        )
    return UpstreamError(f"llama-server refused the request (HTTP {status}): {text}")


def turns_to_drop(turn_tokens: Sequence[int], fixed_tokens: int, budget: int) -> int:
    """How many of the oldest turns to leave out so the prompt fits ``budget``.

    ``turn_tokens`` are the turns oldest first, the new user message last;
    ``fixed_tokens`` (the system prompt) always stays. Raises ``ContextOverflow``
    when even the newest turn alone does not fit.
    """
    total = fixed_tokens + sum(turn_tokens)
    dropped = 0
    while total > budget:
        if dropped >= len(turn_tokens) - 1:
            raise ContextOverflow(
                f"the message needs about {fixed_tokens + turn_tokens[-1]} tokens but the "
                f"model's context leaves room for {budget}; shorten it or raise ctx_size"
            )
        total -= turn_tokens[dropped]
        dropped += 1
    return dropped


async def context_size(client: httpx.AsyncClient) -> int:
    """The per-slot context length from ``/props``."""
    props = await _ask(client, "GET", "/props")
    settings = (props.get("default_generation_settings") or {}) if isinstance(props, dict) else {}
    n_ctx = settings.get("n_ctx") or (props.get("n_ctx") if isinstance(props, dict) else None)
    if not isinstance(n_ctx, int) or n_ctx <= 0:
        raise UpstreamError("llama-server's /props did not report n_ctx")
    return n_ctx


async def _ask(client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> Any:
    """One small request to llama-server; every failure becomes an ``UpstreamError``."""
    try:
        response = await client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise UpstreamError(f"llama-server did not answer {path} ({exc!r})") from None
    if response.status_code != 200:
        raise refusal_message(response.status_code, response.content)
    try:
        return response.json()
    except ValueError:
        raise UpstreamError(f"llama-server sent {path} an answer that is not JSON") from None


async def template_overhead(client: httpx.AsyncClient) -> int:
    """Tokens the chat template adds around one message, plus the reply header.

    Measured on the model itself (``/apply-template`` of an empty message),
    because it ranges from a few special tokens to dozens of spelled-out ones.
    """
    answer = await _ask(
        client, "POST", "/apply-template", json={"messages": [{"role": "user", "content": ""}]}
    )
    prompt = answer.get("prompt", "") if isinstance(answer, dict) else ""
    return await count_tokens(client, prompt) + TEMPLATE_SLACK_TOKENS


async def count_tokens(client: httpx.AsyncClient, text: str) -> int:
    answer = await _ask(client, "POST", "/tokenize", json={"content": text})
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    return len(tokens) if isinstance(tokens, list) else len(text.encode())


async def stream_chat(client: httpx.AsyncClient, payload: dict[str, Any]) -> AsyncIterator[Chunk]:
    """POST a streaming chat completion; yield chunks until [DONE]."""
    try:
        async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            if response.status_code != 200:
                raise refusal_message(response.status_code, await response.aread())
            decoder = SSEDecoder()
            async for raw in response.aiter_raw():
                for event in decoder.feed(raw):
                    chunk = interpret_chunk(event)
                    if chunk.done:
                        return
                    yield chunk
    except httpx.HTTPError as exc:
        raise UpstreamError(
            f"lost the connection to llama-server while replying ({exc!r})"
        ) from None
