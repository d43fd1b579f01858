"""``llamactl ps``: the resident models, like ``ollama ps``, and the RPC workers."""

from __future__ import annotations

import argparse
import time

from llamactl.client import Client
from llamactl.output import memory_line, print_json, size
from llamad.protocol import ModelStatus, Status, StatusReply, WorkerStatus


def _for(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _memory(status: ModelStatus) -> str:
    memory = status.memory
    estimated = size(memory.estimated_host)
    measured = size(memory.measured_pss if memory.measured_pss is not None else None)
    text = f"{estimated} / {measured}"
    if memory.estimated_gpu or memory.measured_gpu:
        text += f" (GPU {size(memory.estimated_gpu)} / {size(memory.measured_gpu)})"
    return text


def ps_rows(reply: StatusReply, now: float) -> list[list[str]]:
    """One row per model that is not stopped, or that should run."""
    rows = [["NAME", "STATE", "MEMORY est/measured", "CTX", "SLOTS", "WAITING", "IDLE", "UNLOADS"]]
    for status in reply.models:
        if status.state == "stopped" and not status.expected:
            continue
        idle = (
            _for(now - status.last_used)
            if status.last_used is not None and not status.in_flight
            else "-"
        )
        if status.pinned:
            unloads = "pinned"
        elif status.unload_at is not None:
            unloads = f"in {_for(status.unload_at - now)}"
        else:
            unloads = "when memory is needed"
        rows.append(
            [
                status.name,
                status.state,
                _memory(status),
                str(status.ctx_size),
                f"{status.in_flight}/{status.parallel}",
                str(status.waiting),
                idle,
                unloads,
            ]
        )
    return rows


def worker_devices(worker: WorkerStatus) -> str:
    """``CPU 23.5 GiB free of 23.5 GiB``, one entry per device; ``-`` before it reported."""
    shown = []
    for device in worker.devices:
        name = device.name or "device"
        if device.free is not None and device.total is not None:
            shown.append(f"{name} {size(device.free)} free of {size(device.total)}")
        else:
            shown.append(name)
    return ", ".join(shown) or "-"


def worker_line(worker: WorkerStatus) -> str:
    """``ready for 3 min, pid 812, CPU 23.5 GiB free of 23.5 GiB, serving split``."""
    if worker.local:
        parts = [f"{worker.state} for {_for(time.time() - worker.since)}"]
    elif worker.since:
        parts = [f"elsewhere, {worker.state} for {_for(time.time() - worker.since)}"]
    else:
        parts = ["elsewhere, not checked yet"]
    if worker.pid is not None:
        parts.append(f"pid {worker.pid}")
    if worker.restarts:
        parts.append(f"{worker.restarts} restarts")
    if worker.devices:
        parts.append(worker_devices(worker))
    if worker.serving:
        parts.append(f"serving {worker.serving}")
    elif worker.used_by:
        parts.append(f"used by {', '.join(worker.used_by)}")
    text = ", ".join(parts)
    return f"{text}: {worker.reason}" if worker.reason else text


def worker_rows(reply: StatusReply) -> list[list[str]]:
    """One row per RPC worker: ours (supervised here) and those models name elsewhere."""
    rows = [["WORKER", "ADDRESS", "STATE", "DEVICES", "SERVING", "USED BY"]]
    for worker in reply.workers:
        state = worker.state if worker.local else f"{worker.state} (elsewhere)"
        rows.append(
            [
                worker.name,
                worker.address,
                state,
                worker_devices(worker),
                worker.serving or "-",
                ", ".join(worker.used_by) or "-",
            ]
        )
    return rows


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def add_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    reading: argparse.ArgumentParser,
) -> None:
    commands.add_parser("ps", parents=[reading], help="resident models: memory, requests, idle")


def cmd_ps(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply)
    resident = [s for s in reply.models if s.state != "stopped" or s.expected]
    if args.json:
        print_json(resident)
        return 0
    rows = ps_rows(reply, time.time())
    print_table(rows)
    if len(rows) == 1:
        print("no model is loaded; `llamactl load NAME` loads one")
    print(memory_line(reply.memory))
    if reply.workers:
        print()
        print_table(worker_rows(reply))
    return 0
