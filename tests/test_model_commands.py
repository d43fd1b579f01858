"""``llamactl models`` and ``llamactl show`` against a real llamad, real models and files."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

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
        read_gguf(real_models["smol"]), ctx_size=4096, parallel=None, n_gpu_layers=0
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
