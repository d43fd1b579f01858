"""Switch overhead: `llamactl load B` through llamad vs. llama-server's own load time.

Interleaved rounds in one run: (a) the bench spawns the same llama-server
command itself and times spawn -> /health 200 (polling every 1 ms); (b) llamad
switches A -> B (`Load` over the control socket, llamad measures it) and the
bench times the request end to end. The result is the difference of medians.

    .venv/bin/python bench/switch.py [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llamactl.client import Client
from llamad.demo_model import write_demo_model
from llamad.llama_server import find_server_binary
from llamad.protocol import Load, Loaded


def direct_load(binary: Path, model: Path, sock: Path) -> float:
    """Spawn llama-server ourselves; seconds from spawn to /health 200."""
    sock.unlink(missing_ok=True)
    command = [
        str(binary),
        "--model",
        str(model),
        "--n-gpu-layers",
        "0",
        "--ctx-size",
        "512",
        "--host",
        str(sock),
        "--threads",
        "1",
    ]
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    transport = httpx.HTTPTransport(uds=str(sock))
    try:
        with httpx.Client(transport=transport, base_url="http://x", timeout=5) as client:
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        return time.perf_counter() - began
                except httpx.HTTPError:
                    pass
                time.sleep(0.001)
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="llamad-bench-", dir="/tmp"))
    models = {v: write_demo_model(work / f"{v}.gguf", v) for v in ("demo", "demo-b")}
    binary = find_server_binary(None).path
    config = work / "models.toml"
    config.write_text(
        f'[daemon]\nruntime_dir = "{work}"\nllama_server = "{binary}"\n'
        + "".join(
            f'[models.{n}]\npath = "{p}"\nctx_size = 512\nargs = ["--threads", "1"]\n'
            for n, p in models.items()
        )
    )
    control = work / "control.sock"
    env = {**os.environ, "LLAMAD_SOCKET": str(control)}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "llamad", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(control))
                break
            except OSError:
                time.sleep(0.02)
        direct: list[float] = []
        via_end_to_end: list[float] = []
        via_daemon: list[float] = []
        via_server: list[float] = []
        with Client(control, timeout=60) as client:
            client.call(lambda i: Load(id=i, model="demo"))
            for round_no in range(args.rounds):
                target = "demo-b" if round_no % 2 == 0 else "demo"
                direct.append(direct_load(binary, models[target], work / "direct.sock"))
                began = time.perf_counter()
                reply = client.call(lambda i, t=target: Load(id=i, model=t))
                via_end_to_end.append(time.perf_counter() - began)
                assert isinstance(reply, Loaded)
                via_daemon.append(reply.seconds)
                via_server.append(reply.ready_seconds)
    finally:
        daemon.terminate()
        daemon.wait()

    def ms(values: list[float]) -> str:
        q = statistics.quantiles(values, n=4)
        return (
            f"{statistics.median(values) * 1000:7.1f} ms  (IQR {q[0] * 1000:.1f}-{q[2] * 1000:.1f})"
        )

    overhead = statistics.median(via_end_to_end) - statistics.median(direct)
    print(f"switch overhead, {args.rounds} interleaved rounds, demo <-> demo-b")
    print(f"  llama-server alone, spawn -> /health 200:      {ms(direct)}")
    print(f"  llama-server under llamad (its own timing):     {ms(via_server)}")
    print(f"  llamad switch, as llamad measured it:           {ms(via_daemon)}")
    print(f"  `load` end to end (stop A + start B), client:   {ms(via_end_to_end)}")
    print(
        f"  overhead = end-to-end - alone (medians):        {overhead * 1000:7.1f} ms (goal <= 30)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "direct": direct,
                    "end_to_end": via_end_to_end,
                    "daemon": via_daemon,
                    "server": via_server,
                    "overhead": overhead,
                }
            )
        )


if __name__ == "__main__":
    main()
