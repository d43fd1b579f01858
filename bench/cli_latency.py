"""`llamactl status` wall time against `python -c pass` on the same interpreter.

The goal is a ratio (at most 2.3 times bare Python), so it holds on a fast
machine and a slow one alike.

Interleaved rounds against a llamad: one started for the benchmark (the demo
model loaded), or with ``--running`` the one ``llamactl`` finds by default
(e.g. started by scripts/demo).

    .venv/bin/python -m bench.cli_latency [--rounds 30] [--running]
    (or as one of all the benchmarks: scripts/bench --only cli)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from bench.common import Figure, Goal, interleave, model_table, running_daemon, shared_demo_models

GOAL_RATIO = 2.3


def timed(command: list[str], env: Mapping[str, str] | None = None) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - began


def measure(rounds: int, env: Mapping[str, str] | None = None) -> tuple[list[float], list[float]]:
    """(bare python, llamactl status) wall times in seconds, interleaved."""
    bare: list[float] = []
    status: list[float] = []
    interleave(
        rounds,
        lambda: bare.append(timed([sys.executable, "-c", "pass"], env)),
        lambda: status.append(timed([sys.executable, "-m", "llamactl", "status"], env)),
    )
    return bare, status


def with_bytecode_cache(env: Mapping[str, str], cache: Path) -> dict[str, str]:
    """``env`` with byte-code caching on, in ``cache`` (not next to the sources).

    A pip-installed llamactl has its .pyc files; with PYTHONDONTWRITEBYTECODE
    set (as in some dev shells) every run would compile llamad.protocol & co.
    from source, about 10 ms that no installed copy pays.
    """
    clean = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    clean["PYTHONPYCACHEPREFIX"] = str(cache)
    return clean


def figures(rounds: int = 30) -> list[Figure]:
    with running_daemon(
        model_table("demo", shared_demo_models()["demo"]), default_model="demo", websocket="off"
    ) as d:
        d.wait_ready("demo")
        env = with_bytecode_cache(d.env, d.work / "pycache")
        measure(1, env)  # warm-up: writes the byte-code cache
        bare, status = measure(rounds, env)
    bare_ms = [v * 1000 for v in bare]
    status_ms = [v * 1000 for v in status]
    own = statistics.median(status_ms) - statistics.median(bare_ms)
    return [
        Figure(
            "CLI `llamactl status` wall time",
            "ms",
            status_ms,
            baseline=bare_ms,
            baseline_name="python -c pass",
            goal=Goal("ratio", "<=", GOAL_RATIO),
            note=f"llamactl's own cost {own:.1f} ms (difference of medians); "
            "byte-code cached, as installed",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--running", action="store_true", help="use the llamad already running")
    args = parser.parse_args()
    if args.running:
        bare, status = measure(args.rounds, os.environ)
        b, s = statistics.median(bare), statistics.median(status)
        print(f"python -c pass:   {b * 1000:6.1f} ms median")
        print(
            f"llamactl status:  {s * 1000:6.1f} ms median, {s / b:.2f}x bare python "
            f"(goal <= {GOAL_RATIO}x)"
        )
        print(f"llamactl's own cost: {(s - b) * 1000:.1f} ms")
        return
    for figure in figures(args.rounds):
        print(
            f"{figure.name}: {figure.median:.1f} ms median, {figure.ratio or 0:.2f}x "
            f"python -c pass (goal <= {GOAL_RATIO}x), {figure.note}"
        )


if __name__ == "__main__":
    main()
