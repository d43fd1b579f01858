"""The accept loop (llamad/transport/accept.py): running out of descriptors is one line."""

from __future__ import annotations

import errno
import logging
import resource
import socket

import pytest
import trio
import trio.testing

from llamad.transport.accept import accept_forever, raise_open_file_limit


class FakeListener(trio.abc.Listener[trio.SocketStream]):
    """Fails like a process at its descriptor limit, then accepts."""

    def __init__(self, failures: int, streams: int) -> None:
        self.failures = failures
        self.streams = streams
        self.accepted = 0
        self.peers: list[socket.socket] = []

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        if not self.streams:
            await trio.sleep_forever()
        self.streams -= 1
        self.accepted += 1
        left, right = socket.socketpair()
        self.peers.append(right)
        return trio.SocketStream(trio.socket.from_stdlib_socket(left))

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def test_emfile_is_one_line_then_one_when_it_is_over(caplog: pytest.LogCaptureFixture) -> None:
    listener = FakeListener(failures=500, streams=3)
    handled: list[trio.SocketStream] = []

    async def handler(stream: trio.SocketStream) -> None:
        handled.append(stream)
        await trio.lowlevel.checkpoint()

    async def main() -> None:
        with trio.move_on_after(3600):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: accept_forever(
                        listener,  # type: ignore[arg-type]
                        handler,
                        what="test socket",
                        handler_nursery=nursery,
                    )
                )

    caplog.set_level(logging.DEBUG)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    for peer in listener.peers:
        peer.close()
    assert len(handled) == 3  # it kept going, and served them once it could
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "test socket: cannot accept connections: Too many open files; retrying quietly until "
        "descriptors are free (raise LimitNOFILE= / `ulimit -n` if this persists)",
        "test socket: accepting connections again (500 retries)",
    ]


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_open_file_limit() == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
