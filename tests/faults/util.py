"""Helpers shared by the fault drills."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.conftest import Llamad

MakeLlamad = Callable[..., Llamad]

# What a busy 2-core CI machine may add to anything that is not itself under
# test: starting a Python process, a llama-server loading the demo model, a
# round trip through llamad. Bounds are "what the config promises + SLACK".
SLACK = 5.0


def pid_gone(pid: int, timeout: float = 5.0) -> bool:
    """True once ``pid`` has exited (a zombie counts: it runs nothing any more)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the seconds it took."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - began


def fake_model(directory: Path) -> Path:
    """A file for the fake server's ``path``: it only has to exist."""
    model = directory / "fake.gguf"
    model.write_bytes(b"GGUF\x03\x00\x00\x00")
    return model


def live_children(daemon: Llamad) -> list[psutil.Process]:
    """The daemon's model processes that are still running (zombies excluded)."""
    found = []
    for proc in daemon.children():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found
