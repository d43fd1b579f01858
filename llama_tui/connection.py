"""The TUI's link to llamad: the WebSocket (default) or the Unix socket.

Both carry the shared protocol (``llamad.protocol``) as msgpack; this module
only moves whole messages. Reconnecting is the app's business.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from llamad.ownership import UntrustedPath, UntrustedPeer, check_server_peer, read_private_file
from llamad.paths import default_socket_path, runtime_dir
from llamad.protocol import (
    FrameDecoder,
    ProtocolError,
    Request,
    ServerMessage,
    decode_server_message,
    encode,
    frame,
)


class Disconnected(Exception):
    """llamad is not reachable (or went away); ``str()`` says why, in one line."""


class Connection(Protocol):
    async def send(self, request: Request) -> None: ...
    async def receive(self) -> ServerMessage: ...
    async def aclose(self) -> None: ...


class UnixConnection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._decoder = FrameDecoder()
        self._pending: list[ServerMessage] = []

    async def send(self, request: Request) -> None:
        try:
            await self._stream.send_all(frame(encode(request)))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise Disconnected("llamad closed the connection") from exc

    async def receive(self) -> ServerMessage:
        while not self._pending:
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise Disconnected("llamad closed the connection") from exc
            if not data:
                raise Disconnected("llamad closed the connection")
            try:
                self._pending += [decode_server_message(p) for p in self._decoder.feed(data)]
            except ProtocolError as exc:
                raise Disconnected(str(exc)) from exc
        return self._pending.pop(0)

    async def aclose(self) -> None:
        await self._stream.aclose()


class WebSocketLink:
    def __init__(self, connection: WebSocketConnection) -> None:
        self._connection = connection

    async def send(self, request: Request) -> None:
        try:
            await self._connection.send_message(encode(request))
        except (ConnectionClosed, trio.BrokenResourceError) as exc:
            raise Disconnected("llamad closed the connection") from exc

    async def receive(self) -> ServerMessage:
        try:
            data = await self._connection.get_message()
        except (ConnectionClosed, trio.BrokenResourceError) as exc:
            raise Disconnected("llamad closed the connection") from exc
        raw = data.encode() if isinstance(data, str) else data
        try:
            return decode_server_message(raw)
        except ProtocolError as exc:
            raise Disconnected(str(exc)) from exc

    async def aclose(self) -> None:
        await self._connection.aclose()


async def connect(
    nursery: trio.Nursery,
    *,
    socket_path: Path | None,
    url: str | None,
    token_file: Path | None = None,
    env: Mapping[str, str] = os.environ,
) -> Connection:
    """Open the Unix socket when a path is given, else the WebSocket."""
    if socket_path is not None:
        try:
            stream = await trio.open_unix_socket(str(socket_path))
        except OSError as exc:
            raise Disconnected(f"llamad is not running (no answer at {socket_path})") from exc
        await check_daemon_peer(stream, socket_path)
        return UnixConnection(stream)
    token = read_token(token_file or runtime_dir(env) / "token")
    target = url or "ws://127.0.0.1:8765/"
    try:
        connection = await connect_websocket_url(
            nursery,
            target,
            extra_headers=[(b"Authorization", f"Bearer {token}".encode())],
            max_message_size=16 * 1024 * 1024,
        )
    except (OSError, HandshakeError, ConnectionClosed) as exc:
        raise Disconnected(f"llamad is not reachable at {target} ({exc})") from exc
    return WebSocketLink(connection)


async def check_daemon_peer(stream: trio.SocketStream, socket_path: Path) -> None:
    """Before anything is sent: the daemon on the socket must run as us (or root)."""
    try:
        check_server_peer(stream.socket, f"the socket {socket_path}")
    except UntrustedPeer as exc:
        await stream.aclose()
        raise Disconnected(str(exc)) from None


def read_token(token_file: Path) -> str:
    """The WebSocket token, only from a file that is ours alone (0600, not a symlink).

    A token file planted by another user would send our prompts to their server.
    """
    try:
        return read_private_file(token_file).decode(errors="replace").strip()
    except UntrustedPath as exc:
        raise Disconnected(str(exc)) from None
    except OSError as exc:
        raise Disconnected(f"llamad is not running (no token at {token_file})") from exc


def default_socket() -> Path:
    return default_socket_path(os.environ)
