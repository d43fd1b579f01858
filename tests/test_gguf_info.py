"""llamad.gguf_info: reading GGUF headers, and the memory estimate against the real server."""

from __future__ import annotations

import dataclasses
import re
import socket as socketlib
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from llamad.config import parse_config
from llamad.demo_model import DEMO_VARIANTS, write_demo_model
from llamad.errors import ModelFileInvalid
from llamad.gguf_info import (
    AUTO_SLOTS,
    CUDA_CONTEXT,
    GGUFInfo,
    MemoryEstimate,
    MiB,
    estimate_for_model,
    estimate_memory,
    memory_breakdown,
    read_gguf,
    settings_from_args,
    split_parts,
)
from tests.conftest import short_tempdir


@pytest.fixture(scope="module")
def demo(demo_models: dict[str, Path]) -> GGUFInfo:
    return read_gguf(demo_models["demo"])


# ------------------------------------------------------------------ reading


def test_demo_model_as_its_header_says(demo: GGUFInfo, demo_models: dict[str, Path]) -> None:
    spec = DEMO_VARIANTS["demo"]
    assert demo.architecture == "llama"
    assert demo.parts == (demo_models["demo"],)
    assert demo.file_size == demo_models["demo"].stat().st_size
    assert demo.quantization == "F32"
    assert demo.dominant_type == "F32"
    assert demo.context_length == spec.n_ctx
    assert demo.block_count == spec.n_layer
    assert demo.embedding_length == spec.n_embd
    assert demo.head_count == spec.n_head
    assert demo.kv_heads == (spec.n_head,) * spec.n_layer
    assert demo.key_length == demo.value_length == spec.n_embd // spec.n_head
    assert demo.feed_forward_length == spec.n_ff
    assert demo.tokenizer == "llama"
    assert demo.has_chat_template
    assert not demo.supports_tools
    assert not demo.is_projector
    assert demo.sliding_window is None
    assert not any(demo.swa_layers)
    # f32 weights: 4 bytes each, and the tensors fill the file after the header.
    assert demo.tensor_bytes == 4 * demo.parameters
    assert demo.file_size - 64 * 1024 < demo.tensor_bytes < demo.file_size
    assert demo.vocab_size is not None and 400 < demo.vocab_size < 700
    assert demo.name == "llamad demo (random weights)"


def test_a_template_that_takes_tools(demo: GGUFInfo) -> None:
    with_tools = dataclasses.replace(
        demo, chat_template="{% if tools %}{{ tools | tojson }}{% endif %}"
    )
    assert with_tools.supports_tools
    assert not dataclasses.replace(demo, chat_template=None).supports_tools


def test_a_split_model_is_read_as_one(tmp_path: Path, demo: GGUFInfo) -> None:
    first = write_demo_model(tmp_path / "demo.gguf", "demo", split_max_tensors=8)
    assert first.name == "demo-00001-of-00003.gguf"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"demo-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    for given in sorted(tmp_path.iterdir()):  # any part names the whole model
        info = read_gguf(given)
        assert info.path == first
        assert [p.name for p in info.parts] == names
        assert info.parameters == demo.parameters
        assert info.tensor_count == demo.tensor_count
        assert info.tensor_bytes == demo.tensor_bytes
        assert info.file_size == sum(p.stat().st_size for p in tmp_path.iterdir())
        assert info.architecture == "llama"
    (tmp_path / "demo-00002-of-00003.gguf").unlink()
    with pytest.raises(ModelFileInvalid, match=r"missing demo-00002-of-00003\.gguf \(of 3 parts\)"):
        read_gguf(first)
    assert split_parts(tmp_path / "plain.gguf") == [tmp_path / "plain.gguf"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", r"not a GGUF file \(0 bytes, expected b'GGUF'\)"),
        (
            b"\x00" * 4096,
            r"not a GGUF file \(it starts with b'\\x00\\x00\\x00\\x00', expected b'GGUF'\)",
        ),
        (b"GGUF" + (7).to_bytes(4, "little") + b"\x00" * 64, r"GGUF version 7 is not supported"),
        (
            b"GGUF"
            + (3).to_bytes(4, "little")
            + (1).to_bytes(8, "little")
            + (2**40).to_bytes(8, "little")
            + b"\x00" * 16,
            r"corrupt GGUF header: impossible counts",
        ),
    ],
)
def test_files_that_are_not_models(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFileInvalid, match=problem) as caught:
        read_gguf(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert "\n" not in str(caught.value)


def test_a_truncated_file(tmp_path: Path, demo_models: dict[str, Path]) -> None:
    whole = demo_models["demo"].read_bytes()
    for cut in (24, 200, 5_000):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(whole[:cut])
        with pytest.raises(ModelFileInvalid, match="truncated GGUF header"):
            read_gguf(path)


def test_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ModelFileInvalid, match="no such file"):
        read_gguf(tmp_path / "nothing.gguf")
    with pytest.raises(ModelFileInvalid, match="not a file"):
        read_gguf(tmp_path)


@pytest.mark.real_model
def test_smollm2(real_models: dict[str, Path]) -> None:
    info = read_gguf(real_models["smol"])
    assert (info.architecture, info.quantization, info.dominant_type) == ("llama", "Q4_1", "Q4_1")
    assert info.parameters == 134_515_008
    assert info.size_label == "135M"
    assert info.file_size == 98_362_432
    assert info.context_length == 8192
    assert (info.block_count, info.embedding_length, info.head_count) == (30, 576, 9)
    assert info.kv_heads == (3,) * 30
    assert (info.key_length, info.value_length) == (64, 64)
    assert (info.tokenizer, info.tokenizer_pre, info.vocab_size) == ("gpt2", "smollm", 49152)
    assert info.license == "apache-2.0"
    assert info.has_chat_template
    assert "<|im_start|>" in (info.chat_template or "")
    assert not info.supports_tools  # as llama-server's /props says (supports_tools: false)


@pytest.mark.real_model
def test_gemma3_base_model(real_models: dict[str, Path]) -> None:
    info = read_gguf(real_models["gemma"])
    assert (info.architecture, info.quantization) == ("gemma3", "Q4_K_M")
    assert info.dominant_type == "Q8_0"
    assert info.parameters == 268_098_176
    assert info.context_length == 32768
    assert (info.block_count, info.head_count, info.kv_heads) == (18, 4, (1,) * 18)
    assert (info.key_length, info.value_length) == (256, 256)
    assert info.sliding_window == 512
    # Gemma 3: every 6th layer is global attention, the others slide.
    assert [i for i, swa in enumerate(info.swa_layers) if not swa] == [5, 11, 17]
    assert (info.tokenizer, info.vocab_size) == ("llama", 262144)
    assert info.license == "gemma"
    assert not info.has_chat_template  # a base model


@pytest.mark.real_model
def test_reading_headers_is_fast(real_models: dict[str, Path]) -> None:
    # gguf.GGUFReader takes about 10 s for Gemma 3 (262,144 vocabulary entries) here.
    for path in real_models.values():
        started = time.perf_counter()
        read_gguf(path)
        assert time.perf_counter() - started < 0.5


# ------------------------------------------------------------- the estimate


def test_parallel_splits_the_context_it_does_not_multiply_it(demo: GGUFInfo) -> None:
    per_cell = 2 * demo.layers * demo.kv_heads[0] * (demo.key_length or 0) * 2  # K+V, f16
    auto = memory_breakdown(demo, ctx_size=2048, parallel=None, n_gpu_layers=0)
    assert (auto.slots, auto.unified, auto.kv_cells) == (AUTO_SLOTS, True, 2048)
    assert auto.kv_cache == MemoryEstimate(2048 * per_cell, 0)
    four = memory_breakdown(demo, ctx_size=2048, parallel=4, n_gpu_layers=0)
    assert (four.slots, four.unified, four.kv_cells) == (4, False, 2048)
    assert four.kv_cache == auto.kv_cache
    # Each slot's share is rounded up to 256 cells: 3 x 768 for 2000 / 3.
    three = memory_breakdown(demo, ctx_size=2000, parallel=3, n_gpu_layers=0)
    assert three.kv_cells == 3 * 768
    assert memory_breakdown(demo, ctx_size=0, parallel=1, n_gpu_layers=0).kv_cells == 65536


def test_cache_types(demo: GGUFInfo) -> None:
    f16 = memory_breakdown(demo, ctx_size=4096, parallel=None, n_gpu_layers=0).kv_cache.host
    q8 = memory_breakdown(
        demo, ctx_size=4096, parallel=None, n_gpu_layers=0, cache_type_k="q8_0", cache_type_v="q8_0"
    ).kv_cache.host
    assert q8 * 32 == f16 // 2 * 34
    with pytest.raises(ValueError, match="unknown KV cache type 'q3'"):
        estimate_memory(demo, ctx_size=512, parallel=None, n_gpu_layers=0, cache_type_k="q3")


def test_gpu_layers_move_weights_and_cache_by_layer(demo: GGUFInfo) -> None:
    # llama.cpp counts the output layer as the last one: -ngl 1 offloads only
    # it, -ngl 2 also the last block, and so on.
    host_only = memory_breakdown(demo, ctx_size=2048, parallel=None, n_gpu_layers=0)
    assert host_only.total.gpu == 0
    output = sum(t.n_bytes for t in demo.tensors if t.name.startswith("output"))
    last_block = sum(t.n_bytes for t in demo.tensors if t.name.startswith("blk.1."))
    one = memory_breakdown(demo, ctx_size=2048, parallel=None, n_gpu_layers=1)
    assert (one.weights.gpu, one.kv_cache.gpu) == (output, 0)
    assert one.overhead.gpu == CUDA_CONTEXT
    two = memory_breakdown(demo, ctx_size=2048, parallel=None, n_gpu_layers=2)
    assert two.weights.gpu == output + last_block
    assert two.kv_cache == MemoryEstimate(
        host_only.kv_cache.host // 2, host_only.kv_cache.host // 2
    )
    every = memory_breakdown(demo, ctx_size=2048, parallel=None, n_gpu_layers=99)
    embeddings = next(t.n_bytes for t in demo.tensors if t.name == "token_embd.weight")
    assert every.weights.host == embeddings  # the input layer never moves
    assert every.weights.gpu == demo.tensor_bytes - embeddings
    assert every.kv_cache == MemoryEstimate(0, host_only.kv_cache.host)
    assert every.compute.gpu > 0
    assert every.compute.host < host_only.compute.host


def test_settings_from_args() -> None:
    assert settings_from_args(
        ["--threads", "2", "-ctk", "q8_0", "--cache-type-v=q4_0", "-np", "2", "--kv-unified"]
    ) == {"cache_type_k": "q8_0", "cache_type_v": "q4_0", "parallel": 2, "kv_unified": True}
    assert settings_from_args(["-fa", "off", "-ngl", "all", "--cache-ram", "512"]) == {
        "flash_attn": False,
        "n_gpu_layers": 1_000_000,
        "cache_ram_mib": 512,
    }
    assert settings_from_args(["-np", "-1", "-c", "nonsense", "--swa-full"]) == {
        "parallel": None,
        "swa_full": True,
    }
    assert settings_from_args(["-c"]) == {}


def test_estimate_for_a_models_toml_entry(demo: GGUFInfo, demo_models: dict[str, Path]) -> None:
    config = parse_config(
        f"""
        [models.one]
        path = "{demo_models["demo"]}"
        ctx_size = 4096
        [models.two]
        path = "{demo_models["demo"]}"
        ctx_size = 4096
        parallel = 2
        args = ["--cache-ram", "100"]
        """,
        source=Path("models.toml"),
    )
    one = estimate_for_model(demo, config.models["one"])
    # llamad always passes --parallel (default 1): the estimate assumes what it passes.
    assert one == estimate_memory(demo, ctx_size=4096, parallel=1, n_gpu_layers=0)
    two = estimate_for_model(demo, config.models["two"])
    assert two == estimate_memory(
        demo, ctx_size=4096, parallel=2, n_gpu_layers=0, cache_ram_mib=100
    )
    assert two.host - 100 * MiB < one.host  # two slots' logits, not four


# ------------------------------------------- against the real llama-server


def _server_figures(binary: Path, model: Path, ctx: int, args: Sequence[str]) -> dict[str, float]:
    """MiB of llama-server's own KV, compute and output buffers, from its log."""
    where = short_tempdir()
    socket = where / "s.sock"
    command = [str(binary), "-m", str(model), "-c", str(ctx), "--host", str(socket)]
    command += ["--threads", "1", "-lv", "4", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        # A plain socket until it listens: httpx's transport can leave the
        # socket of a refused connect to the garbage collector (a ResourceWarning
        # that fails the test at a random later point).
        while time.monotonic() < deadline and process.poll() is None:
            with socketlib.socket(socketlib.AF_UNIX) as probe:
                if probe.connect_ex(str(socket)) == 0:
                    break
            time.sleep(0.02)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket))) as client:
            while time.monotonic() < deadline and process.poll() is None:
                if client.get("http://x/health").status_code == 200:  # 503 while loading
                    break
                time.sleep(0.02)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode(errors="replace")
    kv = sum(float(m) for m in re.findall(r"llama_kv_cache: size = +([\d.]+) MiB", output))
    compute = re.findall(r"CPU compute buffer size = +([\d.]+) MiB", output)
    logits = re.findall(r"CPU +output buffer size = +([\d.]+) MiB", output)
    assert compute and logits, output[-3000:]
    return {"kv": kv, "compute": float(compute[-1]) + float(logits[-1])}


def _check_against_server(binary: Path, path: Path, ctx: int, args: list[str]) -> None:
    info = read_gguf(path)
    settings = {"ctx_size": ctx, "parallel": None, "n_gpu_layers": 0}
    settings |= settings_from_args(args)
    estimate = memory_breakdown(info, **settings)
    server = _server_figures(binary, path, ctx, args)
    # The KV cache is exact: the same rules as llama.cpp's allocator.
    assert estimate.kv_cache.host / MiB == pytest.approx(server["kv"], abs=0.01)
    # The graph's scratch is calibrated: within 10 %.
    assert estimate.compute.host / MiB == pytest.approx(server["compute"], rel=0.10)


KV_CASES = [
    (2048, []),
    (8192, []),
    (4096, ["-np", "2"]),
    (3000, ["-np", "3"]),
    (4096, ["-ctk", "f32", "-ctv", "bf16"]),
    (2048, ["-np", "2", "--kv-unified"]),
    # Quantized caches need a head size that is a multiple of 32: not the demo's 16.
    (4096, ["-ctk", "q8_0", "-ctv", "q8_0"]),
]


@pytest.mark.server
@pytest.mark.parametrize(("ctx", "args"), KV_CASES[:-1])
def test_estimate_matches_llama_server_demo(
    llama_server_binary: Path, demo_models: dict[str, Path], ctx: int, args: list[str]
) -> None:
    _check_against_server(llama_server_binary, demo_models["demo-b"], ctx, args)


@pytest.mark.real_model
@pytest.mark.parametrize("model", ["smol", "gemma"])
@pytest.mark.parametrize(("ctx", "args"), [KV_CASES[1], KV_CASES[3], KV_CASES[5], KV_CASES[6]])
def test_estimate_matches_llama_server_real(
    llama_server_binary: Path,
    real_models: dict[str, Path],
    model: str,
    ctx: int,
    args: list[str],
) -> None:
    _check_against_server(llama_server_binary, real_models[model], ctx, args)


def test_type_tables_agree_with_the_gguf_package() -> None:
    import gguf

    from llamad import gguf_info

    assert {
        kind.value: (kind.name, block, size)
        for kind, (block, size) in gguf.GGML_QUANT_SIZES.items()
    } == dict(gguf_info._GGML_TYPES)
    assert {
        kind.value: kind.name.removeprefix("MOSTLY_").removeprefix("ALL_")
        for kind in gguf.LlamaFileType
        if kind.name != "GUESSED"
    } == dict(gguf_info._FILE_TYPES)
    assert gguf.GGUF_DEFAULT_ALIGNMENT == gguf_info._DEFAULT_ALIGNMENT


def test_the_daemon_does_not_pay_for_gguf() -> None:
    code = "import sys, llamad.gguf_info; print('gguf' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
