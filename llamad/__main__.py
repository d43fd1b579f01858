"""``llamad``: run the daemon in the foreground, or check a models.toml."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from llamad import __version__
from llamad.concurrency import consists_of, first_leaf
from llamad.config import Config, find_config, load_config
from llamad.errors import ConfigError, LlamadError, ServerBinaryNotFound
from llamad.systemd import configure_logging

EX_CONFIG = 78  # sysexits.h; the unit's RestartPreventExitStatus=78 stops retrying


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamad", description="Supervise llama.cpp's llama-server for local models."
    )
    parser.add_argument("--version", action="version", version=f"llamad {__version__}")
    parser.add_argument("--config", "-c", metavar="PATH", help="models.toml to use")
    parser.add_argument("--socket", metavar="PATH", help="control socket path")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="run the daemon in the foreground (the default)")
    check = commands.add_parser("check-config", help="validate models.toml and exit")
    check.add_argument("--config", "-c", metavar="PATH", dest="check_config")
    return parser


def _load(explicit: str | None) -> Config:
    return load_config(find_config(explicit, os.environ), os.environ)


def _check_config(explicit: str | None) -> int:
    try:
        config = _load(explicit)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    for model in config.models.values():
        if model.path is not None and not model.path.is_file():
            print(f"warning: model {model.name!r}: file {model.path} does not exist")
    workers = f", {len(config.workers)} workers" if config.workers else ""
    print(f"ok: {config.source} ({len(config.models)} models{workers})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.check_config or args.config)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        config = _load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"llamad: {problem}", file=sys.stderr)
        return EX_CONFIG
    socket_path = Path(args.socket or os.environ.get("LLAMAD_SOCKET") or config.socket_path())

    import trio

    from llamad.daemon import Daemon

    try:
        trio.run(Daemon(config, socket_path).run)
    except (LlamadError, BaseExceptionGroup) as exc:
        # Start-up errors raised inside the daemon's nursery arrive wrapped.
        error = _user_error(exc)
        if error is None:
            raise
        print(f"llamad: {error}", file=sys.stderr)
        return EX_CONFIG if isinstance(error, ServerBinaryNotFound | ConfigError) else 1
    return 0


def _user_error(exc: BaseException) -> LlamadError | None:
    """The LlamadError behind ``exc``, when that is all it is."""
    if isinstance(exc, BaseExceptionGroup) and not consists_of(exc, (LlamadError,)):
        return None
    error = first_leaf(exc)
    return error if isinstance(error, LlamadError) else None


if __name__ == "__main__":
    sys.exit(main())
