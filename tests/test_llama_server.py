"""How llamad runs llama-server: the command line it builds (checked on the real
server), and reaping a stale one: only a pid file of ours, only a process of ours."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from llamad.config import ModelConfig, load_config
from llamad.llama_server import Endpoint, build_command, reap_stale, write_pidfile
from tests.conftest import Llamad, ready_daemon
from tests.faults.other_user import AS_NOBODY, NOBODY, require_root

MakeLlamad = Callable[..., Llamad]


def _model(tmp_path: Path, extra: str = "") -> ModelConfig:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    config = tmp_path / "models.toml"
    config.write_text(f'[models.m]\npath = "{model}"\n{extra}')
    return load_config(config, {}).models["m"]


@pytest.mark.parametrize(("extra", "slots"), [("", "1"), ("parallel = 3\n", "3")])
def test_parallel_is_always_passed(tmp_path: Path, extra: str, slots: str) -> None:
    command = build_command(Path("/bin/llama-server"), _model(tmp_path, extra), Endpoint(port=1))
    assert command[command.index("--parallel") + 1] == slots


@pytest.mark.server
def test_the_real_server_has_as_many_slots_as_llamad_queues_for(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    # No `parallel` key: llama-server's own default is several slots; llamad assumes one.
    daemon = ready_daemon(make_llamad, demo_models)
    endpoint = daemon.status("demo").endpoint
    transport = httpx.HTTPTransport(uds=endpoint)
    with httpx.Client(transport=transport, base_url="http://llama-server") as client:
        props = client.get("/props").json()
    assert props["total_slots"] == 1, json.dumps(props)[:300]


@contextmanager
def sleeper(*prefix: str) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([*prefix, "sleep", "60"], start_new_session=True)
    try:
        # setpriv execs sleep in the same process: wait until it has.
        while psutil.Process(process.pid).name() != "sleep":
            pass
        yield process
    finally:
        process.kill()
        process.wait()


def record(pidfile: Path, pid: int) -> None:
    info = psutil.Process(pid)
    pidfile.write_text(
        json.dumps({"pid": pid, "create_time": info.create_time(), "cmdline": info.cmdline()})
    )


def test_a_matching_process_of_ours_is_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "demo.pid"
    with sleeper() as process:
        record(pidfile, process.pid)
        assert reap_stale(pidfile) == process.pid
        assert process.wait(timeout=5) == -signal.SIGKILL
    assert not pidfile.exists()


def test_the_pid_file_written_is_the_one_read_back(tmp_path: Path) -> None:
    pidfile = tmp_path / "demo.pid"
    with sleeper() as process:
        write_pidfile(pidfile, process)
        assert pidfile.stat().st_mode & 0o777 == 0o600
        assert reap_stale(pidfile) == process.pid


def test_a_pid_file_that_cannot_be_written_is_a_warning_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pidfile = tmp_path / "gone" / "demo.pid"  # its directory is missing
    with sleeper() as process:
        write_pidfile(pidfile, process)
        assert process.poll() is None
    assert f"could not write {pidfile}" in caplog.text
    assert not pidfile.exists()


def test_a_pid_file_someone_else_wrote_is_not_acted_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_root()
    pidfile = tmp_path / "demo.pid"
    with sleeper() as process:
        record(pidfile, process.pid)  # names one of our processes, exactly
        os.chown(pidfile, NOBODY, NOBODY)
        assert reap_stale(pidfile) is None
        assert process.poll() is None
    assert not pidfile.exists()
    assert f"ignoring {pidfile}: not a regular file of yours (uid {NOBODY})" in caplog.text


def test_a_process_of_another_user_is_not_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_root()
    pidfile = tmp_path / "demo.pid"
    with sleeper(*AS_NOBODY) as process:
        record(pidfile, process.pid)
        assert reap_stale(pidfile) is None
        assert process.poll() is None
    assert "it runs as another user" in caplog.text


def test_a_symlinked_pid_file_is_not_read(tmp_path: Path) -> None:
    with sleeper() as process:
        real = tmp_path / "elsewhere.json"
        record(real, process.pid)
        pidfile = tmp_path / "demo.pid"
        pidfile.symlink_to(real)
        assert reap_stale(pidfile) is None
        assert process.poll() is None
