"""llama-tui in a real terminal: tmux runs it against a real llamad; we read the screen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llamad.protocol import Status, StatusReply
from tests.conftest import FAKE_SERVER, Llamad, demo_config, long_reply_daemon, ready_daemon
from tests.tmux import Tmux

pytestmark = pytest.mark.server

MakeLlamad = Callable[..., Llamad]


@pytest.fixture
def tui(request: pytest.FixtureRequest) -> Iterator[Callable[..., Tmux]]:
    sessions: list[Tmux] = []

    def start(
        daemon: Llamad,
        *args: str,
        size: tuple[int, int] = (100, 30),
        flags: bool = True,
        env: dict[str, str] | None = None,
    ) -> Tmux:
        """llama-tui on ``daemon``'s WebSocket; ``flags=False``: as a user starts it, bare."""
        command = [sys.executable, "-m", "llama_tui"]
        if flags:
            with daemon.client() as client:
                reply = client.call(lambda i: Status(id=i))
            assert isinstance(reply, StatusReply) and reply.websocket is not None
            command += [
                "--url",
                f"ws://{reply.websocket}/",
                "--token-file",
                str(daemon.runtime_dir / "token"),
            ]
        command += args
        name = f"llamad-test-{len(sessions)}-{time.monotonic_ns()}"
        log = daemon.runtime_dir / f"{name}.stderr"
        session = Tmux(name, command, {**daemon.env, **(env or {})}, size, log)
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
    shown = screen.wait_for("Keys (")
    assert "Ctrl+L" in shown
    screen.send("NPage")
    screen.send("NPage")
    assert "Ctrl+Q" in screen.wait_for("Ctrl+Q")  # the end is reached by scrolling
    screen.send("x")
    screen.wait_until(lambda s: "Keys (" not in s and "demo ready" in s, "help closed", 10)


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


# ------------------------------------------------------------------ issue 11


def test_finds_the_local_llamad_without_flags_on_the_unix_socket(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    # No WebSocket at all: only the Unix socket can have answered.
    daemon = make_llamad(demo_config(demo_models), 'default_model = "demo"\nwebsocket = "off"\n')
    daemon.start()
    daemon.wait_for("demo", lambda s: s.state == "ready")
    screen = tui(daemon, flags=False)
    screen.wait_for("demo ready")
    screen.type("over the socket")
    screen.send("Enter")
    assert "over the socket" in screen.wait_for("tok/s")


def test_finds_the_configured_websocket_without_flags(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    port = _free_port()
    daemon = make_llamad(
        demo_config(demo_models), f'default_model = "demo"\nwebsocket = "127.0.0.1:{port}"\n'
    )
    # llamad's runtime directory where clients look for it: $XDG_RUNTIME_DIR/llamad.
    runtime = daemon.runtime_dir / "llamad"
    daemon.config_path.write_text(
        daemon.config_path.read_text().replace(
            f'runtime_dir = "{daemon.runtime_dir}"', f'runtime_dir = "{runtime}"'
        )
    )
    daemon.start()
    daemon.wait_for("demo", lambda s: s.state == "ready")
    address = runtime / "websocket"
    assert address.read_text() == f"ws://127.0.0.1:{port}/\n"
    assert address.stat().st_mode & 0o777 == 0o600
    # The Unix socket is not where this client looks: the address file must lead it.
    elsewhere = {"LLAMAD_SOCKET": str(daemon.runtime_dir / "not-here.sock")}
    screen = tui(daemon, flags=False, env=elsewhere)
    screen.wait_for("demo ready")
    screen.type("over the websocket")
    screen.send("Enter")
    assert "over the websocket" in screen.wait_for("tok/s")
    daemon.stop()
    assert not address.exists()  # a stopped llamad leaves no address to mislead a client


def test_a_message_typed_while_llamad_is_down_is_sent_when_it_is_back(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    screen = tui(daemon, flags=False)
    screen.wait_for("demo ready")
    daemon.stop()
    screen.wait_for("retrying")
    screen.type("typed while you were away")
    screen.send("Enter")
    waiting = chat_pane(screen.wait_for("will send when llamad is back"))
    assert "typed while you were away" in waiting
    daemon.start()
    done = screen.wait_until(
        lambda s: "tok/s" in s and "will send" not in s, "the queued message answered", 30
    )
    assert "typed while you" in done  # the conversation it started, in the list
    hits = json.loads(daemon.ctl("history", "search", "typed while you", "--json").stdout)
    assert [hit["role"] for hit in hits] == ["user"]  # stored once, not lost, not twice


def test_slash_commands_never_reach_the_model(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    screen = tui(daemon)
    screen.wait_for("demo ready")
    screen.type("/foo")
    screen.send("Enter")
    refused = screen.wait_for("unknown command /foo")
    assert "/model" in refused and "/system" in refused and "/retry" in refused
    assert "> /foo" in refused  # kept in the input to be corrected
    assert daemon.ctl("history", "list", "--json").stdout.strip() == "[]"
    screen.send(*["BSpace"] * 4)
    # /model NAME: this conversation's next replies come from that model.
    screen.type("/model demo-b")
    screen.send("Enter")
    screen.wait_for("demo-b ready", timeout=30)
    screen.type("which model are you")
    screen.send("Enter")
    screen.wait_for("tok/s")
    shown = daemon.ctl("history", "show", daemon_last_conversation(daemon)).stdout
    assert "assistant (demo-b)" in shown and "/model" not in shown
    # /system TEXT: a new conversation with that system prompt.
    screen.type("/system Answer in one word.")
    screen.send("Enter")
    screen.wait_for("Answer in one word.")
    screen.type("with a system prompt")
    screen.send("Enter")
    screen.wait_until(
        lambda s: "with a system prompt" in s and s.count("tok/s") == 1 and "writing" not in s,
        "the reply in the new conversation",
    )
    newest = json.loads(daemon.ctl("history", "list", "--json").stdout)[0]
    assert newest["system_prompt"] == "Answer in one word."
    assert newest["title"] == "with a system prompt"


def test_retry_and_edit_replace_the_last_turn(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    assert daemon.ctl("chat", "--max-tokens", "8", "the first question").returncode == 0
    conversation = daemon_last_conversation(daemon)
    first = _messages(daemon, conversation)
    screen = tui(daemon, "--conversation", conversation[:13])
    screen.wait_for("the first question")
    screen.type("/retry")
    screen.send("Enter")
    screen.wait_until(lambda s: "tok/s" in s and "writing" not in s, "the retried reply")
    again = _messages(daemon, conversation)
    assert [m["role"] for m in again] == ["user", "assistant"]  # replaced, not added
    assert again[1] != first[1]  # a new reply (its time, text and stats)
    # Up on an empty input: the last message, to edit; Enter replaces that turn.
    screen.send("Up")
    screen.wait_for("editing your last message")
    screen.send(*["BSpace"] * len("question"))
    screen.type("edited words")
    screen.send("Enter")
    deadline = time.monotonic() + 15
    while True:
        edited = _messages(daemon, conversation)
        turn = [(m["role"], m["status"], _text(m)) for m in edited]
        if turn[-1][:2] == ("assistant", "complete") and turn[0][2] == "the first edited words":
            break
        assert time.monotonic() < deadline, f"the edited turn was never answered: {turn}"
        time.sleep(0.1)
    assert [role for role, _, _ in turn] == ["user", "assistant"]  # replaced, not added
    screen.wait_until(lambda s: "tok/s" in s and "replying" not in s, "the reply shown")
    screen.send("Home")
    pane = chat_pane(screen.wait_for("the first edited words"))
    assert "the first question" not in pane


def _text(message: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for part in message["parts"])


def _messages(daemon: Llamad, conversation: str) -> list[dict[str, Any]]:
    shown = json.loads(daemon.ctl("history", "show", conversation, "--json").stdout)
    return list(shown["messages"])


def test_scrolled_up_the_view_holds_still_while_a_reply_streams(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    daemon = long_reply_daemon(make_llamad, demo_models)
    screen = tui(daemon)
    screen.wait_for("demo ready")
    screen.type("tell me everything")
    screen.send("Enter")
    streaming = screen.wait_for("replying… Esc stops")
    assert "[incomplete]" not in streaming  # streaming is not an error
    time.sleep(1.0)  # some screens of text
    screen.send("PPage")
    held = screen.wait_for("↓ new")
    time.sleep(1.5)
    later = screen.screen()
    assert "replying…" in later, "the reply ended too soon to tell"

    def settled(text: str) -> list[str]:  # the spinner in the reply's label moves on purpose
        return [line for line in chat_pane(text).splitlines() if "writing" not in line]

    assert settled(later) == settled(held)
    # llama-server dies mid-reply: the reason is told in full, not cut off.
    pid = daemon.status("demo").pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    screen.send("End")
    screen.wait_for("error: ", timeout=30)
    stored = daemon.ctl("history", "show", daemon_last_conversation(daemon)).stdout
    reason = next(line for line in stored.splitlines() if line.startswith("error: "))
    pane = " ".join(" ".join(chat_pane(screen.screen()).split("\n")).split())
    assert " ".join(reason.split()) in pane


def test_user_messages_are_shown_as_typed(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    screen = tui(daemon)
    screen.wait_for("demo ready")
    code = "def f(x):\n    if x:\n        return x * 2\n    return 0"
    subprocess.run(["tmux", "set-buffer", "-b", screen.name, code], check=True)
    subprocess.run(["tmux", "paste-buffer", "-p", "-b", screen.name, "-t", screen.name], check=True)
    screen.send("Enter")
    screen.wait_for("tok/s")
    screen.send("Home")  # the reply may be long: the top of the conversation
    pane = chat_pane(screen.wait_for("you\n")).splitlines()
    for line in code.splitlines():
        assert line in pane, line


def test_status_messages_expire(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    assert daemon.ctl("chat", "--max-tokens", "3", "paris in spring").returncode == 0
    screen = tui(daemon)
    screen.wait_for("demo ready")
    screen.type("/search paris")
    screen.send("Enter")
    screen.wait_for("1 messages contain 'paris'")
    screen.send("Escape")
    bar = screen.wait_until(
        lambda s: "contain 'paris'" not in s, "the message gone", timeout=15
    ).splitlines()[-1]
    assert bar.rstrip().endswith("F1 help")


def test_help_fits_a_small_terminal(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tui: Callable[..., Tmux]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    screen = tui(daemon, size=(70, 20))
    screen.wait_for("demo ready")
    screen.send("F1")
    shown = screen.wait_for("more")
    rows = shown.splitlines()
    column = next(row for row in rows if "send the message" in row).index("send the message")
    for row in rows[2:-3]:
        if row[:column].strip():
            assert row[column - 1] == " ", f"misaligned: {row!r}"
    assert "attach" not in shown or "(Tab completes)  attach" in shown
    for _ in range(4):
        screen.send("NPage")
    assert "Ctrl+Q" in screen.wait_for("Ctrl+Q")


def test_export_without_a_path_goes_to_the_downloads_folder(
    make_llamad: MakeLlamad,
    demo_models: dict[str, Path],
    tui: Callable[..., Tmux],
    tmp_path: Path,
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    assert daemon.ctl("chat", "--max-tokens", "3", "Trip plans").returncode == 0
    downloads = tmp_path / "Downloads"
    screen = tui(daemon, env={"XDG_DOWNLOAD_DIR": str(downloads)})
    screen.wait_for("Trip plans")
    screen.type("/export")
    screen.send("Enter")
    screen.wait_for("exported to")
    (written,) = downloads.iterdir()
    assert written.name.startswith("trip-plans-") and written.suffix == ".md"
    assert str(downloads) in screen.screen().replace("\n", "")
    assert "Trip plans" in written.read_text()
