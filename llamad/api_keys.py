"""API keys for the HTTP API: who may use it, and which models.

Two sources, both read at start and on reload:

- **llamad's own key**, made at first start and kept in ``data_dir/api_key``
  (mode 0600): it may use every model. ``llamactl api-key`` prints it.
- **a keys file**, ``[daemon] api_keys_file``, TOML, one table per key::

      [[keys]]
      name = "editor"                  # shown in logs instead of the key
      key = "sk-…"                     # at least 16 characters
      models = ["qwen-coder", "embed"] # optional; names or aliases. Absent: every model

Keys are compared in constant time (SHA-256 of both sides, then
``hmac.compare_digest`` against every key, without stopping at a match) and
never logged or shown in a ``repr``. A file holding keys must be ours and not
readable by anyone else, as ssh insists for its own keys.

Parsing and checking are pure; ``read_keys_file`` and ``ensure_own_key`` do the I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llamad.config import Config
from llamad.errors import ConfigError, StartupError, UnknownModelError

MIN_KEY_CHARS = 16
OWN_KEY_NAME = "llamad"
KEY_PREFIX = "sk-llamad-"  # "sk-" so that tools checking a key's look accept it


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True)
class ApiKey:
    """One key. ``models`` holds configured names; None means every model."""

    name: str
    digest: bytes = field(repr=False)  # SHA-256 of the key: the key itself is not kept
    models: frozenset[str] | None = None

    @classmethod
    def from_secret(cls, name: str, secret: str, models: Iterable[str] | None = None) -> ApiKey:
        return cls(name, _digest(secret), None if models is None else frozenset(models))

    def allows(self, model: str) -> bool:
        """Whether this key may use the configured model ``model`` (a name, not an alias)."""
        return self.models is None or model in self.models

    @property
    def unrestricted(self) -> bool:
        return self.models is None


class KeyRing:
    """The keys in force; ``find`` is constant-time in the key offered."""

    def __init__(self, keys: Sequence[ApiKey] = ()) -> None:
        self._keys = tuple(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, offered: str) -> ApiKey | None:
        digest = _digest(offered)
        found: ApiKey | None = None
        for key in self._keys:  # every key is compared, match or not
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found


def offered_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: ``Authorization: Bearer KEY`` or ``x-api-key: KEY``.

    OpenAI's clients send the first, Anthropic's the second.
    """
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = headers.get("x-api-key", "").strip()
    return api_key or None


# ------------------------------------------------------------------ the file


def parse_keys_file(text: str, source: str, config: Config) -> list[ApiKey]:
    """A keys file's text → keys with their models resolved to configured names.

    Raises ``ConfigError`` with one line per problem (never quoting a key).
    """
    problems: list[str] = []
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: {exc}"]) from None
    unknown = [k for k in document if k != "keys"]
    if unknown:
        problems.append(f"{source}: unknown key {unknown[0]!r}; write one [[keys]] table per key")
    tables = document.get("keys", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError([*problems, f"{source}: keys: expected [[keys]] tables"])
    keys: list[ApiKey] = []
    seen: dict[bytes, str] = {}
    for index, table in enumerate(tables):
        where = f"{source}: keys[{index}]"
        name = table.get("name", f"key {index + 1}")
        secret = table.get("key")
        models = table.get("models")
        extra = sorted(set(table) - {"name", "key", "models"})
        if extra:
            problems.append(f"{where}: unknown key {extra[0]!r}; known keys: name, key, models")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}.name: expected a non-empty string")
            name = f"key {index + 1}"
        if not isinstance(secret, str):
            problems.append(f"{where}.key: missing or not a string")
            continue
        if len(secret) < MIN_KEY_CHARS or secret != secret.strip():
            problems.append(
                f"{where}.key ({name}): at least {MIN_KEY_CHARS} characters without surrounding "
                "spaces; make one with `python3 -c 'import secrets; "
                'print("sk-" + secrets.token_urlsafe(32))\'`'
            )
            continue
        resolved: list[str] | None = None
        if models is not None:
            if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
                problems.append(f"{where}.models ({name}): expected a list of model names")
                continue
            resolved = []
            for model in models:
                try:
                    resolved.append(config.resolve(model).name)
                except UnknownModelError as exc:
                    problems.append(f"{where}.models ({name}): {exc}")
        key = ApiKey.from_secret(name, secret, resolved)
        if key.digest in seen:
            problems.append(f"{where} ({name}): the same key as {seen[key.digest]!r}")
            continue
        seen[key.digest] = name
        keys.append(key)
    if problems:
        raise ConfigError(problems)
    return keys


def _private_file_problem(path: Path, what: str) -> str | None:
    """Why ``path`` cannot hold keys (not ours, not a plain file, readable by others)."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        return f"{what} {path} is not a regular file"
    if info.st_uid != os.getuid():
        return f"{what} {path} belongs to uid {info.st_uid}, not to you; remove it"
    if info.st_mode & 0o077:
        mode = f"{stat.S_IMODE(info.st_mode):04o}"
        return f"{what} {path} is readable by other users (mode {mode}); `chmod 600 {path}`"
    return None


def read_keys_file(path: Path, config: Config) -> list[ApiKey]:
    """``[daemon] api_keys_file``, checked to be ours and private; ``ConfigError`` otherwise."""
    try:
        problem = _private_file_problem(path, "api_keys_file")
        if problem is not None:
            raise ConfigError([problem])
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"api_keys_file {path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"api_keys_file {path}: cannot read: {exc}"]) from None
    return parse_keys_file(text, str(path), config)


def ensure_own_key(path: Path) -> str:
    """llamad's own key: read it, or make one (mode 0600) at first start."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        problem = _private_file_problem(path, "the API key file")
        if problem is not None:
            raise StartupError(problem) from None
        secret = path.read_text(encoding="utf-8").strip()
        if len(secret) < MIN_KEY_CHARS:
            raise StartupError(
                f"the API key file {path} holds no usable key; remove it and llamad makes a new one"
            ) from None
        return secret
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")
    return secret


def key_ring(own: str, extra: Sequence[ApiKey]) -> KeyRing:
    return KeyRing([ApiKey.from_secret(OWN_KEY_NAME, own), *extra])
