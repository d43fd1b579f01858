"""``llamactl chat`` on a terminal with no message: a chat, line by line.

Each line is a message in one conversation; the reply streams below it.
Ctrl+C stops a reply (what came is kept) or clears the line being typed;
a second Ctrl+C during a reply, or Ctrl+D at the prompt, leaves. Lines are
edited and recalled with readline; the history is kept, private, in llamad's
data directory when it exists.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from llamactl.chat_commands import exchange, finish, resolve_conversation
from llamactl.client import Client, RequestFailed
from llamad.paths import data_dir

HISTORY_LINES = 1000


def run_chat_loop(client: Client, args: argparse.Namespace) -> int:
    client.set_timeout(None)  # a model may take minutes to load or to answer
    conversation = resolve_conversation(client, args)
    where = f"conversation {args.conversation}" if args.conversation else "a new conversation"
    if args.resume:
        where = "your most recent conversation"
    print(f"chatting in {where}; Ctrl+C stops a reply, Ctrl+D leaves", file=sys.stderr)
    with _line_history(data_dir() / "chat_history"):
        while True:
            try:
                line = input("> ")
            except EOFError:  # Ctrl+D
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:  # as in a shell: the line is dropped, the prompt stays
                print(file=sys.stderr)
                continue
            text = line.strip()
            if not text:
                continue
            try:
                reply = exchange(client, args, text, conversation, interrupted_quits=False)
            except KeyboardInterrupt:  # the second Ctrl+C of one reply
                print(file=sys.stderr)
                return 130
            except RequestFailed as exc:  # refused: say why, and let the user go on
                print(f"llamactl: {exc}", file=sys.stderr)
                continue
            conversation = reply.message.conversation
            finish(reply.message, args.verbose, reply.handle)


@contextlib.contextmanager
def _line_history(path: Path) -> Iterator[None]:
    """Line editing, and earlier lines under ↑, kept in ``path`` (0600) between runs."""
    try:
        import readline
    except ImportError:  # Python built without it: plain input() still works
        yield
        return
    readline.set_history_length(HISTORY_LINES)
    keep = path.parent.is_dir()
    if keep:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
            readline.read_history_file(path)
    try:
        yield
    finally:
        if keep:
            with contextlib.suppress(OSError):
                readline.write_history_file(path)
