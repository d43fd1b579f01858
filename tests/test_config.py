"""models.toml parsing: values, defaults, overrides, and one clear line per mistake."""

from __future__ import annotations

import os
import pickle
import re
import textwrap
from pathlib import Path

import pytest

from llamad import paths
from llamad.config import (
    Config,
    DaemonConfig,
    ModelConfig,
    Supervision,
    ToolConfig,
    budget_bytes,
    find_config,
    load_config,
    parse_config,
    parse_size,
    remote_base,
)
from llamad.errors import ConfigError, UnknownModelError

SOURCE = Path("/etc/llamad/models.toml")
ENV = {"HOME": "/home/ada", "MODELS": "/srv/models", "XDG_RUNTIME_DIR": "/run/user/1000"}

FULL = """
[daemon]
llama_server = "/opt/llama.cpp/llama-server"
socket = "/run/llamad.sock"
runtime_dir = "run"
data_dir = "~/data"
default_model = "tiny"
log_lines = 50
websocket = "off"
allowed_origins = ["https://example.org"]
allowed_hosts = ["box.lan"]
restart = "always"
restart_sec = 0.5
start_limit_burst = 7

[models.demo]
path = "models/demo.gguf"
ctx_size = 1024
n_gpu_layers = 99
aliases = ["tiny", "small"]
args = ["--threads", "2"]
env = { CUDA_VISIBLE_DEVICES = "0", LLAMA_ARG_X = "1" }
mmproj = "models/mmproj.gguf"
parallel = 4
ttl_sec = 600
health_interval_sec = 2

[models.big]
path = "$MODELS/big.gguf"
port = 8081
restart = "no"
stop_drain_sec = 0
"""
MISSING_PATH = (
    "missing; every model needs the path to its GGUF file "
    '(or url = "http://HOST:PORT" for one served elsewhere)'
)


def parse(text: str, env: dict[str, str] = ENV) -> Config:
    return parse_config(text, source=SOURCE, env=env)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# ------------------------------------------------------------------ values


def test_full_file_round_trips() -> None:
    config = parse(FULL)
    assert config.source == SOURCE
    assert config.daemon == DaemonConfig(
        llama_server=Path("/opt/llama.cpp/llama-server"),
        socket=Path("/run/llamad.sock"),
        runtime_dir=Path("/etc/llamad/run"),
        data_dir=Path("/home/ada/data"),
        default_model="tiny",
        log_lines=50,
        websocket="off",
        allowed_origins=("https://example.org",),
        allowed_hosts=("box.lan",),
        supervision=Supervision(restart="always", restart_sec=0.5, start_limit_burst=7),
    )
    assert config.models["demo"] == ModelConfig(
        name="demo",
        path=Path("/etc/llamad/models/demo.gguf"),
        n_gpu_layers=99,
        ctx_size=1024,
        args=("--threads", "2"),
        env={"CUDA_VISIBLE_DEVICES": "0", "LLAMA_ARG_X": "1"},
        aliases=("tiny", "small"),
        mmproj=Path("/etc/llamad/models/mmproj.gguf"),
        parallel=4,
        supervision=Supervision(
            restart="always",
            restart_sec=0.5,
            start_limit_burst=7,
            health_interval_sec=2.0,
            ttl_sec=600.0,
        ),
    )
    big = config.models["big"]
    assert big.path == Path("/srv/models/big.gguf")
    assert big.port == 8081
    assert list(config.models) == ["demo", "big"]  # file order
    assert config.socket_path() == Path("/run/llamad.sock")


def test_numbers_have_their_declared_types() -> None:
    demo = parse(FULL).models["demo"]
    assert type(demo.supervision.health_interval_sec) is float  # written as 2
    assert type(demo.supervision.ttl_sec) is float
    assert type(demo.ctx_size) is int


def test_defaults_for_an_empty_file() -> None:
    config = parse("")
    assert config.models == {}
    assert config.daemon == DaemonConfig(
        runtime_dir=Path("/run/user/1000/llamad"),
        data_dir=Path("/home/ada/.local/share/llamad"),
    )
    assert config.daemon.supervision == Supervision()
    assert config.daemon.llama_server is None
    assert config.daemon.default_model is None
    assert config.daemon.log_lines == 1000
    assert config.socket_path() == Path("/run/user/1000/llamad/control.sock")


def test_defaults_for_a_minimal_model() -> None:
    model = parse('[models.m]\npath = "/m.gguf"\n').models["m"]
    assert model == ModelConfig(name="m", path=Path("/m.gguf"))
    assert (model.n_gpu_layers, model.ctx_size, model.port, model.parallel) == (0, 2048, None, 1)
    assert (model.args, model.env, model.aliases) == ((), {}, ())
    assert model.mmproj is None and model.supervision.ttl_sec == 0
    assert (model.pinned, model.max_concurrent) == (False, 512)
    assert model.supervision == Supervision()


def test_an_empty_models_table_is_zero_models() -> None:
    assert parse("[daemon]\n[models]\n").models == {}


def test_daemon_defaults_and_model_overrides_merge() -> None:
    config = parse(FULL)
    demo, big = config.models["demo"].supervision, config.models["big"].supervision
    assert config.daemon.supervision.restart == "always"
    assert demo.restart == "always" and demo.start_limit_burst == 7  # from [daemon]
    assert demo.health_interval_sec == 2.0  # its own override
    assert demo.ready_timeout_sec == Supervision().ready_timeout_sec  # built-in default
    assert big.restart == "no" and big.start_limit_burst == 7
    assert big.health_interval_sec == Supervision().health_interval_sec
    assert big.stop_drain_sec == 0.0


def test_a_missing_model_file_is_not_a_config_error() -> None:
    config = parse('[models.m]\npath = "/nonexistent/m.gguf"\n')
    assert config.models["m"].path == Path("/nonexistent/m.gguf")


# ------------------------------------------------------------- resolution


def test_resolve_by_name_and_alias() -> None:
    config = parse(FULL)
    assert config.resolve("tiny").name == "demo"
    assert config.resolve("small").name == "demo"
    assert config.resolve("big").name == "big"
    with pytest.raises(UnknownModelError) as info:
        config.resolve("codellama")
    assert info.value.known == ["demo", "big"]
    assert str(info.value) == "unknown model 'codellama'; configured models: demo, big"


def test_default_model_may_be_an_alias() -> None:
    config = parse(FULL)
    assert config.daemon.default_model == "tiny"
    assert config.resolve(config.daemon.default_model).name == "demo"


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("m.gguf", "/etc/llamad/m.gguf"),
        ("../shared/m.gguf", "/etc/llamad/../shared/m.gguf"),
        ("/abs/m.gguf", "/abs/m.gguf"),
        ("~", "/home/ada"),
        ("~/m.gguf", "/home/ada/m.gguf"),
        ("$MODELS/m.gguf", "/srv/models/m.gguf"),
        ("${MODELS}/m.gguf", "/srv/models/m.gguf"),
        ("$HOME/x/${MODELS}.gguf", "/home/ada/x//srv/models.gguf"),
        ("sub/$MODELS", "/etc/llamad/sub/srv/models"),
    ],
)
def test_path_expansion(written: str, expected: str) -> None:
    config = parse(f'[models.m]\npath = "{written}"\n')
    assert config.models["m"].path == Path(expected)


def test_expansion_uses_the_given_environment_not_os_environ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODELS", "/from/os/environ")
    monkeypatch.setenv("HOME", "/home/other")
    config = parse('[models.m]\npath = "$MODELS/m.gguf"\nmmproj = "~/p.gguf"\n')
    assert config.models["m"].path == Path("/srv/models/m.gguf")
    assert config.models["m"].mmproj == Path("/home/ada/p.gguf")


def test_relative_source_resolves_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse_config('[models.m]\npath = "m.gguf"\n', source=Path("models.toml"), env=ENV)
    assert config.source == tmp_path / "models.toml"
    assert config.models["m"].path == tmp_path / "m.gguf"


def test_runtime_and_data_dirs_follow_the_environment() -> None:
    config = parse("", env={"HOME": "/h", "XDG_RUNTIME_DIR": "/r", "XDG_DATA_HOME": "/d"})
    assert config.daemon.runtime_dir == Path("/r/llamad")
    assert config.daemon.data_dir == Path("/d/llamad")
    fallback = parse("", env={"HOME": "/h"})
    assert fallback.daemon.runtime_dir == Path(f"/tmp/llamad-{os.getuid()}")
    assert fallback.daemon.data_dir == Path("/h/.local/share/llamad")


# ------------------------------------------------------------- equality


def test_same_text_parses_equal() -> None:
    """Reload keeps a model running when its settings compare equal."""
    first, second = parse(FULL), parse(FULL)
    assert first == second
    assert first.models["demo"] == second.models["demo"]
    assert hash(first.models["demo"]) == hash(second.models["demo"])
    changed = parse(FULL.replace("ctx_size = 1024", "ctx_size = 2048"))
    assert changed.models["demo"] != first.models["demo"]
    assert changed.models["big"] == first.models["big"]
    env_changed = parse(FULL.replace('LLAMA_ARG_X = "1"', 'LLAMA_ARG_X = "2"'))
    assert env_changed.models["demo"] != first.models["demo"]
    daemon_changed = parse(FULL.replace("restart_sec = 0.5", "restart_sec = 1"))
    assert daemon_changed.models["demo"] != first.models["demo"]  # inherited default moved


def test_config_is_immutable_and_picklable() -> None:
    config = parse(FULL)
    demo = config.models["demo"]
    with pytest.raises(TypeError):
        demo.env["X"] = "y"  # type: ignore[index]
    with pytest.raises(TypeError):
        config.models["x"] = demo  # type: ignore[index]
    assert demo.env == {"CUDA_VISIBLE_DEVICES": "0", "LLAMA_ARG_X": "1"}
    assert dict(demo.env) == {"CUDA_VISIBLE_DEVICES": "0", "LLAMA_ARG_X": "1"}
    assert pickle.loads(pickle.dumps(config)) == config


# -------------------------------------------------------------- mistakes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[models.codellama]\npath = "x"\nn_gpu_layers = "all"\n',
            'models.codellama.n_gpu_layers: expected an integer, got "all"',
        ),
        (
            '[models.m]\npath = "x"\nctx_size = true\n',
            "models.m.ctx_size: expected an integer, got true",
        ),
        (
            '[models.m]\npath = "x"\nctx_size = 2048.0\n',
            "models.m.ctx_size: expected an integer, got 2048.0",
        ),
        (
            "[daemon]\nrestart_sec = false\n",
            "daemon.restart_sec: expected a number, got false",
        ),
        (
            '[daemon]\nhealth_interval_sec = "5s"\n',
            'daemon.health_interval_sec: expected a number, got "5s"',
        ),
        ("[daemon]\nrestart_sec = nan\n", "daemon.restart_sec: expected a number, got nan"),
        ("[daemon]\ndefault_model = 3\n", "daemon.default_model: expected a string, got 3"),
        ("[models.m]\npath = 5\n", "models.m.path: expected a string, got 5"),
        ('[models.m]\npath = ""\n', "models.m.path: must not be empty"),
        (
            '[models.m]\npath = "x"\nargs = "--threads 2"\n',
            'models.m.args: expected a list of strings, got "--threads 2"',
        ),
        (
            '[models.m]\npath = "x"\naliases = ["a", 1]\n',
            'models.m.aliases: expected a list of strings, got ["a", 1]',
        ),
        ('[models.m]\npath = "x"\nenv = 3\n', "models.m.env: expected a table, got 3"),
        (
            '[models.m]\npath = "x"\nenv = { A = 1 }\n',
            "models.m.env.A: expected a string, got 1",
        ),
        (
            '[models.demo]\npath = "x"\nctx_sizes = 5\n',
            'models.demo.ctx_sizes: unknown key; did you mean "ctx_size"?',
        ),
        (
            "[daemon]\nrestart_secs = 1\n",
            'daemon.restart_secs: unknown key; did you mean "restart_sec"?',
        ),
        (
            '[daemon]\npath = "x"\n',
            "daemon.path: unknown key; it belongs in a [models.NAME] table",
        ),
        (
            '[models.m]\npath = "x"\nlog_lines = 5\n',
            "models.m.log_lines: unknown key; it belongs in [daemon]",
        ),
        ('default_model = "m"\n', "default_model: unknown key; it belongs in [daemon]"),
        ("[deamon]\n", 'deamon: unknown key; did you mean "daemon"?'),
        (
            '[models.m]\npath = "x"\nrestart = "sometimes"\n',
            'models.m.restart: expected one of "no", "on-failure", "always", got "sometimes"',
        ),
        (
            "[daemon]\nrestart = true\n",
            'daemon.restart: expected one of "no", "on-failure", "always", got true',
        ),
        (
            "[daemon]\nstop_timeout_sec = -1\n",
            "daemon.stop_timeout_sec: must be greater than 0, got -1",
        ),
        (
            "[daemon]\nready_timeout_sec = 0.0\n",
            "daemon.ready_timeout_sec: must be greater than 0, got 0.0",
        ),
        ("[daemon]\nrestart_sec = -0.5\n", "daemon.restart_sec: must not be negative, got -0.5"),
        ("[daemon]\nlog_lines = 0\n", "daemon.log_lines: must be greater than 0, got 0"),
        (
            '[models.m]\npath = "x"\nctx_size = 0\n',
            "models.m.ctx_size: must be greater than 0, got 0",
        ),
        (
            '[models.m]\npath = "x"\nport = 70000\n',
            "models.m.port: must be between 1 and 65535, got 70000",
        ),
        ('[models.m]\npath = "x"\nport = 0\n', "models.m.port: must be between 1 and 65535, got 0"),
        (
            '[models.m]\npath = "$NOPE/x.gguf"\n',
            "models.m.path: $NOPE is not set in the environment",
        ),
        (
            "[models.m]\nctx_size = 5\n",
            "models.m.path: " + MISSING_PATH,
        ),
        (
            '[daemon]\ndefault_model = "ghost"\n[models.m]\npath = "x"\n',
            'daemon.default_model: no model or alias named "ghost"; configured models: m',
        ),
        (
            '[daemon]\ndefault_model = "ghost"\n',
            'daemon.default_model: no model or alias named "ghost"; no models are configured',
        ),
        ('[models]\nm = "x"\n', 'models.m: expected a table, got "x"'),
        ("models = 3\n", "models: expected a table, got 3"),
        ("daemon = [1]\n", "daemon: expected a table, got [1]"),
        (
            '[models."my model"]\npath = "x"\n',
            "models.\"my model\": a model name must be non-empty, without whitespace or '/'",
        ),
        (
            '[models."a/b"]\npath = "x"\n',
            "models.\"a/b\": a model name must be non-empty, without whitespace or '/'",
        ),
        (
            '[daemon]\nwebsocket = "8765"\n',
            'daemon.websocket: expected "HOST:PORT" or "off", got "8765"',
        ),
        (
            '[daemon]\nhttp = "8766"\n',
            'daemon.http: expected "HOST:PORT" or "off", got "8766"',
        ),
        (
            '[daemon]\nauth = "maybe"\n',
            'daemon.auth: expected one of "keys", "none", got "maybe"',
        ),
        (
            '[daemon]\nhttp = "0.0.0.0:8766"\nauth = "none"\n',
            'daemon.auth: "none" is only allowed when the HTTP API listens on a loopback '
            'address, not "0.0.0.0:8766": anyone who can reach it could use your models; '
            'use API keys (auth = "keys") or listen on 127.0.0.1',
        ),
    ],
)
def test_each_mistake_is_one_exact_line(text: str, expected: str) -> None:
    assert problems(text) == [f"{SOURCE}: {expected}"]


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    (line,) = problems("[daemon]\nzzz = 1\n")
    assert line.startswith(f"{SOURCE}: daemon.zzz: unknown key; known keys: llama_server, ")
    assert "restart_sec" in line and "health_failures" in line


def test_alias_colliding_with_another_models_name() -> None:
    lines = problems('[models.a]\npath = "x"\n[models.b]\npath = "y"\naliases = ["a"]\n')
    assert lines == [f'{SOURCE}: models.b.aliases: "a" is already the name of model "a"']


def test_alias_colliding_with_another_models_alias() -> None:
    lines = problems(
        '[models.a]\npath = "x"\naliases = ["z"]\n[models.b]\npath = "y"\naliases = ["z"]\n'
    )
    assert lines == [f'{SOURCE}: models.b.aliases: "z" is already an alias of model "a"']


def test_alias_naming_a_later_model() -> None:
    lines = problems('[models.a]\npath = "x"\naliases = ["b"]\n[models.b]\npath = "y"\n')
    assert lines == [f'{SOURCE}: models.a.aliases: "b" is already the name of model "b"']


def test_an_alias_equal_to_its_own_name_is_harmless() -> None:
    assert parse('[models.a]\npath = "x"\naliases = ["a"]\n').resolve("a").name == "a"


def test_toml_syntax_error_names_line_and_column() -> None:
    (line,) = problems('[models.m]\npath = "x\n')
    assert re.fullmatch(
        rf"{re.escape(str(SOURCE))}: line 2, column \d+: Illegal character .*", line
    )


def test_toml_duplicate_key_names_its_line() -> None:
    (line,) = problems('[models.m]\npath = "x"\npath = "y"\n')
    assert re.fullmatch(rf"{re.escape(str(SOURCE))}: line 3, column \d+: \S.*", line)
    assert "(at line" not in line


def test_all_problems_are_reported_together() -> None:
    lines = problems(
        "[daemon]\n"
        "health_failures = 0\n"
        'restart = "sometimes"\n'
        "[models.a]\n"
        "path = 5\n"
        'ctx_size = "big"\n'
        "[models.b]\n"
        "x = 1\n"
        "[models.c]\n"
        'path = "c"\n'
        'aliases = ["a"]\n'
    )
    assert lines == [
        f"{SOURCE}: daemon.health_failures: must be greater than 0, got 0",
        f'{SOURCE}: daemon.restart: expected one of "no", "on-failure", "always", got "sometimes"',
        f"{SOURCE}: models.a.path: expected a string, got 5",
        f'{SOURCE}: models.a.ctx_size: expected an integer, got "big"',
        f"{SOURCE}: models.b.x: unknown key; known keys: " + _model_keys(),
        f"{SOURCE}: models.b.path: " + MISSING_PATH,
        f'{SOURCE}: models.c.aliases: "a" is already the name of model "a"',
    ]


def _model_keys() -> str:
    return (
        "path, n_gpu_layers, ctx_size, port, args, env, aliases, mmproj, parallel, pinned, "
        "max_concurrent, tools, max_tool_rounds, workers, rpc, tensor_split, devices, url, "
        "api_key, api_key_file, remote_model, ca_file, restart, restart_sec, "
        "restart_max_delay_sec, start_limit_burst, start_limit_interval_sec, stable_after_sec, "
        "ready_timeout_sec, stop_timeout_sec, stop_drain_sec, health_interval_sec, "
        "health_failures, ttl_sec, temperature, top_p, top_k, min_p, repeat_penalty, "
        "max_tokens, system_prompt"
    )


def test_every_bad_env_value_is_reported() -> None:
    lines = problems('[models.m]\npath = "x"\nenv = { A = 1, B = "ok", C = true }\n')
    assert lines == [
        f"{SOURCE}: models.m.env.A: expected a string, got 1",
        f"{SOURCE}: models.m.env.C: expected a string, got true",
    ]


def test_a_model_with_mistakes_does_not_also_break_default_model() -> None:
    lines = problems('[daemon]\ndefault_model = "m"\n[models.m]\nctx_size = "x"\n')
    assert lines == [
        f"{SOURCE}: models.m.path: " + MISSING_PATH,
        f'{SOURCE}: models.m.ctx_size: expected an integer, got "x"',
    ]


def test_a_bad_daemon_default_is_reported_once_not_per_model() -> None:
    lines = problems(
        '[daemon]\nstop_timeout_sec = -1\n[models.a]\npath = "a"\n[models.b]\npath = "b"\n'
    )
    assert lines == [f"{SOURCE}: daemon.stop_timeout_sec: must be greater than 0, got -1"]


# ------------------------------------------------------------ load_config


def test_load_config_reports_the_path_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("models.toml").write_text('[models.m]\npath = "m.gguf"\nctx_size = "big"\n')
    with pytest.raises(ConfigError) as info:
        load_config(Path("models.toml"), ENV)
    assert info.value.problems == ['models.toml: models.m.ctx_size: expected an integer, got "big"']
    Path("models.toml").write_text('[models.m]\npath = "m.gguf"\n')
    config = load_config(Path("models.toml"), ENV)
    assert config.source == tmp_path / "models.toml"  # absolute, for reloads
    assert config.models["m"].path == tmp_path / "m.gguf"


def test_load_config_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.problems == [f"{missing}: cannot read: No such file or directory"]
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as info:
        load_config(binary)
    assert info.value.problems == [f"{binary}: not UTF-8 text (byte 0)"]


def test_the_repositorys_models_toml_is_valid() -> None:
    repo_file = Path(__file__).resolve().parent.parent / "models.toml"
    config = load_config(repo_file, ENV)
    assert config.resolve("tiny").path == repo_file.parent / "models" / "demo.gguf"


# ------------------------------------------------------------ find_config


def test_find_config_order(tmp_path: Path) -> None:
    explicit = tmp_path / "explicit.toml"
    from_env = tmp_path / "env.toml"
    xdg = tmp_path / "xdg" / "llamad" / "models.toml"
    cwd = tmp_path / "cwd"
    for path in (explicit, from_env, xdg, cwd / "models.toml"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    env = {"LLAMAD_CONFIG": str(from_env), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert find_config(explicit, env, cwd) == explicit
    assert find_config(str(explicit), env, cwd) == explicit
    assert find_config(None, env, cwd) == from_env
    from_env.unlink()  # a $LLAMAD_CONFIG that does not exist falls through
    assert find_config(None, env, cwd) == xdg
    del env["LLAMAD_CONFIG"]
    assert find_config(None, env, cwd) == xdg
    xdg.unlink()
    assert find_config(None, env, cwd) == cwd / "models.toml"


def test_find_config_defaults_to_home_config(tmp_path: Path) -> None:
    user_file = tmp_path / ".config" / "llamad" / "models.toml"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("")
    assert find_config(None, {"HOME": str(tmp_path)}, tmp_path / "elsewhere") == user_file


def test_find_config_none_found(tmp_path: Path) -> None:
    env = {"LLAMAD_CONFIG": str(tmp_path / "env.toml"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    with pytest.raises(ConfigError) as info:
        find_config(None, env, tmp_path)
    (line,) = info.value.problems
    tried = f"{tmp_path}/env.toml, {tmp_path}/xdg/llamad/models.toml, {tmp_path}/models.toml"
    assert line.startswith(f"no models.toml found (looked for {tried}); ")
    assert f"copy the repository's models.toml to {tmp_path}/xdg/llamad/models.toml" in line
    assert "`llamactl demo-model PATH`" in line


def test_find_config_explicit_must_exist(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    (tmp_path / "models.toml").write_text("")  # present, but --config wins
    with pytest.raises(ConfigError) as info:
        find_config(tmp_path / "nope.toml", env, tmp_path)
    assert info.value.problems == [f"{tmp_path}/nope.toml: no such file (given with --config)"]
    with pytest.raises(ConfigError) as info:
        find_config(tmp_path, env, tmp_path)
    assert info.value.problems == [f"{tmp_path}: not a file (given with --config)"]


# ------------------------------------------------------------------ paths


def test_runtime_dir_and_socket() -> None:
    assert paths.runtime_dir({"XDG_RUNTIME_DIR": "/run/user/7"}) == Path("/run/user/7/llamad")
    assert paths.runtime_dir({}) == Path(f"/tmp/llamad-{os.getuid()}")
    assert paths.runtime_dir({"XDG_RUNTIME_DIR": "relative"}) == Path(f"/tmp/llamad-{os.getuid()}")
    env = {"XDG_RUNTIME_DIR": "/run/user/7"}
    assert paths.default_socket_path(env) == Path("/run/user/7/llamad/control.sock")
    assert paths.default_socket_path({**env, "LLAMAD_SOCKET": "/s.sock"}) == Path("/s.sock")


def test_data_dir() -> None:
    assert paths.data_dir({"XDG_DATA_HOME": "/d", "HOME": "/h"}) == Path("/d/llamad")
    assert paths.data_dir({"HOME": "/h"}) == Path("/h/.local/share/llamad")


def test_config_search_path() -> None:
    env = {"HOME": "/h", "LLAMAD_CONFIG": "/c.toml"}
    assert paths.config_search_path(env, Path("/w")) == [
        Path("/c.toml"),
        Path("/h/.config/llamad/models.toml"),
        Path("/w/models.toml"),
    ]
    assert paths.config_search_path({"HOME": "/h", "XDG_CONFIG_HOME": "/x"}, Path("/w")) == [
        Path("/x/llamad/models.toml"),
        Path("/w/models.toml"),
    ]


# ------------------------------------------------------------------- tools


def test_tools_per_model_and_their_settings() -> None:
    config = parse(
        """
        [models.a]
        path = "a.gguf"
        tools = ["calculator", "file_search"]
        max_tool_rounds = 3

        [tools.file_search]
        roots = ["~/notes", "docs"]
        confirm = true
        timeout_sec = 2.5
        """.replace("        ", "")
    )
    model = config.models["a"]
    assert (model.tools, model.max_tool_rounds) == (("calculator", "file_search"), 3)
    search = config.tool("file_search")
    assert search.roots == (Path(ENV["HOME"]) / "notes", SOURCE.parent.absolute() / "docs")
    assert (search.confirm, search.timeout_sec) == (True, 2.5)
    assert config.tool("calculator") == ToolConfig()  # defaults when no table


def test_tool_mistakes_are_one_line_each() -> None:
    assert problems(
        """
        [models.a]
        path = "a.gguf"
        tools = ["calculater"]
        max_tool_rounds = 0

        [tools.calculator]
        roots = ["/"]
        confirm = "yes"

        [tools.file_search]
        timeot_sec = 3

        [tools.shell]
        """.replace("        ", "")
    ) == [
        "/etc/llamad/models.toml: models.a.max_tool_rounds: must be greater than 0, got 0",
        '/etc/llamad/models.toml: models.a.tools[0]: no tool named "calculater"; '
        'did you mean "calculator"?',
        "/etc/llamad/models.toml: tools.calculator.roots: only file_search takes roots",
        '/etc/llamad/models.toml: tools.calculator.confirm: expected true or false, got "yes"',
        "/etc/llamad/models.toml: tools.file_search.timeot_sec: unknown key; "
        'did you mean "timeout_sec"?',
        '/etc/llamad/models.toml: tools.shell: no tool named "shell"; '
        "built-in tools: calculator, file_search",
    ]


def test_file_search_without_roots_is_refused() -> None:
    assert problems('[models.a]\npath = "a"\ntools = ["file_search"]\n') == [
        "/etc/llamad/models.toml: models.a.tools: file_search needs the folders it may "
        'search: add [tools.file_search] roots = ["~/notes"]'
    ]


def test_pool_keys_and_sizes() -> None:
    config = parse(
        '[daemon]\nmemory_budget = "12GiB"\ngpu_memory_budget = "512 MiB"\nmax_models = 2\n'
        'preload = ["m"]\nttl_sec = 300\n[models.m]\npath = "/m.gguf"\npinned = true\n'
    )
    assert budget_bytes(config.daemon.memory_budget) == 12 * 1024**3
    assert budget_bytes(config.daemon.gpu_memory_budget) == 512 * 1024**2
    assert budget_bytes("auto") is None
    assert (config.daemon.max_models, config.daemon.preload) == (2, ("m",))
    assert config.models["m"].supervision.ttl_sec == 300.0
    assert config.models["m"].pinned
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("2KiB") == 2048


def test_bad_pool_keys_are_one_line_each() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(
            '[daemon]\nmemory_budget = "lots"\npreload = ["nope"]\nmax_models = 0\n'
            'ttl_sec = -1\n[models.m]\npath = "/m.gguf"\n'
        )
    assert caught.value.problems == [
        f"{SOURCE}: daemon.max_models: must be greater than 0, got 0",
        f"{SOURCE}: daemon.ttl_sec: must not be negative, got -1",
        f'{SOURCE}: daemon.memory_budget: expected "auto" or a size such as "12GiB" or '
        '"512MiB", got "lots"',
        f'{SOURCE}: daemon.preload[0]: no model or alias named "nope"; configured models: m',
    ]


def test_the_http_api_is_on_with_keys_by_default_and_none_is_fine_on_loopback() -> None:
    default = parse_config("", source=Path("models.toml"), env={"HOME": "/home/u"}).daemon
    assert (default.http, default.auth, default.api_keys_file) == ("127.0.0.1:8766", "keys", None)
    text = '[daemon]\nhttp = "[::1]:9000"\nauth = "none"\napi_keys_file = "keys.toml"\n'
    daemon = parse_config(text, source=Path("/etc/llamad/models.toml"), env={}).daemon
    assert daemon.auth == "none" and daemon.api_keys_file == Path("/etc/llamad/keys.toml")


# ------------------------------------------------ workers, split and remote models


def test_workers_and_a_model_split_over_them() -> None:
    config = parse(
        '[workers.gpu0]\nport = 50052\ndevices = ["CUDA0"]\nthreads = 4\ncache = true\n'
        "restart_sec = 1\n"
        '[workers.any]\nhost = "0.0.0.0"\nport = 50053\nallow_network = true\n'
        '[models.big]\npath = "big.gguf"\nworkers = ["gpu0", "any"]\n'
        'rpc = ["gpu-box:50052", "[fd00::2]:50052"]\nn_gpu_layers = 99\n'
        "tensor_split = [3, 1, 1, 1]\n"
    )
    gpu0 = config.workers["gpu0"]
    assert (gpu0.host, gpu0.port, gpu0.devices, gpu0.threads, gpu0.cache) == (
        "127.0.0.1",
        50052,
        ("CUDA0",),
        4,
        True,
    )
    assert gpu0.supervision.restart_sec == 1.0
    big = config.models["big"]
    assert big.tensor_split == (3.0, 1.0, 1.0, 1.0)
    # A wildcard bind is reached on loopback by the models of this machine.
    assert config.rpc_addresses(big) == (
        "127.0.0.1:50052",
        "127.0.0.1:50053",
        "gpu-box:50052",
        "[fd00::2]:50052",
    )


def test_a_worker_off_loopback_needs_allow_network() -> None:
    (line,) = problems('[workers.w]\nhost = "0.0.0.0"\n')
    assert line.startswith(f'{SOURCE}: workers.w.host: "0.0.0.0" is not a loopback address')
    assert "allow_network = true" in line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[models.m]\npath = "m"\nworkers = ["gpu1"]\nn_gpu_layers = 99\n[workers.gpu0]\n',
            'models.m.workers[0]: no [workers.gpu1] table; did you mean "gpu0"?',
        ),
        (
            '[models.m]\npath = "m"\nrpc = ["gpu-box"]\nn_gpu_layers = 99\n',
            'models.m.rpc[0]: expected "HOST:PORT", got "gpu-box"',
        ),
        (
            '[models.m]\npath = "m"\nrpc = ["gpu-box:50052"]\n',
            "models.m.n_gpu_layers: a model split over workers needs its layers offloaded",
        ),
        (
            '[models.m]\npath = "m"\nrpc = ["h:1"]\nn_gpu_layers = 9\ntensor_split = [0, 0]\n',
            "models.m.tensor_split: expected proportions such as [3, 1]",
        ),
        (
            '[models.demo]\npath = "m"\n[workers.demo]\n',
            'workers.demo: "demo" is also a model\'s name or alias',
        ),
        (
            "[workers.a]\nport = 1\n[workers.b]\nport = 1\n",
            'workers.b.port: 1 is already the port of worker "a"',
        ),
        ('[workers.a]\nmem = "lots"\n', 'workers.a.mem: expected "auto" or a size'),
        (
            '[models.r]\nurl = "http://h:1"\nn_gpu_layers = 9\n',
            "models.r.n_gpu_layers: not for a model with url",
        ),
        (
            '[models.r]\nurl = "ftp://h"\n',
            'models.r.url: expected "http://HOST:PORT" or "https://HOST", got "ftp://h"',
        ),
        (
            '[models.r]\nurl = "https://user:secret@h"\n',
            "models.r.url: put the key in api_key or api_key_file, not in the URL",
        ),
        (
            '[models.r]\nurl = "http://h"\napi_key = "k"\napi_key_file = "f"\n',
            "models.r.api_key: give api_key or api_key_file, not both",
        ),
        (
            '[models.m]\npath = "m"\nremote_model = "x"\n',
            "models.m.remote_model: only for a model served elsewhere (url = ...)",
        ),
    ],
)
def test_worker_and_remote_mistakes(text: str, expected: str) -> None:
    lines = problems(text)
    assert any(line.startswith(f"{SOURCE}: {expected}") for line in lines), lines


def test_a_remote_model_needs_no_path() -> None:
    config = parse(
        '[models.far]\nurl = "https://llm.example.net/v1/"\napi_key_file = "key"\n'
        'remote_model = "qwen2.5-7b"\nctx_size = 8192\nparallel = 4\n'
    )
    far = config.models["far"]
    assert far.remote and far.path is None
    assert far.api_key_file == SOURCE.parent / "key"
    assert remote_base(far.url or "") == "https://llm.example.net"


# ------------------------------------------------------ generation defaults


def test_sampling_defaults_merge_like_supervision() -> None:
    config = parse_config(
        textwrap.dedent(
            """\
            [daemon]
            temperature = 0.7
            max_tokens = 1000
            system_prompt = "Be brief."
            [models.a]
            path = "a.gguf"
            temperature = 0
            top_k = 40
            [models.b]
            path = "b.gguf"
            """
        ),
        source=SOURCE,
        env=ENV,
    )
    a, b = config.models["a"].sampling, config.models["b"].sampling
    assert (a.temperature, a.top_k, a.max_tokens, a.system_prompt) == (0.0, 40, 1000, "Be brief.")
    assert (b.temperature, b.top_k, b.top_p, b.max_tokens) == (0.7, None, None, 1000)
    assert (
        parse_config('[models.c]\npath = "c.gguf"\n', source=SOURCE, env=ENV)
        .models["c"]
        .sampling.max_tokens
        == 4096
    )


def test_sampling_mistakes() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            textwrap.dedent(
                """\
                [daemon]
                top_p = 1.5
                [models.a]
                path = "a.gguf"
                temperature = -1
                max_tokens = 0
                min_p = "low"
                system_prompt = 3
                top_k = 2.5
                """
            ),
            source=SOURCE,
            env=ENV,
        )
    assert sorted(info.value.problems) == sorted(
        [
            f"{SOURCE}: daemon.top_p: must be between 0 and 1, got 1.5",
            f"{SOURCE}: models.a.temperature: must not be negative, got -1",
            f"{SOURCE}: models.a.max_tokens: must be greater than 0, got 0",
            f'{SOURCE}: models.a.min_p: expected a number, got "low"',
            f"{SOURCE}: models.a.system_prompt: expected a string, got 3",
            f"{SOURCE}: models.a.top_k: expected an integer, got 2.5",
        ]
    )
