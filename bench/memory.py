"""llamad's memory: resident set size idle, and with 500 idle WebSocket clients.

llamad runs as a real subprocess (``python -m llamad``) with the demo model
loaded on the real llama-server; only llamad's own RSS is counted. Per round:
its RSS idle, then with 500 WebSocket clients connected (each has done one
``status`` round trip, then waits), then idle again after they leave.

Baselines, measured in the same rounds: a bare interpreter (``python -c`` that
sleeps) and one that has only imported llamad's modules (what the code
itself costs before any work).

    .venv/bin/python -m bench --only memory
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time

import psutil
import trio
import trio.lowlevel
from trio_websocket import open_websocket_url

from bench.common import Figure, Goal, model_table, running_daemon, shared_demo_models
from llamad.protocol import Status, StatusReply, decode_server_message, encode

MB = 1e6
IMPORTS = "import llamad.__main__, llamad.daemon, trio"


def _rss(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MB


def _interpreter_rss(code: str) -> float:
    """RSS of a fresh interpreter after ``code`` has run, while it sleeps."""
    process = subprocess.Popen(
        [sys.executable, "-c", f"{code}\nimport sys, time\nprint(flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()  # printed once the code has run
        time.sleep(0.05)
        return _rss(process.pid)
    finally:
        process.kill()
        process.wait()


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, wanted), hard))


async def _hold_clients(url: str, count: int, measure: trio.Event, release: trio.Event) -> None:
    connected = 0

    async def client() -> None:
        nonlocal connected
        async with open_websocket_url(url) as ws:
            await ws.send_message(encode(Status(id=1)))
            reply = decode_server_message(await ws.get_message())  # type: ignore[arg-type]
            assert isinstance(reply, StatusReply)
            connected += 1
            if connected == count:
                measure.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(client)
            await trio.lowlevel.checkpoint()


def run(rounds: int = 3, clients: int = 500) -> list[Figure]:
    _raise_fd_limit(clients * 2 + 256)
    bare: list[float] = []
    imported: list[float] = []
    idle: list[float] = []
    loaded: list[float] = []
    after: list[float] = []
    table = model_table("demo", shared_demo_models()["demo"])
    for _ in range(rounds):
        # A fresh llamad each round: memory freed by Python is not given back
        # to the system, so "idle" after 500 clients would not be idle any more.
        bare.append(_interpreter_rss("pass"))
        imported.append(_interpreter_rss(IMPORTS))
        with running_daemon(table, default_model="demo") as daemon:
            daemon.wait_ready("demo")
            status = daemon.status()
            assert status.websocket is not None
            url = f"ws://{status.websocket}/?token={daemon.token()}"
            pid = daemon.process.pid
            time.sleep(0.5)
            idle.append(_rss(pid))

            async def with_clients(url: str = url, pid: int = pid) -> None:
                measure, release = trio.Event(), trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_hold_clients, url, clients, measure, release)
                    with trio.fail_after(60):
                        await measure.wait()
                    await trio.sleep(0.3)
                    loaded.append(_rss(pid))
                    release.set()

            trio.run(with_clients)
            time.sleep(0.5)
            after.append(_rss(pid))
    per_client = (statistics.median(loaded) - statistics.median(idle)) * MB / clients / 1024
    return [
        Figure(
            "llamad RSS idle, model loaded",
            "MB",
            idle,
            baseline=bare,
            baseline_name="bare python",
            goal=Goal("value", "<=", 60.0),
            note=f"python with llamad's modules imported only: "
            f"{statistics.median(imported):.1f} MB",
        ),
        Figure(
            f"llamad RSS with {clients} idle WebSockets",
            "MB",
            loaded,
            baseline=idle,
            baseline_name="llamad idle",
            goal=Goal("value", "<=", 120.0),
            note=f"{per_client:.0f} KiB per connection; "
            f"{statistics.median(after):.1f} MB after they left",
        ),
    ]


if __name__ == "__main__":
    for figure in run(rounds=1):
        print(figure.name, figure.samples, figure.baseline, figure.note)
