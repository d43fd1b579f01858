"""``llamactl``: control llamad from the shell and from monitoring scripts.

Every failure a user can cause ends in one line on stderr and a non-zero exit,
never a traceback. ``health`` follows the monitoring-plugin convention:
0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from llamactl import chat_commands, model_commands
from llamactl.client import Client, ClientError, resolve_socket
from llamactl.output import print_json
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


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH", help="llamad's control socket")
    reading = argparse.ArgumentParser(add_help=False, parents=[common])
    reading.add_argument("--json", action="store_true", help="machine-readable output")

    parser = argparse.ArgumentParser(prog="llamactl", description="Control the llamad daemon.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", parents=[reading], help="daemon and model states")
    load = commands.add_parser("load", parents=[common], help="switch to a model")
    load.add_argument("model", help="model name or alias")
    load.add_argument("--no-wait", action="store_true", help="return once the load has begun")
    unload = commands.add_parser("unload", parents=[common], help="stop a model (default: all)")
    unload.add_argument("model", nargs="?")
    restart = commands.add_parser("restart", parents=[common], help="restart a model")
    restart.add_argument("model", nargs="?", help="default: the active model")
    restart.add_argument("--no-wait", action="store_true")
    commands.add_parser("health", parents=[reading], help="monitoring check (exit 0/1/2/3)")
    logs = commands.add_parser("logs", parents=[reading], help="llama-server output")
    logs.add_argument("model", nargs="?", help="default: the active model")
    logs.add_argument("-n", "--lines", type=int, default=50, metavar="N")
    logs.add_argument("-f", "--follow", action="store_true")
    commands.add_parser("reload", parents=[common], help="re-read models.toml")
    chat_commands.add_parsers(commands, common, reading)
    model_commands.add_parsers(commands, common, reading)
    demo = commands.add_parser("demo-model", help="write a tiny random-weights GGUF model")
    demo.add_argument("path", type=Path)
    demo.add_argument("--variant", default="demo", help="demo or demo-b (default: demo)")
    return parser


def _ago(since: float) -> str:
    seconds = max(time.time() - since, 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _describe(status: ModelStatus) -> str:
    parts = [f"{status.state} for {_ago(status.since)}"]
    if status.pid is not None:
        parts.append(f"pid {status.pid}")
    if status.restarts:
        parts.append(f"{status.restarts} restarts")
    if status.waiting:
        parts.append(f"{status.waiting} waiting")
    if status.in_flight:
        parts.append(f"{status.in_flight} in flight")
    text = ", ".join(parts)
    return f"{text}: {status.reason}" if status.reason else text


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply)
    if args.json:
        print_json(reply)
        return 0
    print(f"llamad {reply.version}, pid {reply.pid}, up {_ago(time.time() - reply.uptime)}")
    print(f"config {reply.config_path}")
    for model in reply.models:
        marker = "*" if model.name == reply.active else " "
        print(f"{marker} {model.name:<16} {_describe(model)}")
    if reply.active is None:
        print("no model loaded; try `llamactl load NAME`")
    return 0


def _follow_load(client: Client, make: type[Load] | type[Restart], args: argparse.Namespace) -> int:
    name = args.model
    if args.no_wait:
        reply = client.call(lambda i: make(id=i, model=name, wait=False))
        assert isinstance(reply, Ok)
        print(reply.message)
        return 0
    client.set_timeout(None)  # a big model may take minutes; llamad enforces ready_timeout_sec
    last = ""
    for message in client.stream(lambda i: make(id=i, model=name, wait=True)):
        if isinstance(message, StateChanged):
            status = message.model
            line = f"{status.name}: {status.state}" + (
                f" ({status.reason})" if status.reason else ""
            )
            if line != last:
                print(line, file=sys.stderr)
                last = line
        elif isinstance(message, Loaded):
            print(
                f"{message.model} ready in {message.seconds:.2f} s "
                f"(llama-server load {message.ready_seconds:.2f} s)"
            )
    return 0


def cmd_load(client: Client, args: argparse.Namespace) -> int:
    return _follow_load(client, Load, args)


def cmd_restart(client: Client, args: argparse.Namespace) -> int:
    return _follow_load(client, Restart, args)


def cmd_unload(client: Client, args: argparse.Namespace) -> int:
    client.set_timeout(None)
    reply = client.call(lambda i: Unload(id=i, model=args.model))
    assert isinstance(reply, Ok)
    print(reply.message)
    return 0


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(lambda i: Health(id=i))
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


COMMANDS = {
    "status": cmd_status,
    "models": model_commands.cmd_models,
    "show": model_commands.cmd_show,
    "load": cmd_load,
    "unload": cmd_unload,
    "restart": cmd_restart,
    "health": cmd_health,
    "logs": cmd_logs,
    "reload": cmd_reload,
    "chat": chat_commands.cmd_chat,
    "history": chat_commands.cmd_history,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo-model":
        return cmd_demo_model(args)
    if (local := model_commands.without_daemon(args)) is not None:
        return local
    try:
        with Client(resolve_socket(args.socket)) as client:
            return COMMANDS[args.command](client, args)
    except ClientError as exc:  # daemon down, an Error reply, a broken connection
        print(f"llamactl: {exc}", file=sys.stderr)
        return HEALTH_UNKNOWN if args.command == "health" else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
