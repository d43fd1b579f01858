"""The HTTP API with the real openai and anthropic packages against a real llamad.

llamad runs as a process with the real llama-server and the demo models; the
clients are the ones editors, scripts and agent frameworks use.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamad.protocol import Status, StatusReply
from tests.conftest import Llamad, demo_config

pytestmark = pytest.mark.server

MakeLlamad = Callable[..., Llamad]
LIMITED_KEY = "sk-only-demo-0123456789abcdef"
HELLO = [{"role": "user", "content": "hello"}]


def start(make_llamad: MakeLlamad, models: str, daemon: str = "") -> tuple[Llamad, str, str]:
    """A started llamad with demo ready; returns it, the HTTP API's address and the key."""
    handle = make_llamad(models, 'default_model = "demo"\n' + daemon)
    handle.start()
    handle.wait_for("demo", lambda s: s.state == "ready")
    with handle.client() as client:
        reply = client.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply) and reply.http is not None
    key = handle.ctl("api-key")
    assert key.returncode == 0, key.stderr
    return handle, reply.http, key.stdout.strip()


_clients: list[openai.OpenAI | anthropic.Anthropic] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def openai_client(address: str, key: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"http://{address}/v1", api_key=key, max_retries=0)
    _clients.append(client)
    return client


def metric(address: str, key: str, name: str, **labels: str) -> float:
    text = httpx.get(f"http://{address}/metrics", headers={"authorization": f"Bearer {key}"}).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_openai_client_lists_and_chats(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon, address, key = start(make_llamad, demo_config(demo_models, aliases=[]))
    status = daemon.ctl("status")
    assert f"http   http://{address}/v1" in status.stdout
    exports = daemon.ctl("api-key", "--env").stdout
    assert f"export OPENAI_BASE_URL=http://{address}/v1" in exports
    assert f"export ANTHROPIC_API_KEY={key}" in exports
    client = openai_client(address, key)
    listed = {model.id: model for model in client.models.list()}
    assert set(listed) == {"demo", "demo-b"}
    assert listed["demo"].model_extra is not None
    assert listed["demo"].model_extra["llamad"]["state"] == "ready"

    reply = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=8)
    assert reply.model == "demo"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 8

    began = time.monotonic()
    first: float | None = None
    text = ""
    models = set()
    for chunk in client.chat.completions.create(
        model="demo", messages=HELLO, max_tokens=16, stream=True
    ):
        models.add(chunk.model)
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.monotonic() - began
            text += chunk.choices[0].delta.content
    assert models == {"demo"}
    assert text and first is not None
    completion = client.completions.create(model="demo", prompt="once upon", max_tokens=4)
    assert completion.model == "demo" and completion.choices[0].text
    auth = {"authorization": f"Bearer {key}"}
    props = httpx.get(f"http://{address}/upstream/demo-b/props", headers=auth, timeout=30)
    assert props.status_code == 200 and "default_generation_settings" in props.json()
    tokens = httpx.post(
        f"http://{address}/upstream/demo/tokenize", json={"content": "hello"}, headers=auth
    )
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    # Nothing of this is chat history: that is llamad's own protocol's.
    history = json.loads(daemon.ctl("history", "list", "--json").stdout)
    assert history == []


def test_one_client_asks_for_one_model_then_another(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    # Room for one model: every change of model is a swap.
    _daemon, address, key = start(make_llamad, demo_config(demo_models), "max_models = 1\n")
    client = openai_client(address, key)
    for model in ("demo", "demo-b", "demo"):
        reply = client.chat.completions.create(model=model, messages=HELLO, max_tokens=4)
        assert reply.model == model
    assert metric(address, key, "llamad_model_evictions_total", model="demo") == 1
    assert metric(address, key, "llamad_model_evictions_total", model="demo-b") == 1
    assert metric(address, key, "llamad_model_loads_total", model="demo") == 2


def test_keep_alive_zero_unloads_once_the_request_is_done(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon, address, key = start(make_llamad, demo_config(demo_models))
    client = openai_client(address, key)
    reply = client.chat.completions.create(
        model="demo-b", messages=HELLO, max_tokens=4, extra_body={"keep_alive": 0}
    )
    assert reply.model == "demo-b"
    daemon.wait_for("demo-b", lambda s: s.state == "stopped", timeout=10)
    assert daemon.status("demo").state == "ready"  # the others are left alone
    assert metric(address, key, "llamad_model_idle_unloads_total", model="demo-b") == 1


def test_a_full_queue_is_429_with_retry_after(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    _daemon, address, key = start(
        make_llamad, demo_config(demo_models, ctx_size=8192, max_concurrent=1)
    )
    client = openai_client(address, key)
    stream = client.chat.completions.create(
        model="demo", messages=HELLO, max_tokens=4000, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))  # the first request holds the model's one place
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="demo", messages=HELLO, max_tokens=2)
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert "max_concurrent" in str(refused.value)
    stream.close()


def test_two_models_stream_in_parallel(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon, address, key = start(make_llamad, demo_config(demo_models, ctx_size=2048))
    for name in ("demo", "demo-b"):  # both resident first: the streams, not loads, overlap
        assert daemon.ctl("load", name).returncode == 0
    client = openai_client(address, key)
    results: dict[str, str] = {}
    generated: dict[str, int] = {}
    first: dict[str, float] = {}
    finished: dict[str, float] = {}
    errors: list[BaseException] = []

    def stream(model: str) -> None:
        try:
            text = ""
            for chunk in client.chat.completions.create(
                model=model,
                messages=HELLO,
                max_tokens=1500,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            ):
                assert chunk.model == model
                if chunk.usage is not None:
                    generated[model] = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    first.setdefault(model, time.monotonic())
                    text += chunk.choices[0].delta.content
            finished[model] = time.monotonic()
            results[model] = text
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(m,)) for m in ("demo", "demo-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert set(results) == {"demo", "demo-b"} and all(results.values())
    assert generated == {"demo": 1500, "demo-b": 1500}  # neither was cut short
    # Both streamed at the same time: neither waited for the other to finish.
    assert max(first.values()) < min(finished.values())


def test_anthropic_client(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    _daemon, address, key = start(make_llamad, demo_config(demo_models))
    client = anthropic.Anthropic(base_url=f"http://{address}", api_key=key, max_retries=0)
    _clients.append(client)
    message = client.messages.create(model="demo", max_tokens=8, messages=HELLO)
    assert message.model == "demo"
    assert message.content and message.usage.output_tokens == 8
    with client.messages.stream(model="demo-b", max_tokens=8, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.model == "demo-b"
    counted = client.messages.count_tokens(model="demo-b", messages=HELLO)
    assert counted.input_tokens > 0
    listed = [model.id for model in client.models.list()]
    assert listed == ["demo", "demo-b"]


def test_embeddings(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    models = demo_config(demo_models) + (
        f'[models.embed]\npath = "{demo_models["demo"]}"\nctx_size = 512\n'
        'args = ["--threads", "1", "--embeddings", "--pooling", "mean"]\n'
    )
    _daemon, address, key = start(make_llamad, models)
    client = openai_client(address, key)
    result = client.embeddings.create(model="embed", input=["a cat", "a dog"])
    assert result.model == "embed"
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == len(result.data[1].embedding) > 8


def _slots_busy(endpoint: str) -> bool:
    transport = httpx.HTTPTransport(uds=endpoint)
    with httpx.Client(transport=transport, base_url="http://x", timeout=5) as client:
        return any(slot["is_processing"] for slot in client.get("/slots").json())


def test_a_client_leaving_mid_stream_frees_the_slot(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon, address, key = start(make_llamad, demo_config(demo_models, ctx_size=8192))
    endpoint = daemon.status("demo").endpoint
    host, _, port = address.rpartition(":")
    body = json.dumps(
        {
            "model": "demo",
            "messages": HELLO,
            "max_tokens": 4000,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    freed_after: list[float] = []
    for _ in range(5):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(request)
            received = b""
            while received.count(b'"delta":{"content"') < 20:
                received += sock.recv(65536)
            assert _slots_busy(endpoint)
            sock.close()
            left = time.monotonic()
        while _slots_busy(endpoint):
            assert time.monotonic() - left < 5, "the slot kept generating"
            time.sleep(0.002)
        freed_after.append(time.monotonic() - left)
    # The goal is 100 ms; the median of five keeps one slow moment of a shared
    # CI machine from deciding it.
    print(f"slot freed after {[round(t * 1000, 1) for t in freed_after]} ms")
    assert statistics.median(freed_after) < 0.1, freed_after
    assert metric(address, key, "llamad_requests_total", model="demo",
                  endpoint="chat_completions", status="499") == 5  # fmt: skip


def test_who_may_use_it(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "demo only"\nkey = "{LIMITED_KEY}"\nmodels = ["demo"]\n')
    keys.chmod(0o600)
    daemon = f'api_keys_file = "{keys}"\nallowed_origins = ["http://ok.example"]\n'
    handle, address, _key = start(make_llamad, demo_config(demo_models), daemon)

    limited = openai_client(address, LIMITED_KEY)
    reply = limited.chat.completions.create(model="demo", messages=HELLO, max_tokens=2)
    assert reply.model == "demo"
    with pytest.raises(openai.PermissionDeniedError) as refused:
        limited.chat.completions.create(model="demo-b", messages=HELLO, max_tokens=2)
    assert "may not use model 'demo-b'" in str(refused.value)
    assert [m.id for m in limited.models.list()] == ["demo"]
    with pytest.raises(openai.AuthenticationError):
        openai_client(address, "sk-wrong-wrong-wrong-wrong").models.list()
    url = f"http://{address}"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    auth = {"authorization": f"Bearer {LIMITED_KEY}"}
    rebinding = httpx.get(f"{url}/v1/models", headers={**auth, "host": "evil.example"})
    assert rebinding.status_code == 403
    page = httpx.get(f"{url}/v1/models", headers={**auth, "origin": "http://evil.example"})
    assert page.status_code == 403
    allowed = httpx.get(f"{url}/v1/models", headers={**auth, "origin": "http://ok.example"})
    assert allowed.headers["access-control-allow-origin"] == "http://ok.example"
    huge = httpx.post(
        f"{url}/v1/chat/completions",
        content=b'{"model": "demo", "padding": "' + b"x" * 20_000_000 + b'"}',
        headers={**auth, "content-type": "application/json"},
        timeout=30,
    )
    assert huge.status_code == 413
    assert huge.json()["error"]["code"] == "too_large"
    # The daemon carried on.
    reply = limited.chat.completions.create(model="demo", messages=HELLO, max_tokens=2)
    assert reply.model == "demo"
    # A reload re-reads the keys file: the limited key now may use demo-b too,
    # but not from a reload that is rejected for something else (the binary).
    keys.write_text(f'[[keys]]\nname = "both"\nkey = "{LIMITED_KEY}"\n')
    config = handle.config_path.read_text()
    binary = config.split('llama_server = "', 1)[1].split('"', 1)[0]
    handle.config_path.write_text(config.replace(binary, "/nonexistent/llama-server"))
    rejected = handle.ctl("reload")
    assert rejected.returncode == 1 and "is not an executable file" in rejected.stderr
    with pytest.raises(openai.PermissionDeniedError):
        limited.chat.completions.create(model="demo-b", messages=HELLO, max_tokens=2)
    handle.config_path.write_text(config)
    reloaded = handle.ctl("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    reply = limited.chat.completions.create(model="demo-b", messages=HELLO, max_tokens=2)
    assert reply.model == "demo-b"


def test_metrics_move_with_requests(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    daemon, address, key = start(make_llamad, demo_config(demo_models))
    labels = {"model": "demo", "endpoint": "chat_completions", "status": "200"}
    before = metric(address, key, "llamad_requests_total", **labels)
    tokens_before = metric(address, key, "llamad_tokens_total", model="demo", direction="out")
    client = openai_client(address, key)
    client.chat.completions.create(model="demo", messages=HELLO, max_tokens=5)
    for _ in client.chat.completions.create(
        model="demo", messages=HELLO, max_tokens=7, stream=True
    ):
        pass
    chat = daemon.ctl("chat", "--max-tokens", "3", "hi")
    assert chat.returncode == 0, chat.stderr
    assert metric(address, key, "llamad_requests_total", **labels) == before + 2
    assert metric(address, key, "llamad_tokens_total", model="demo", direction="out") == (
        tokens_before + 5 + 7 + 3
    )
    assert metric(address, key, "llamad_requests_total", model="demo", endpoint="llamad_chat",
                  status="complete") == 1  # fmt: skip
    assert metric(address, key, "llamad_model_loads_total", model="demo") == 1
    assert metric(address, key, "llamad_model_state", model="demo", state="ready") == 1
    assert metric(address, key, "llamad_time_to_first_token_seconds_count", model="demo") >= 2
    assert metric(address, key, "process_resident_memory_bytes") > 1e6


def test_auth_none_on_loopback(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    handle = make_llamad(demo_config(demo_models), 'default_model = "demo"\nauth = "none"\n')
    handle.start()
    handle.wait_for("demo", lambda s: s.state == "ready")
    with handle.client() as control:
        reply = control.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply) and reply.http is not None
    assert reply.api_key_file is None
    assert "no key needed" in handle.ctl("status").stdout
    refused = handle.ctl("api-key")
    assert refused.returncode == 1 and 'auth = "none"' in refused.stderr
    listed = httpx.get(f"http://{reply.http}/v1/models")
    assert listed.status_code == 200 and len(listed.json()["data"]) == 2
