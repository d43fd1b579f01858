"""The WebSocket: the same messages as the control socket, for browsers and scripts.

A binary WebSocket message carries msgpack, a text message carries JSON; each
reply uses the encoding of the request it answers. Any web page the user
opens can reach a loopback port, so the handshake is checked (``check_handshake``,
pure and unit-tested) before anything else: a bearer token made fresh at each
start, no foreign ``Origin``, and a loopback ``Host`` (DNS rebinding).

Any local user can connect to the port, token or not, so everything a peer can
hold before (or without) authenticating is bounded:

* the handshake must be complete within ``HANDSHAKE_TIMEOUT_SEC``;
* connections still handshaking are capped per peer (a local peer is known by
  its uid, asked of the kernel; a remote one by its address) and in total;
  the owner's own connections are never capped. Excess connections are closed
  at once;
* a message must arrive whole within ``MESSAGE_TIMEOUT_SEC`` of its first
  byte, and all the partly received messages of all clients together may hold
  at most ``MAX_RECEIVING_BYTES``;
* a peer that takes nothing for ``SEND_TIMEOUT_SEC``, or does not answer a ping
  within ``PONG_TIMEOUT_SEC``, is dropped at once: no close handshake is
  waited for from a peer that is not reading.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import trio
import wsproto
import wsproto.events
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState

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
from llamad.ownership import tcp_peer_uid
from llamad.protocol import (
    Error,
    ProtocolError,
    Request,
    ServerMessage,
    decode_request,
    encode,
    encode_json,
)
from llamad.transport.accept import accept_forever

log = logging.getLogger(__name__)


MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_RECEIVING_BYTES = 64 * 1024 * 1024  # partly received messages, all clients together
HANDSHAKE_TIMEOUT_SEC = 5.0  # connect -> handshake answered
MESSAGE_TIMEOUT_SEC = 10.0  # a message's first byte -> its last
MAX_HANDSHAKING_PER_PEER = 16
MAX_HANDSHAKING = 64
PING_INTERVAL_SEC = 20.0
PONG_TIMEOUT_SEC = 20.0
CLOSE_GRACE_SEC = 1.0  # after our close frame, how long the peer may take to hang up
REFUSAL_LOG_INTERVAL_SEC = 60.0
RECEIVE_BUFFER_BYTES = 64 * 1024


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
    """The host part of a ``Host`` header, without the port, lower case."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")].lower()
    name = host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header
    return name.lower()


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
    """None when the handshake may proceed, else the HTTP status and why.

    Host names are compared case-insensitively, as DNS does; origins exactly
    (their scheme and host are lower case in every browser's ``Origin``).
    """
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
    """A fresh token, written 0600 (replacing any old one) before the port opens.

    ``path`` is in the verified private runtime directory; ``O_NOFOLLOW`` and
    ``O_EXCL`` still refuse to write through anything planted there.
    """
    token = secrets.token_urlsafe(32)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


# ------------------------------------------------------------- the bounds, pure


class ReceiveBudget:
    """Bytes of partly received messages that all connections together may hold."""

    def __init__(self, limit: int = MAX_RECEIVING_BYTES) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


class HandshakeGate:
    """Caps connections that have not finished their handshake, per peer and in total."""

    def __init__(
        self, per_peer: int = MAX_HANDSHAKING_PER_PEER, total: int = MAX_HANDSHAKING
    ) -> None:
        self.per_peer = per_peer
        self.total = total
        self._count: Counter[str] = Counter()

    def admit(self, peer: str) -> bool:
        if self._count[peer] >= self.per_peer or self._count.total() >= self.total:
            return False
        self._count[peer] += 1
        return True

    def release(self, peer: str) -> None:
        self._count[peer] -= 1
        if self._count[peer] <= 0:
            del self._count[peer]

    @property
    def handshaking(self) -> int:
        return self._count.total()


class _QuietLog:
    """A warning per kind at most once a minute, with how many were left out.

    A flood of refused connections must not become a flood of log lines.
    """

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL_SEC) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -math.inf) < self._interval:
            self._held[kind] += 1
            return
        more = self._held.pop(kind, 0)
        suffix = f" (and {more} more like it in the last {self._interval:g} s)" if more else ""
        log.warning("%s%s", message, suffix)
        self._last[kind] = now


# --------------------------------------------------------------- the connection


class _BoundedConnection(WebSocketConnection):
    """trio-websocket's connection, with llamad's bounds on what a peer can hold.

    Partly received messages draw on a budget shared by every connection, a
    started message must finish before a deadline (the reader task's cancel
    scope), and a send that makes no progress for ``SEND_TIMEOUT_SEC`` drops
    the peer instead of waiting for it forever.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        budget: ReceiveBudget,
        max_message_bytes: int,
        message_timeout: float,
        reader_scope: trio.CancelScope,
        drop: Callable[[str], None],
    ) -> None:
        super().__init__(
            stream,
            wsproto.WSConnection(wsproto.ConnectionType.SERVER),
            max_message_size=max_message_bytes,
            receive_buffer_size=RECEIVE_BUFFER_BYTES,
        )
        self.socket_stream = stream  # _stream, as the socket stream it is
        self.budget = budget
        self.held = 0  # this connection's share of the budget
        self.message_timeout = message_timeout
        self.reader_scope = reader_scope
        self._drop = drop

    async def _handle_message_event(
        self, event: wsproto.events.BytesMessage | wsproto.events.TextMessage
    ) -> None:
        size = len(event.data)
        if not self.budget.take(size):
            await self._refuse(
                1013, "llamad is receiving too many large messages at once; try again"
            )
            return
        self.held += size
        if self._message_size == 0:
            self.reader_scope.deadline = trio.current_time() + self.message_timeout
        if event.message_finished:
            # Complete: handing it over may wait for the reader of this
            # connection, which is not the peer's doing.
            self.reader_scope.deadline = math.inf
        try:
            await super()._handle_message_event(event)
        finally:
            if self._message_size == 0:  # handed over, or dropped as too big
                self.budget.give(self.held)
                self.held = 0

    async def _refuse(self, code: int, reason: str) -> None:
        self.budget.give(self.held)
        self.held = 0
        self._message_size = 0
        self._message_parts = []
        self._close_reason = CloseReason(code, reason)
        await self._send(wsproto.events.CloseConnection(code=code, reason=reason))
        await self._recv_channel.aclose()
        self._reader_running = False

    async def _send(self, event: wsproto.events.Event) -> None:
        with trio.move_on_after(SEND_TIMEOUT_SEC) as stuck:
            await super()._send(event)
        if stuck.cancelled_caught:
            self._drop(f"its socket took nothing for {SEND_TIMEOUT_SEC:g} s")
            raise ConnectionClosed(CloseReason(1006, "peer is not reading"))

    async def send_message_now(self, message: str | bytes) -> None:
        """``send_message`` in one write, without trips through trio's scheduler.

        The usual case (the connection is open, no other frame is being
        written, the socket has room): wsproto frames the message and one
        non-blocking write sends it; the only checkpoint is
        ``checkpoint_if_cancelled``. The lock, the timeout's cancel scope and
        ``send_all`` cost several scheduler trips a message (a token, when
        streaming), taken from llama-server's generation on a busy machine.

        A partial write (or a full socket, or an error) takes ``_stream_lock``
        at once, before any checkpoint, so no other frame can come between the
        halves of this one, and sends the rest as ``_send`` does. When the lock
        is held or the connection is closing, this is ``send_message``.
        Raises ``ConnectionClosed`` as ``send_message`` does, and
        ``trio.TooSlowError`` when the socket took nothing for ``SEND_TIMEOUT_SEC``.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if (
            self._close_reason is not None
            or self._stream_lock.locked()
            or self._wsproto.state is not ConnectionState.OPEN
        ):
            with trio.move_on_after(SEND_TIMEOUT_SEC) as stuck:
                await self.send_message(message)
            if stuck.cancelled_caught:
                raise trio.TooSlowError
            return
        event: wsproto.events.Event = (
            wsproto.events.TextMessage(data=message)
            if isinstance(message, str)
            else wsproto.events.BytesMessage(data=message)
        )
        data = self._wsproto.send(event)
        try:
            sent = os.write(self.socket_stream.socket.fileno(), data)
        except OSError:  # full (BlockingIOError), or broken: send_all says which, as in _send
            sent = 0
        if sent == len(data):
            return
        self._stream_lock.acquire_nowait()  # free: checked above, and nothing awaited since
        try:
            with trio.move_on_after(SEND_TIMEOUT_SEC) as stuck:
                await self.socket_stream.send_all(data[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._abort_web_socket()
            assert self._close_reason is not None
            raise ConnectionClosed(self._close_reason) from None
        finally:
            self._stream_lock.release()
        if stuck.cancelled_caught:
            raise trio.TooSlowError


class _WebSocketPeer:
    def __init__(self, connection: _BoundedConnection, json: bool) -> None:
        self._connection = connection
        self._json = json

    async def send(self, message: ServerMessage) -> None:
        data: str | bytes = encode_json(message).decode() if self._json else encode(message)
        try:
            await self._connection.send_message_now(data)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGone from exc
        except trio.TooSlowError:
            raise SubscriberTooSlow from None


class _Session:
    """What one connection's tasks share: the scope to cancel and why it was dropped."""

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.dropped = ""  # why llamad dropped the peer, for the log
        self.gone = False  # the peer left on its own

    def drop(self, reason: str) -> None:
        if not self.dropped:
            self.dropped = reason
        self.scope.cancel()

    def end(self) -> None:
        self.gone = True
        self.scope.cancel()


class WebSocketServer:
    def __init__(
        self,
        dispatcher: Dispatcher | None,
        token: str,
        allowed_origins: Sequence[str] = (),
        allowed_hosts: Sequence[str] = (),
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        *,
        budget: ReceiveBudget | None = None,
        gate: HandshakeGate | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_SEC,
        message_timeout: float = MESSAGE_TIMEOUT_SEC,
    ) -> None:
        # Set once the dispatcher exists; the port opens first so status can report it.
        self.dispatcher = dispatcher
        self.token = token
        # Public: `llamactl reload` changes them on a running server.
        self.allowed_origins = tuple(allowed_origins)
        self.allowed_hosts = tuple(allowed_hosts)
        self._max_message_bytes = max_message_bytes
        self.budget = budget or ReceiveBudget()
        self.gate = gate or HandshakeGate()
        self._handshake_timeout = handshake_timeout
        self._message_timeout = message_timeout
        self._uid = os.getuid()
        self._quiet = _QuietLog()

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if not is_loopback(host):
            log.warning(
                "the WebSocket listens on %s, which is not a loopback address: anyone who "
                "can reach it and has the token can use your models",
                host,
            )
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=socket.SOMAXCONN)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(
                    functools.partial(
                        accept_forever,
                        listener,
                        self._handle_stream,
                        what="WebSocket",
                        handler_nursery=nursery,
                    )
                )
            task_status.started(listeners[0].socket.getsockname()[1])

    # ------------------------------------------------------------ per connection

    def _peer_key(self, stream: trio.SocketStream) -> str | None:
        """Who the peer is for the caps: None for our own uid (never capped)."""
        try:
            remote = stream.socket.getpeername()
            local = stream.socket.getsockname()
        except OSError:
            return "unknown"
        address = str(remote[0])
        if is_loopback(address) or address.startswith("::ffff:127."):
            uid = tcp_peer_uid((str(local[0]), int(local[1])), (address, int(remote[1])))
            if uid == self._uid:
                return None
            if uid is not None:
                return f"uid {uid}"
        return address

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        await contain_client(
            functools.partial(self._connection, stream),
            "WebSocket connection",
            (*DISCONNECTS, ConnectionClosed),
        )

    async def _connection(self, stream: trio.SocketStream) -> None:
        peer = self._peer_key(stream)
        if peer is not None and not self.gate.admit(peer):
            self._quiet.warning(
                "cap",
                f"closed a WebSocket connection from {peer} at once: too many connections "
                f"still handshaking ({self.gate.handshaking} in all)",
            )
            return  # accept_forever closes the stream
        connection: _BoundedConnection | None = None
        try:
            async with trio.open_nursery() as nursery:
                session = _Session(nursery.cancel_scope)
                reader_scope = trio.CancelScope()
                connection = _BoundedConnection(
                    stream,
                    budget=self.budget,
                    max_message_bytes=self._max_message_bytes,
                    message_timeout=self._message_timeout,
                    reader_scope=reader_scope,
                    drop=session.drop,
                )
                nursery.start_soon(self._read, connection, session)
                with trio.move_on_after(self._handshake_timeout) as handshake:
                    accepted = await self._handshake(connection)
                if peer is not None:
                    self.gate.release(peer)
                    peer = None
                if handshake.cancelled_caught:
                    log.debug("dropped a WebSocket connection: no handshake within the deadline")
                    nursery.cancel_scope.cancel()
                    return
                if accepted:
                    await contain_client(
                        functools.partial(self._serve_client, connection, session),
                        "WebSocket client",
                        (*DISCONNECTS, ConnectionClosed),
                    )
                if session.dropped:
                    log.info("dropped a WebSocket client: %s", session.dropped)
                    return
                if session.gone:
                    return
                nursery.cancel_scope.cancel()
            # Our close frame (or rejection) is on its way: let the peer read it
            # and hang up before the socket closes, discarding what it still sends.
            with trio.move_on_after(CLOSE_GRACE_SEC):
                while await stream.receive_some(RECEIVE_BUFFER_BYTES):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if peer is not None:
                self.gate.release(peer)
            if connection is not None:
                self.budget.give(connection.held)
                connection.held = 0

    async def _read(self, connection: _BoundedConnection, session: _Session) -> None:
        with connection.reader_scope:
            await connection._reader_task()
        if connection.reader_scope.cancelled_caught:
            session.drop(f"a message not completed within {self._message_timeout:g} s")

    async def _handshake(self, connection: _BoundedConnection) -> bool:
        request = await connection._get_request()
        if self.dispatcher is None:  # llamad is still starting
            await request.reject(503, body=b"llamad is starting; try again\n")
            return False
        # wsproto parses Host out of the headers into Request.host, which
        # trio-websocket does not re-export; read it from the event.
        host_header = str(request._event.host)
        rejection = check_handshake(
            host_header,
            request.headers,
            request.path,
            self.token,
            allowed_origins=self.allowed_origins,
            allowed_hosts=self.allowed_hosts,
        )
        if rejection is not None:
            self._quiet.warning(
                f"refused {rejection.status}",
                f"refused a WebSocket connection: {rejection.reason}",
            )
            await request.reject(rejection.status, body=rejection.reason.encode() + b"\n")
            return False
        await request.accept()
        return True

    async def _serve_client(self, connection: _BoundedConnection, session: _Session) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive, connection, session)
            while True:
                try:
                    data = await connection.get_message()
                except ConnectionClosed:
                    nursery.cancel_scope.cancel()
                    return
                json = isinstance(data, str)
                peer = _WebSocketPeer(connection, json)
                try:
                    raw = data.encode() if isinstance(data, str) else data
                    request_message = decode_request(raw, json=json)
                except ProtocolError as exc:
                    # WebSocket framing keeps the stream in sync: answer and carry on.
                    await peer.send(Error(id=exc.request_id, code=exc.code, message=str(exc)))
                    continue
                nursery.start_soon(self._run, request_message, peer, session)

    async def _run(self, request: Request, peer: _WebSocketPeer, session: _Session) -> None:
        assert self.dispatcher is not None
        try:
            await self.dispatcher.dispatch(request, peer)
        except SubscriberTooSlow:
            session.drop(f"its socket took nothing for {SEND_TIMEOUT_SEC:g} s")
        except PeerGone:
            session.end()

    async def _keepalive(self, connection: WebSocketConnection, session: _Session) -> None:
        """Drop connections whose peer vanished without a goodbye."""
        while True:
            await trio.sleep(PING_INTERVAL_SEC)
            with trio.move_on_after(PONG_TIMEOUT_SEC) as timeout:
                await connection.ping()
            if timeout.cancelled_caught:
                session.drop(f"no answer to a ping within {PONG_TIMEOUT_SEC:g} s")
                return
