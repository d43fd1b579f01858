"""Switch overhead: `llamactl load B` through llamad vs. llama-server's own load time.

Interleaved rounds in one run: (a) the bench spawns the same llama-server
command itself and times spawn -> /health 200 (polling every 1 ms); (b) llamad
switches A -> B (`Load` over the control socket, llamad measures it) and the
bench times the request end to end. The result is the difference of medians.

    .venv/bin/python -m bench.switch [--rounds 15] [--json out.json]
    (or as one of all the benchmarks: scripts/bench --only switch)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import httpx

from bench.common import (
    Figure,
    Goal,
    model_table,
    running_daemon,
    server_binary,
    shared_demo_models,
)
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
    # The client is made before the clock starts: building httpx's default SSL
    # context alone takes ~20 ms, which is no part of llama-server's load.
    transport = httpx.HTTPTransport(uds=str(sock))
    client = httpx.Client(transport=transport, base_url="http://x", timeout=5)
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with client:
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


def measure(rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds of (a) llama-server alone and (b) a llamad switch; seconds."""
    models = shared_demo_models()
    binary = server_binary()
    samples: dict[str, list[float]] = {"direct": [], "end_to_end": [], "daemon": [], "server": []}
    tables = "".join(model_table(name, path) for name, path in models.items())
    # Room for one model: every load is a swap (evict, then start).
    with (
        running_daemon(tables, daemon_extra="max_models = 1\n") as daemon,
        daemon.client(timeout=60) as client,
    ):
        client.call(lambda i: Load(id=i, model="demo"))
        for round_no in range(rounds):
            target = "demo-b" if round_no % 2 == 0 else "demo"
            samples["direct"].append(
                direct_load(binary, models[target], daemon.work / "direct.sock")
            )
            began = time.perf_counter()
            reply = client.call(lambda i, t=target: Load(id=i, model=t))  # type: ignore[misc]
            samples["end_to_end"].append(time.perf_counter() - began)
            assert isinstance(reply, Loaded)
            samples["daemon"].append(reply.seconds)
            samples["server"].append(reply.ready_seconds)
    return samples


def figures(rounds: int = 15) -> list[Figure]:
    samples = measure(rounds)
    ms = {key: [v * 1000 for v in values] for key, values in samples.items()}
    overhead = [e - d for e, d in zip(ms["end_to_end"], ms["direct"], strict=True)]
    return [
        Figure(
            "switch overhead (load B end to end - alone)",
            "ms",
            overhead,
            baseline=ms["direct"],
            baseline_name="llama-server alone, spawn->200",
            ratio=statistics.median(ms["end_to_end"]) / statistics.median(ms["direct"]),
            goal=Goal("value", "<=", 30.0),
            note=f"demo <-> demo-b, per-round difference; end to end "
            f"{statistics.median(ms['end_to_end']):.1f} ms, llamad's own timing "
            f"{statistics.median(ms['daemon']):.1f} ms, llama-server under llamad "
            f"{statistics.median(ms['server']):.1f} ms",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    samples = measure(args.rounds)
    direct, via_end_to_end = samples["direct"], samples["end_to_end"]
    via_daemon, via_server = samples["daemon"], samples["server"]

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
        args.json.write_text(json.dumps({**samples, "overhead": overhead}))


if __name__ == "__main__":
    main()
