"""The control socket: length-prefixed msgpack frames over a Unix socket.

Thin by design: bytes in, ``FrameDecoder`` and ``decode_request`` from the
shared protocol, hand to the dispatcher, encode replies. Only the daemon's own
uid is served (SO_PEERCRED), so no token is needed here. A connection that
sends something unreadable gets an ``Error`` and is closed; nothing else is
disturbed.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import struct
from pathlib import Path

import trio

from llamad.dispatch import (
    SEND_TIMEOUT_SEC,
    Dispatcher,
    PeerGone,
    SubscriberTooSlow,
    contain_client,
)
from llamad.errors import StartupError
from llamad.protocol import (
    Error,
    FrameDecoder,
    ProtocolError,
    Request,
    ServerMessage,
    decode_request,
    encode,
    frame,
)

log = logging.getLogger(__name__)


FRAME_READ_TIMEOUT_SEC = 10.0  # a frame that has started must finish within this
_UNIX_PATH_MAX = 107


def bind_control_socket(path: Path) -> socket.socket:
    """Bind the control socket (mode 0600, directory created 0700).

    A socket file left by a crashed llamad is replaced; one that a live llamad
    answers on is not.
    """
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise StartupError(
            f"socket path {path} is longer than {_UNIX_PATH_MAX} bytes; choose a shorter --socket"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StartupError(f"cannot create {path.parent}: {exc.strerror}") from None
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # stale: nobody is listening
        else:
            raise StartupError(
                f"another llamad is already serving {path}; stop it first "
                "(`systemctl --user stop llamad`) or pass a different --socket"
            )
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes the socket 0600 from the start: no window where others may connect.
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError as exc:
        listener.close()
        raise StartupError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    # The kernel's maximum: with 128, a burst of clients connecting at once on a
    # busy machine got refused (found by the 200-client drill in tests/faults).
    listener.listen(socket.SOMAXCONN)
    return listener


def peer_uid(sock: socket.socket | trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class _FramePeer:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._lock = trio.Lock()

    async def send(self, message: ServerMessage) -> None:
        data = frame(encode(message))
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._lock.locked():
            # The usual case: nobody else is writing and the socket has room.
            # One write, without the lock's and the timeout's trips through
            # trio's scheduler (about 30 µs a message on 2 busy cores).
            try:
                sent = os.write(self._stream.socket.fileno(), data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise PeerGone from exc
            if sent == len(data):
                return
            data = data[sent:]
        try:
            async with self._lock:
                with trio.move_on_after(SEND_TIMEOUT_SEC) as stuck:
                    await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGone from exc
        if stuck.cancelled_caught:
            raise SubscriberTooSlow


class ControlServer:
    def __init__(self, dispatcher: Dispatcher, *, uid: int | None = None) -> None:
        self._dispatcher = dispatcher
        self._uid = os.getuid() if uid is None else uid

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        trio_listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
        await trio.serve_listeners(self.handle, [trio_listener], task_status=task_status)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            await contain_client(functools.partial(self._serve_client, stream), "control client")

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        peer = _FramePeer(stream)
        uid = peer_uid(stream.socket)
        if uid != self._uid:
            log.warning("refused a control connection from uid %d", uid)
            await peer.send(
                Error(
                    id=None,
                    code="permission_denied",
                    message=f"llamad serves only uid {self._uid}; you are uid {uid}",
                )
            )
            return
        async with trio.open_nursery() as nursery:
            await self._read_requests(stream, peer, nursery)
            nursery.cancel_scope.cancel()

    async def _read_requests(
        self, stream: trio.SocketStream, peer: _FramePeer, nursery: trio.Nursery
    ) -> None:
        decoder = FrameDecoder()
        while True:
            timeout = FRAME_READ_TIMEOUT_SEC if decoder.in_frame else float("inf")
            with trio.move_on_after(timeout):
                data = await stream.receive_some(65536)
                if not data:
                    return  # the client closed; its requests in flight are cancelled
                try:
                    for payload in decoder.feed(data):
                        nursery.start_soon(self._run, decode_request(payload), peer, nursery)
                    decoder.feed(b"")  # raises for an oversized header after those frames
                except ProtocolError as exc:
                    await peer.send(Error(id=exc.request_id, code=exc.code, message=str(exc)))
                    return
                continue
            await peer.send(
                Error(
                    id=None,
                    code="bad_frame",
                    message=f"frame not completed within {FRAME_READ_TIMEOUT_SEC:g} s",
                )
            )
            return

    async def _run(self, request: Request, peer: _FramePeer, nursery: trio.Nursery) -> None:
        try:
            await self._dispatcher.dispatch(request, peer)
        except (PeerGone, SubscriberTooSlow):
            nursery.cancel_scope.cancel()  # close this connection, and only this one
