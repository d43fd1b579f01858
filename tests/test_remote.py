"""Remote model servers: the dialect, the checks, TLS, against a real llama-server."""

from __future__ import annotations

import http.server
import json
import os
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from llamad.config import parse_config
from llamad.errors import RemoteUnavailable
from llamad.events import EventHub
from llamad.remote import RemoteServer, RemoteTransport, estimated, with_model
from tests.conftest import free_port


def start_llama_server(
    binary: Path, model: Path, alias: str, *extra: str, port: int | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """A plain llama-server on a loopback port: an OpenAI-compatible server like any other."""
    port = port or free_port()
    process = subprocess.Popen(
        [
            *(str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port)),
            *("--alias", alias, "--ctx-size", "512", "--threads", "1", *extra),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process, port
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    process.kill()
    raise AssertionError("llama-server did not become ready")


@pytest.fixture
def upstream(llama_server_binary: Path, demo_models: dict[str, Path]) -> Iterator[int]:
    process, port = start_llama_server(
        llama_server_binary, demo_models["demo"], "far-demo", "--api-key", "sesame"
    )
    try:
        yield port
    finally:
        process.kill()
        process.wait()


@asynccontextmanager
async def remote(model_table: str) -> AsyncIterator[RemoteServer]:
    text = "[daemon]\nhealth_interval_sec = 0.2\n[models.far]\n" + model_table
    config = parse_config(text, source=Path("/tmp/models.toml"), env=os.environ)
    server = RemoteServer(config.models["far"], EventHub())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def test_a_remote_llama_server_serves_chats_with_our_key_and_its_name(
    upstream: int,
) -> None:
    table = f'url = "http://127.0.0.1:{upstream}/v1"\napi_key = "sesame"\n'
    async with remote(table + 'remote_model = "far-demo"\n') as server:
        await server.precheck()
        server.start()
        with trio.fail_after(10):
            await server.wait_until(lambda: server.state == "ready")
        assert server.status().remote and server.status().endpoint == (
            f"http://127.0.0.1:{upstream}"
        )
        with server.hold():
            answer = await server.client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            )
        assert answer.status_code == 200
        assert answer.json()["model"] == "far-demo"  # the name it knows the model by
        # llama-server's own endpoints are reached directly.
        props = await server.client.get("/props")
        assert props.status_code == 200 and "x-llamad-estimate" not in props.headers


async def test_a_wrong_name_or_key_is_refused_with_the_fix(upstream: int) -> None:
    base = f'url = "http://127.0.0.1:{upstream}"\n'
    async with remote(base + 'api_key = "sesame"\n') as server:
        with pytest.raises(RemoteUnavailable) as refused:
            await server.precheck()
        assert str(refused.value) == (
            f"model 'far': remote server http://127.0.0.1:{upstream} does not serve a model "
            "named 'far' (it serves: far-demo); set remote_model in [models.far]"
        )
    async with remote(base + 'api_key = "wrong"\nremote_model = "far-demo"\n') as server:
        with pytest.raises(RemoteUnavailable, match=r"refused our API key \(HTTP 401\)"):
            await server.precheck()


async def test_a_server_that_stops_answering_backs_off_then_comes_back(
    llama_server_binary: Path, demo_models: dict[str, Path]
) -> None:
    process, port = start_llama_server(llama_server_binary, demo_models["demo"], "far-demo")
    table = f'url = "http://127.0.0.1:{port}"\nremote_model = "far-demo"\nhealth_failures = 2\n'
    try:
        async with remote(table) as server:
            server.start()
            with trio.fail_after(10):
                await server.wait_until(lambda: server.state == "ready")
            process.kill()
            process.wait()
            with trio.fail_after(10):
                await server.wait_until(lambda: server.state == "backoff" and bool(server.blocked))
            assert "is not answering: connection refused" in server.reason
            process, _ = start_llama_server(
                llama_server_binary, demo_models["demo"], "far-demo", port=port
            )
            with trio.fail_after(10):
                await server.wait_until(lambda: server.state == "ready")
            assert server.status().restarts == 1
    finally:
        process.kill()
        process.wait()


# ------------------------------------------------------------------- TLS


def _certificate(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


class _OpenAIish(http.server.BaseHTTPRequestHandler):
    """An OpenAI-style server with only /v1/models (no /health, no llama-server endpoints)."""

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            body = json.dumps({"object": "list", "data": [{"id": "gpt-x"}]}).encode()
            self.send_response(200)
        else:
            body = b'{"error": {"message": "not found"}}'
            self.send_response(404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    key, cert = _certificate(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OpenAIish)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], cert
    finally:
        server.shutdown()
        server.server_close()


async def test_tls_is_verified_and_a_private_ca_is_trusted_only_when_given(
    tls_server: tuple[int, Path],
) -> None:
    port, cert = tls_server
    table = f'url = "https://127.0.0.1:{port}"\nremote_model = "gpt-x"\nctx_size = 4096\n'
    async with remote(table) as server:
        with pytest.raises(RemoteUnavailable, match="its TLS certificate is not trusted"):
            await server.precheck()
    async with remote(table + f'ca_file = "{cert}"\n') as server:
        await server.precheck()
        server.start()
        with trio.fail_after(10):
            await server.wait_until(lambda: server.state == "ready")
        # No llama-server endpoints there: the context is models.toml's, tokens per byte.
        props = (await server.client.get("/props")).json()
        assert props["default_generation_settings"]["n_ctx"] == 4096
        tokens = await server.client.post("/tokenize", json={"content": "héllo"})
        assert len(tokens.json()["tokens"]) == len("héllo".encode())


# ----------------------------------------------------------- the dialect


def test_an_openai_body_carries_the_remote_name() -> None:
    body = json.dumps({"messages": [], "stream": True}).encode()
    assert json.loads(with_model(body, "qwen2.5-7b")) == {
        "messages": [],
        "stream": True,
        "model": "qwen2.5-7b",
    }
    assert with_model(b"not json", "x") == b"not json"


def test_estimates_never_undercount() -> None:
    tokens = estimated("/tokenize", json.dumps({"content": "ab€"}).encode(), 2048)
    assert tokens is not None and len(tokens.json()["tokens"]) == 5
    assert estimated("/slots", b"", 2048) is None


async def test_llama_endpoints_go_direct_then_upstream_then_estimate() -> None:
    seen: list[tuple[str, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization")))
        if request.url.path == "/upstream/qwen/props":  # another llamad
            return httpx.Response(200, json={"n_ctx": 32768})
        return httpx.Response(404)

    transport = RemoteTransport(
        httpx.MockTransport(answer),
        base="http://far:8766",
        remote_name="qwen",
        key=lambda: "k1",
        ctx_size=2048,
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://far:8766") as client:
        assert (await client.get("/props")).json() == {"n_ctx": 32768}
        assert seen == [("/props", "Bearer k1"), ("/upstream/qwen/props", "Bearer k1")]
        seen.clear()
        await client.post("/tokenize", json={"content": "x"})
        assert seen == [("/upstream/qwen/tokenize", "Bearer k1")]  # the route is remembered
