"""Client-side faults: a client that stops reading, and a crowd of clients.

A client that stops reading while a reply streams must cost nobody else
anything: other chats complete promptly, llamad's memory stays bounded (one
bounded queue per client), and the stuck client is dropped once it is that
far behind. The reply it asked for is still generated and stored: it can read
it from the history later.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import resource
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psutil
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from llamad.dispatch import SEND_TIMEOUT_SEC
from llamad.protocol import (
    Chat,
    ChatDelta,
    ChatDone,
    ChatOptions,
    ConversationReply,
    Conversations,
    FrameDecoder,
    GetConversation,
    ListConversations,
    ServerMessage,
    Status,
    StatusReply,
    Subscribe,
    Watch,
    decode_server_message,
    encode,
    frame,
)
from tests.conftest import Llamad, ready_daemon
from tests.faults.util import SLACK, MakeLlamad, wait_until

pytestmark = pytest.mark.server

# Every token is one chat_delta event: the stuck client's events outrun its
# socket buffers plus its 1,024-event queue several times over. (Long replies
# slow down as the context fills: this takes a few seconds.)
FLOOD = ChatOptions(max_tokens=6000, ignore_eos=True)
SMALL = ChatOptions(max_tokens=32, ignore_eos=True)
WATCHERS = 20


def _open_fds(daemon: Llamad) -> int:
    assert daemon.process is not None
    return psutil.Process(daemon.process.pid).num_fds()


def _rss(daemon: Llamad) -> int:
    assert daemon.process is not None
    return int(psutil.Process(daemon.process.pid).memory_info().rss)


def _chat_seconds(daemon: Llamad, content: str) -> float:
    began = time.monotonic()
    with daemon.client(timeout=30) as client:
        messages = list(client.stream(lambda i: Chat(id=i, content=content, options=SMALL)))
    done = messages[-1]
    assert isinstance(done, ChatDone) and done.message.status == "complete", done
    assert done.message.text == "".join(m.text for m in messages if isinstance(m, ChatDelta))
    return time.monotonic() - began


# --------------------------------------------------- raw clients that stop reading


def _small_receive_buffer(sock: socket.socket) -> None:
    # Before connect, so a TCP window starts small too: the daemon's sends
    # block soon, as they would for a client on a stalled network.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


@contextlib.contextmanager
def _stuck_unix_client(daemon: Llamad, content: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _small_receive_buffer(sock)
    sock.connect(str(daemon.socket_path))
    sock.sendall(frame(encode(Chat(id=1, content=content, options=FLOOD))))
    with sock:
        yield sock


def _unix_messages(data: bytes) -> list[ServerMessage]:
    decoder = FrameDecoder()
    return [decode_server_message(p) for p in decoder.feed(data)]


@contextlib.contextmanager
def _stuck_websocket_client(daemon: Llamad, content: str) -> Iterator[socket.socket]:
    """A WebSocket client by hand: handshake, one masked text frame, then silence."""
    with daemon.client() as client:
        reply = client.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply) and reply.websocket is not None
    host, port = reply.websocket.rsplit(":", 1)
    token = (daemon.runtime_dir / "token").read_text().strip()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _small_receive_buffer(sock)
    sock.settimeout(15)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /?token={token} HTTP/1.1\r\nHost: {reply.websocket}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)  # byte by byte: read nothing past the handshake
    assert response.startswith(b"HTTP/1.1 101"), response
    payload = json.dumps(
        {"type": "chat", "id": 1, "content": content, "options": msgspec.to_builtins(FLOOD)}
    ).encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    header = bytes([0x81, 0x80 | 126]) + struct.pack(">H", len(payload))
    sock.sendall(header + mask + masked)
    with sock:
        yield sock


def _websocket_messages(data: bytes) -> list[dict[str, object] | str]:
    """Server frames (unmasked): JSON messages, and "close" for a close frame."""
    messages: list[dict[str, object] | str] = []
    at = 0
    while at + 2 <= len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            (length,) = struct.unpack(">H", data[at : at + 2])
            at += 2
        elif length == 127:
            (length,) = struct.unpack(">Q", data[at : at + 8])
            at += 8
        body = data[at : at + length]
        at += length
        if len(body) < length:
            break  # cut short: the connection was dropped mid-frame
        if opcode == 0x1:
            messages.append(json.loads(body))
        elif opcode == 0x8:
            messages.append("close")
    return messages


def _read_until_closed(sock: socket.socket, websocket: bool, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(1 << 20):
            data += chunk
            if websocket and b"\x88" in data[-200:] and "close" in _websocket_messages(data):
                break  # the close frame; the TCP close waits for our (absent) reply
    return data


@pytest.mark.parametrize("transport", ["unix", "websocket"])
def test_client_that_stops_reading_is_dropped_and_costs_nobody_else(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], transport: str
) -> None:
    daemon = ready_daemon(make_llamad, demo_models, parallel=2, ctx_size=2 * 8192)
    baseline = _chat_seconds(daemon, "warm up")
    rss_before = _rss(daemon)
    fds_before = _open_fds(daemon)
    stuck = _stuck_unix_client if transport == "unix" else _stuck_websocket_client
    title = f"flood over {transport}"
    with stuck(daemon, title) as sock:
        # The flood has started: its conversation exists and is generating.
        def flood_conversation() -> str | None:
            with daemon.client() as client:
                page = client.call(lambda i: ListConversations(id=i, limit=10))
            assert isinstance(page, Conversations)
            return next((c.id for c in page.conversations if c.title == title), None)

        wait_until(lambda: flood_conversation() is not None, SLACK, "the flood to start")
        conversation = flood_conversation()
        assert conversation is not None
        # More stuck clients: watchers of the flood that never read either. Were
        # events buffered without bound, llamad would hold every one for each.
        watchers = []
        for n in range(WATCHERS):
            watcher = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            _small_receive_buffer(watcher)
            watcher.connect(str(daemon.socket_path))
            watcher.sendall(frame(encode(Watch(id=n, conversation=conversation))))
            watchers.append(watcher)
        # Others chat while it streams into the stuck socket: as promptly as ever
        # (the bound is loose: a busy CI machine is not a benchmark).
        during = [_chat_seconds(daemon, f"meanwhile {n}") for n in range(3)]
        assert max(during) < baseline + SLACK, (baseline, during)

        # The flood is generated to the end and stored, whoever reads it.
        def flood_status() -> str:
            with daemon.client() as client:
                reply = client.call(
                    lambda i: GetConversation(id=i, conversation=conversation)  # type: ignore[arg-type]
                )
            assert isinstance(reply, ConversationReply)
            return reply.messages[-1].status

        wait_until(lambda: flood_status() == "complete", 90, "the flood reply to complete")
        # Bounded memory: 6,000 events each went to 21 clients that read none
        # of them; llamad kept at most a queue's worth per client.
        growth = _rss(daemon) - rss_before
        assert growth < 32 * 2**20, f"llamad grew by {growth / 2**20:.1f} MiB"
        # Stuck clients are closed while they are still stuck, not when they
        # read again: no progress for SEND_TIMEOUT_SEC frees their connection.
        wait_until(
            lambda: _open_fds(daemon) <= fds_before + 1,
            SEND_TIMEOUT_SEC + SLACK,
            "llamad to close the stuck connections",
        )
        for watcher in watchers:
            with watcher:
                seen = _unix_messages(_read_until_closed(watcher, False, timeout=SLACK * 2))
            assert not any(isinstance(m, ChatDone) for m in seen)
            assert sum(isinstance(m, ChatDelta) for m in seen) < FLOOD.max_tokens // 2  # type: ignore[operator]
        # The stuck client reads at last: it gets what was queued, then the
        # connection ends without the chat's end: it was dropped.
        data = _read_until_closed(sock, transport == "websocket", timeout=SLACK * 2)
    if transport == "unix":
        messages = _unix_messages(data)
        assert messages and not any(isinstance(m, ChatDone) for m in messages)
        deltas = sum(isinstance(m, ChatDelta) for m in messages)
    else:
        frames = _websocket_messages(data)
        # Dropped at once, without a close handshake it would never answer: the
        # stream just ends after what was queued (the last frame may be cut short).
        assert "close" not in frames
        assert not any(isinstance(f, dict) and f["type"] == "chat_done" for f in frames)
        deltas = sum(isinstance(f, dict) and f["type"] == "chat_delta" for f in frames)
    # Cut off after about a queue's worth (1,024) plus what the socket held.
    assert 0 < deltas < FLOOD.max_tokens // 2  # type: ignore[operator]
    assert _chat_seconds(daemon, "afterwards") < baseline + SLACK
    assert daemon.process is not None and daemon.process.poll() is None
    assert "Traceback" not in daemon.log()


# ------------------------------------------------------------ a crowd of clients

CLIENTS = 200
CHATTING = 20


def _enough_file_descriptors(needed: int) -> None:
    # Both ends of every connection live on this machine; llamad inherits the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} this drill needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class UnixClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.pending: list[ServerMessage] = []

    async def send(self, request: Chat | Status | Subscribe) -> None:
        await self.stream.send_all(frame(encode(request)))

    async def receive(self) -> ServerMessage:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            assert data, "llamad closed the connection"
            self.pending += [decode_server_message(p) for p in self.decoder.feed(data)]
        return self.pending.pop(0)


class WsClient:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, request: Chat | Status | Subscribe) -> None:
        await self.ws.send_message(encode(request))  # binary: msgpack

    async def receive(self) -> ServerMessage:
        raw = await self.ws.get_message()
        assert isinstance(raw, bytes)
        return decode_server_message(raw)


async def test_two_hundred_clients_twenty_chatting(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    _enough_file_descriptors(4 * CLIENTS + 256)
    daemon = ready_daemon(make_llamad, demo_models, parallel=4, ctx_size=4096)
    with daemon.client() as control:
        reply = control.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply) and reply.websocket is not None
    token = (daemon.runtime_dir / "token").read_text().strip()
    url = f"ws://{reply.websocket}/?token={token}"
    results: dict[int, tuple[str, list[str], ChatDone]] = {}
    statuses = 0

    async def one(n: int, client: UnixClient | WsClient, connected: trio.Event) -> None:
        nonlocal statuses
        await client.send(Status(id=1))
        assert isinstance(await client.receive(), StatusReply)
        connected.set()
        await everyone_connected.wait()
        if n % (CLIENTS // CHATTING) == 0:  # every tenth client chats
            content = f"client {n} says hello"
            await client.send(Chat(id=2, content=content, options=SMALL))
            deltas: list[str] = []
            while True:
                message = await client.receive()
                assert message.id == 2, message
                if isinstance(message, ChatDelta):
                    deltas.append(message.text)
                if isinstance(message, ChatDone):
                    results[n] = (content, deltas, message)
                    if len(results) == CHATTING:
                        chats_done.set()
                    break
        await all_chats_done.wait()
        await client.send(Status(id=3))  # every client is still served
        assert isinstance(await client.receive(), StatusReply)
        statuses += 1

    async def unix_client(n: int, connected: trio.Event) -> None:
        async with await trio.open_unix_socket(str(daemon.socket_path)) as stream:
            await one(n, UnixClient(stream), connected)

    async def ws_client(n: int, connected: trio.Event) -> None:
        async with open_websocket_url(url) as ws:
            await one(n, WsClient(ws), connected)

    everyone_connected = trio.Event()
    chats_done = trio.Event()
    all_chats_done = trio.Event()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            events = []
            for n in range(CLIENTS):
                connected = trio.Event()
                events.append(connected)
                # A quarter on the WebSocket (half of the chatters), the rest on the Unix socket.
                nursery.start_soon(ws_client if n % 4 == 2 else unix_client, n, connected)
            for connected in events:
                await connected.wait()
            everyone_connected.set()
            await chats_done.wait()
            all_chats_done.set()
    assert statuses == CLIENTS
    assert len(results) == CHATTING
    for deltas, done in (result[1:] for result in results.values()):
        assert done.message.status == "complete", done.message.error
        assert done.message.text == "".join(deltas)
        assert done.message.stats is not None
        assert done.message.stats.completion_tokens == SMALL.max_tokens
    # Every conversation is in the history, whole.
    with daemon.client() as client:
        page = client.call(lambda i: ListConversations(id=i, limit=100))
        assert isinstance(page, Conversations)
        assert sorted(c.title for c in page.conversations) == sorted(
            content for content, _, _ in results.values()
        )
        by_title = {c.title: c.id for c in page.conversations}
        for content, _, done in results.values():
            conversation = by_title[content]
            stored = client.call(lambda i: GetConversation(id=i, conversation=conversation))  # noqa: B023
            assert isinstance(stored, ConversationReply)
            user, assistant = stored.messages
            assert user.text == content
            assert assistant.status == "complete" and assistant.text == done.message.text
    assert "Traceback" not in daemon.log()
