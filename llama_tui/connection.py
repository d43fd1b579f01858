"""The TUI's link to llamad: the Unix socket or the WebSocket.

Both carry the shared protocol (``llamad.protocol``) as msgpack; this module
only moves whole messages. Reconnecting is the app's business. With neither
``--socket`` nor ``--url``, ``default_transport`` finds the local llamad.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, cast

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from llamad.ownership import UntrustedPeer, check_server_peer
from llamad.paths import default_socket_path, runtime_dir, websocket_address_path
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
    """Open the Unix socket when a path is given, else the WebSocket.

    With neither, the local llamad's (``default_transport``), looked up again
    on every call: llamad may have started, stopped or moved since the last.
    """
    if socket_path is None and url is None:
        socket_path, url = default_transport(env)
    if socket_path is not None:
        try:
            stream = await trio.open_unix_socket(str(socket_path))
        except OSError as exc:
            raise Disconnected(f"llamad is not running (no answer at {socket_path})") from exc
        try:
            # trio's socket answers getsockopt as the standard one does.
            check_server_peer(cast(socket.socket, stream.socket), f"the socket {socket_path}")
        except UntrustedPeer as exc:
            await stream.aclose()
            raise Disconnected(str(exc)) from None
        return UnixConnection(stream)
    token_file = token_file or runtime_dir(env) / "token"
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise Disconnected(f"llamad is not running (no token at {token_file})") from exc
    target = url or "ws://127.0.0.1:8765/"
    try:
        connection = await connect_websocket_url(
            nursery,
            target,
            extra_headers=[(b"Authorization", f"Bearer {token}".encode())],
            max_message_size=16 * 1024 * 1024,
        )
    except (OSError, HandshakeError, ConnectionClosed) as exc:
        raise Disconnected(f"llamad is not reachable at {target} ({_why(exc)})") from exc
    return WebSocketLink(connection)


def _why(exc: BaseException) -> str:
    """A failed connection in words, not as an exception's repr."""
    if isinstance(exc, OSError):
        return exc.strerror or "the connection failed"
    status = getattr(exc, "status_code", None)
    if status == 401:
        return "the token was refused: is it the token of this llamad?"
    if status is not None:
        return f"the handshake was refused with HTTP {status}"
    if isinstance(exc, ConnectionClosed):
        return "llamad closed the connection"
    return "the WebSocket handshake failed"


def default_transport(env: Mapping[str, str] = os.environ) -> tuple[Path | None, str | None]:
    """Where a local client finds llamad when told nothing: ``(socket_path, url)``.

    The Unix socket when it exists (no token or port needed), else the
    WebSocket address llamad wrote into its runtime directory (so a configured
    ``websocket = "HOST:PORT"`` is found), else the default socket, whose
    absence is what the user is then told about.
    """
    socket_path = default_socket_path(env)
    if socket_path.exists():
        return socket_path, None
    try:
        address = websocket_address_path(env).read_text().strip()
    except OSError:
        return socket_path, None
    if address.startswith(("ws://", "wss://")):
        return None, address
    return socket_path, None
