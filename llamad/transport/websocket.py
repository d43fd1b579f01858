"""The WebSocket: the same messages as the control socket, for browsers and scripts.

A binary WebSocket message carries msgpack, a text message carries JSON; each
reply uses the encoding of the request it answers. Any web page the user
opens can reach a loopback port, so the handshake is checked (``check_handshake``,
pure and unit-tested) before anything else: a bearer token made fresh at each
start, no foreign ``Origin``, and a loopback ``Host`` (DNS rebinding).
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from llamad.config import is_loopback
from llamad.dispatch import (
    DISCONNECTS,
    SEND_TIMEOUT_SEC,
    Dispatcher,
    PeerGone,
    SubscriberTooSlow,
    contain_client,
)
from llamad.errors import ConfigError
from llamad.protocol import (
    Error,
    ProtocolError,
    Request,
    ServerMessage,
    decode_request,
    encode,
    encode_json,
)

log = logging.getLogger(__name__)


MAX_MESSAGE_BYTES = 16 * 1024 * 1024
PING_INTERVAL_SEC = 20.0
PONG_TIMEOUT_SEC = 20.0


@dataclass(frozen=True)
class Rejection:
    status: int
    reason: str


def parse_listen_address(value: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``[v6]:PORT`` for IPv6) from ``[daemon] websocket``."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError([f'websocket: expected "HOST:PORT" or "off", got "{value}"'])
    return host, int(port)


def _host_name(host_header: str) -> str:
    """The host part of a ``Host`` header, without the port."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def check_host_and_origin(
    host_header: str,
    origin: str | None,
    *,
    allowed_origins: Sequence[str] = (),
    allowed_hosts: Sequence[str] = (),
) -> Rejection | None:
    """The defences every request from a browser's reach needs (WebSocket and HTTP API).

    The ``Host`` must be a loopback name or address, or listed: a DNS-rebinding
    page reaches a loopback port under its own host name. A request with an
    ``Origin`` comes from a web page and is refused unless that origin is
    listed. Both compare case-insensitively, as host names and schemes do.
    """
    host = _host_name(host_header).lower()
    if not (is_loopback(host) or host in (h.lower() for h in allowed_hosts)):
        return Rejection(403, f"Host {host!r} is not allowed (add it to allowed_hosts)")
    if origin is not None and origin.lower() not in (o.lower() for o in allowed_origins):
        return Rejection(403, f"Origin {origin!r} is not allowed (add it to allowed_origins)")
    return None


def check_handshake(
    host_header: str,
    headers: Iterable[tuple[bytes, bytes]],
    path: str,
    token: str,
    *,
    allowed_origins: Sequence[str] = (),
    allowed_hosts: Sequence[str] = (),
) -> Rejection | None:
    """None when the handshake may proceed, else the HTTP status and why."""
    fields: dict[str, str] = {}
    for name, value in headers:
        fields[name.decode("latin-1").lower()] = value.decode("latin-1")
    rejection = check_host_and_origin(
        host_header,
        fields.get("origin"),
        allowed_origins=allowed_origins,
        allowed_hosts=allowed_hosts,
    )
    if rejection is not None:
        return rejection
    offered = ""
    authorization = fields.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        offered = authorization[7:].strip()
    else:
        # Browsers cannot set headers on a WebSocket, hence the query parameter.
        offered = parse_qs(urlsplit(path).query).get("token", [""])[0]
    if not offered or not secrets.compare_digest(offered.encode(), token.encode()):
        return Rejection(401, "missing or wrong token (see the token file in llamad's runtime dir)")
    return None


def write_token(path: Path) -> str:
    """A fresh token, written 0600 (replacing any old one) before the port opens."""
    token = secrets.token_urlsafe(32)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


class _WebSocketPeer:
    def __init__(self, connection: WebSocketConnection, json: bool) -> None:
        self._connection = connection
        self._json = json

    async def send(self, message: ServerMessage) -> None:
        data: str | bytes = encode_json(message).decode() if self._json else encode(message)
        try:
            with trio.move_on_after(SEND_TIMEOUT_SEC) as stuck:
                await self._connection.send_message(data)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGone from exc
        if stuck.cancelled_caught:
            raise SubscriberTooSlow


class WebSocketServer:
    def __init__(
        self,
        dispatcher: Dispatcher | None,
        token: str,
        allowed_origins: Sequence[str] = (),
        allowed_hosts: Sequence[str] = (),
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        # Set once the dispatcher exists; the port opens first so status can report it.
        self.dispatcher = dispatcher
        self._token = token
        self._allowed_origins = tuple(allowed_origins)
        self._allowed_hosts = tuple(allowed_hosts)
        self._max_message_bytes = max_message_bytes

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if not is_loopback(host):
            log.warning(
                "the WebSocket listens on %s, which is not a loopback address: anyone who "
                "can reach it and has the token can use your models",
                host,
            )
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(
                    serve_websocket,
                    self._handle,
                    host,
                    port,
                    None,
                    max_message_size=self._max_message_bytes,
                )
            )
            task_status.started(server.port)

    async def _handle(self, request: WebSocketRequest) -> None:
        await contain_client(
            functools.partial(self._serve_client, request),
            "WebSocket client",
            (*DISCONNECTS, ConnectionClosed),
        )

    async def _serve_client(self, request: WebSocketRequest) -> None:
        if self.dispatcher is None:  # llamad is still starting
            await request.reject(503, body=b"llamad is starting; try again\n")
            return
        # wsproto parses Host out of the headers into Request.host, which
        # trio-websocket does not re-export; read it from the event.
        host_header = str(request._event.host)
        rejection = check_handshake(
            host_header,
            request.headers,
            request.path,
            self._token,
            allowed_origins=self._allowed_origins,
            allowed_hosts=self._allowed_hosts,
        )
        if rejection is not None:
            log.warning("refused a WebSocket connection: %s", rejection.reason)
            await request.reject(rejection.status, body=rejection.reason.encode() + b"\n")
            return
        connection = await request.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive, connection, nursery.cancel_scope)
            while True:
                data = await connection.get_message()
                json = isinstance(data, str)
                peer = _WebSocketPeer(connection, json)
                try:
                    raw = data.encode() if isinstance(data, str) else data
                    request_message = decode_request(raw, json=json)
                except ProtocolError as exc:
                    # WebSocket framing keeps the stream in sync: answer and carry on.
                    await peer.send(Error(id=exc.request_id, code=exc.code, message=str(exc)))
                    continue
                nursery.start_soon(self._run, request_message, peer, nursery.cancel_scope)

    async def _run(self, request: Request, peer: _WebSocketPeer, scope: trio.CancelScope) -> None:
        assert self.dispatcher is not None
        try:
            await self.dispatcher.dispatch(request, peer)
        except (PeerGone, SubscriberTooSlow):
            scope.cancel()

    async def _keepalive(self, connection: WebSocketConnection, scope: trio.CancelScope) -> None:
        """Close connections whose peer vanished without a goodbye."""
        while True:
            await trio.sleep(PING_INTERVAL_SEC)
            with trio.move_on_after(PONG_TIMEOUT_SEC) as timeout:
                await connection.ping()
            if timeout.cancelled_caught:
                log.info("closing a WebSocket whose peer stopped answering pings")
                scope.cancel()
                return
