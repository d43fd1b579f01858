"""llama-tui in a real terminal: tmux runs it against a real llamad; we read the screen."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llamad.protocol import Status, StatusReply
from tests.conftest import FAKE_SERVER, Llamad, ready_daemon

pytestmark = pytest.mark.server

MakeLlamad = Callable[..., Llamad]


class Tmux:
    """One tmux session running llama-tui, at a fixed size."""

    def __init__(
        self, name: str, command: list[str], env: dict[str, str], size: tuple[int, int], log: Path
    ):
        self.name = name
        self.log = log
        width, height = size
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k.isidentifier())
        # stderr goes to a file: if the TUI dies, its session (and screen) goes with it.
        script = (
            f"env -i {exports} TERM=xterm-256color {shlex.join(command)} "
            f"2>>{shlex.quote(str(log))}; echo exit=$? >> {shlex.quote(str(log))}"
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


@pytest.fixture
def tui(request: pytest.FixtureRequest) -> Iterator[Callable[..., Tmux]]:
    sessions: list[Tmux] = []

    def start(daemon: Llamad, *args: str, size: tuple[int, int] = (100, 30)) -> Tmux:
        with daemon.client() as client:
            reply = client.call(lambda i: Status(id=i))
        assert isinstance(reply, StatusReply) and reply.websocket is not None
        command = [
            sys.executable,
            "-m",
            "llama_tui",
            "--url",
            f"ws://{reply.websocket}/",
            "--token-file",
            str(daemon.runtime_dir / "token"),
            *args,
        ]
        name = f"llamad-test-{len(sessions)}-{time.monotonic_ns()}"
        log = daemon.runtime_dir / f"{name}.stderr"
        session = Tmux(name, command, daemon.env, size, log)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.kill()


def test_history_at_start_and_a_streamed_reply(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    assert daemon.ctl("chat", "--max-tokens", "5", "an earlier question").returncode == 0
    screen = tui(daemon)
    shown = screen.wait_for("an earlier question")
    assert "Conversations" in shown  # the sidebar, at 100 columns
    assert "demo ready" in shown
    screen.type("hello from the terminal")
    screen.send("Enter")
    done = screen.wait_for("tok/s")
    assert "hello from the terminal" in done
    listing = daemon.ctl("history", "show", daemon_last_conversation(daemon)).stdout
    reply_words = listing.strip().splitlines()[-1].split()[:3]
    assert " ".join(reply_words) in done.replace("\n", " ") or all(w in done for w in reply_words)


def daemon_last_conversation(daemon: Llamad) -> str:
    import json

    return str(json.loads(daemon.ctl("history", "list", "--json").stdout)[0]["id"])


def test_model_picker_shows_loading_then_ready(
    make_llamad: MakeLlamad, tmp_path: Path, tui: Callable[..., Tmux]
) -> None:
    model = tmp_path / "fake.gguf"
    model.write_bytes(b"GGUF\x03\x00\x00\x00")
    daemon = make_llamad(
        f'[models.fast]\npath = "{model}"\n'
        f'[models.slow]\npath = "{model}"\nargs = ["--fake-ready-after", "5"]\n',
        'default_model = "fast"\n',
        binary=FAKE_SERVER,
    )
    daemon.start()
    daemon.wait_for("fast", lambda s: s.state == "ready")
    screen = tui(daemon)
    screen.wait_for("fast ready")
    screen.send("C-l")
    picker = screen.wait_for("Choose a model")
    assert "slow" in picker
    screen.send("Down")
    screen.send("Enter")
    loading = screen.wait_for("Loading slow…")
    assert " s " in loading or " s│" in loading or "s │" in loading
    screen.wait_for("slow ready", timeout=20)
    # The input stayed usable meanwhile.
    screen.type("still typing")
    screen.wait_for("still typing")


def test_resize_reflows(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    screen = tui(daemon, size=(100, 30))
    assert "Conversations" in screen.wait_for("demo ready")
    screen.resize(70, 20)
    # The sidebar hides on a narrow terminal; the status bar stays.
    narrow = screen.wait_until(
        lambda s: "Conversations" not in s and "demo ready" in s, "the narrow layout", 10
    )
    assert max(len(line) for line in narrow.splitlines()) <= 70
    assert "demo ready" in narrow
    screen.resize(100, 30)
    screen.wait_for("Conversations")


def test_help_overlay(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    screen = tui(daemon)
    screen.wait_for("demo ready")
    screen.send("F1")
    shown = screen.wait_for("Keys (any key closes this)")
    assert "Ctrl+L" in shown and "Ctrl+Q" in shown
    screen.send("x")
    screen.wait_until(lambda s: "Keys (any key" not in s and "demo ready" in s, "help closed", 10)


def test_llamad_restart_while_open(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    daemon.config_path.write_text(
        daemon.config_path.read_text().replace(
            'websocket = "127.0.0.1:0"', f'websocket = "127.0.0.1:{_free_port()}"'
        )
    )
    daemon.stop()
    daemon.start()
    daemon.wait_for("demo", lambda s: s.state == "ready")
    screen = tui(daemon)
    screen.wait_for("connected")
    daemon.stop(signal.SIGTERM)
    screen.wait_for("retrying")
    assert "Traceback" not in screen.screen()
    daemon.start()
    daemon.wait_for("demo", lambda s: s.state == "ready")
    screen.wait_for("connected", timeout=20)
    screen.type("are you back")
    screen.send("Enter")
    assert "are you back" in screen.wait_for("tok/s", timeout=20)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_find_and_search_jump_to_the_message(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    assert daemon.ctl("chat", "--max-tokens", "3", "remember the aardvark").returncode == 0
    conversation = daemon_last_conversation(daemon)
    for n in range(12):  # push the aardvark far above the bottom of the screen
        result = daemon.ctl("chat", "-c", conversation, "--max-tokens", "40", f"filler {n}")
        assert result.returncode == 0
    assert daemon.ctl("chat", "--max-tokens", "3", "another conversation").returncode == 0
    screen = tui(daemon, "--conversation", conversation[:13])
    assert "aardvark" not in chat_pane(screen.wait_for("filler 11"))
    screen.send("C-f")
    screen.type("aardvark")
    screen.send("Enter")
    assert "remember the aardvark" in chat_pane(screen.wait_for("find 'aardvark': 1/1"))
    screen.send("Escape")
    # Across every conversation: /search lists hits, Enter opens one at its message.
    screen.send("C-n")
    screen.type("/search aardvark")
    screen.send("Enter")
    screen.wait_for("Search results")
    screen.send("Enter")
    assert "remember the aardvark" in chat_pane(screen.wait_for("find 'aardvark'"))


def chat_pane(screen: str) -> str:
    """The screen right of the sidebar's border (the sidebar lists titles too)."""
    return "\n".join(line.split("│", 1)[-1] for line in screen.splitlines()[:-1])


def test_ctrl_e_writes_the_message_in_the_editor(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux], tmp_path: Path
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\nprintf "written in the editor" > "$1"\n')
    editor.chmod(0o755)
    daemon.env["EDITOR"] = str(editor)
    screen = tui(daemon)
    screen.wait_for("demo ready")
    screen.send("C-e")
    screen.wait_for("> written in the editor")
    screen.send("Enter")
    screen.wait_for("tok/s")
    assert daemon.ctl("history", "search", "written in the editor").stdout.count("user") == 1


def test_bracketed_paste_is_not_sent_line_by_line(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    screen = tui(daemon)
    screen.wait_for("demo ready")
    subprocess.run(["tmux", "set-buffer", "-b", screen.name, "pasted one\npasted two"], check=True)
    # -p: paste with brackets, as a terminal does when the app asked for them.
    subprocess.run(["tmux", "paste-buffer", "-p", "-b", screen.name, "-t", screen.name], check=True)
    shown = screen.wait_for("pasted two")
    assert "> pasted one" in shown  # both lines in the input, nothing sent yet
    screen.send("C-j")
    screen.type("third")
    screen.send("M-Enter")
    screen.type("fourth")
    shown = screen.wait_for("fourth")
    assert "  third" in shown and "  fourth" in shown
    assert daemon.ctl("history", "list", "--json").stdout.strip() == "[]"
