"""Reaping a stale llama-server: only a pid file of ours, only a process of ours."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from llamad.llama_server import reap_stale
from tests.faults.other_user import AS_NOBODY, NOBODY, require_root


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
