"""llamad end to end: a real daemon process, the real llama-server, the demo models."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import psutil
import pytest

from llamactl.client import RequestFailed
from llamad.daemon import open_history
from llamad.history import HistoryStore
from llamad.ownership import UntrustedPath
from llamad.protocol import (
    MAX_FRAME_BYTES,
    Error,
    FrameDecoder,
    Reload,
    StateChanged,
    Status,
    StatusReply,
    Subscribe,
    decode_server_message,
    encode,
    frame,
)
from tests.conftest import FAKE_SERVER, Llamad, demo_config, ready_daemon

pytestmark = pytest.mark.server

MakeLlamad = Callable[..., Llamad]


def pid_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------- basics


def test_default_model_ready_and_status(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    result = daemon.ctl("status")
    assert result.returncode == 0, result.stderr
    assert "* demo" in result.stdout and "ready" in result.stdout
    as_json = json.loads(daemon.ctl("status", "--json").stdout)
    demo = next(m for m in as_json["models"] if m["name"] == "demo")
    assert demo["expected"] is True
    assert demo["state"] == "ready" and demo["pid"] > 0
    assert demo["ready_seconds"] < 5
    health = daemon.ctl("health")
    assert health.returncode == 0
    assert health.stdout.startswith("OK: demo ready")
    assert daemon.stop() == 0
    assert pid_gone(demo["pid"])
    assert not daemon.socket_path.exists()


def test_load_keeps_the_others_and_load_only_switches(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    both = daemon.ctl("load", "demo-b")
    assert both.returncode == 0, both.stderr
    assert daemon.status("demo").state == "ready"  # room for both: demo stays
    assert len(daemon.children()) == 2
    assert daemon.ctl("unload", "demo-b").returncode == 0
    events: list[tuple[str, str]] = []
    with daemon.client(timeout=60) as watcher:
        stream = watcher.events(lambda i: Subscribe(id=i, topics=["state"]))
        next(stream)  # Ok: subscribed

        def collect() -> None:
            for message in stream:
                if isinstance(message, StateChanged):
                    step = (message.model.name, message.model.state)
                    if not events or events[-1] != step:
                        events.append(step)
                if events[-1:] == [("demo", "ready")] and len(events) > 2:
                    return

        thread = threading.Thread(target=collect, daemon=True)
        thread.start()
        to_b = daemon.ctl("load", "--only", "demo-b")
        assert to_b.returncode == 0, to_b.stderr
        assert "demo-b ready in" in to_b.stdout
        assert "demo: stopping (unloaded by load --only)" in to_b.stderr
        assert daemon.ctl("load", "--only", "demo").returncode == 0
        thread.join(timeout=30)
    assert events == [
        ("demo", "stopping"),
        ("demo", "stopped"),
        ("demo-b", "starting"),
        ("demo-b", "ready"),
        ("demo-b", "stopping"),
        ("demo-b", "stopped"),
        ("demo", "starting"),
        ("demo", "ready"),
    ]
    assert len(daemon.children()) == 1


def test_alias_and_unknown_model(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    body = demo_config(demo_models).replace(
        "[models.demo-b]\n", '[models.demo-b]\naliases = ["second"]\n'
    )
    daemon = make_llamad(body)
    daemon.start()
    assert daemon.ctl("load", "second").returncode == 0
    assert daemon.status("demo-b").state == "ready"
    unknown = daemon.ctl("load", "codellama")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == (
        "llamactl: unknown model 'codellama'; configured models: demo, demo-b"
    )
    assert "Traceback" not in unknown.stderr


def test_missing_model_file_is_refused(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = make_llamad(
        demo_config(demo_models) + '[models.ghost]\npath = "/nonexistent/ghost.gguf"\n'
    )
    daemon.start()
    models = daemon.ctl("models")
    assert "ghost" in models.stdout and "MISSING FILE" in models.stdout
    result = daemon.ctl("load", "ghost")
    assert result.returncode == 1
    assert "/nonexistent/ghost.gguf does not exist" in result.stderr
    assert daemon.ctl("status").returncode == 0  # the daemon carries on


def test_daemon_not_running_messages(tmp_path: Path) -> None:
    env = {**os.environ, "LLAMAD_SOCKET": str(tmp_path / "none.sock")}
    for command, expected_rc in (("status", 1), ("health", 3)):
        result = subprocess.run(
            [sys.executable, "-m", "llamactl", command],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == expected_rc
        assert "llamad is not running" in result.stderr
        assert "systemctl --user start llamad" in result.stderr
        assert "Traceback" not in result.stderr


def test_logs_show_llama_server_output(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    result = daemon.ctl("logs", "-n", "500")
    assert result.returncode == 0
    assert "llama" in result.stdout.lower()
    # llamad's own log keeps them at DEBUG only: at INFO they would drown its own lines.
    assert "[demo]" not in daemon.log()
    lines = json.loads(daemon.ctl("logs", "-n", "3", "--json").stdout)
    assert isinstance(lines, list) and len(lines) == 3


# ---------------------------------------------------------------- restarts


def test_stale_server_from_previous_llamad_is_reaped(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], llama_server_binary: Path
) -> None:
    daemon = make_llamad(demo_config(demo_models))
    models_dir = daemon.runtime_dir / "models"
    models_dir.mkdir()
    # A server as a killed llamad would leave it: running, with its pid file.
    command = [
        str(llama_server_binary),
        "--model",
        str(demo_models["demo"]),
        "--host",
        str(models_dir / "demo.sock"),
    ]
    orphan = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    info = psutil.Process(orphan.pid)
    (models_dir / "demo.pid").write_text(
        json.dumps({"pid": orphan.pid, "create_time": info.create_time(), "cmdline": command})
    )
    # And a pid file whose pid now belongs to somebody else: must be left alone.
    bystander = subprocess.Popen(["sleep", "30"])
    (models_dir / "demo-b.pid").write_text(
        json.dumps({"pid": bystander.pid, "create_time": 1.0, "cmdline": ["llama-server"]})
    )
    try:
        daemon.start()
        assert orphan.wait(timeout=5) == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while (models_dir / "demo.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not (models_dir / "demo.pid").exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_loads_racing_with_room_for_one_end_consistent(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = make_llamad(demo_config(demo_models), 'default_model = "demo"\nmax_models = 1\n')
    daemon.start()
    daemon.wait_for("demo", lambda s: s.state == "ready")
    for _ in range(3):
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "llamactl", "load", name],
                env=daemon.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for name in ("demo-b", "demo", "demo-b")
        ]
        for proc in procs:
            _, stderr = proc.communicate(timeout=60)
            # Each load is served in its turn (its model was ready when it returned).
            assert proc.returncode == 0, stderr
            assert b"Traceback" not in stderr
        with daemon.client() as client:
            reply = client.call(lambda i: Status(id=i))
        assert isinstance(reply, StatusReply)
        states = {m.name: m.state for m in reply.models}
        assert sorted(states.values()) == ["ready", "stopped"]
        assert len(daemon.children()) == 1


# ----------------------------------------------------------- the protocol


def _raw(daemon: Llamad) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(15)
    sock.connect(str(daemon.socket_path))
    return sock


def _read_all(sock: socket.socket) -> list[object]:
    decoder = FrameDecoder()
    messages: list[object] = []
    while True:
        data = sock.recv(65536)
        if not data:
            return messages
        messages += [decode_server_message(p) for p in decoder.feed(data)]


def test_bad_frames_get_an_error_and_close_only_that_connection(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = make_llamad(demo_config(demo_models))
    daemon.start()
    with daemon.client() as bystander:
        assert isinstance(bystander.call(lambda i: Status(id=i)), StatusReply)
        cases = {
            "garbage": frame(b"\xc1\xc1\xc1"),
            "oversized": struct.pack(">I", MAX_FRAME_BYTES + 1) + b"x" * 100,
        }
        for name, payload in cases.items():
            with _raw(daemon) as sock:
                sock.sendall(payload)
                replies = _read_all(sock)  # returns when llamad closes the connection
            assert len(replies) == 1, name
            error = replies[0]
            assert isinstance(error, Error), name
            assert error.code == "bad_frame", name
        assert isinstance(bystander.call(lambda i: Status(id=i)), StatusReply)
    assert daemon.process is not None and daemon.process.poll() is None


def test_invalid_requests_get_bad_request_and_the_connection_stays_open(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    """A whole frame that is not a valid request leaves the stream in sync: the
    connection stays open and the next request is served (as on the WebSocket)."""
    daemon = make_llamad(demo_config(demo_models))
    daemon.start()
    invalid = [
        ({"type": "load", "id": 5, "model": 3}, 5),  # wrong field type
        ({"type": "explode", "id": 6}, 6),  # unknown type
        ({"type": "status", "id": "x"}, None),  # the id itself is unreadable
        ({"type": "export_conversation", "id": 7, "conversation": "a", "format": "pdf"}, 7),
    ]
    with _raw(daemon) as sock:
        for request, request_id in invalid:
            sock.sendall(frame(msgspec.msgpack.encode(request)) + frame(encode(Status(id=99))))
            decoder = FrameDecoder()
            replies: list[object] = []
            while len(replies) < 2:
                replies += [decode_server_message(p) for p in decoder.feed(sock.recv(65536))]
            error, status = replies
            assert isinstance(error, Error) and error.code == "bad_request", request
            assert error.id == request_id, request
            assert isinstance(status, StatusReply) and status.id == 99, request


def test_peer_uid_is_checked(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    """Connect as another uid through a copy of the socket path that it can reach."""
    daemon = make_llamad(demo_config(demo_models))
    daemon.start()
    os.chmod(daemon.runtime_dir, 0o755)
    os.chmod(daemon.socket_path, 0o777)
    # The refusal comes at connect, before llamad reads anything: just read it.
    script = (
        "import os, socket, sys\n"
        "os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "sys.stdout.buffer.write(s.recv(4096))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(daemon.socket_path)],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    reply = decode_server_message(FrameDecoder().feed(result.stdout)[0])
    assert isinstance(reply, Error) and reply.code == "permission_denied"


def test_frame_must_finish_in_time(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = make_llamad(demo_config(demo_models))
    daemon.start()
    with _raw(daemon) as sock:
        sock.sendall(frame(encode(Status(id=1)))[:3])
        began = time.monotonic()
        replies = _read_all(sock)
        assert 9 <= time.monotonic() - began < 14
    assert len(replies) == 1 and isinstance(replies[0], Error)
    assert "not completed within" in replies[0].message


# ------------------------------------------------------------ config


def test_bad_config_exits_78_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text('[models.codellama]\npath = "x.gguf"\nn_gpu_layers = "all"\n')
    result = subprocess.run(
        [sys.executable, "-m", "llamad", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=20,
    )
    assert result.returncode == 78
    assert result.stderr.strip() == (
        f'llamad: {config}: models.codellama.n_gpu_layers: expected an integer, got "all"'
    )
    check = subprocess.run(
        [sys.executable, "-m", "llamad", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 78
    assert "n_gpu_layers" in check.stderr and "Traceback" not in check.stderr


def test_check_config_ok(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    daemon = make_llamad(demo_config(demo_models))
    result = subprocess.run(
        [sys.executable, "-m", "llamad", "check-config", "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("ok: ")


def test_reload_keeps_unchanged_models_and_rejects_bad_files(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    pid = daemon.status("demo").pid
    original = daemon.config_path.read_text()
    # demo-b changes, a model is added, demo is untouched: demo keeps running.
    daemon.config_path.write_text(
        original.replace("[models.demo-b]\npath", "[models.demo-b]\nctx_size_note = 1\npath")
    )
    bad = daemon.ctl("reload")
    assert bad.returncode == 1
    assert "models.demo-b.ctx_size_note: unknown key" in bad.stderr
    assert daemon.status("demo").pid == pid
    daemon.config_path.write_text(
        original.replace("[models.demo-b]\n", "[models.demo-b]\nn_gpu_layers = 0\nparallel = 2\n")
        + f'[models.extra]\npath = "{demo_models["demo"]}"\n'
    )
    good = daemon.ctl("reload")
    assert good.returncode == 0, good.stderr
    assert "changed demo-b" in good.stdout and "added extra" in good.stdout
    assert "demo;" not in good.stdout
    assert daemon.status("demo").pid == pid
    assert daemon.status("extra").state == "stopped"
    # SIGHUP does the same.
    daemon.config_path.write_text(original)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "removed extra" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "removed extra" in daemon.log()
    assert daemon.status("demo").pid == pid


def test_reload_applies_daemon_keys_live_and_names_those_that_need_a_restart(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    pid = daemon.status("demo").pid
    original = daemon.config_path.read_text()
    websocket = 'websocket = "127.0.0.1:0"\n'
    assert websocket in original
    changed = original.replace(
        websocket,
        websocket
        + 'allowed_origins = ["http://localhost:3000"]\nlog_lines = 5\n'
        + f'data_dir = "{daemon.runtime_dir / "elsewhere"}"\n',
    ).replace(f'data_dir = "{daemon.runtime_dir / "data"}"\n', "")
    daemon.config_path.write_text(changed)
    reply = daemon.ctl("reload")
    assert reply.returncode == 0, reply.stderr
    assert "no model changed" not in reply.stdout
    assert "[daemon] log_lines, allowed_origins applied" in reply.stdout
    assert "[daemon] data_dir changed: restart llamad to apply" in reply.stdout
    assert daemon.status("demo").pid == pid  # no model restarted
    with daemon.client() as client:
        status = client.call(lambda i: Status(id=i))
    assert isinstance(status, StatusReply) and status.websocket is not None
    token = (daemon.runtime_dir / "token").read_text().strip()
    assert _handshake(status.websocket, token, "http://localhost:3000") == 101
    logs = json.loads(daemon.ctl("logs", "-n", "100", "--json").stdout)
    assert len(logs) <= 5
    # The WebSocket off, then on again: applied at once, said plainly.
    daemon.config_path.write_text(changed.replace(websocket, 'websocket = "off"\n'))
    off = daemon.ctl("reload")
    assert "WebSocket now off" in off.stdout, off.stdout + off.stderr
    with daemon.client() as client:
        assert client.call(lambda i: Status(id=i)).websocket is None  # type: ignore[union-attr]
    assert not (daemon.runtime_dir / "token").exists()
    with pytest.raises(OSError):
        _handshake(status.websocket, token, None)
    daemon.config_path.write_text(changed)
    on = daemon.ctl("reload")
    with daemon.client() as client:
        address = client.call(lambda i: Status(id=i)).websocket  # type: ignore[union-attr]
    assert address is not None and f"WebSocket now on ws://{address}" in on.stdout, on.stdout
    fresh = (daemon.runtime_dir / "token").read_text().strip()
    assert _handshake(address, fresh, None) == 101
    assert daemon.status("demo").pid == pid
    # A reload that cannot be applied whole is rejected whole.
    binary = changed.split('llama_server = "', 1)[1].split('"', 1)[0]
    daemon.config_path.write_text(
        changed.replace(binary, "/nonexistent/llama-server").replace(websocket, "")
    )
    rejected = daemon.ctl("reload")
    assert rejected.returncode == 1
    assert "is not an executable file" in rejected.stderr
    with daemon.client() as client, pytest.raises(RequestFailed) as refused:
        client.call(lambda i: Reload(id=i))
    assert refused.value.error.code == "config_error"  # as protocol.md says
    with daemon.client() as client:
        assert client.call(lambda i: Status(id=i)).websocket == address  # type: ignore[union-attr]
    daemon.config_path.write_text(changed)
    again = daemon.ctl("reload")
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout
    assert daemon.status("demo").pid == pid


def _handshake(address: str, token: str, origin: str | None) -> int:
    host, port = address.rsplit(":", 1)
    extra = f"Origin: {origin}\r\n" if origin else ""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            (
                f"GET /?token={token} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        return int(sock.recv(4096).split()[1])


# ------------------------------------------------------------- more CLI


def test_no_wait_restart_and_follow_logs(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = make_llamad(demo_config(demo_models))
    daemon.start()
    started = daemon.ctl("load", "demo-b", "--no-wait")
    assert started.returncode == 0
    assert started.stdout.strip() == "loading demo-b"
    # Right after a --no-wait load, health reports the transition, not an error.
    early = daemon.ctl("health", "--json")
    assert json.loads(early.stdout)["level"] in ("warning", "ok")
    first = daemon.wait_for("demo-b", lambda s: s.state == "ready").pid
    follower = subprocess.Popen(
        [sys.executable, "-m", "llamactl", "logs", "-f", "-n", "1"],
        env=daemon.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        follower.stdout.readline()  # the last line so far: the follower is subscribed
        restarted = daemon.ctl("restart")  # the model loaded last
        assert restarted.returncode == 0, restarted.stderr
        assert "demo-b ready in" in restarted.stdout
        second = daemon.status("demo-b").pid
        assert second not in (None, first)
        assert daemon.status("demo-b").restarts == 0  # a user restart is not a crash
        assert follower.stdout is not None
        seen = [follower.stdout.readline() for _ in range(5)]
        assert any("llama" in line.lower() for line in seen)  # the new server's start-up lines
    finally:
        follower.terminate()
        follower.communicate(timeout=10)
    assert daemon.ctl("status").returncode == 0  # the follower's exit disturbed nothing


def test_health_critical_when_expected_model_stopped_by_crash(
    make_llamad: MakeLlamad, tmp_path: Path
) -> None:
    model = tmp_path / "fake.gguf"
    model.write_bytes(b"GGUF\x03\x00\x00\x00")
    daemon = make_llamad(
        f'[models.fake]\npath = "{model}"\nrestart = "no"\n',
        binary=FAKE_SERVER,
    )
    daemon.start()
    assert daemon.ctl("load", "fake").returncode == 0
    pid = daemon.status("fake").pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    daemon.wait_for("fake", lambda s: s.state == "stopped")
    health = daemon.ctl("health")
    assert health.returncode == 2
    assert health.stdout.strip() == "CRITICAL: fake expected but stopped: killed by SIGKILL"
    unloaded = daemon.ctl("unload")
    assert unloaded.returncode == 0
    assert daemon.ctl("health").returncode == 0  # nothing expected any more


def test_client_vanishing_mid_stream_does_not_hurt_the_daemon(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    for _ in range(5):
        sock = _raw(daemon)
        sock.sendall(frame(encode(Subscribe(id=1, topics=["state", "log"]))))
        sock.recv(4096)  # the Ok
        # Reset, not a clean close: SO_LINGER with a zero timeout sends RST.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        assert daemon.ctl("restart").returncode == 0  # events flow to the dead peer
    assert daemon.process is not None and daemon.process.poll() is None
    assert "Traceback" not in daemon.log()


def test_websocket_port_in_use_is_one_clear_line(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = make_llamad(demo_config(demo_models), f'websocket = "127.0.0.1:{port}"\n')
        daemon.start(wait=False)
        assert daemon.process is not None
        assert daemon.process.wait(timeout=20) == 1
    log = daemon.log()
    assert f"cannot listen for the WebSocket on 127.0.0.1:{port}: Address already in use" in log
    assert "Traceback" not in log
    assert not daemon.socket_path.exists()  # cleaned up on the way out


# ------------------------------------------------ the data directory, privately


def test_the_data_directory_and_its_files_are_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)  # ours, others may only read: fixed
    with HistoryStore(data / "history.lmdb"):
        pass
    os.chmod(data / "history.lmdb" / "data.mdb", 0o644)
    store, problem = open_history(data, home=tmp_path / "elsewhere")
    with store:
        assert problem is None
    assert os.stat(data).st_mode & 0o777 == 0o700
    assert os.stat(data / "history.lmdb" / "data.mdb").st_mode & 0o777 == 0o600
    os.chmod(data, 0o777)  # others could have planted anything: refused
    with pytest.raises(UntrustedPath, match="writable by other users"):
        open_history(data, home=tmp_path / "elsewhere")
