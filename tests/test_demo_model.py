"""The demo models: deterministic, distinct, and loadable by the real llama-server."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import gguf
import httpx
import pytest

from llamad.demo_model import DEMO_VARIANTS, write_demo_model
from tests.conftest import short_tempdir


def _field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def test_deterministic_and_distinct(tmp_path: Path) -> None:
    first = write_demo_model(tmp_path / "a.gguf", "demo").read_bytes()
    again = write_demo_model(tmp_path / "b.gguf", "demo").read_bytes()
    other = write_demo_model(tmp_path / "c.gguf", "demo-b").read_bytes()
    assert first == again
    assert first != other
    assert 300_000 < len(first) < 1_500_000


def test_metadata(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_demo_model(tmp_path / "d.gguf"))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert isinstance(tokens, list)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert "<0x41>" in tokens and len(tokens) > 400
    assert "im_start" in str(_field(reader, "tokenizer.chat_template"))


def test_unknown_variant(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one of: demo, demo-b"):
        write_demo_model(tmp_path / "x.gguf", "demo-c")
    assert set(DEMO_VARIANTS) == {"demo", "demo-b"}
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.server
@pytest.mark.parametrize("variant", ["demo", "demo-b"])
def test_real_llama_server_loads_and_chats(llama_server_binary: Path, variant: str) -> None:
    work = short_tempdir()
    model = write_demo_model(work / f"{variant}.gguf", variant)
    sock = work / "s.sock"
    process = subprocess.Popen(
        [str(llama_server_binary), "-m", str(model), "--host", str(sock), "-c", "512"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://x", timeout=10) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "llama-server never became ready"
                time.sleep(0.01)
            reply = client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16},
            ).json()
        assert reply["usage"]["completion_tokens"] == 16
        assert reply["choices"][0]["message"]["content"]
    finally:
        process.terminate()
        process.wait()
