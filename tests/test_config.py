"""models.toml parsing: values, defaults, overrides, and one clear line per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamad.config import Config, Supervision, find_config, load_config, parse_config
from llamad.errors import ConfigError, UnknownModelError

SOURCE = Path("/etc/llamad/models.toml")
ENV = {"HOME": "/home/ada", "MODELS": "/srv/models", "XDG_RUNTIME_DIR": "/run/user/1000"}

FULL = """
[daemon]
default_model = "tiny"
restart = "always"
start_limit_burst = 7
log_lines = 50

[models.demo]
path = "models/demo.gguf"
ctx_size = 1024
n_gpu_layers = 99
aliases = ["tiny"]
args = ["--threads", "2"]
env = { CUDA_VISIBLE_DEVICES = "0" }
health_interval_sec = 2

[models.big]
path = "$MODELS/big.gguf"
port = 8081
restart = "no"
"""


def parse(text: str) -> Config:
    return parse_config(text, source=SOURCE, env=ENV)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.problems


def test_full_file() -> None:
    config = parse(FULL)
    demo = config.models["demo"]
    assert demo.path == Path("/etc/llamad/models/demo.gguf")  # relative to the file
    assert demo.ctx_size == 1024 and demo.n_gpu_layers == 99
    assert demo.args == ("--threads", "2")
    assert demo.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert config.daemon.default_model == "tiny"
    assert config.daemon.log_lines == 50
    assert config.daemon.runtime_dir == Path("/run/user/1000/llamad")
    assert config.socket_path() == Path("/run/user/1000/llamad/control.sock")
    assert config.daemon.data_dir == Path("/home/ada/.local/share/llamad")
    big = config.models["big"]
    assert big.path == Path("/srv/models/big.gguf")
    assert big.port == 8081
    assert list(config.models) == ["demo", "big"]  # file order


def test_daemon_defaults_and_model_overrides_merge() -> None:
    config = parse(FULL)
    demo, big = config.models["demo"].supervision, config.models["big"].supervision
    assert config.daemon.supervision.restart == "always"
    assert demo.restart == "always" and demo.start_limit_burst == 7  # from [daemon]
    assert demo.health_interval_sec == 2.0  # its own override
    assert big.restart == "no" and big.health_interval_sec == Supervision().health_interval_sec


def test_defaults_for_an_empty_file() -> None:
    config = parse("")
    assert config.models == {}
    assert config.daemon.supervision == Supervision()
    assert config.daemon.llama_server is None


def test_resolve_by_name_and_alias() -> None:
    config = parse(FULL)
    assert config.resolve("tiny").name == "demo"
    assert config.resolve("big").name == "big"
    with pytest.raises(UnknownModelError) as info:
        config.resolve("codellama")
    assert str(info.value) == "unknown model 'codellama'; configured models: demo, big"


def test_home_expansion() -> None:
    config = parse('[models.m]\npath = "~/m.gguf"\n')
    assert config.models["m"].path == Path("/home/ada/m.gguf")


def test_same_text_parses_equal() -> None:
    """Reload keeps a model running when its settings compare equal."""
    assert parse(FULL).models["demo"] == parse(FULL).models["demo"]
    changed = parse(FULL.replace("ctx_size = 1024", "ctx_size = 2048"))
    assert changed.models["demo"] != parse(FULL).models["demo"]
    assert changed.models["big"] == parse(FULL).models["big"]


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
            '[models.demo]\npath = "x"\nctx_sizes = 5\n',
            'models.demo.ctx_sizes: unknown key; did you mean "ctx_size"?',
        ),
        (
            "[daemon]\nrestart_secs = 1\n",
            'daemon.restart_secs: unknown key; did you mean "restart_sec"?',
        ),
        (
            '[models.m]\npath = "x"\nrestart = "sometimes"\n',
            'models.m.restart: expected one of "no", "on-failure", "always", got "sometimes"',
        ),
        (
            "[daemon]\nstop_timeout_sec = -1\n",
            "daemon.stop_timeout_sec: must be greater than 0, got -1",
        ),
        (
            '[models.m]\npath = "x"\nport = 70000\n',
            "models.m.port: must be between 1 and 65535, got 70000",
        ),
        (
            '[models.m]\npath = "x"\nargs = "--threads 2"\n',
            'models.m.args: expected a list of strings, got "--threads 2"',
        ),
        (
            '[models.m]\npath = "x"\nenv = { A = 1 }\n',
            "models.m.env: A: expected a string, got 1",
        ),
        (
            '[models.m]\npath = "$NOPE/x.gguf"\n',
            "models.m.path: $NOPE is not set in the environment",
        ),
        ("[models.m]\nctx_size = 5\n", "models.m.path: missing: every model needs the path"),
        (
            '[daemon]\ndefault_model = "ghost"\n[models.m]\npath = "x"\n',
            'daemon.default_model: no model or alias named "ghost"; configured models: m',
        ),
        ('[models]\nm = "x"\n', 'models.m: expected a table, got "x"'),
        ("[deamon]\n", 'deamon: unknown key; did you mean "daemon"?'),
    ],
)
def test_each_mistake_is_one_clear_line(text: str, expected: str) -> None:
    lines = problems(text)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{SOURCE}: {expected}")


def test_duplicate_alias() -> None:
    lines = problems('[models.a]\npath = "x"\n[models.b]\npath = "y"\naliases = ["a"]\n')
    assert lines == [
        f'{SOURCE}: models.b.aliases: "a" is already the name or an alias of model "a"'
    ]


def test_toml_syntax_error_names_the_line() -> None:
    lines = problems('[models.m]\npath = "x\n')
    assert len(lines) == 1
    assert lines[0].startswith(f"{SOURCE}: ") and "line 2" in lines[0]


def test_all_problems_are_reported_together() -> None:
    lines = problems(
        '[daemon]\nhealth_failures = 0\n[models.a]\npath = 5\nctx_size = "big"\n[models.b]\nx = 1\n'
    )
    assert len(lines) == 5, lines
    joined = "\n".join(lines)
    keys = ("daemon.health_failures", "models.a.path", "models.a.ctx_size", "models.b.x")
    for key in (*keys, "models.b.path"):
        assert key in joined


def test_load_config_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert "cannot read" in str(info.value)


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
    assert find_config(None, env, cwd) == from_env
    del env["LLAMAD_CONFIG"]
    assert find_config(None, env, cwd) == xdg
    xdg.unlink()
    assert find_config(None, env, cwd) == cwd / "models.toml"
    (cwd / "models.toml").unlink()
    with pytest.raises(ConfigError) as info:
        find_config(None, env, cwd)
    assert "no models.toml found" in str(info.value)
    assert "llamactl demo-model" in str(info.value)
    with pytest.raises(ConfigError, match="no such file"):
        find_config(tmp_path / "nope.toml", env, cwd)
