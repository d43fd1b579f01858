"""llamad under systemd's protocols: notify, watchdog, socket activation, clean child env."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from llamad.protocol import Status, StatusReply
from tests.conftest import Llamad, demo_config

pytestmark = pytest.mark.server

MakeLlamad = Callable[..., Llamad]


def _datagrams(
    sock: socket.socket, until: Callable[[list[str]], bool], timeout: float
) -> list[str]:
    received: list[str] = []
    deadline = time.monotonic() + timeout
    while not until(received):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting; got {received}")
        sock.settimeout(remaining)
        received.append(sock.recv(4096).decode())
    return received


def test_notify_ready_status_watchdog_stopping(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = make_llamad(demo_config(demo_models), 'default_model = "demo"\n')
    notify_path = daemon.runtime_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        daemon.env.update(
            NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="200000", LLAMAD_TOKEN="secret"
        )
        daemon.start(wait=False)
        got = _datagrams(
            notify,
            lambda r: (
                any("STATUS=demo: ready" in m for m in r) and sum("WATCHDOG=1" in m for m in r) >= 3
            ),
            timeout=20,
        )
        ready_index = next(i for i, m in enumerate(got) if "READY=1" in m)
        # READY comes once the socket answers, before the model is loaded.
        assert ready_index < next(i for i, m in enumerate(got) if "STATUS=demo: ready" in m)
        with daemon.client() as client:
            assert isinstance(client.call(lambda i: Status(id=i)), StatusReply)
        # The child sees none of systemd's variables nor the token.
        pid = daemon.status("demo").pid
        assert pid is not None
        child_env = psutil.Process(pid).environ()
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LLAMAD_TOKEN"):
            assert name not in child_env
        assert child_env.get("PATH") == os.environ.get("PATH")
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        reload_msgs = _datagrams(notify, lambda r: any("READY=1" in m for m in r), timeout=10)
        assert any("RELOADING=1" in m for m in reload_msgs)
        daemon.process.send_signal(signal.SIGTERM)
        rest = _datagrams(notify, lambda r: any("STOPPING=1" in m for m in r), timeout=10)
        assert rest
        assert daemon.process.wait(timeout=20) == 0


def test_socket_activation(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    daemon = make_llamad(demo_config(demo_models))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(daemon.socket_path))
    listener.listen(8)
    # LISTEN_PID must be llamad's own pid: set it just before exec, which keeps the pid.
    launcher = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.environ['LISTEN_FDS'] = '1'\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'llamad', '--config', sys.argv[2],"
        " '--socket', '/nonexistent/not-used.sock'])\n"
    )
    with (daemon.runtime_dir / "llamad.log").open("wb") as log:
        daemon.process = subprocess.Popen(
            [sys.executable, "-c", launcher, str(listener.fileno()), str(daemon.config_path)],
            env=daemon.env,
            pass_fds=(listener.fileno(),),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    listener.close()  # only llamad holds it now
    # The socket accepts connections from the start (the kernel queues them), so
    # wait for llamad to say it took it over.
    deadline = time.monotonic() + 20
    while "listening on" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "socket activation" in daemon.log()
    result = daemon.ctl("load", "demo")
    assert result.returncode == 0, result.stderr + daemon.log()
    pid = daemon.status("demo").pid
    assert pid is not None
    child_env = psutil.Process(pid).environ()
    assert "LISTEN_FDS" not in child_env and "LISTEN_PID" not in child_env
    # The passed fd must not leak into llama-server.
    child_sockets = [c.laddr for c in psutil.Process(pid).net_connections(kind="unix")]
    assert str(daemon.socket_path) not in child_sockets
    assert any(path.endswith("demo.sock") for path in child_sockets)  # the check can see
    assert daemon.stop() == 0
    # An activated socket belongs to systemd: llamad must not remove it.
    assert daemon.socket_path.exists()
