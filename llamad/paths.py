"""Where llamad keeps things (XDG base directories). Shared with the clients.

Deliberately tiny and free of heavy imports: ``llamactl`` imports it on every
invocation to find the control socket. Every function takes the environment as
an argument so tests, and callers with a modified environment, get consistent
answers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def _xdg(env: Mapping[str, str], name: str) -> Path | None:
    # The XDG spec says relative values are invalid and must be ignored.
    value = env.get(name)
    if value and Path(value).is_absolute():
        return Path(value)
    return None


def runtime_dir(env: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_RUNTIME_DIR/llamad``; without it, ``/tmp/llamad-<uid>``.

    The fallback carries the uid so two users on one machine do not collide.
    """
    base = _xdg(env, "XDG_RUNTIME_DIR")
    if base is not None:
        return base / "llamad"
    return Path("/tmp") / f"llamad-{os.getuid()}"


def default_socket_path(env: Mapping[str, str] = os.environ) -> Path:
    """``$LLAMAD_SOCKET`` if set, else ``control.sock`` in the runtime directory."""
    explicit = env.get("LLAMAD_SOCKET")
    if explicit:
        return Path(explicit)
    return runtime_dir(env) / "control.sock"


def data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_DATA_HOME/llamad``, by default ``~/.local/share/llamad``."""
    base = _xdg(env, "XDG_DATA_HOME") or _home(env) / ".local" / "share"
    return base / "llamad"


def config_search_path(env: Mapping[str, str] = os.environ, cwd: Path | None = None) -> list[Path]:
    """Where models.toml is looked for, in order (``--config`` comes before all).

    ``$LLAMAD_CONFIG``, then ``$XDG_CONFIG_HOME/llamad/models.toml`` (by default
    ``~/.config/llamad/models.toml``), then ``models.toml`` in ``cwd`` (by
    default the current directory).
    """
    candidates: list[Path] = []
    explicit = env.get("LLAMAD_CONFIG")
    if explicit:
        candidates.append(Path(explicit))
    config_home = _xdg(env, "XDG_CONFIG_HOME") or _home(env) / ".config"
    candidates.append(config_home / "llamad" / "models.toml")
    candidates.append((cwd if cwd is not None else Path.cwd()) / "models.toml")
    return candidates


WEBSOCKET_ADDRESS_NAME = "websocket"


def websocket_address_path(env: Mapping[str, str] = os.environ) -> Path:
    """Where llamad writes its WebSocket's address (``ws://HOST:PORT/``), next to its token."""
    return runtime_dir(env) / WEBSOCKET_ADDRESS_NAME
