"""systemd's protocols, exercised directly: no service manager runs here.

The notify tests bind their own datagram socket and read what a manager would;
the socket-activation tests start a child whose fd 3 really is a listening
socket, as systemd would leave it; the unit files go through
``systemd-analyze verify``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamad.systemd import (
    CHILD_ENV_DROP,
    JournalFormatter,
    Notifier,
    child_environment,
    configure_logging,
    listen_sockets,
    listen_sockets_with_names,
    under_systemd,
)

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "contrib" / "systemd"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory under /tmp: pytest's tmp_path can exceed the 107-byte socket path limit."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="llamad-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def manager_socket(short_tmp: Path) -> Iterator[tuple[socket.socket, str]]:
    """A stand-in for the manager's notify socket (path form) and its NOTIFY_SOCKET value."""
    path = short_tmp / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    with sock:
        yield sock, str(path)


def _drain(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    messages = []
    try:
        while True:
            messages.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return messages


# --- sd_notify


def test_notifier_sends_exact_datagrams_to_a_path(
    manager_socket: tuple[socket.socket, str],
) -> None:
    sock, path = manager_socket
    with Notifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled
        notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        notifier.ready("2 models, qwen ready")
        assert sock.recv(4096) == b"READY=1\nSTATUS=2 models, qwen ready"
        notifier.status("loading qwen")
        assert sock.recv(4096) == b"STATUS=loading qwen"
        notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
        notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        notifier.send("A=1", "B=2")
        assert sock.recv(4096) == b"A=1\nB=2"
        notifier.send()  # nothing to say: nothing sent
        assert _drain(sock) == []


def test_reloading_carries_the_monotonic_clock(manager_socket: tuple[socket.socket, str]) -> None:
    sock, path = manager_socket
    with Notifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_newlines_cannot_forge_fields(manager_socket: tuple[socket.socket, str]) -> None:
    sock, path = manager_socket
    with Notifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        notifier.status("evil\nREADY=1")
        assert sock.recv(4096) == b"STATUS=evil READY=1"
        notifier.ready("a\r\nb")
        assert sock.recv(4096) == b"READY=1\nSTATUS=a b"


def test_notifier_sends_to_an_abstract_socket() -> None:
    name = f"llamad-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    with sock, Notifier.from_env({"NOTIFY_SOCKET": "@" + name}) as notifier:
        assert notifier.enabled
        notifier.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}])
def test_notifier_without_a_socket_is_a_no_op(env: dict[str, str]) -> None:
    env = {**env, "WATCHDOG_USEC": "30000000"}
    original = dict(env)
    notifier = Notifier.from_env(env)
    assert not notifier.enabled
    # No socket, so no watchdog either: its pings could not arrive.
    assert notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.status("x")
    notifier.reloading()
    notifier.stopping()
    notifier.watchdog()
    notifier.send("A=1")
    notifier.close()
    assert env == original  # read only


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<self>"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "<self>"}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<other>"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": "<self>"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(
    manager_socket: tuple[socket.socket, str], extra: dict[str, str], expected: float | None
) -> None:
    _, path = manager_socket
    pids = {"<self>": str(os.getpid()), "<other>": str(os.getpid() + 1)}
    env = {"NOTIFY_SOCKET": path} | {k: pids.get(v, v) for k, v in extra.items()}
    with Notifier.from_env(env) as notifier:
        assert notifier.watchdog_interval == expected


def test_send_to_a_vanished_socket_does_not_raise(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = short_tmp / "gone.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    sock.close()
    path.unlink()  # the manager went away (ENOENT)
    with caplog.at_level(logging.DEBUG, logger="llamad.systemd"):
        notifier.watchdog()
    assert any("sd_notify" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records)

    # A socket file nobody reads from any more (ECONNREFUSED).
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.close()
    notifier.ready()
    # An abstract name nobody has bound.
    with Notifier.from_env({"NOTIFY_SOCKET": f"@llamad-none-{uuid.uuid4().hex}"}) as nobody:
        nobody.stopping()
    notifier.close()
    notifier.watchdog()  # closed: a no-op
    assert not notifier.enabled


def test_a_full_manager_queue_does_not_block(manager_socket: tuple[socket.socket, str]) -> None:
    # The daemon calls these from the trio loop: a manager that stopped reading
    # must cost dropped datagrams, never a stalled loop.
    sock, path = manager_socket
    with Notifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        started = time.monotonic()
        for _ in range(2000):
            notifier.send("STATUS=" + "x" * 1000)
        assert time.monotonic() - started < 5
    assert _drain(sock)


# --- sd_listen_fds

# Runs in a child: puts the fd it was given at 3, as systemd does, sets
# LISTEN_PID to its own pid (unknown to the parent beforehand), then takes the
# sockets, reports on them and serves one echo.
_ACTIVATED_CHILD = textwrap.dedent(
    """
    import fcntl, json, os, subprocess, sys
    from llamad.systemd import listen_sockets_with_names

    given, fdnames = int(sys.argv[1]), sys.argv[2]
    if given != 3:
        os.dup2(given, 3, inheritable=True)
        os.close(given)
    os.set_inheritable(3, True)  # as systemd leaves it: no FD_CLOEXEC
    report = {"cloexec_before": bool(fcntl.fcntl(3, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)}
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = "1"
    if fdnames != "-":
        os.environ["LISTEN_FDNAMES"] = fdnames
    found = listen_sockets_with_names()
    report["names"] = [name for name, _ in found]
    report["fds"] = [sock.fileno() for _, sock in found]
    report["family"] = [int(sock.family) for _, sock in found]
    report["type"] = [int(sock.type) for _, sock in found]
    report["cloexec_after"] = bool(fcntl.fcntl(3, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    report["env_left"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
    # A grandchild spawned without closing fds must see neither the socket nor LISTEN_*.
    grandchild = subprocess.run(
        [sys.executable, "-c",
         "import os, json; "
         "ok = True\\n"
         "try: os.fstat(3)\\n"
         "except OSError: ok = False\\n"
         "print(json.dumps([ok, sorted(k for k in os.environ if k.startswith('LISTEN_'))]))"],
        close_fds=False, capture_output=True, text=True, check=True,
    )
    report["grandchild_fd3_open"], report["grandchild_env"] = json.loads(grandchild.stdout)
    print(json.dumps(report), flush=True)
    listener = found[0][1]
    conn, _ = listener.accept()
    with conn:
        conn.sendall(b"echo:" + conn.recv(100))
    """
)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize(("fdnames", "expected_name"), [("control", "control"), ("-", "unknown")])
def test_listen_sockets_takes_a_real_passed_fd(
    short_tmp: Path, fdnames: str, expected_name: str
) -> None:
    path = short_tmp / "control.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    with listener:
        child = subprocess.Popen(
            [sys.executable, "-c", _ACTIVATED_CHILD, str(listener.fileno()), fdnames],
            pass_fds=(listener.fileno(),),
            stdout=subprocess.PIPE,
            env=_child_env(),
            text=True,
        )
    # The parent's copy is closed: only the child can be accepting from now on.
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, "the child died before reporting"
        report = json.loads(line)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(path))
            client.sendall(b"ping")
            assert client.recv(100) == b"echo:ping"
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert report == {
        "cloexec_before": False,
        "names": [expected_name],
        "fds": [3],
        "family": [int(socket.AF_UNIX)],
        "type": [int(socket.SOCK_STREAM)],
        "cloexec_after": True,
        "env_left": [],
        "grandchild_fd3_open": False,
        "grandchild_env": [],
    }


_NON_SOCKET_CHILD = textwrap.dedent(
    """
    import fcntl, json, os
    from llamad.systemd import listen_sockets
    r, w = os.pipe()
    os.dup2(r, 3, inheritable=True)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
    found = listen_sockets()
    print(json.dumps([len(found), bool(fcntl.fcntl(3, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)]))
    """
)


def test_listen_sockets_skips_an_fd_that_is_not_a_socket() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _NON_SOCKET_CHILD],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(done.stdout) == [0, True]
    # Logging is unconfigured there, so the warning reaches stderr via logging.lastResort.
    assert "passed fd 3 (unknown) is not a socket" in done.stderr


def test_listen_sockets_for_another_pid_is_empty_and_unset() -> None:
    env = {
        "LISTEN_PID": str(os.getpid() + 1),
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "control",
        "HOME": "/home/x",
    }
    assert listen_sockets(env) == []
    # Unset whatever the outcome, as libsystemd does: a child must not see them.
    assert env == {"HOME": "/home/x"}


def test_listen_sockets_can_leave_the_environment_alone() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert listen_sockets(env, unset=False) == []
    assert env == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_FDS": "1"},
        {"LISTEN_PID": "<self>"},
        {"LISTEN_PID": "<self>", "LISTEN_FDS": "0"},
        {"LISTEN_PID": "<self>", "LISTEN_FDS": "-2"},
        {"LISTEN_PID": "<self>", "LISTEN_FDS": "many"},
        {"LISTEN_PID": "pid", "LISTEN_FDS": "1"},
    ],
)
def test_listen_sockets_without_usable_fds_is_empty(env: dict[str, str]) -> None:
    env = {k: str(os.getpid()) if v == "<self>" else v for k, v in env.items()}
    assert listen_sockets_with_names(env) == []
    assert env == {}


# --- child environment


def test_child_env_drop_is_exactly_systemds_per_process_names() -> None:
    assert (
        frozenset(
            {
                "NOTIFY_SOCKET",
                "WATCHDOG_USEC",
                "WATCHDOG_PID",
                "LISTEN_PID",
                "LISTEN_FDS",
                "LISTEN_FDNAMES",
            }
        )
        == CHILD_ENV_DROP
    )


def test_child_environment_drops_the_daemons_own_names() -> None:
    env = {
        "NOTIFY_SOCKET": "/run/user/1000/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "123",
        "LISTEN_PID": "123",
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "control",
        "LISTEN_PIDFDID": "77",  # newer systemd
        "WATCHDOG_SOMETHING": "x",
        "LLAMAD_TOKEN": "secret",
        "AWS_SECRET": "s3",
        "HOME": "/home/u",
        "PATH": "/usr/bin",
        "LLAMAD_SOCKET": "/run/user/1000/llamad/control.sock",
        "JOURNAL_STREAM": "8:1234",
        "MY_LISTEN_FDS": "kept: only the prefix counts",
    }
    original = dict(env)
    result = child_environment(
        env, extra={"CUDA_VISIBLE_DEVICES": "1", "PATH": "/opt/cuda/bin"}, drop=["AWS_SECRET"]
    )
    assert result == {
        "HOME": "/home/u",
        "PATH": "/opt/cuda/bin",
        "LLAMAD_SOCKET": "/run/user/1000/llamad/control.sock",
        "JOURNAL_STREAM": "8:1234",
        "MY_LISTEN_FDS": "kept: only the prefix counts",
        "CUDA_VISIBLE_DEVICES": "1",
    }
    assert env == original  # a copy, never the daemon's own environment
    assert child_environment({"A": "1"}) == {"A": "1"}


def test_child_environment_lets_the_model_config_win() -> None:
    # `extra` goes on top: a model that sets one of these asked for it.
    assert child_environment({"LLAMAD_TOKEN": "a"}, extra={"LLAMAD_TOKEN": "b"}) == {
        "LLAMAD_TOKEN": "b"
    }


# --- logging


def _record(level: int, msg: str, exc_info: bool = False) -> logging.LogRecord:
    info = sys.exc_info() if exc_info else None
    return logging.LogRecord("llamad.test", level, __file__, 1, msg, None, info)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.DEBUG, "<7>"),
        (logging.INFO, "<6>"),
        (logging.WARNING, "<4>"),
        (logging.ERROR, "<3>"),
        (logging.CRITICAL, "<2>"),
        (5, "<7>"),  # below DEBUG
        (25, "<6>"),  # between INFO and WARNING rounds down
        (60, "<2>"),
    ],
)
def test_journal_formatter_levels(level: int, prefix: str) -> None:
    assert JournalFormatter().format(_record(level, "hello")) == f"{prefix}llamad.test: hello"


def _fail() -> None:
    raise ValueError("boom")


def test_journal_formatter_prefixes_every_line() -> None:
    formatter = JournalFormatter()
    assert formatter.format(_record(logging.ERROR, "first\nsecond\n\nfourth")) == (
        "<3>llamad.test: first\n<3>second\n<3>\n<3>fourth"
    )
    try:
        _fail()
    except ValueError:
        record = _record(logging.ERROR, "failed", exc_info=True)
    lines = formatter.format(record).split("\n")
    assert len(lines) > 3
    assert lines[0] == "<3>llamad.test: failed"
    assert lines[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in lines)


def test_under_systemd_matches_stderrs_inode() -> None:
    st = os.fstat(2)
    assert under_systemd({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not under_systemd({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not under_systemd({"JOURNAL_STREAM": f"{st.st_dev + 1}:{st.st_ino}"})
    assert not under_systemd({"JOURNAL_STREAM": "garbage"})
    assert not under_systemd({"JOURNAL_STREAM": "1:x"})
    assert not under_systemd({})


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def test_configure_logging_picks_the_format(root_logger: logging.Logger) -> None:
    configure_logging(logging.DEBUG, env={})
    (handler,) = root_logger.handlers
    assert root_logger.level == logging.DEBUG
    assert not isinstance(handler.formatter, JournalFormatter)
    assert handler.formatter is not None
    line = handler.formatter.format(_record(logging.WARNING, "careful"))
    time_part, rest = line.split(" ", 1)
    assert time.strptime(time_part, "%H:%M:%S")
    assert rest == "WARNING llamad.test: careful"

    st = os.fstat(2)
    configure_logging(env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    (handler,) = root_logger.handlers  # replaced, not added to
    assert root_logger.level == logging.INFO
    assert isinstance(handler.formatter, JournalFormatter)


# --- unit files


def _parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """systemd's INI dialect: keys may repeat, so no configparser."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {raw!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {raw!r} is not KEY=VALUE"
        current.append((key.strip(), value.strip()))
    return sections


def _values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def test_service_unit_settings() -> None:
    unit = _parse_unit(UNITS / "llamad.service")
    service = unit["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "%h/.local/bin/llamad",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "RestartSec": "2",
        "RestartPreventExitStatus": "78",
        "WatchdogSec": "30",
        "TimeoutStopSec": "30",
        "KillMode": "mixed",
        "LimitNOFILE": "65536",
    }
    for key, value in expected.items():
        assert _values(service, key) == [value], key
    assert _values(unit["Install"], "WantedBy") == ["default.target"]
    # Socket activation is optional: the service must not pull in or wait for the socket.
    for key in ("Requires", "After", "Wants", "BindsTo", "Requisite", "PartOf"):
        assert not any("llamad.socket" in v for v in _values(unit["Unit"], key)), key
    # systemd 252 has no RestartSteps=; it would only be an "unknown key" warning.
    text = (UNITS / "llamad.service").read_text()
    assert not any(line.lstrip().startswith("RestartSteps") for line in text.splitlines())


def test_socket_unit_settings() -> None:
    unit = _parse_unit(UNITS / "llamad.socket")
    sock = unit["Socket"]
    assert _values(sock, "ListenStream") == ["%t/llamad/control.sock"]
    assert _values(sock, "SocketMode") == ["0600"]
    assert _values(sock, "DirectoryMode") == ["0700"]
    assert _values(unit["Install"], "WantedBy") == ["sockets.target"]


def _executable_for_exec_start() -> str:
    # verify insists that ExecStart's binary exists; %h/.local/bin/llamad need not here.
    script = Path(sys.executable).parent / "llamad"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    return sys.executable


def _verify(units_dir: Path, runtime_dir: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    # --user needs a runtime dir (for %t) even with no user manager running;
    # --man=no: no Documentation= pages to check (and no man-db needed).
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)}
    return subprocess.run(
        [
            analyze,
            "verify",
            "--user",
            "--man=no",
            str(units_dir / "llamad.service"),
            str(units_dir / "llamad.socket"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _copy_units(short_tmp: Path, extra_service_line: str = "") -> tuple[Path, Path]:
    units_dir = short_tmp / "units"
    units_dir.mkdir()
    runtime_dir = short_tmp / "run"
    runtime_dir.mkdir(mode=0o700)
    service = (UNITS / "llamad.service").read_text()
    assert "ExecStart=%h/.local/bin/llamad\n" in service
    service = service.replace(
        "ExecStart=%h/.local/bin/llamad\n",
        f"ExecStart={_executable_for_exec_start()}\n{extra_service_line}",
    )
    (units_dir / "llamad.service").write_text(service)
    shutil.copy(UNITS / "llamad.socket", units_dir / "llamad.socket")
    return units_dir, runtime_dir


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_pass_systemd_analyze_verify(short_tmp: Path) -> None:
    units_dir, runtime_dir = _copy_units(short_tmp)
    done = _verify(units_dir, runtime_dir)
    problems = [line for line in done.stderr.splitlines() if "llamad" in line]
    assert done.returncode == 0, done.stderr
    assert problems == [], done.stderr
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_verify_does_report_a_bad_line(short_tmp: Path) -> None:
    # Guards the test above: an unknown key only warns (exit 0), so the stderr
    # check is what catches it, and it must see the unit's name.
    units_dir, runtime_dir = _copy_units(short_tmp, "NoSuchSetting=1\n")
    done = _verify(units_dir, runtime_dir)
    assert any(
        "llamad.service" in line and "NoSuchSetting" in line for line in done.stderr.splitlines()
    ), done.stderr
