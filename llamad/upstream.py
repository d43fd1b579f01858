"""Talking to llama-server's OpenAI-style API.

The decisions are pure and tested alone: ``ResponseReader`` turns the bytes of
an HTTP/1.1 response into its status and body, ``SSEDecoder`` turns body bytes
into event payloads, ``interpret_chunk`` reads one streamed chunk and
``merge_chunks`` joins the chunks of one read, ``turns_to_drop`` decides how
much old history to leave out, ``refusal_message`` turns an HTTP error into one
line for the user. The async functions below them only move bytes.

Streaming is the hot path of the whole daemon (every token of every reply
passes here, and on a machine whose cores llama-server saturates each cycle
spent here is taken from generation): ``stream_chat_direct`` reads the reply
straight off the socket (httpx's layers cost about as much per read as all of
llamad's own work, see bench/README.md), decodes each chunk into typed structs
that skip the fields llamad does not use, and hands over one merged chunk per
read instead of one per token.
"""

from __future__ import annotations

import contextlib
import math
import os
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httpx
import msgspec
import trio

from llamad.errors import ContextOverflow, UpstreamError
from llamad.llama_server import Endpoint

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


class ResponseReader:
    """Sans-I/O HTTP/1.1 response: feed the bytes as they arrive, get the body's bytes.

    ``status`` (and ``headers``, names in lower case) are set once the head is
    in. ``feed`` returns the body bytes decoded so far, from a chunked body,
    one with a Content-Length or one that ends when the connection closes;
    ``complete`` says the body has ended. ``closed`` is called when the
    connection has closed and raises if the response was cut short. Every
    malformed response is an ``UpstreamError`` of one line.
    """

    MAX_HEAD_BYTES = 65536
    MAX_SIZE_LINE_BYTES = 1024

    def __init__(self, *, no_body: bool = False) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.complete = False
        self._no_body = no_body  # the answer to HEAD: a head, whatever it says of a body
        self._buffer = b""
        self._framing = ""  # "chunked", "length" or "close", once the head is in
        self._left = 0  # bytes left of the current chunk, or of a Content-Length body
        self._chunk_end = False  # the CRLF after a chunk's data is still due
        self._trailer = False  # after the last chunk: trailer lines until a blank one

    def feed(self, data: bytes) -> bytes:
        if self.complete:
            return b""
        # Usually nothing is left over from the last read: no copy then.
        buffer = self._buffer + data if self._buffer else data
        if not self._framing:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > self.MAX_HEAD_BYTES:
                    raise UpstreamError("llama-server sent an HTTP head that never ends")
                self._buffer = buffer
                return b""
            self._head(buffer[:end])
            buffer = buffer[end + 4 :]
        if self._framing == "close":
            self._buffer = b""
            return buffer
        if self._framing == "length":
            body = buffer[: self._left]
            self._left -= len(body)
            self.complete = self._left == 0
            self._buffer = b""
            return body
        return self._dechunk(buffer)

    def closed(self) -> None:
        """The connection closed: fine only after a whole response."""
        if self._framing == "close":
            self.complete = True
        if not self.complete:
            raise UpstreamError("llama-server closed the connection in the middle of its reply")

    def _head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise UpstreamError(f"llama-server sent a bad HTTP status line: {lines[0][:80]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise UpstreamError(f"llama-server sent a bad HTTP header line: {line[:80]!r}")
            self.headers[name.strip().lower()] = value.strip()
        if self._no_body or self.status in (204, 304):
            self._framing = "length"
            self.complete = True
        elif "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._framing = "chunked"
        elif "content-length" in self.headers:
            length = self.headers["content-length"]
            if not length.isdigit():
                raise UpstreamError(f"llama-server sent a bad Content-Length: {length[:40]!r}")
            self._framing = "length"
            self._left = int(length)
            self.complete = self._left == 0
        else:
            self._framing = "close"

    def _dechunk(self, buffer: bytes) -> bytes:
        body: list[bytes] = []
        at = 0
        size = len(buffer)
        while True:
            if self._left:
                piece = buffer[at : at + self._left]
                body.append(piece)
                at += len(piece)
                self._left -= len(piece)
                if self._left:
                    break
                self._chunk_end = True
            if self._chunk_end:
                if size - at < 2:
                    break
                if buffer[at : at + 2] != b"\r\n":
                    raise UpstreamError("llama-server sent a malformed chunked body")
                at += 2
                self._chunk_end = False
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                if size - at > self.MAX_SIZE_LINE_BYTES:
                    raise UpstreamError("llama-server sent a malformed chunked body")
                break
            line = buffer[at:line_end]
            at = line_end + 2
            if self._trailer:
                if not line:  # the blank line that ends the trailer: the body is complete
                    self.complete = True
                    break
                continue
            field = line.split(b";", 1)[0].strip()
            try:
                chunk_size = int(field, 16)
            except ValueError:
                raise UpstreamError("llama-server sent a malformed chunked body") from None
            if chunk_size < 0:
                raise UpstreamError("llama-server sent a malformed chunked body")
            if chunk_size == 0:
                self._trailer = True
            self._left = chunk_size
        self._buffer = buffer[at:] if not self.complete else b""
        return body[0] if len(body) == 1 else b"".join(body)


# Structs, not dataclasses: one is made per token, and a Struct is built ten
# times faster (0.09 against 0.9 µs here).
class ToolCallDelta(msgspec.Struct, frozen=True):
    """A piece of a streamed tool call: the first carries id and name, all carry arguments."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


class Chunk(msgspec.Struct, frozen=True):
    """What llamad uses of one streamed chunk (or of all the chunks of one read)."""

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


# The shape of a chunk as llama-server sends it, reduced to what llamad reads:
# msgspec skips every other field (id, model, created, ...) without building it.
class _FunctionShape(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallShape(msgspec.Struct):
    index: int | None = None
    id: str | None = None
    function: _FunctionShape | None = None


class _DeltaShape(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallShape] | None = None


class _ChoiceShape(msgspec.Struct):
    delta: _DeltaShape | None = None
    finish_reason: str | None = None


class _ChunkShape(msgspec.Struct):
    choices: list[_ChoiceShape] | None = None
    timings: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    error: Any = msgspec.UNSET


_chunk_decoder = msgspec.json.Decoder(_ChunkShape)
_DONE = b"[DONE]"
_DONE_CHUNK = Chunk(done=True)


def interpret_chunk(payload: bytes) -> Chunk:
    """One streamed chunk of ``/v1/chat/completions``.

    The typed decoder reads every well-formed chunk; anything else (an error,
    a field of an unexpected type, a chunk that is not JSON) is read again by
    the generic decoder below, which decides what it means, so both paths
    give the same answer for every input.
    """
    if payload == _DONE:
        return _DONE_CHUNK
    try:
        shape = _chunk_decoder.decode(payload)
    except msgspec.DecodeError:  # also every ValidationError: a shape we did not expect
        return _interpret_generic(payload)
    if shape.error is not msgspec.UNSET:
        return _interpret_generic(payload)
    choices = shape.choices
    if not choices:
        return Chunk(timings=shape.timings, usage=shape.usage)
    choice = choices[0]
    delta = choice.delta
    if delta is None:
        return Chunk(finish_reason=choice.finish_reason, timings=shape.timings, usage=shape.usage)
    calls: tuple[ToolCallDelta, ...] = ()
    if delta.tool_calls is not None:
        calls = tuple(
            ToolCallDelta(
                index=call.index if call.index is not None else position,
                id=call.id or "",
                name=(call.function.name or "") if call.function is not None else "",
                arguments=(call.function.arguments or "") if call.function is not None else "",
            )
            for position, call in enumerate(delta.tool_calls)
        )
    return Chunk(
        text=delta.content or "",
        finish_reason=choice.finish_reason,
        timings=shape.timings,
        usage=shape.usage,
        tool_calls=calls,
    )


def _interpret_generic(payload: bytes) -> Chunk:
    """Any chunk, read as plain JSON values: the reference for ``interpret_chunk``."""
    if payload.strip() == _DONE:
        return _DONE_CHUNK
    try:
        data = _json.decode(payload)
    except msgspec.DecodeError:
        raise UpstreamError("llama-server sent a chunk that is not JSON") from None
    if not isinstance(data, dict):
        raise UpstreamError("llama-server sent an unexpected chunk")
    if "error" in data:
        raise UpstreamError(f"llama-server: {_error_text(data)}")
    # A field of an unexpected type counts as absent (as in a tool call below):
    # a chunk is never turned into an internal error or a non-text delta.
    text = ""
    finish = None
    calls: tuple[ToolCallDelta, ...] = ()
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta")
        if not isinstance(delta, dict):
            delta = {}
        text = _text(delta.get("content"))
        reason = choices[0].get("finish_reason")
        finish = reason if isinstance(reason, str) else None
        calls = _tool_call_deltas(delta.get("tool_calls"))
    return Chunk(
        text=text,
        finish_reason=finish,
        timings=_mapping(data.get("timings")),
        usage=_mapping(data.get("usage")),
        tool_calls=calls,
    )


def merge_chunks(chunks: Sequence[Chunk]) -> Chunk:
    """The chunks of one read as one: texts and tool-call pieces joined in order,
    the last finish reason, timings and usage that were given.

    A reader of the merged chunk ends in the same state as a reader of each in
    turn (``chat`` keeps the last truthy timings, usage and finish reason).
    """
    if len(chunks) == 1:
        return chunks[0]
    texts: list[str] = []
    calls: list[ToolCallDelta] = []
    finish: str | None = None
    timings: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    for chunk in chunks:
        if chunk.text:
            texts.append(chunk.text)
        calls += chunk.tool_calls
        finish = chunk.finish_reason or finish
        timings = chunk.timings or timings
        usage = chunk.usage or usage
    return Chunk(
        text="".join(texts),
        finish_reason=finish,
        timings=timings,
        usage=usage,
        tool_calls=tuple(calls),
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


def _mapping(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


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


def in_words(exc: BaseException) -> str:
    """What went wrong with a connection, for people: never an exception's repr."""
    if isinstance(exc, trio.TooSlowError | httpx.TimeoutException):
        return "it did not answer in time"
    if isinstance(exc, httpx.RemoteProtocolError | trio.BrokenResourceError):
        return "it closed the connection"
    if isinstance(exc, httpx.ConnectError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        return "it refused the connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return "the connection failed"


async def _ask(client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> Any:
    """One small request to llama-server; every failure becomes an ``UpstreamError``."""
    try:
        response = await client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise UpstreamError(f"llama-server did not answer {path}: {in_words(exc)}") from None
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


def read_chunks(events: Sequence[bytes]) -> tuple[Chunk | None, bool, UpstreamError | None]:
    """The events of one read: their chunks merged (None if there were none),
    whether ``[DONE]`` came, and the error that ended them, if one did.

    The chunks before an error still count (they were sent): the caller passes
    them on, then raises the error.
    """
    chunks: list[Chunk] = []
    for event in events:
        try:
            chunk = interpret_chunk(event)
        except UpstreamError as exc:
            return (merge_chunks(chunks) if chunks else None), False, exc
        if chunk.done:
            return (merge_chunks(chunks) if chunks else None), True, None
        chunks.append(chunk)
    return (merge_chunks(chunks) if chunks else None), False, None


async def stream_chat(client: httpx.AsyncClient, payload: dict[str, Any]) -> AsyncGenerator[Chunk]:
    """POST a streaming chat completion through httpx; yield chunks until [DONE].

    One chunk per read from the socket: what arrived together is merged.
    ``stream_chat_direct`` does the same at about half the CPU per read.
    """
    try:
        async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            if response.status_code != 200:
                raise refusal_message(response.status_code, await response.aread())
            decoder = SSEDecoder()
            async for raw in response.aiter_raw():
                chunk, done, error = read_chunks(decoder.feed(raw))
                if chunk is not None:
                    yield chunk
                if error is not None:
                    raise error
                if done:
                    return
    except httpx.HTTPError as exc:
        raise UpstreamError(
            f"lost the connection to llama-server while replying: {in_words(exc)}"
        ) from None


CONNECT_TIMEOUT_SEC = 10.0
_READ_BYTES = 65536
_json_encoder = msgspec.json.Encoder()


def completion_request(endpoint: Endpoint, payload: dict[str, Any]) -> bytes:
    """The bytes of ``POST /v1/chat/completions`` for ``payload``.

    ``Connection: close``: llama-server closes the connection after a streamed
    reply anyway (measured on llama-server 11434), so it is never reused.
    """
    body = _json_encoder.encode(payload)
    host = "llama-server" if endpoint.port is None else f"127.0.0.1:{endpoint.port}"
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


# Reads straight from the file descriptor: trio's receive_some yields to the
# scheduler once more after every read (its cancel-shielded checkpoint), which
# costs a trip through the run loop per token (26,000 of 227,000 instructions
# per token, bench/relay_cost.py). Here a read that finds data does not yield;
# one that finds none waits (a checkpoint), and every _EAGER_READS reads in a
# row that all found data yield anyway, so a flood never starves other tasks.
_EAGER_READS = 16


class _FdReader:
    """Reads a socket's file descriptor the cheap way (see above), batching a fast stream.

    ``receive(batch_window=W)`` sleeps until W after the last read before
    reading again, but only while that pays: while data comes twice or more
    per window (or is already waiting), and while a read after such a sleep
    brings several events. A slower model is read as each token comes: a
    sleep costs a timer wake-up (a cancel scope's worth of trio's machinery,
    more than a read's wake-up), which saves nothing when it brings one token.
    Nor after a read that filled its buffer: more is waiting already, and a
    sleep would only cap the stream at one buffer per window.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._eager = 0  # reads in a row that found data at once
        self._last_read = -math.inf
        self._batching = False
        self._full = False  # the last read filled its buffer

    async def receive(self, *, batch_window: float = 0.0) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        slept = False
        if batch_window > 0 and self._batching and not self._full:
            wake = self._last_read + batch_window
            if wake > trio.current_time():
                self._eager = 0
                slept = True
                await trio.sleep_until(wake)
        if self._eager >= _EAGER_READS:
            self._eager = 0
            await trio.lowlevel.checkpoint()
        waited = False
        while True:
            try:
                data = os.read(self._fd, _READ_BYTES)
            except BlockingIOError:
                self._eager = 0
                waited = True
                await trio.lowlevel.wait_readable(self._fd)
                continue
            self._eager += 1
            self._full = len(data) == _READ_BYTES
            now = trio.current_time()
            if slept:
                # An SSE event ends with a blank line (chunked framing or not).
                self._batching = data.count(b"\n\n") >= 2
            else:
                # Data came twice or more per window since the last read: a sleep will pay.
                self._batching = not waited or now - self._last_read < batch_window / 2
            self._last_read = now
            return data


async def _connect(endpoint: Endpoint, within: float) -> trio.SocketStream:
    try:
        with trio.fail_after(within):
            if endpoint.socket_path is not None:
                return await trio.open_unix_socket(str(endpoint.socket_path))
            return await trio.open_tcp_stream("127.0.0.1", endpoint.port or 0)
    except (OSError, trio.TooSlowError) as exc:
        raise UpstreamError(
            f"llama-server did not answer at {endpoint.describe()}: {in_words(exc)}"
        ) from None


async def stream_chat_direct(
    endpoint: Endpoint,
    payload: dict[str, Any],
    *,
    connect_timeout: float = CONNECT_TIMEOUT_SEC,
    batch_window: float = 0.0,
) -> AsyncGenerator[Chunk]:
    """``stream_chat`` on a socket of its own, without httpx; same chunks, same errors.

    ``batch_window`` (seconds): once text has come and while the model is
    faster than one token per window, read at most once per window, so its
    tokens come out of one read together instead of waking llamad once per
    token; each token is then held back at most that long. A slower model's
    tokens, and the end of a reply once ``finish_reason`` came, are read as
    soon as they arrive. 0 always reads at once.
    """
    stream = await _connect(endpoint, connect_timeout)
    async with stream:
        try:
            await stream.send_all(completion_request(endpoint, payload))
            response = ResponseReader()
            decoder = SSEDecoder()
            refused: list[bytes] = []
            window = 0.0  # batching starts with the first text, ends with the reply
            reader = _FdReader(stream.socket.fileno())
            while True:
                data = await reader.receive(batch_window=window)
                if not data:
                    response.closed()
                body = response.feed(data)
                if response.status is None:
                    continue
                if response.status != 200:
                    refused.append(body)
                    if response.complete or not data:
                        raise refusal_message(response.status, b"".join(refused))
                    continue
                chunk, done, error = read_chunks(decoder.feed(body))
                if chunk is not None:
                    if chunk.finish_reason is not None:
                        window = 0.0  # the rest (timings, [DONE]) is on its way: no waiting
                    elif chunk.text:
                        window = batch_window
                    yield chunk
                if error is not None:
                    raise error
                if done:
                    return
                if response.complete:
                    raise UpstreamError("llama-server ended its reply without [DONE]")
        except (OSError, trio.BrokenResourceError) as exc:
            raise UpstreamError(
                f"lost the connection to llama-server while replying: {in_words(exc)}"
            ) from None


# ------------------------------------------------------- relaying any request

# Hop-by-hop and credential headers are not passed on: the relay frames the
# request itself, and the client's key for llamad is not llama-server's.
_NOT_RELAYED = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "te",
        "trailer",
        "upgrade",
        "host",
        "authorization",
        "x-api-key",
        "origin",
        "cookie",
        "proxy-authorization",
        "expect",
        "accept-encoding",  # what comes back is relayed without its Content-Encoding
    }
)
# What may stand in a request target as it is; anything else is percent-encoded.
_TARGET_SAFE = "/:@!$&'()*+,;=-._~%?"


class UpstreamResponse(Protocol):
    """An answer from a model's server being read: its head, then its body as it arrives."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Names in lower case."""
        ...

    async def read(self, *, batch: bool = False) -> bytes:
        """The next piece of the body as it arrives (transfer coding removed); b"" at its end.

        ``batch``: a piece may wait for the batch window (see ``exchange_direct``),
        so a fast stream comes in fewer, larger pieces.
        """
        ...


async def read_all(response: UpstreamResponse) -> bytes:
    pieces: list[bytes] = []
    while piece := await response.read():
        pieces.append(piece)
    return b"".join(pieces)


def relay_request(
    endpoint: Endpoint, method: str, target: str, body: bytes, headers: Mapping[str, str]
) -> bytes:
    """The bytes of one HTTP/1.1 request to llama-server, closing the connection after it.

    ``target`` is percent-encoded where needed; ``headers`` lose the hop-by-hop
    and credential ones.
    """
    host = "llama-server" if endpoint.port is None else f"127.0.0.1:{endpoint.port}"
    lines = [f"{method} {urllib.parse.quote(target, safe=_TARGET_SAFE)} HTTP/1.1", f"Host: {host}"]
    lines.extend(
        f"{name}: {value}"
        for name, value in headers.items()
        if name.lower() not in _NOT_RELAYED and "\r" not in value and "\n" not in value
    )
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _DirectResponse:
    """``UpstreamResponse`` read straight off the socket (``ResponseReader``, ``_FdReader``)."""

    def __init__(
        self, reader: ResponseReader, fd: _FdReader, first: bytes, batch_window: float
    ) -> None:
        assert reader.status is not None
        self.status: int = reader.status
        self.headers: Mapping[str, str] = reader.headers
        self._reader = reader
        self._fd = fd
        self._pending = first
        self._batch_window = batch_window

    async def read(self, *, batch: bool = False) -> bytes:
        if self._pending:
            piece, self._pending = self._pending, b""
            return piece
        reader = self._reader
        while not reader.complete:
            try:
                data = await self._fd.receive(batch_window=self._batch_window if batch else 0.0)
            except OSError as exc:
                raise _lost(exc) from None
            if not data:
                reader.closed()
                return b""
            piece = reader.feed(data)
            if piece:
                return piece
        return b""


def _lost(exc: BaseException) -> UpstreamError:
    return UpstreamError(f"lost the connection to llama-server while replying: {in_words(exc)}")


@contextlib.asynccontextmanager
async def exchange_direct(
    endpoint: Endpoint,
    method: str,
    target: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_SEC,
    batch_window: float = 0.0,
) -> AsyncIterator[UpstreamResponse]:
    """One request on a socket of its own, without httpx; the response once its head is in.

    Leaving the block closes the socket, which is what tells llama-server to
    stop generating: a relay that is cancelled frees the slot at once.
    ``batch_window`` (seconds): a ``read(batch=True)`` comes at most once per
    window after the last read, as in ``stream_chat_direct``.
    """
    stream = await _connect(endpoint, connect_timeout)
    async with stream:
        reader = ResponseReader(no_body=method == "HEAD")
        fd = _FdReader(stream.socket.fileno())
        try:
            await stream.send_all(relay_request(endpoint, method, target, body, headers or {}))
            first = b""
            while reader.status is None:
                data = await fd.receive()
                if not data:
                    reader.closed()
                first += reader.feed(data)
        except (OSError, trio.BrokenResourceError) as exc:
            raise _lost(exc) from None
        yield _DirectResponse(reader, fd, first, batch_window)


class _HttpxResponse:
    """``UpstreamResponse`` through an httpx client (a model served elsewhere)."""

    def __init__(self, response: httpx.Response) -> None:
        self.status: int = response.status_code
        self.headers: Mapping[str, str] = response.headers
        # Decoded: the relay never passes Content-Encoding on, so a body the
        # remote server compressed must reach the client as plain bytes.
        self._pieces = cast(AsyncGenerator[bytes, None], response.aiter_bytes())

    async def read(self, *, batch: bool = False) -> bytes:
        del batch  # httpx reads as it reads
        try:
            async for piece in self._pieces:
                if piece:
                    return piece
        except httpx.HTTPError as exc:
            raise _lost(exc) from None
        return b""

    async def aclose(self) -> None:
        await self._pieces.aclose()


@contextlib.asynccontextmanager
async def exchange_httpx(
    client: httpx.AsyncClient,
    method: str,
    target: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_SEC,
) -> AsyncIterator[UpstreamResponse]:
    """``exchange_direct`` through ``client`` (a remote server: its base URL, key and TLS)."""
    relayed = {k: v for k, v in (headers or {}).items() if k.lower() not in _NOT_RELAYED}
    request = client.build_request(
        method,
        target,
        content=body or None,
        headers=relayed,
        timeout=httpx.Timeout(None, connect=connect_timeout),
    )
    try:
        response = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise UpstreamError(f"llama-server did not answer {target}: {in_words(exc)}") from None
    wrapped = _HttpxResponse(response)
    try:
        yield wrapped
    finally:
        # Closing the connection is what tells the server to stop generating;
        # done even when the relay is cancelled.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + connect_timeout):
            await wrapped.aclose()
            await response.aclose()
