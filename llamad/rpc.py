"""Speaking to a ggml-rpc-server: the handshake, its memory report, and who it serves.

llama.cpp's RPC protocol is a byte stream: a command byte, a little-endian u64
length and that many bytes; answers are a u64 length and the bytes. Every
connection must begin with ``HELLO``, which answers the protocol version; the
server then serves that one client until it disconnects, **and only then
accepts the next** (its listen backlog is 1). So:

* a check (``check``) is a short session of its own: HELLO, the device count,
  each device's memory, then a clean close. It must never be made while a
  llama-server of ours is connected: it would queue behind that session;
* a check that gets no answer closes with a reset, never a FIN. A server that
  later accepts a closed connection with a HELLO waiting in it answers into a
  half-closed socket, and its second write kills it with SIGPIPE (seen with
  ggml-rpc-server v7.0.0). After a reset its first write fails cleanly;
* whether a worker went away while a llama-server uses it is read from that
  llama-server's own TCP connection (``connection_closed``): the kernel marks
  it CLOSE_WAIT the moment the worker's end closes, without touching the worker.

The version this module speaks (its HELLO carries the v7 capability block) is
the one of the llama.cpp it was built with: ``RPC_MAJOR``. A worker of another
version is refused by name rather than left to crash llama-server.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import psutil
import trio

from llamad.config import split_address

RPC_MAJOR = 7
HELLO = 14
DEVICE_COUNT = 15
GET_DEVICE_MEMORY = 11
CAPS_SIZE = 24  # rpc_msg_hello_req: the connection capabilities (none asked for here)
_HELLO_ANSWER = 4 + CAPS_SIZE  # major, minor, patch, padding, capabilities
_U64 = struct.Struct("<Q")
_MAX_DEVICES = 64
CHECK_TIMEOUT_SEC = 3.0

# rpc-server's start-up banner: "Starting RPC server v7.0.0" and one line per device,
# "  CPU: AMD EPYC (24105 MiB, 24105 MiB free)".
_BANNER = re.compile(r"Starting RPC server v(\d+\.\d+\.\d+)")
_DEVICE_LINE = re.compile(r"\s+(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)")
MIB = 1024 * 1024


class WorkerProblem(Exception):
    """Why a worker cannot be used, as the end of "worker ADDRESS ..." (one line)."""


@dataclass(frozen=True)
class Device:
    name: str = ""
    description: str = ""
    free: int | None = None  # bytes
    total: int | None = None


@dataclass(frozen=True)
class Report:
    """What a worker said of itself: its protocol version and its devices' memory."""

    version: str
    devices: tuple[Device, ...] = ()

    @property
    def free(self) -> int:
        return sum(d.free or 0 for d in self.devices)


def request(command: int, payload: bytes = b"") -> bytes:
    """One RPC request: the command byte, the payload's length, the payload."""
    return bytes([command]) + _U64.pack(len(payload)) + payload


def hello_version(answer: bytes) -> tuple[int, int, int]:
    """The (major, minor, patch) of a HELLO answer body."""
    if len(answer) < 3:
        raise WorkerProblem("sent a malformed answer to the RPC handshake")
    return answer[0], answer[1], answer[2]


def banner_version(line: str) -> str | None:
    match = _BANNER.search(line)
    return match.group(1) if match else None


def banner_device(line: str) -> Device | None:
    """A device line of rpc-server's start-up banner."""
    match = _DEVICE_LINE.fullmatch(line)
    if match is None:
        return None
    name, description, total, free = match.groups()
    return Device(name, description, free=int(free) * MIB, total=int(total) * MIB)


class _Session:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise WorkerProblem(
                    "closed the connection during the RPC handshake; it may speak another "
                    f"protocol version than this llama.cpp (v{RPC_MAJOR}): see its log"
                )
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def call(self, command: int, payload: bytes, answer_size: int) -> bytes:
        await self.stream.send_all(request(command, payload))
        (size,) = _U64.unpack(await self.read(_U64.size))
        if size != answer_size:
            raise WorkerProblem(
                f"answered {size} bytes where {answer_size} were expected; it speaks another "
                f"RPC protocol version than this llama.cpp (v{RPC_MAJOR})"
            )
        return await self.read(size)


def _reset_on_close(stream: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def check(address: str, seconds: float = CHECK_TIMEOUT_SEC) -> Report:
    """Connect, shake hands and read the devices' memory; ``WorkerProblem`` says why not.

    Only for a worker no llama-server of ours is connected to (see the module
    docstring). ``seconds`` bounds the connect and, separately, the answers.
    """
    host, port = split_address(address)
    try:
        with trio.fail_after(seconds):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise WorkerProblem(f"is not answering: no connection within {seconds:g} s") from None
    except OSError as exc:
        raise WorkerProblem(f"is not answering: {_os_reason(exc)}") from None
    answered = complete = False
    try:
        session = _Session(stream)
        try:
            with trio.fail_after(seconds):
                hello = await session.call(HELLO, bytes(CAPS_SIZE), _HELLO_ANSWER)
                answered = True
                major, minor, patch = hello_version(hello)
                if major != RPC_MAJOR:
                    raise WorkerProblem(
                        f"speaks RPC protocol v{major}.{minor}.{patch}, this llama.cpp "
                        f"v{RPC_MAJOR}: run the same llama.cpp build on both machines"
                    )
                (count,) = struct.unpack("<I", await session.call(DEVICE_COUNT, b"", 4))
                devices = []
                for index in range(min(count, _MAX_DEVICES)):
                    memory = await session.call(GET_DEVICE_MEMORY, struct.pack("<I", index), 16)
                    free, total = struct.unpack("<QQ", memory)
                    devices.append(Device(free=free, total=total))
                complete = True
        except trio.TooSlowError:
            what = "answer" if answered else "answer to the RPC handshake"
            raise WorkerProblem(
                f"is busy or hung: no {what} within {seconds:g} s (an rpc-server serves one "
                "client at a time)"
            ) from None
        except OSError as exc:
            raise WorkerProblem(f"is not answering: {_os_reason(exc)}") from None
    finally:
        if not complete:  # it may still answer: never into a half-closed socket
            _reset_on_close(stream)
        with trio.CancelScope(shield=True):
            await stream.aclose()
    return Report(f"{major}.{minor}.{patch}", tuple(devices))


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve its host name ({exc.strerror})"
    cause: BaseException = exc
    # trio's happy-eyeballs connect raises one OSError caused by a group of each attempt's.
    if isinstance(exc.__cause__, BaseExceptionGroup):
        cause = next((e for e in exc.__cause__.exceptions if isinstance(e, OSError)), exc)
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno).lower()
    return str(cause)


# ------------------------------------------------------ watching, without a word


def _addresses(host: str, port: int) -> set[tuple[str, int]]:
    """``host`` resolved, as (ip, port) pairs a socket's peer address can be matched with."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {(str(info[4][0]), port) for info in found}


def connection_closed(pid: int, addresses: Iterable[str]) -> str | None:
    """The first of ``addresses`` whose connection from process ``pid`` the worker closed.

    Blocking (reads /proc); call from a thread. None when every connection
    is open, or when there is none yet (a server still starting has not
    connected).
    """
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    for address in addresses:
        peers = _addresses(*split_address(address))
        for connection in connections:
            remote = connection.raddr
            if not remote or (remote.ip, remote.port) not in peers:
                continue
            if connection.status in (psutil.CONN_CLOSE_WAIT, psutil.CONN_CLOSE, "NONE"):
                return address
    return None


def serving_a_client(pid: int, port: int) -> bool:
    """Whether rpc-server ``pid`` has a client connected on ``port`` (blocking)."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(
        c.laddr and c.laddr.port == port and c.raddr and c.status == psutil.CONN_ESTABLISHED
        for c in connections
    )
