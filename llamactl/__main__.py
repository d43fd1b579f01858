"""``llamactl``: control llamad from the shell and from monitoring scripts.

Every failure a user can cause ends in one line on stderr and a non-zero exit,
never a traceback. ``health`` follows the monitoring-plugin convention:
0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.

Start-up time is part of the interface (``llamactl status`` in a prompt or a
monitoring loop): only the parser of the command being run is built, and a
command's module is imported only to run it (``COMMANDS``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from llamactl import _lean  # noqa: F401 - first, before msgspec: see its docstring
from llamactl.client import Client, ClientError, resolve_socket
from llamactl.output import StateLines, memory_line, print_json
from llamad import __version__
from llamad.protocol import (
    Health,
    HealthReply,
    Load,
    Loaded,
    LogLine,
    LogLines,
    Logs,
    ModelStatus,
    Ok,
    Reload,
    Restart,
    StateChanged,
    Status,
    StatusReply,
    Unload,
)

HEALTH_EXIT = {"ok": 0, "warning": 1, "critical": 2}
HEALTH_UNKNOWN = 3
# A stopped model's reason ("switching to demo") explains the stop; after this
# long it is history and no longer shown beside the state (as in llama-tui).
STOPPED_REASON_SECONDS = 60.0

# Every command: its help line and the module that defines it. That module has
# ``add_parsers(commands, common, reading)`` and ``cmd_NAME(client, args)``
# (dashes as underscores) and is imported only when one of its commands runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "status": ("daemon and model states", __name__),
    "models": (
        "configured and found models, their files and sizes; models add / remove",
        "llamactl.model_commands",
    ),
    "show": ("what a model's GGUF file says, and its memory estimate", "llamactl.model_commands"),
    "load": ("load a model (evicting idle ones if memory requires)", __name__),
    "unload": ("stop a model (default: all)", __name__),
    "restart": ("restart a model", __name__),
    "health": ("monitoring check (exit 0/1/2/3)", __name__),
    "ps": ("resident models: memory, requests, idle", "llamactl.pool_commands"),
    "logs": ("llama-server output", __name__),
    "reload": ("re-read models.toml", __name__),
    "chat": (
        "send a message and stream the reply; with no message on a terminal, chat line by line",
        "llamactl.chat_commands",
    ),
    "history": (
        "stored conversations: list, show, search, export, rename, delete",
        "llamactl.chat_commands",
    ),
    "api-key": ("print the API key of the HTTP API", "llamactl.api_key_command"),
    "demo-model": ("write a tiny random-weights GGUF model", __name__),
}
LOCAL_COMMANDS = frozenset({"demo-model"})  # need no llamad


def _shared_options() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH", help="llamad's control socket")
    reading = argparse.ArgumentParser(add_help=False, parents=[common])
    reading.add_argument("--json", action="store_true", help="machine-readable output")
    return common, reading


def add_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    reading: argparse.ArgumentParser,
    only: str | None = None,
) -> None:
    """The parsers of the commands defined here (just ``only``'s when given)."""

    def wanted(name: str) -> bool:
        return only is None or only == name

    def add(name: str, parent: argparse.ArgumentParser | None) -> argparse.ArgumentParser:
        parents = [parent] if parent is not None else []
        return commands.add_parser(name, parents=parents, help=COMMANDS[name][0])

    if wanted("status"):
        add("status", reading)
    if wanted("load"):
        load = add("load", common)
        load.add_argument("model", help="model name or alias")
        load.add_argument("--no-wait", action="store_true", help="return once the load has begun")
        load.add_argument("--only", action="store_true", help="unload every other model first")
    if wanted("unload"):
        add("unload", common).add_argument("model", nargs="?")
    if wanted("restart"):
        restart = add("restart", common)
        restart.add_argument("model", nargs="?", help="default: the active model")
        restart.add_argument("--no-wait", action="store_true")
    if wanted("health"):
        add("health", reading).add_argument("model", nargs="?", help="check this model only")
    if wanted("logs"):
        logs = add("logs", reading)
        logs.add_argument("model", nargs="?", help="default: the active model")
        logs.add_argument("-n", "--lines", type=int, default=50, metavar="N")
        logs.add_argument("-f", "--follow", action="store_true")
    if wanted("reload"):
        add("reload", common)
    if wanted("demo-model"):
        demo = add("demo-model", None)
        demo.add_argument("path", type=Path)
        demo.add_argument("--variant", default="demo", help="demo or demo-b (default: demo)")


class _FixedWidthFormatter(argparse.HelpFormatter):
    """For parsing, not for help: argparse makes a formatter for every argument
    added, and the default one imports shutil to ask the terminal's width."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=98)


def _parser(only: str | None = None, *, helping: bool = True) -> argparse.ArgumentParser:
    """The command line; with ``only``, just that command's parser is built."""
    common, reading = _shared_options()
    parser = argparse.ArgumentParser(
        prog="llamactl",
        description="Control the llamad daemon.",
        formatter_class=argparse.HelpFormatter if helping else _FixedWidthFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llamactl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    added: set[str] = set()
    for name, (_, module) in COMMANDS.items():  # in this order in --help
        if only is not None and name != only:
            continue
        if module == __name__:
            add_parsers(commands, common, reading, name)
        elif module not in added:  # a module adds all of its commands at once
            importlib.import_module(module).add_parsers(commands, common, reading)
            added.add(module)
    return parser


def _ago(since: float) -> str:
    seconds = max(time.time() - since, 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def shown_reason(status: ModelStatus, now: float) -> str:
    """A model's reason while it still explains its state (see ``STOPPED_REASON_SECONDS``)."""
    if status.state == "stopped" and now - status.since >= STOPPED_REASON_SECONDS:
        return ""
    return status.reason


def _describe(status: ModelStatus) -> str:
    parts = [f"{status.state} for {_ago(status.since)}"]
    if status.pid is not None:
        parts.append(f"pid {status.pid}")
    if status.restarts:
        parts.append(_plural(status.restarts, "restart"))
    if status.waiting:
        parts.append(f"{status.waiting} waiting")
    if status.in_flight:
        parts.append(f"{status.in_flight} in flight")
    text = ", ".join(parts)
    reason = shown_reason(status, time.time())
    return f"{text}: {reason}" if reason else text


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply)
    if args.json:
        print_json(reply)
        return 0
    print(f"llamad {reply.version}, pid {reply.pid}, up {_ago(time.time() - reply.uptime)}")
    print(f"config {reply.config_path}")
    print(memory_line(reply.memory))
    if reply.history is not None:
        print(f"history: {reply.history}")
    if reply.http is not None:
        key = "key: `llamactl api-key`" if reply.api_key_file else "no key needed"
        print(f"http   http://{reply.http}/v1 (OpenAI and Anthropic API; {key})")
    for model in reply.models:
        marker = "*" if model.expected else " "
        print(f"{marker} {model.name:<16} {_describe(model)}")
    if reply.models and not any(model.expected for model in reply.models):
        print("no model loaded; try `llamactl load NAME`")
    if reply.workers:
        from llamactl.pool_commands import worker_line

        for worker in reply.workers:
            print(f"  worker {worker.name} {worker.address}: {worker_line(worker)}")
    return 0


def _follow_load(client: Client, make: Callable[[int], Load | Restart]) -> int:
    client.set_timeout(None)  # a big model may take minutes; llamad enforces ready_timeout_sec
    states = StateLines()
    for message in client.stream(make):
        if isinstance(message, StateChanged):
            # Every model's changes: a load may evict others, and says so.
            if message.model.state != "ready":  # the last line says it, with the times
                states.show(message.model)
        elif isinstance(message, Loaded):
            print(
                f"{message.model} ready in {message.seconds:.2f} s "
                f"(llama-server load {message.ready_seconds:.2f} s)"
            )
    return 0


def _no_wait(client: Client, request: Load | Restart) -> int:
    import msgspec

    reply = client.call(lambda i: msgspec.structs.replace(request, id=i))
    assert isinstance(reply, Ok)
    print(reply.message)
    return 0


def cmd_load(client: Client, args: argparse.Namespace) -> int:
    if args.no_wait:
        return _no_wait(client, Load(id=0, model=args.model, wait=False, only=args.only))
    return _follow_load(client, lambda i: Load(id=i, model=args.model, only=args.only))


def cmd_restart(client: Client, args: argparse.Namespace) -> int:
    if args.no_wait:
        return _no_wait(client, Restart(id=0, model=args.model, wait=False))
    return _follow_load(client, lambda i: Restart(id=i, model=args.model))


def cmd_unload(client: Client, args: argparse.Namespace) -> int:
    client.set_timeout(None)
    reply = client.call(lambda i: Unload(id=i, model=args.model))
    assert isinstance(reply, Ok)
    print(reply.message)
    return 0


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(lambda i: Health(id=i, model=args.model))
    assert isinstance(reply, HealthReply)
    if args.json:
        print_json(reply)
    else:
        print(f"{reply.level.upper()}: {reply.summary}")
    return HEALTH_EXIT[reply.level]


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    def make(i: int) -> Logs:
        return Logs(id=i, model=args.model, lines=args.lines, follow=args.follow)

    if not args.follow:
        reply = client.call(make)
        assert isinstance(reply, LogLines)
        if args.json:
            print_json(reply.lines)
        else:
            print("\n".join(reply.lines))
        return 0
    import msgspec

    client.set_timeout(None)
    for message in client.events(make):
        if isinstance(message, LogLines):
            lines = message.lines
        elif isinstance(message, LogLine):
            lines = [message.line]
        else:
            continue
        for line in lines:
            if args.json:
                sys.stdout.write(msgspec.json.encode(line).decode() + "\n")
            else:
                sys.stdout.write(line + "\n")
        sys.stdout.flush()
    return 0


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    client.set_timeout(None)
    reply = client.call(lambda i: Reload(id=i))
    assert isinstance(reply, Ok)
    print(reply.message)
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from llamad.demo_model import write_demo_model

    try:
        path = write_demo_model(args.path, args.variant)
    except (ValueError, OSError) as exc:
        print(f"llamactl: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.variant} model to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _unknown_command(name: str) -> int:
    import difflib

    close = difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.6)
    hint = f"; did you mean `llamactl {close[0]}`?" if close else ""
    print(
        f"llamactl: unknown command {name!r}{hint} (`llamactl --help` lists them)",
        file=sys.stderr,
    )
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv else ""
    if name and not name.startswith("-") and name not in COMMANDS:
        return _unknown_command(name)
    if argv == ["--version"]:
        print(f"llamactl {__version__}")
        return 0
    # --help, or no command: the whole parser answers (and exits).
    helping = "-h" in argv or "--help" in argv
    args = _parser(name if name in COMMANDS else None, helping=helping).parse_args(argv)
    if args.command in LOCAL_COMMANDS:
        return cmd_demo_model(args)
    module = sys.modules[__name__]
    if COMMANDS[args.command][1] != __name__:
        module = importlib.import_module(COMMANDS[args.command][1])
    command = getattr(module, "cmd_" + args.command.replace("-", "_"))
    if args.command in ("show", "models"):  # some of theirs need no llamad
        from llamactl import model_commands

        if (local := model_commands.without_daemon(args)) is not None:
            return local
    try:
        with Client(resolve_socket(args.socket)) as client:
            return int(command(client, args))
    except ClientError as exc:  # daemon down, an Error reply, a broken connection
        print(f"llamactl: {exc}", file=sys.stderr)
        return HEALTH_UNKNOWN if args.command == "health" else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def run() -> NoReturn:
    """The command's entry point: ``main``, then exit at once.

    The interpreter's clean-up at exit tears down every module and class
    msgspec and the protocol made, about a quarter of ``llamactl status``'s
    own time; nothing of llamactl's needs it once its output is flushed.
    """
    code = main()
    # OSError: the reader went away (`llamactl logs | head`); nobody is left to tell.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
