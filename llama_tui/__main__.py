"""``llama-tui``: chat with your local models in the terminal, through llamad."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import blessed

from llama_tui.app import App, Options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-tui",
        description="Terminal chat client for llamad. F1 in the app lists the keys.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        type=Path,
        help="llamad's Unix socket (default: $LLAMAD_SOCKET or the usual place, when it exists; "
        "else the WebSocket address llamad wrote into its runtime directory)",
    )
    where.add_argument("--url", help="a WebSocket URL, e.g. of a llamad on another machine")
    parser.add_argument(
        "--token-file", type=Path, help="WebSocket token (default $XDG_RUNTIME_DIR/llamad/token)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--conversation", "-c", metavar="ID", help="open this conversation (handle or id prefix)"
    )
    which.add_argument("--new", action="store_true", help="start with a new conversation")
    parser.add_argument("--model", "-m", help="load this model at start")
    return parser


@contextlib.contextmanager
def input_modes(term: blessed.Terminal) -> Iterator[None]:
    """Bracketed paste and mouse wheel reporting, on for the app's lifetime.

    blessed's ``bracketed_paste()``/``mouse_enabled()`` enable a mode only when
    the terminal answers a DECRQM query, and tmux, for one, does not answer. A
    terminal that does not know a DEC mode ignores the request, so set them
    unconditionally; blessed's setter also tells its key parser to expect the
    events. Without that (private) setter we simply go without.
    """
    from blessed.dec_modes import DecPrivateMode

    modes = (
        DecPrivateMode.BRACKETED_PASTE,
        DecPrivateMode.MOUSE_REPORT_CLICK,
        DecPrivateMode.MOUSE_EXTENDED_SGR,
    )
    enable = getattr(term, "_dec_mode_set_enabled", None)
    disable = getattr(term, "_dec_mode_set_disabled", None)
    if enable is None or disable is None:
        yield
        return
    enable(*modes)
    try:
        yield
    finally:
        disable(*modes)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        print("llama-tui: needs a terminal (stdin and stdout must be a tty)", file=sys.stderr)
        return 2
    import trio

    term = blessed.Terminal()
    options = Options(
        args.socket, args.url, args.conversation, args.new, args.model, args.token_file
    )
    # The context managers restore the terminal on any exit, a crash included.
    with (
        term.fullscreen(),
        term.raw(),  # not cbreak: ICRNL would make Enter and Ctrl+J the same "\n"
        term.hidden_cursor(),
        input_modes(term),
        contextlib.suppress(KeyboardInterrupt),
    ):
        trio.run(App(term, options).run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
