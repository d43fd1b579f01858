"""Where llamad keeps things (XDG base directories). Shared with the clients.

Every function takes the environment as an argument so tests and callers with
a modified environment get consistent answers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def runtime_dir(env: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_RUNTIME_DIR/llamad``; without it, a private directory under /tmp."""
    base = env.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "llamad"
    return Path("/tmp") / f"llamad-{os.getuid()}"


def default_socket_path(env: Mapping[str, str] = os.environ) -> Path:
    """``$LLAMAD_SOCKET``, else the control socket in the runtime directory."""
    explicit = env.get("LLAMAD_SOCKET")
    if explicit:
        return Path(explicit)
    return runtime_dir(env) / "control.sock"


def data_dir(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_DATA_HOME") or str(_home(env) / ".local" / "share")
    return Path(base) / "llamad"


def config_search_path(env: Mapping[str, str] = os.environ, cwd: Path | None = None) -> list[Path]:
    """Where models.toml is looked for, in order (``--config`` comes before all)."""
    candidates = []
    if env.get("LLAMAD_CONFIG"):
        candidates.append(Path(env["LLAMAD_CONFIG"]))
    config_home = env.get("XDG_CONFIG_HOME") or str(_home(env) / ".config")
    candidates.append(Path(config_home) / "llamad" / "models.toml")
    candidates.append((cwd or Path.cwd()) / "models.toml")
    return candidates
