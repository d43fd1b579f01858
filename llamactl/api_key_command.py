"""``llamactl api-key``: print llamad's key for the HTTP API.

The key is read from the file llamad names in its status (mode 0600, in its
data directory), never sent over the control socket, and only when that file
is ours.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from llamactl.client import Client, ClientError
from llamad.ownership import owned_by
from llamad.protocol import Status, StatusReply


def add_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    reading: argparse.ArgumentParser,
) -> None:
    parser = commands.add_parser(
        "api-key", parents=[common], help="print the API key of the HTTP API"
    )
    parser.add_argument(
        "--env",
        action="store_true",
        help="print shell exports for the openai and anthropic clients instead",
    )


def cmd_api_key(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply)
    if reply.http is None:
        raise ClientError('the HTTP API is off ([daemon] http = "off" in models.toml)')
    if reply.api_key_file is None:
        raise ClientError('the HTTP API needs no key ([daemon] auth = "none")')
    path = Path(reply.api_key_file)
    if not owned_by(path):
        raise ClientError(f"{path} is missing or not yours; restart llamad to make a new key")
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not args.env:
        print(key)
        return 0
    url = f"http://{reply.http}"
    for name, value in (
        ("OPENAI_BASE_URL", f"{url}/v1"),
        ("OPENAI_API_KEY", key),
        ("ANTHROPIC_BASE_URL", url),
        ("ANTHROPIC_API_KEY", key),
    ):
        print(f"export {name}={shlex.quote(value)}")
    return 0
