"""A small synchronous client for llamad's control socket.

Synchronous and trio-free on purpose: ``llamactl status`` must answer in a few
tens of milliseconds, and importing trio alone costs about 100 ms.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from llamad.ownership import UntrustedPeer, check_server_peer
from llamad.paths import default_socket_path
from llamad.protocol import (
    ChatDelta,
    ChatStarted,
    ContextTrimmed,
    Error,
    FrameDecoder,
    LogLine,
    ProtocolError,
    QueuePosition,
    Request,
    ServerMessage,
    StateChanged,
    ToolCallEvent,
    WorkerChanged,
    decode_server_message,
    encode,
    frame,
)

# Messages that are followed by more answers to the same request.
_EVENTS = (
    StateChanged,
    WorkerChanged,
    LogLine,
    ChatStarted,
    QueuePosition,
    ContextTrimmed,
    ChatDelta,
    ToolCallEvent,
)


class ClientError(Exception):
    """Root of llamactl's errors; ``str()`` is the one line to print."""


class DaemonUnreachable(ClientError):
    def __init__(self, path: Path, why: str) -> None:
        super().__init__(
            f"llamad is not running ({why} at {path}); start it with "
            "`systemctl --user start llamad` (or `llamad &`), or pass --socket"
        )


class RequestFailed(ClientError):
    """The daemon answered with an ``Error``."""

    def __init__(self, error: Error) -> None:
        self.error = error
        super().__init__(error.message)


def resolve_socket(explicit: str | None) -> Path:
    return Path(explicit) if explicit else default_socket_path(os.environ)


def _check_daemon(sock: socket.socket, path: Path) -> None:
    """Before anything is sent: the daemon on ``path`` must run as us (or root).

    Another user who got to the socket path first would otherwise read every
    prompt and answer in llamad's place.
    """
    try:
        check_server_peer(sock, f"the socket {path}")
    except UntrustedPeer as exc:
        sock.close()
        raise ClientError(str(exc)) from None


class Client:
    def __init__(self, path: Path, timeout: float | None = 30.0) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._decoder = FrameDecoder()
        self._pending: list[ServerMessage] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except FileNotFoundError:
            self._sock.close()
            raise DaemonUnreachable(path, "no socket") from None
        except ConnectionRefusedError:
            self._sock.close()
            raise DaemonUnreachable(path, "nobody listening") from None
        except PermissionError:
            self._sock.close()
            raise ClientError(f"permission denied on {path}; is llamad running as you?") from None
        _check_daemon(self._sock, path)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def set_timeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def _receive(self) -> ServerMessage:
        while not self._pending:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise ClientError("llamad did not answer in time") from None
            if not data:
                raise ClientError("llamad closed the connection")
            try:
                self._pending.extend(decode_server_message(p) for p in self._decoder.feed(data))
            except ProtocolError as exc:
                raise ClientError(str(exc)) from None
        return self._pending.pop(0)

    def send(self, make: Callable[[int], Request]) -> int:
        """Send a request without waiting; returns its id."""
        request = make(next(self._ids))
        self._sock.sendall(frame(encode(request)))
        return request.id

    def stream(self, make: Callable[[int], Request]) -> Iterator[ServerMessage]:
        """Send a request; yield its events, then its final reply, then stop.

        An ``Error`` reply raises ``RequestFailed``.
        """
        request = make(next(self._ids))
        self._sock.sendall(frame(encode(request)))
        while True:
            message = self._receive()
            if message.id is not None and message.id != request.id:
                continue
            if isinstance(message, Error):
                raise RequestFailed(message)
            yield message
            if not isinstance(message, _EVENTS):
                return

    def receive_for(self, request_id: int) -> ServerMessage:
        """The next message answering ``request_id`` (replies to other requests are skipped)."""
        while True:
            message = self._receive()
            if message.id is None or message.id == request_id:
                return message

    def events(self, make: Callable[[int], Request]) -> Iterator[ServerMessage]:
        """Send a request that streams (``Logs`` with follow, ``Subscribe``); yield forever."""
        request = make(next(self._ids))
        self._sock.sendall(frame(encode(request)))
        while True:
            message = self._receive()
            if isinstance(message, Error):
                raise RequestFailed(message)
            yield message

    def call(self, make: Callable[[int], Request]) -> ServerMessage:
        """Send a request and return its final reply, skipping events."""
        final: ServerMessage | None = None
        for final in self.stream(make):  # noqa: B007 - the last one is the reply
            pass
        assert final is not None
        return final
