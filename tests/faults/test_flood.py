"""Connection floods: another user must not be able to lock the owner out.

The drill that found it: 1,100 silent TCP connections from another uid to the
WebSocket port left llamad at its descriptor limit (systemd's soft limit of
1,024), the owner's `llamactl status` unanswered and 2,288 log lines in a
minute. Now llamad raises its soft limit to the hard one, closes excess
handshaking connections at once (another user's are capped; the owner's are
not), drops silent ones after the handshake deadline, and backs off quietly
when it does run out of descriptors.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import trio
from trio_websocket import open_websocket_url

from llamad.protocol import Chat, ChatDone, ChatOptions, Status, StatusReply
from llamad.transport.websocket import HANDSHAKE_TIMEOUT_SEC, MAX_HANDSHAKING
from tests.conftest import Llamad, demo_config
from tests.faults.other_user import AS_NOBODY, require_root
from tests.faults.util import MakeLlamad

pytestmark = pytest.mark.server

FLOOD_CONNECTIONS = 1100

# Run as nobody: keep FLOOD_CONNECTIONS silent connections open to the port,
# reconnecting whichever llamad closes, for the given number of seconds.
FLOODER = r"""
import select, socket, sys, time
port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
poll = select.poll()
held = {}
def connect():
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setblocking(False)
    held[s.fileno()] = s
    poll.register(s, select.POLLIN)
made = 0
for _ in range(count):
    connect()
    made += 1
print("flooding", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for fd, _ in poll.poll(500):
        s = held.pop(fd)
        poll.unregister(fd)
        s.close()  # llamad closed it (or reset it): open another
        connect()
        made += 1
print(f"made {made}", flush=True)
"""


def _start_like_systemd(daemon: Llamad) -> None:
    """Start llamad with systemd's default soft limit of 1,024 descriptors."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with daemon.log_path.open("ab") as log:
        daemon.process = subprocess.Popen(
            [
                "prlimit",
                f"--nofile=1024:{hard}",
                "--",
                sys.executable,
                "-m",
                "llamad",
                "--config",
                str(daemon.config_path),
            ],
            env=daemon.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    daemon.wait_listening()


def _websocket_address(daemon: Llamad) -> str:
    with daemon.client() as client:
        reply = client.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply) and reply.websocket is not None
    return reply.websocket


def test_a_flood_from_another_user_does_not_lock_the_owner_out(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    require_root()
    daemon = make_llamad(demo_config(demo_models), 'default_model = "demo"\n')
    _start_like_systemd(daemon)
    daemon.wait_for("demo", lambda s: s.state == "ready")
    assert daemon.process is not None
    soft, hard = psutil.Process(daemon.process.pid).rlimit(psutil.RLIMIT_NOFILE)
    assert soft == hard  # raised at start from 1,024
    address = _websocket_address(daemon)
    port = int(address.rsplit(":", 1)[1])
    token = (daemon.runtime_dir / "token").read_text().strip()
    log_before = daemon.log()
    seconds = 3 * HANDSHAKE_TIMEOUT_SEC
    arguments = (str(port), str(FLOOD_CONNECTIONS), str(seconds))
    flooder = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", FLOODER, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert flooder.stdout is not None
        assert flooder.stdout.readline().strip() == "flooding", flooder.stderr
        time.sleep(1.0)  # the flood is on
        # The owner's Unix socket answers, promptly, all through the flood...
        latencies = []
        for _ in range(10):
            began = time.monotonic()
            result = daemon.ctl("status")
            latencies.append(time.monotonic() - began)
            assert result.returncode == 0, result.stderr
        with daemon.client(timeout=30) as client:
            messages = list(
                client.stream(
                    lambda i: Chat(id=i, content="hello", options=ChatOptions(max_tokens=8))
                )
            )
        assert isinstance(messages[-1], ChatDone)
        assert messages[-1].message.status == "complete"

        # ...and so does the owner's own WebSocket: another user's connections are
        # capped, the owner's never are.
        async def owner_websocket() -> str:
            with trio.fail_after(10):
                async with open_websocket_url(f"ws://{address}/?token={token}") as ws:
                    await ws.send_message('{"type": "status", "id": 1}')
                    return str(await ws.get_message())

        assert '"status_reply"' in trio.run(owner_websocket)
        # llamad holds no more of the flood than the cap.
        fds = psutil.Process(daemon.process.pid).num_fds()
        assert fds < 200 + MAX_HANDSHAKING, fds
        out, _err = flooder.communicate(timeout=seconds + 30)
    finally:
        flooder.kill()
        flooder.communicate()
    made = int(out.split()[-1])
    assert made > FLOOD_CONNECTIONS + MAX_HANDSHAKING, out  # llamad kept closing them
    assert max(latencies) < 2.0, latencies
    added = daemon.log()[len(log_before) :]
    assert "Traceback" not in added
    assert len(added.splitlines()) <= 5, added
    assert "too many connections still handshaking" in added
    assert daemon.ctl("status").returncode == 0


def test_out_of_descriptors_is_one_log_line_and_the_daemon_recovers(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    """With a hard limit of 128 the owner's own connections exhaust it: accept
    fails with EMFILE. One line says so, one says it is over; no traceback."""
    daemon = make_llamad(demo_config(demo_models))
    with daemon.log_path.open("ab") as log:
        command = [sys.executable, "-m", "llamad", "--config", str(daemon.config_path)]
        daemon.process = subprocess.Popen(
            ["prlimit", "--nofile=128:128", "--", *command],
            env=daemon.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    daemon.wait_listening()
    # The socket is bound (and connects) before llamad has said all it says at
    # start: count only what comes after that.
    deadline = time.monotonic() + 20
    while "listening on" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log_before = daemon.log()
    held = []
    try:
        for _ in range(200):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(daemon.socket_path))  # the backlog takes what llamad cannot
            held.append(sock)
        time.sleep(3)  # llamad retries accept meanwhile, quietly
    finally:
        for sock in held:
            sock.close()
    time.sleep(1.5)
    assert daemon.ctl("status").returncode == 0
    added = daemon.log()[len(log_before) :]
    assert "Traceback" not in added
    assert added.count("cannot accept connections: Too many open files") == 1, added
    assert added.count("accepting connections again") == 1, added
    assert len(added.splitlines()) <= 4, added
