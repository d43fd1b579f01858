"""`llamactl status` wall time against `python -c pass` on the same interpreter.

Interleaved rounds against a running llamad (start one first, e.g. scripts/demo).

    .venv/bin/python bench/cli_latency.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def timed(command: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    bare: list[float] = []
    status: list[float] = []
    for _ in range(args.rounds):
        bare.append(timed([sys.executable, "-c", "pass"]))
        status.append(timed([sys.executable, "-m", "llamactl", "status"]))
    b, s = statistics.median(bare), statistics.median(status)
    print(f"python -c pass:   {b * 1000:6.1f} ms median")
    ratio = s / b
    print(f"llamactl status:  {s * 1000:6.1f} ms median (goal <= 60), {ratio:.2f}x bare python")
    print(f"llamactl's own cost: {(s - b) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
