"""Cheap streaming clients for the relay benchmarks, all in one thread.

``read_streams`` drives any number of connections with one ``selectors`` loop
and timestamps, per stream, the request, the first token and the last one.
Two parsers count tokens as they arrive:

- ``SSEParser``: llama-server's ``/v1/chat/completions`` stream read straight
  off the socket; a token is an event with ``"delta":{"content":"…"}`` (found by
  a byte search, cheaper than the JSON parsing llamad must do);
- ``FrameParser``: llamad's control protocol; a token is a ``chat_delta`` (or,
  at ``chat_done``, the reply's ``completion_tokens`` when deltas were merged);
- ``WebSocketParser``: the same messages in llamad's WebSocket frames (msgpack),
  the frames parsed by hand: as cheap a client as the other two (a trio and
  trio-websocket client costs several times their CPU per token, taken from
  llama-server on a small machine).

Both run in C for the heavy parts, so the measuring client is not what limits
the figure (see ``cpu_seconds`` in the results, the client's own CPU time).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llamad.protocol import (
    Chat,
    ChatDelta,
    ChatDone,
    ChatOptions,
    ChatStarted,
    Error,
    FrameDecoder,
    decode_server_message,
    encode,
    frame,
)

_TOKEN = b'"delta":{"content":"'
_DONE = b"data: [DONE]"


class Parser(Protocol):
    def feed(self, data: bytes) -> tuple[int, bool]:
        """Bytes in; (tokens completed in them, whether the stream ended)."""


class SSEParser:
    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> tuple[int, bool]:
        data = self._tail + data
        end = data.rfind(b"\n\n")
        if end < 0:
            self._tail = data
            return 0, False
        complete, self._tail = data[: end + 2], data[end + 2 :]
        return complete.count(_TOKEN), _DONE in complete


class FrameParser:
    def __init__(self) -> None:
        self._decoder = FrameDecoder()
        self.reply: ChatDone | None = None
        self.started = 0.0  # when chat_started came: the user message is on disk
        self.deltas = 0

    def feed(self, data: bytes) -> tuple[int, bool]:
        return self.messages(self._decoder.feed(data))

    def messages(self, payloads: list[bytes]) -> tuple[int, bool]:
        """Whole messages (msgpack) in; (tokens in them, whether the reply is done)."""
        tokens = 0
        done = False
        for payload in payloads:
            message = decode_server_message(payload)
            if isinstance(message, ChatDelta):
                tokens += 1
                self.deltas += 1
            elif isinstance(message, ChatStarted):
                self.started = time.perf_counter()
            elif isinstance(message, ChatDone):
                self.reply = message
                done = True
                # A delta may carry several tokens (if llamad merges them): the
                # stored reply's count is the truth.
                stats = message.message.stats
                if stats is not None and stats.completion_tokens:
                    tokens += max(0, stats.completion_tokens - self.deltas)
            elif isinstance(message, Error):
                raise RuntimeError(f"llamad refused the chat: {message.message}")  # noqa: TRY004
        return tokens, done


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocketParser(FrameParser):
    """``FrameParser`` for llamad's WebSocket: its frames read by hand.

    A server's frames are not masked and llamad sends each message whole, in
    one binary frame (a 2-byte header, then a 16- or 64-bit length when the
    payload is 126 bytes or more). Pings are left unanswered (a stream is over
    long before llamad would miss the pong); a close frame ends the stream.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tail = b""

    def feed(self, data: bytes) -> tuple[int, bool]:
        buffer = self._tail + data if self._tail else data
        size = len(buffer)
        payloads: list[bytes] = []
        closed = False
        at = 0
        while size - at >= 2:
            first, second = buffer[at], buffer[at + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if size - at < 4:
                    break
                (length,) = struct.unpack_from(">H", buffer, at + 2)
                head = 4
            elif length == 127:
                if size - at < 10:
                    break
                (length,) = struct.unpack_from(">Q", buffer, at + 2)
                head = 10
            end = at + head + length
            if end > size:
                break
            opcode = first & 0x0F
            if second & 0x80 or (opcode in (0x0, 0x1, 0x2) and not first & 0x80):
                raise RuntimeError(f"unexpected WebSocket frame header {buffer[at : at + 2]!r}")
            if opcode == 0x2:
                payloads.append(buffer[at + head : end])
            elif opcode == 0x8:
                closed = True
            elif opcode not in (0x9, 0xA):  # ping, pong
                raise RuntimeError(f"unexpected WebSocket opcode {opcode:#x}")
            at = end
        self._tail = buffer[at:]
        tokens, done = self.messages(payloads)
        return tokens, done or closed


def websocket_connect(address: str, token: str) -> socket.socket:
    """A TCP connection to llamad's WebSocket (``host:port``), its handshake done."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host.strip("[]"), int(port)))
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET /?token="
        + token.encode()
        + b" HTTP/1.1\r\nHost: "
        + address.encode()
        + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
        + key
        + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"llamad closed the WebSocket handshake: {response!r}")
        response += chunk
    head, _, rest = response.partition(b"\r\n\r\n")
    accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
    if not head.startswith(b"HTTP/1.1 101") or accept not in head:
        raise ConnectionError(f"llamad refused the WebSocket handshake: {head!r}")
    if rest:  # llamad says nothing before it is asked
        raise ConnectionError(f"unexpected bytes after the handshake: {rest!r}")
    return sock


def websocket_frame(payload: bytes) -> bytes:
    """One binary client frame: masked, as RFC 6455 requires of a client."""
    size = len(payload)
    if size < 126:
        header = struct.pack(">BB", 0x82, 0x80 | size)
    elif size < 65536:
        header = struct.pack(">BBH", 0x82, 0x80 | 126, size)
    else:
        header = struct.pack(">BBQ", 0x82, 0x80 | 127, size)
    mask = os.urandom(4)
    key = (mask * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload) ^ int.from_bytes(key)).to_bytes(size)
    return header + mask + masked


@dataclass
class Stream:
    """One request: how to open it, and when its tokens came."""

    open: Callable[[], socket.socket]
    request: bytes
    parser: Parser
    sent: float = 0.0
    first: float = 0.0  # first token
    last: float = 0.0  # last token
    tokens: int = 0
    done: bool = False
    cpu: float = 0.0  # the client's CPU seconds for it, when measured (``read_one``)
    sock: socket.socket | None = field(default=None, repr=False)

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def rate(self) -> float:
        """Tokens/s while streaming: first token to last."""
        span = self.last - self.first
        return (self.tokens - 1) / span if span > 0 else float("nan")


def read_streams(streams: Sequence[Stream], timeout: float = 120.0) -> float:
    """Open every stream, send its request, read all to the end; returns the wall time."""
    selector = selectors.DefaultSelector()
    began = time.perf_counter()
    for stream in streams:
        stream.sent = time.perf_counter()
        sock = stream.open()
        sock.sendall(stream.request)
        sock.setblocking(False)
        stream.sock = sock
        selector.register(sock, selectors.EVENT_READ, stream)
    remaining = len(streams)
    deadline = began + timeout
    try:
        while remaining:
            events = selector.select(timeout=max(0.0, deadline - time.perf_counter()))
            if not events:
                raise TimeoutError(f"{remaining} streams did not finish within {timeout} s")
            for key, _ in events:
                stream = key.data
                data = stream.sock.recv(262144)
                now = time.perf_counter()
                if data:
                    tokens, done = stream.parser.feed(data)
                else:
                    tokens, done = 0, True  # closed by the server
                if tokens:
                    if not stream.tokens:
                        stream.first = now
                    stream.tokens += tokens
                    stream.last = now
                if done:
                    stream.done = True
                    remaining -= 1
                    selector.unregister(stream.sock)
                    stream.sock.close()
    finally:
        for stream in streams:
            if stream.sock is not None and not stream.done:
                stream.sock.close()
        selector.close()
    return time.perf_counter() - began


def read_one(stream: Stream, timeout: float = 120.0) -> Stream:
    """``read_streams`` for one stream, with this process's CPU time for it in ``cpu``."""
    began = time.process_time()
    read_streams([stream], timeout)
    stream.cpu = time.process_time() - began
    return stream


def unix_opener(path: Path) -> Callable[[], socket.socket]:
    def open_() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        return sock

    return open_


def completion_payload(max_tokens: int, *, seed: int = 42, prompt: str = "hi") -> dict[str, Any]:
    """What llamad sends upstream for a new conversation with these options."""
    return {
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0.8,
        "max_tokens": max_tokens,
        "seed": seed,
        "ignore_eos": True,
    }


def http_post(path: str, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: llama-server\r\nContent-Type: application/json\r\n"
        f"Accept: */*\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def direct_stream(endpoint: Path, max_tokens: int, *, seed: int = 42) -> Stream:
    """A chat completion read straight from llama-server (or the fast upstream)."""
    return Stream(
        unix_opener(endpoint),
        http_post("/v1/chat/completions", completion_payload(max_tokens, seed=seed)),
        SSEParser(),
    )


def chat_request(max_tokens: int, *, seed: int = 42, request_id: int = 1) -> Chat:
    return Chat(
        id=request_id,
        content="hi",
        options=ChatOptions(temperature=0.8, max_tokens=max_tokens, seed=seed, ignore_eos=True),
    )


def llamad_stream(control: Path, max_tokens: int, *, seed: int = 42) -> Stream:
    """The same chat (a new conversation each time) through llamad's control socket."""
    return Stream(
        unix_opener(control), frame(encode(chat_request(max_tokens, seed=seed))), FrameParser()
    )


def websocket_stream(address: str, token: str, max_tokens: int, *, seed: int = 42) -> Stream:
    """The same chat through llamad's WebSocket (msgpack). The connection is opened
    and its handshake done here, before the clock starts (``read_streams`` starts
    it at the request)."""
    sock = websocket_connect(address, token)
    return Stream(
        lambda: sock,
        websocket_frame(encode(chat_request(max_tokens, seed=seed))),
        WebSocketParser(),
    )
