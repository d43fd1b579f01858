"""Memory on this machine: what a server really uses, what the pool may use.

Blocking reads (``/proc`` through psutil, ``nvidia-smi``), so the pool calls
them from a worker thread. The decisions made with these figures live in
``llamad.placement``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

from llamad.placement import MIB, Budget

log = logging.getLogger(__name__)

# What "auto" leaves for everything else on the machine: a tenth of it, at least 1 GiB.
AUTO_MARGIN_FRACTION = 0.10
AUTO_MARGIN_MIN = 1024 * MIB
NVIDIA_SMI_TIMEOUT_SEC = 5.0


@dataclass(frozen=True)
class Measured:
    """One server's memory as read from the system, in bytes."""

    rss: int
    pss: int
    gpu: int  # 0 when there is no NVIDIA GPU or the process holds none


def measure(pids: Iterable[int]) -> dict[int, Measured]:
    """RSS and PSS of each pid (and its GPU memory where ``nvidia-smi`` tells)."""
    gpu = gpu_memory_by_pid()
    found: dict[int, Measured] = {}
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        pss = int(getattr(info, "pss", info.rss))
        found[pid] = Measured(rss=int(info.rss), pss=pss, gpu=gpu.get(pid, 0))
    return found


def _nvidia_smi(query: str) -> list[list[str]]:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        result = subprocess.run(
            [binary, query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_SEC,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("nvidia-smi failed: %s", exc)
        return []
    if result.returncode != 0:
        return []
    return [[field.strip() for field in line.split(",")] for line in result.stdout.splitlines()]


def gpu_memory_by_pid() -> dict[int, int]:
    """GPU memory per process in bytes, summed over devices; {} without NVIDIA GPUs."""
    usage: dict[int, int] = {}
    for row in _nvidia_smi("--query-compute-apps=pid,used_memory"):
        try:
            pid, mib = int(row[0]), int(row[1])
        except (ValueError, IndexError):
            continue
        usage[pid] = usage.get(pid, 0) + mib * MIB
    return usage


def gpu_free() -> int | None:
    """Free GPU memory in bytes summed over devices, or None without NVIDIA GPUs."""
    rows = _nvidia_smi("--query-gpu=memory.free")
    free, read = 0, False
    for row in rows:
        try:
            free += int(row[0]) * MIB
            read = True
        except (ValueError, IndexError):
            continue  # "[N/A]" and the like: unknown, not zero
    return free if read else None


def auto_host_budget() -> int:
    """Available memory now, less a margin for the rest of the machine."""
    memory = psutil.virtual_memory()
    margin = max(int(memory.total * AUTO_MARGIN_FRACTION), AUTO_MARGIN_MIN)
    return max(int(memory.available) - margin, 0)


def resolve_budget(host: int | None, gpu: int | None, max_models: int | None) -> Budget:
    """The pool's budget: explicit sizes as given, "auto" (None here) read now."""
    return Budget(
        host=host if host is not None else auto_host_budget(),
        gpu=gpu if gpu is not None else gpu_free(),
        max_models=max_models,
    )
