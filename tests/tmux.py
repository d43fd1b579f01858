"""A terminal for the tests: tmux runs a program at a fixed size; the screen is read back."""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class Tmux:
    """One tmux session running a program (llama-tui, ``llamactl chat``) at a fixed size.

    ``log`` gets the exit status, and stderr too unless ``stderr_on_screen``
    (a line-based program shows its messages there, as in a real terminal).
    """

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        size: tuple[int, int],
        log: Path,
        *,
        stderr_on_screen: bool = False,
    ):
        self.name = name
        self.log = log
        width, height = size
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k.isidentifier())
        # stderr goes to a file: if the TUI dies, its session (and screen) goes with it.
        errors = "" if stderr_on_screen else f"2>>{shlex.quote(str(log))}"
        script = (
            f"env -i {exports} TERM=xterm-256color {shlex.join(command)} {errors}; "
            f"echo exit=$? >> {shlex.quote(str(log))}"
        )
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", name, "-x", str(width), "-y", str(height), script],
            check=True,
        )

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def type(self, text: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", text], check=True)

    def screen(self) -> str:
        result = subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", self.name],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            died = self.log.read_text() if self.log.exists() else "(no output)"
            raise AssertionError(f"llama-tui is gone; what it printed:\n{died}")
        return result.stdout

    def wait_until(self, done: Callable[[str], bool], what: str, timeout: float = 15.0) -> str:
        """Poll until the screen satisfies ``done`` (tmux may show half-painted frames)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if done(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw {what}; the screen:\n{screen}")
            time.sleep(0.05)

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        return self.wait_until(lambda screen: text in screen, repr(text), timeout)

    def resize(self, width: int, height: int) -> None:
        subprocess.run(
            ["tmux", "resize-window", "-t", self.name, "-x", str(width), "-y", str(height)],
            check=True,
        )

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], check=False, capture_output=True)
