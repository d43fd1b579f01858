"""Speaking to the real ggml-rpc-server: the handshake, busy workers, and going away."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from llamad import rpc
from tests.conftest import free_port


@pytest.fixture
def worker(rpc_server_binary: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        [str(rpc_server_binary), "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "rpc-server did not listen"
            time.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}", process
    finally:
        process.kill()
        process.wait()


def _hold(address: str) -> socket.socket:
    """A client session like llama-server's: connected, handshake done, kept open."""
    host, port = address.rsplit(":", 1)
    client = socket.create_connection((host, int(port)), timeout=5)
    client.sendall(rpc.request(rpc.HELLO, bytes(rpc.CAPS_SIZE)))
    (size,) = struct.unpack("<Q", client.recv(8, socket.MSG_WAITALL))
    client.recv(size, socket.MSG_WAITALL)
    return client


async def test_a_check_reports_the_version_and_each_devices_memory(
    worker: tuple[str, subprocess.Popen[bytes]],
) -> None:
    address, _ = worker
    report = await rpc.check(address)
    assert report.version.startswith(f"{rpc.RPC_MAJOR}.")
    assert report.devices
    assert all(d.total and d.free is not None and d.free <= d.total for d in report.devices)


async def test_a_closed_port_is_not_answering() -> None:
    with pytest.raises(rpc.WorkerProblem, match=r"^is not answering: connection refused$"):
        await rpc.check(f"127.0.0.1:{free_port()}")


async def test_a_busy_worker_is_named_busy_and_outlives_the_checks(
    worker: tuple[str, subprocess.Popen[bytes]],
) -> None:
    address, process = worker
    holder = _hold(address)
    with pytest.raises(rpc.WorkerProblem, match=r"^is busy or hung: no answer to the RPC hand"):
        await rpc.check(address, 0.3)
    # More checks than its listen backlog (1) holds: each waits, then resets its connection.
    for _ in range(3):
        with pytest.raises(rpc.WorkerProblem, match=r"busy or hung|no connection within"):
            await rpc.check(address, 0.3)
    holder.close()
    # The server then accepts the abandoned connections, HELLO waiting in each. Closed
    # with a FIN, its answer into one killed it with SIGPIPE; with a reset it carries on.
    report = await rpc.check(address, 5)
    assert report.devices
    await trio.sleep(0.2)
    assert process.poll() is None


async def test_a_worker_that_dies_under_a_client_shows_in_the_clients_connection(
    worker: tuple[str, subprocess.Popen[bytes]],
) -> None:
    address, process = worker
    holder = _hold(address)
    try:
        assert rpc.connection_closed(os.getpid(), [address]) is None
        assert rpc.serving_a_client(process.pid, int(address.rsplit(":", 1)[1]))
        process.send_signal(signal.SIGKILL)
        process.wait()
        with trio.fail_after(5):
            while rpc.connection_closed(os.getpid(), [address]) is None:  # noqa: ASYNC110
                await trio.sleep(0.02)  # the kernel's socket state: nothing to wait on
    finally:
        holder.close()


def test_the_start_up_banner_is_read() -> None:
    assert rpc.banner_version("Starting RPC server v7.0.0") == "7.0.0"
    device = rpc.banner_device("  CPU: AMD EPYC 7B13 (24105 MiB, 23000 MiB free)")
    assert device == rpc.Device("CPU", "AMD EPYC 7B13", free=23000 * rpc.MIB, total=24105 * rpc.MIB)
    assert rpc.banner_device("  transport      : TCP") is None


def test_a_request_is_command_length_payload() -> None:
    assert rpc.request(rpc.HELLO, b"ab") == bytes([14]) + struct.pack("<Q", 2) + b"ab"
