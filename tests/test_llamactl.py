"""llamactl as a user runs it: the real command against a real llamad."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llamactl.__main__ import shown_reason
from llamad import __version__
from llamad.protocol import ModelStatus
from tests.conftest import Llamad, long_reply_daemon, ready_daemon
from tests.tmux import Tmux

pytestmark = pytest.mark.server

MakeLlamad = Callable[..., Llamad]


def ctl(daemon: Llamad, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """llamactl with ``stdin`` piped in (or /dev/null), as from a shell."""
    return subprocess.run(
        [sys.executable, "-m", "llamactl", *args],
        env=daemon.env,
        input=stdin if stdin is not None else None,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def conversations(daemon: Llamad) -> list[dict[str, object]]:
    return list(json.loads(ctl(daemon, "history", "list", "--json").stdout))


def test_piped_text_and_a_prompt_are_sent_together(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    notes = "The secret word is aardvark.\nIt was chosen on Tuesday.\n"
    result = ctl(daemon, "chat", "--max-tokens", "3", "summarise this", stdin=notes)
    assert result.returncode == 0, result.stderr
    (conversation,) = conversations(daemon)
    shown = json.loads(ctl(daemon, "history", "show", str(conversation["id"]), "--json").stdout)
    sent = shown["messages"][0]["parts"][0]["text"]
    assert sent == "The secret word is aardvark.\nIt was chosen on Tuesday.\n\nsummarise this"
    # Only stdin, as before: the message itself.
    assert ctl(daemon, "chat", "--max-tokens", "3", stdin="from stdin alone").returncode == 0
    assert conversations(daemon)[0]["title"] == "from stdin alone"


def test_short_handles_and_continue(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    refused = ctl(daemon, "chat", "--continue", "too early")
    assert refused.returncode == 1 and "no conversation to continue yet" in refused.stderr
    first = ctl(daemon, "chat", "-v", "--max-tokens", "3", "first topic")
    assert ctl(daemon, "chat", "--max-tokens", "3", "second topic").returncode == 0
    older, newer = conversations(daemon)[::-1]
    handle = str(older["handle"])
    assert re.fullmatch(r"[0-9a-hjkmnp-tv-z]{6}", handle)
    assert f"conversation {handle}" in first.stderr  # chat -v names it by its handle
    listing = ctl(daemon, "history", "list").stdout.splitlines()
    assert [line.split()[0] for line in listing] == [newer["handle"], handle]
    # The handle works wherever an id does.
    assert ctl(daemon, "chat", "-c", handle, "--max-tokens", "3", "back to it").returncode == 0
    shown = ctl(daemon, "history", "show", handle.upper())
    assert shown.returncode == 0 and "back to it" in shown.stdout and handle in shown.stdout
    # --continue: the most recent conversation (now the first one, just continued).
    assert ctl(daemon, "chat", "--continue", "--max-tokens", "3", "and more").returncode == 0
    messages = json.loads(ctl(daemon, "history", "show", handle, "--json").stdout)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    found = ctl(daemon, "history", "search", "back to it")
    assert found.stdout.split()[0] == handle


def test_chat_on_a_terminal_is_a_line_by_line_session(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    daemon = long_reply_daemon(make_llamad, demo_models)  # replies long enough to stop
    terminal = Tmux(
        f"llamactl-chat-{time.monotonic_ns()}",
        [sys.executable, "-m", "llamactl", "chat"],
        daemon.env,
        (100, 30),
        tmp_path / "log",
        stderr_on_screen=True,
    )
    try:
        terminal.wait_for("Ctrl+D leaves")
        terminal.type("first line")
        terminal.send("Enter")
        time.sleep(0.5)  # the reply is streaming
        terminal.send("C-c")
        terminal.wait_for("(cancelled; the partial reply is kept)")
        terminal.wait_until(lambda s: s.rstrip().endswith(">"), "the prompt again")
        terminal.send("Up")  # readline: the line before
        terminal.wait_until(lambda s: s.rstrip().endswith("> first line"), "the line recalled")
        terminal.send("C-u")
        terminal.type("second line")
        terminal.send("Enter")
        time.sleep(0.5)
        terminal.send("C-c")
        terminal.wait_until(lambda s: s.count("(cancelled") == 2, "the second reply stopped")
        terminal.wait_until(lambda s: s.rstrip().endswith(">"), "the prompt again")
        terminal.send("C-d")
        log, deadline = tmp_path / "log", time.monotonic() + 10
        while not (log.exists() and "exit=" in log.read_text()):
            assert time.monotonic() < deadline, "llamactl did not leave on Ctrl+D"
            time.sleep(0.05)
        assert "exit=0" in log.read_text()
    finally:
        terminal.kill()
    (conversation,) = conversations(daemon)  # one conversation, both turns in it
    shown = json.loads(ctl(daemon, "history", "show", str(conversation["id"]), "--json").stdout)
    assert [(m["role"], m["status"]) for m in shown["messages"]] == [
        ("user", "complete"),
        ("assistant", "cancelled"),
        ("user", "complete"),
        ("assistant", "cancelled"),
    ]


def test_small_things(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    typo = ctl(daemon, "laod", "demo-b")
    assert typo.returncode == 2
    assert "unknown command 'laod'; did you mean `llamactl load`?" in typo.stderr
    version = ctl(daemon, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"llamactl {__version__}"
    history_help = ctl(daemon, "history", "--help").stdout
    assert "rename" in history_help and "delete" in history_help
    assert "give a conversation a title" in history_help
    missing = ctl(daemon, "history", "search", "nowhere to be found")
    assert missing.returncode == 1 and "no message contains" in missing.stderr
    assert ctl(daemon, "chat", "--max-tokens", "3", "somewhere").returncode == 0
    assert ctl(daemon, "history", "search", "somewhere").returncode == 0


def test_each_state_is_printed_once(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    for command in (("load", "demo-b"), ("chat", "-m", "demo-b", "--max-tokens", "3", "hi")):
        assert ctl(daemon, "unload", "demo-b").returncode == 0  # so that it starts again
        result = ctl(daemon, *command)
        assert result.returncode == 0, result.stderr
        states = [line for line in result.stderr.splitlines() if ": " in line]
        assert states, result.stderr
        assert len(states) == len(set(states)), result.stderr


def test_one_restart_is_singular(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    pid = daemon.status("demo").pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    daemon.wait_for("demo", lambda s: s.state == "ready" and s.restarts == 1)
    status = ctl(daemon, "status").stdout
    assert re.search(r"pid \d+, 1 restart$", status, re.MULTILINE), status


def test_a_stopped_models_reason_is_shown_only_while_it_is_news() -> None:
    status = ModelStatus(name="b", state="stopped", since=1000.0, reason="switching to a")
    assert shown_reason(status, now=1010.0) == "switching to a"
    assert shown_reason(status, now=1000.0 + 11 * 60) == ""
    failed = ModelStatus(name="b", state="failed", since=1000.0, reason="crash loop")
    assert shown_reason(failed, now=1000.0 + 3600) == "crash loop"


@pytest.fixture
def importtime(tmp_path: Path) -> Iterator[Callable[[list[str], dict[str, str]], str]]:
    def run(args: list[str], env: dict[str, str]) -> str:
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "llamactl", *args],
            env={**env, "PYTHONPYCACHEPREFIX": str(tmp_path)},
            capture_output=True,
            text=True,
            check=False,
        )
        return result.stderr

    yield run


def test_status_starts_without_what_it_does_not_use(
    make_llamad: MakeLlamad,
    demo_models: dict[str, Path],
    importtime: Callable[[list[str], dict[str, str]], str],
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in importtime(["status"], daemon.env).splitlines()
    }
    assert "llamactl.chat_commands" not in imported  # other commands' modules and parsers
    assert "inspect" not in imported  # typing_extensions's import, blocked for msgspec
    assert "llamad.protocol" in imported
