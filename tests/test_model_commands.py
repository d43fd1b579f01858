"""``llamactl models`` and ``llamactl show`` against a real llamad, real models and files."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from llamactl.model_commands import add_entry, remove_entry
from llamad.gguf_info import MiB, estimate_memory, read_gguf
from tests.conftest import Llamad

pytestmark = pytest.mark.server


def _config(models: dict[str, Path], **extra: str) -> str:
    return "".join(
        f'[models.{name}]\npath = "{path}"\nctx_size = 4096\n{extra.get(name, "")}\n'
        for name, path in models.items()
    )


@pytest.fixture
def daemon(
    make_llamad: Callable[..., Llamad], demo_models: dict[str, Path], real_models: dict[str, Path]
) -> Llamad:
    models = {**real_models, "demo": demo_models["demo"]}
    handle = make_llamad(_config(models, smol='aliases = ["smollm2"]\n'))
    handle.start()
    return handle


@pytest.mark.real_model
def test_models_lists_size_quantization_context_and_source(daemon: Llamad) -> None:
    listing = daemon.ctl("models")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()}
    assert set(rows) == {"smol", "gemma", "demo"}
    assert rows["smol"].split()[:6] == ["smol", "stopped", "98", "MB", "Q4_1", "ctx"]
    assert "4K/8K" in rows["smol"] and "models.toml" in rows["smol"]
    assert "(aliases: smollm2)" in rows["smol"]
    assert rows["gemma"].split()[2:5] == ["253", "MB", "Q4_K_M"]
    assert "4K/32K" in rows["gemma"] and "[base model]" in rows["gemma"]
    assert rows["demo"].split()[2:5] == ["618", "kB", "F32"]
    as_json = json.loads(daemon.ctl("models", "--json").stdout)
    smol = next(m for m in as_json if m["name"] == "smol")
    assert (smol["size"], smol["quantization"], smol["context_length"]) == (98362432, "Q4_1", 8192)
    assert smol["source"] == "models.toml"
    assert smol["warnings"] == []
    gemma = next(m for m in as_json if m["name"] == "gemma")
    assert gemma["warnings"] == ["base model: no chat template; chat replies will be poor"]


@pytest.mark.real_model
def test_show_a_configured_model(daemon: Llamad, real_models: dict[str, Path]) -> None:
    shown = daemon.ctl("show", "smollm2")  # an alias will do
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert text.splitlines()[0] == "smol  (from models.toml)"
    for expected in (
        "architecture   llama, 134.5M parameters (135M)",
        "quantization   Q4_1",
        "context        8,192 trained; runs with 4,096",
        "chat template  yes (no tool support)",
        "tokenizer      gpt2 (smollm), 49,152 tokens",
        "license        apache-2.0",
        "vision         no projector (mmproj)",
    ):
        assert expected in text
    estimate = estimate_memory(
        read_gguf(real_models["smol"]), ctx_size=4096, parallel=1, n_gpu_layers=0
    )
    assert (
        f"memory         about {estimate.host / MiB:.0f} MiB host (estimated for ctx 4,096)" in text
    )
    assert "base model" not in text

    gemma = daemon.ctl("show", "gemma")
    assert "chat template  none" in gemma.stdout
    assert gemma.stdout.rstrip().endswith("base model: no chat template; chat replies will be poor")
    assert "sliding window of 512 tokens in 15 of 18 layers" in gemma.stdout

    as_json = json.loads(daemon.ctl("show", "gemma", "--json").stdout)
    assert as_json["base_model"] is True
    assert as_json["parameters"] == 268_098_176
    assert as_json["memory_estimate"]["host"] > 300 * MiB
    assert as_json["memory_estimate"]["gpu"] == 0


def test_show_errors_are_one_line(
    make_llamad: Callable[..., Llamad], demo_models: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model at all")
    handle = make_llamad(_config({"demo": demo_models["demo"], "broken": broken}))
    handle.start()
    unknown = handle.ctl("show", "nope")
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert unknown.stderr == "llamactl: unknown model 'nope'; configured models: demo, broken\n"
    bad = handle.ctl("show", "broken")
    assert bad.returncode == 1
    assert bad.stderr == (
        f"llamactl: {broken}: not a GGUF file (it starts with b'not ', expected b'GGUF')\n"
    )
    # llamad says the same in its status, and still runs the good model.
    listing = json.loads(handle.ctl("models", "--json").stdout)
    assert next(m for m in listing if m["name"] == "broken")["warnings"] == [
        "not a GGUF file (it starts with b'not ', expected b'GGUF')"
    ]
    assert handle.ctl("load", "demo").returncode == 0


def test_show_a_file_needs_no_daemon(demo_models: dict[str, Path], tmp_path: Path) -> None:
    env_socket = str(tmp_path / "nobody.sock")
    shown = subprocess.run(
        [sys.executable, "-m", "llamactl", "--help"], capture_output=True, text=True, check=True
    )
    assert "show" in shown.stdout
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamactl",
            "show",
            str(demo_models["demo"]),
            "--socket",
            env_socket,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "demo.gguf"
    assert "architecture   llama, 151.0K parameters" in result.stdout
    assert "chat template  yes (no tool support)" in result.stdout
    assert "memory         about" in result.stdout


def test_status_does_not_import_the_gguf_reader() -> None:
    # llamactl status must stay fast: show's imports are lazy.
    code = (
        "import sys, llamactl.__main__; "
        "print(sorted(m for m in ('llamad.gguf_info', 'gguf', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------- models add / remove

EDITED = """\
# My models. Keep this comment.
[daemon]
default_model = "a"   # the one I use most

# A is small.
[models.a]
path = "/m/a.gguf"
env = { X = "1" }

# B is big; its env below.
[models.b]
path = "/m/b.gguf"

[models.b.env]
CUDA_VISIBLE_DEVICES = "0"

# Tools, later.
[tools.calculator]
confirm = false
"""


def test_add_entry_keeps_every_other_byte() -> None:
    changed = add_entry(EDITED, "qwen:q4_k_m", {"path": "/m/q w.gguf", "ctx_size": 4096})
    assert changed.startswith(EDITED)
    assert changed[len(EDITED) :] == (
        '\n[models."qwen:q4_k_m"]\npath = "/m/q w.gguf"\nctx_size = 4096\n'
    )
    assert tomllib.loads(changed)["models"]["qwen:q4_k_m"] == {
        "path": "/m/q w.gguf",
        "ctx_size": 4096,
    }
    with pytest.raises(ValueError, match="model 'a' is already in the file"):
        add_entry(EDITED, "a", {"path": "/x"})
    assert add_entry("", "x", {"path": "/x"}) == '[models.x]\npath = "/x"\n'
    assert add_entry("# no newline", "x", {"path": "/x"}) == (
        '# no newline\n\n[models.x]\npath = "/x"\n'
    )


def test_remove_entry_takes_the_table_its_subtables_and_its_comment() -> None:
    without_b = remove_entry(EDITED, "b")
    assert without_b == EDITED.replace(
        '# B is big; its env below.\n[models.b]\npath = "/m/b.gguf"\n\n'
        '[models.b.env]\nCUDA_VISIBLE_DEVICES = "0"\n\n',
        "",
    )
    assert "# Tools, later." in without_b  # the next table's comment stays
    without_a = remove_entry(EDITED, "a")
    assert "# A is small." not in without_a and "# B is big" in without_a
    assert "default_model" in without_a  # the caller's parse_config check refuses this file
    last = add_entry(EDITED, "z", {"path": "/z"})
    assert remove_entry(last, "z") == EDITED
    with pytest.raises(ValueError, match="no model 'nope' in the file"):
        remove_entry(EDITED, "nope")
    inline = 'models = { c = { path = "/c" } }\n'
    with pytest.raises(ValueError, match=r"not written as a \[models.c\] table"):
        remove_entry(inline, "c")


def test_models_add_and_remove_through_llamad(
    make_llamad: Callable[..., Llamad], demo_models: dict[str, Path], tmp_path: Path
) -> None:
    daemon = make_llamad(
        '# my comment\n[models.demo]\npath = "'
        + str(demo_models["demo"])
        + '"  # inline comment\nctx_size = 512\n',
        'default_model = "demo"\n',
    )
    daemon.start()
    before = daemon.config_path.read_text()
    added = daemon.ctl(
        "models", "add", "second", str(demo_models["demo-b"]),
        "--ctx-size", "1024", "--alias", "two", "--args", "--threads 1",
        "--temperature", "0.5", "--system-prompt", "Be brief.",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines()[0] == f"added [models.second] in {daemon.config_path}"
    after = daemon.config_path.read_text()
    assert after.startswith(before)  # comments and formatting untouched
    assert tomllib.loads(after)["models"]["second"] == {
        "path": str(demo_models["demo-b"]),
        "ctx_size": 1024,
        "aliases": ["two"],
        "args": ["--threads", "1"],
        "temperature": 0.5,
        "system_prompt": "Be brief.",
    }
    assert "second" in daemon.ctl("models").stdout
    loaded = daemon.ctl("load", "two")
    assert loaded.returncode == 0, loaded.stderr

    removed = daemon.ctl("models", "remove", "second")
    assert removed.returncode == 0, removed.stderr
    assert daemon.config_path.read_text() == before
    assert "second" not in daemon.ctl("models").stdout

    # Mistakes: one line each, and the file is not touched.
    cases = [
        (("models", "remove", "demo"), 'daemon.default_model: no model or alias named "demo"'),
        (("models", "add", "x", str(tmp_path / "none.gguf")), "none.gguf: no such file"),
        (("models", "add", "demo", str(demo_models["demo-b"])), "model 'demo' is already"),
        (("models", "add", "bad name", str(demo_models["demo"])), "a model name must be"),
        (("models", "remove", "ghost"), "no model 'ghost' in the file"),
    ]
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    cases.append((("models", "add", "notes", str(not_gguf)), "not a GGUF file"))
    cases.append(
        (
            ("models", "add", "hot", str(demo_models["demo"]), "--top-p", "2"),
            "models.hot.top_p: must be between 0 and 1, got 2.0",
        )
    )
    for arguments, message in cases:
        result = daemon.ctl(*arguments)
        assert result.returncode == 1, arguments
        assert message in result.stderr, (arguments, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
        assert daemon.config_path.read_text() == before


def test_models_add_without_llamad(demo_models: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text("# empty for now\n")
    result = subprocess.run(
        [sys.executable, "-m", "llamactl", "models", "add", "d", str(demo_models["demo"]),
         "--config", str(config), "--socket", str(tmp_path / "none.sock")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"added [models.d] in {config}",
        "llamad is not running; it will read the file when it starts",
    ]
    assert config.read_text() == f'# empty for now\n\n[models.d]\npath = "{demo_models["demo"]}"\n'
