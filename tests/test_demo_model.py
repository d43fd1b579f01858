"""The demo models: deterministic, distinct, well-formed, and loadable by the real llama-server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import string
import subprocess
import time
from pathlib import Path
from typing import Any

import gguf
import httpx
import pytest

import llamad.demo_model
from llamad.demo_model import DEMO_VARIANTS, write_demo_model
from tests.conftest import short_tempdir

# What a reply may contain: the word pieces' characters, never a byte or control token.
REPLY_CHARACTERS = set(string.ascii_lowercase + ".,!? ")


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def test_deterministic_and_distinct(tmp_path: Path) -> None:
    first = write_demo_model(tmp_path / "a.gguf", "demo").read_bytes()
    again = write_demo_model(tmp_path / "b.gguf", "demo").read_bytes()
    other = write_demo_model(tmp_path / "c.gguf", "demo-b").read_bytes()
    assert first == again
    assert first != other
    assert 300_000 < len(first) < 1_000_000
    assert 300_000 < len(other) < 1_000_000


@pytest.mark.parametrize(("variant", "n_layer"), [("demo", 2), ("demo-b", 3)])
def test_metadata(tmp_path: Path, variant: str, n_layer: int) -> None:
    reader = gguf.GGUFReader(write_demo_model(tmp_path / "d.gguf", variant))
    assert _field(reader, "general.architecture") == "llama"
    assert variant in _field(reader, "general.name")
    assert _field(reader, "llama.context_length") == DEMO_VARIANTS[variant].n_ctx >= 2048
    assert _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "llama.block_count") == n_layer
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.attention.head_count_kv") == 4
    assert _field(reader, "llama.rope.dimension_count") == 16

    assert _field(reader, "tokenizer.ggml.model") == "llama"
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    scores: list[float] = _field(reader, "tokenizer.ggml.scores")
    assert 300 < len(tokens) == len(types) == len(scores) < 1000
    assert len(set(tokens)) == len(tokens)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert _field(reader, "tokenizer.ggml.unknown_token_id") == 0
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[3:259]) == {gguf.TokenType.BYTE}
    assert set(types[259:]) == {gguf.TokenType.NORMAL}
    assert all(t.startswith("▁") for t in tokens[259:] if len(t) > 1)
    assert "im_start" in _field(reader, "tokenizer.chat_template")

    tensors = {t.name: t for t in reader.tensors}
    assert tensors["token_embd.weight"].data.shape == (len(tokens), 64)
    assert tensors["output.weight"].data.shape == (len(tokens), 64)
    assert f"blk.{n_layer - 1}.ffn_down.weight" in tensors
    assert f"blk.{n_layer}.ffn_down.weight" not in tensors


def test_vocabularies_differ(tmp_path: Path) -> None:
    def words(variant: str) -> set[str]:
        reader = gguf.GGUFReader(write_demo_model(tmp_path / f"{variant}.gguf", variant))
        return set(_field(reader, "tokenizer.ggml.tokens"))

    assert "▁the" in words("demo") and "▁hello" in words("demo")
    assert words("demo") != words("demo-b")


def test_unknown_variant(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'demo-c'; choose one of: demo, demo-b"):
        write_demo_model(tmp_path / "x.gguf", "demo-c")
    assert {"demo", "demo-b"} <= set(DEMO_VARIANTS)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_atomic_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "deep" / "er" / "m.gguf"
    old_umask = os.umask(0o022)
    try:
        write_demo_model(target, "demo-b")
    finally:
        os.umask(old_umask)
    assert target.stat().st_mode & 0o777 == 0o644  # the umask applies, not mkstemp's 0o600
    before = target.read_bytes()

    def fail(filename: Path, variant: str, spec: object) -> None:
        filename.write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(llamad.demo_model, "_write", fail)
    with pytest.raises(OSError, match="disk full"):
        write_demo_model(target, "demo")
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["m.gguf"]  # no temporary left
    monkeypatch.undo()
    write_demo_model(target, "demo")  # replaces an existing file
    assert target.read_bytes() != before


def _wait_ready(process: subprocess.Popen[bytes], sock: Path, log: Path) -> float:
    """Seconds from now until /health says 200; fails with the server's log."""
    start = time.monotonic()
    deadline = start + 30

    def check_alive() -> None:
        if process.poll() is not None:
            pytest.fail(f"llama-server exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"llama-server not ready within 30 s:\n{log.read_text()}")

    # Connect with a plain socket first: httpx leaks the socket of a refused Unix
    # connection, which filterwarnings=error turns into a failure.
    while True:
        check_alive()
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
                break
            except OSError:
                pass
        time.sleep(0.005)
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://x") as client:
        while client.get("/health").status_code != 200:  # 503 while loading
            check_alive()
            time.sleep(0.005)
    return time.monotonic() - start


@pytest.mark.server
@pytest.mark.parametrize("variant", ["demo", "demo-b"])
def test_real_llama_server_loads_and_chats(llama_server_binary: Path, variant: str) -> None:
    work = short_tempdir()
    model = write_demo_model(work / f"{variant}.gguf", variant)
    sock, log = work / "s.sock", work / "server.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [str(llama_server_binary), "-m", str(model), "--host", str(sock), "-c", "2048"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(process, sock, log)
        request = {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 20,
            "stream": True,
        }
        chunks: list[dict[str, Any]] = []
        # llama-server may close a kept-alive connection after a streamed reply;
        # one connection per request keeps a reused, closed one out of the test.
        transport = httpx.HTTPTransport(uds=str(sock))
        headers = {"Connection": "close"}
        with (
            httpx.Client(transport=transport, base_url="http://x", headers=headers) as client,
            client.stream("POST", "/v1/chat/completions", json=request, timeout=30) as reply,
        ):
            assert reply.status_code == 200
            for line in reply.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line.removeprefix("data: ")))
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text.strip(), chunks
        assert set(text) <= REPLY_CHARACTERS, text  # words only: no byte or control tokens
        last = chunks[-1]
        assert last["choices"][0]["finish_reason"] == "length"  # never an early </s>
        assert last["timings"]["predicted_n"] == 20
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(work, ignore_errors=True)
