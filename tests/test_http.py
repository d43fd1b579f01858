"""The HTTP API's ASGI app under the real hypercorn, with a fake model source.

The source hands out leases whose client talks to an in-process upstream
(httpx.MockTransport), so faults the real llama-server cannot show on cue (a
full queue, a model that fails to load, a model stopped mid-stream, an
upstream that holds a token back) are exact. The real llama-server and the
real openai/anthropic clients are in tests/test_http_clients.py.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from llamad.api_keys import ApiKey, KeyRing
from llamad.config import Config, ModelConfig, parse_config
from llamad.errors import LlamadError, ModelFailed, QueueFull, RequestCancelled
from llamad.metrics import Metrics
from llamad.protocol import ModelStatus
from llamad.transport.http import HttpApi, HttpSettings, serve
from llamad.upstream import UpstreamResponse, exchange_httpx

KEY = "sk-test-key-0123456789abcdef"
DEMO_ONLY = "sk-demo-only-0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}

ROLE = b'data: {"choices":[{"delta":{"role":"assistant","content":null}}],"model":"x.gguf"}\n\n'
TOKEN = b'data: {"choices":[{"delta":{"content":"hi"}}],"model":"x.gguf"}\n\n'
FINAL = (
    b'data: {"choices":[],"model":"x.gguf","usage":{"prompt_tokens":5,"completion_tokens":2},'
    b'"timings":{"predicted_n":2,"predicted_per_second":100.0}}\n\ndata: [DONE]\n\n'
)

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


@dataclass
class FakeLease:
    name: str
    client: httpx.AsyncClient

    def exchange(
        self, method: str, target: str, body: bytes, headers: Mapping[str, str]
    ) -> contextlib.AbstractAsyncContextManager[UpstreamResponse]:
        return exchange_httpx(self.client, method, target, body, headers)


@dataclass
class FakeSource:
    config: Config
    client: httpx.AsyncClient
    fail: LlamadError | None = None
    acquired: list[tuple[str, float | None, bool]] = field(default_factory=list)

    def resolve(self, name: str) -> ModelConfig:
        return self.config.resolve(name)

    def statuses(self) -> dict[str, ModelStatus]:
        return {
            name: ModelStatus(name=name, state="ready", since=0.0) for name in self.config.models
        }

    @contextlib.asynccontextmanager
    async def acquire(
        self, name: str, *, keep_alive: float | None = None, slot: bool = True
    ) -> AsyncIterator[FakeLease]:
        self.acquired.append((name, keep_alive, slot))
        if self.fail is not None:
            raise self.fail
        yield FakeLease(self.resolve(name).name, self.client)


@dataclass
class Upstream:
    """What the fake llama-server got, and what it answers."""

    seen: list[httpx.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    respond: Handler | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        self.bodies.append(await request.aread())
        if self.respond is not None:
            return await self.respond(request)
        return httpx.Response(
            200, json={"model": "x.gguf", "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        )


@dataclass
class Api:
    url: str
    source: FakeSource
    upstream: Upstream
    app: HttpApi
    metrics: Metrics

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10, **kwargs)  # type: ignore[arg-type]


def settings(**overrides: object) -> HttpSettings:
    keys = KeyRing(
        [
            ApiKey.from_secret("full", KEY),
            ApiKey.from_secret("demo-only", DEMO_ONLY, ["demo"]),
        ]
    )
    fields: dict[str, object] = {"keys": keys, "allowed_origins": ("http://ui.example",)}
    fields.update(overrides)
    return HttpSettings(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def api(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Api]:
    config = parse_config(
        '[models.demo]\npath = "d.gguf"\naliases = ["d"]\n[models.demo-b]\npath = "b.gguf"\n',
        source=tmp_path / "models.toml",
    )
    upstream = Upstream()
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream), base_url="http://up")
    source = FakeSource(config, client)
    metrics = Metrics(source)
    app = HttpApi(source, settings(), metrics)
    port = await nursery.start(serve, app, "127.0.0.1", 0)
    yield Api(f"http://127.0.0.1:{port}", source, upstream, app, metrics)
    await client.aclose()


def chat(model: str = "demo", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_a_reply_names_the_model_asked_for_and_keep_alive_goes_to_the_pool(
    api: Api,
) -> None:
    async with api.client() as client:
        reply = await client.post(
            "/v1/chat/completions", json=chat("d", keep_alive="5m"), headers=AUTH
        )
    assert reply.status_code == 200
    assert reply.json()["model"] == "d"
    assert api.source.acquired == [("d", 300.0, True)]
    sent = json.loads(api.upstream.bodies[0])
    assert "keep_alive" not in sent and sent["model"] == "d"
    assert api.upstream.seen[0].url.path == "/v1/chat/completions"
    assert "authorization" not in api.upstream.seen[0].headers  # the key stays here


async def test_a_stream_passes_each_event_on_as_it_arrives(api: Api) -> None:
    gate = trio.Event()

    async def events() -> AsyncIterator[bytes]:
        yield ROLE
        yield TOKEN
        await gate.wait()  # the rest is held back until the client has the first token
        yield TOKEN + FINAL

    async def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())

    api.upstream.respond = respond
    received: list[bytes] = []
    async with (
        api.client() as client,
        client.stream(
            "POST", "/v1/chat/completions", json=chat(stream=True), headers=AUTH
        ) as reply,
    ):
        assert reply.headers["content-type"] == "text/event-stream"
        async with contextlib.aclosing(reply.aiter_bytes()) as chunks:  # type: ignore[type-var]
            async for data in chunks:
                received.append(data)
                if b'"content":"hi"' in b"".join(received):
                    gate.set()
    assert gate.is_set()
    text = b"".join(received)
    assert text.count(b'"model":"demo"') == 4 and b"x.gguf" not in text
    assert text.endswith(b"data: [DONE]\n\n")
    await trio.testing.wait_all_tasks_blocked()  # the server counts after the last byte
    assert _sample(api.metrics, "llamad_tokens_total", model="demo", direction="out") == 2
    assert _sample(api.metrics, "llamad_time_to_first_token_seconds_count", model="demo") == 1


async def test_a_client_that_leaves_mid_stream_cancels_upstream(api: Api) -> None:
    closed = trio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            yield ROLE
            while True:
                yield TOKEN
                await trio.sleep(0.001)
        finally:
            closed.set()

    async def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=endless())

    api.upstream.respond = respond
    # A plain socket, so that leaving is exactly a closed connection.
    body = json.dumps(chat(stream=True)).encode()
    port = int(api.url.rpartition(":")[2])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    received = b""
    while b'"content":"hi"' not in received:
        received += await stream.receive_some()
    await stream.aclose()
    left = trio.current_time()
    with trio.fail_after(2):
        await closed.wait()
    assert trio.current_time() - left < 0.1
    await trio.testing.wait_all_tasks_blocked()
    status = {"model": "demo", "endpoint": "chat_completions", "status": "499"}
    assert _sample(api.metrics, "llamad_requests_total", **status) == 1


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (QueueFull("demo", 4, retry_after=2.5), 429, "queue_full"),
        (ModelFailed("demo", "invalid magic characters"), 503, "model_failed"),
        (RequestCancelled("model 'demo' was stopped"), 503, "cancelled"),
    ],
)
async def test_pool_errors_become_statuses(
    api: Api, error: LlamadError, status: int, code: str
) -> None:
    api.source.fail = error
    async with api.client() as client:
        reply = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        anthropic = await client.post(
            "/v1/messages", json=chat(max_tokens=3), headers={"x-api-key": KEY}
        )
    assert reply.status_code == status
    assert reply.json()["error"]["code"] == code
    assert reply.json()["error"]["message"] == str(error)
    if status == 429:
        assert reply.headers["retry-after"] == "3"
    assert anthropic.status_code == status
    assert anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["message"] == str(error)


async def test_a_model_stopped_mid_stream_ends_the_stream_with_an_error_event(api: Api) -> None:
    async def cut() -> AsyncIterator[bytes]:
        yield TOKEN
        raise RequestCancelled("request cancelled: model 'demo' was stopped (unloaded)")

    async def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=cut())

    api.upstream.respond = respond
    async with api.client() as client:
        reply = await client.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
    assert reply.status_code == 200
    last = reply.content.strip().split(b"\n\n")[-1]
    assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "cancelled"


async def test_request_errors(api: Api) -> None:
    async with api.client() as client:
        unknown = await client.post("/v1/chat/completions", json=chat("nope"), headers=AUTH)
        bad_json = await client.post("/v1/chat/completions", content=b"{oops", headers=AUTH)
        no_model = await client.post("/v1/embeddings", json={"input": "x"}, headers=AUTH)
        wrong_method = await client.get("/v1/chat/completions", headers=AUTH)
        no_route = await client.get("/v2/everything", headers=AUTH)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == (
        "unknown model 'nope'; configured models: demo, demo-b"
    )
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    assert no_model.status_code == 400 and "names no model" in no_model.json()["error"]["message"]
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert no_route.status_code == 404 and no_route.json()["error"]["type"] == "not_found_error"
    for reply in (unknown, bad_json, no_model, wrong_method, no_route):
        assert reply.headers["content-type"] == "application/json"


async def test_a_bug_is_a_500_with_a_json_body_not_a_traceback(api: Api) -> None:
    def broken() -> dict[str, ModelStatus]:
        raise RuntimeError("bug")

    api.source.statuses = broken  # type: ignore[method-assign]
    async with api.client() as client:
        reply = await client.get("/v1/models", headers=AUTH)
    assert reply.status_code == 500
    assert reply.json()["error"]["code"] == "internal"
    assert "Traceback" not in reply.text


async def test_bodies_over_the_limit_are_refused_before_being_read(api: Api) -> None:
    api.app.settings = settings(max_body_bytes=1000)
    big = json.dumps(chat(padding="x" * 5000)).encode()

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for start in range(0, len(big), 500):
            yield big[start : start + 500]

    async with api.client() as client:
        declared = await client.post("/v1/chat/completions", content=big, headers=AUTH)
        streamed = await client.post("/v1/chat/completions", content=chunks(), headers=AUTH)
    for reply in (declared, streamed):
        assert reply.status_code == 413
        assert reply.json()["error"]["code"] == "too_large"
    assert api.upstream.seen == []


async def test_keys(api: Api) -> None:
    async with api.client() as client:
        none = await client.get("/v1/models")
        wrong = await client.get("/v1/models", headers={"authorization": "Bearer sk-nope"})
        health = await client.get("/health")
        scoped = {"authorization": f"Bearer {DEMO_ONLY}"}
        listed = await client.get("/v1/models", headers=scoped)
        refused = await client.post("/v1/chat/completions", json=chat("demo-b"), headers=scoped)
        allowed = await client.post("/v1/chat/completions", json=chat("d"), headers=scoped)
        metrics_scoped = await client.get("/metrics", headers=scoped)
        metrics_full = await client.get("/metrics", headers=AUTH)
        upstream_refused = await client.get("/upstream/demo-b/props", headers=scoped)
    assert none.status_code == 401 and none.headers["www-authenticate"].startswith("Bearer")
    assert "llamactl api-key" in none.json()["error"]["message"]
    assert wrong.status_code == 401
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert [m["id"] for m in listed.json()["data"]] == ["demo", "d"]
    assert refused.status_code == 403
    assert refused.json()["error"]["message"] == (
        "API key 'demo-only' may not use model 'demo-b'; it may use: demo"
    )
    assert allowed.status_code == 200
    assert metrics_scoped.status_code == 403
    assert metrics_full.status_code == 200
    assert metrics_full.headers["content-type"].startswith("text/plain")
    assert upstream_refused.status_code == 403
    refused_keys = {"model": "demo-b", "endpoint": "upstream", "status": "403"}
    assert _sample(api.metrics, "llamad_requests_total", **refused_keys) == 1


async def test_auth_none_needs_no_key(api: Api) -> None:
    api.app.settings = settings(keys=None)
    async with api.client() as client:
        reply = await client.get("/v1/models")
    assert reply.status_code == 200 and len(reply.json()["data"]) == 3


async def test_host_origin_and_cors(api: Api) -> None:
    async with api.client() as client:
        rebinding = await client.get("/health", headers={"host": "attacker.example:8766"})
        loopback_upper = await client.get("/health", headers={"host": "LOCALHOST:8766"})
        foreign = await client.get("/v1/models", headers={**AUTH, "origin": "http://evil.example"})
        listed = await client.get("/v1/models", headers={**AUTH, "origin": "http://ui.example"})
        preflight = await client.options(
            "/v1/chat/completions",
            headers={
                "origin": "http://UI.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
        foreign_preflight = await client.options(
            "/v1/chat/completions",
            headers={"origin": "http://evil.example", "access-control-request-method": "POST"},
        )
    assert rebinding.status_code == 403 and "allowed_hosts" in rebinding.json()["error"]["message"]
    assert loopback_upper.status_code == 200
    assert foreign.status_code == 403 and "access-control-allow-origin" not in foreign.headers
    assert listed.status_code == 200
    assert listed.headers["access-control-allow-origin"] == "http://ui.example"
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert foreign_preflight.status_code == 403


async def test_upstream_passes_any_request_through(api: Api) -> None:
    async def respond(request: httpx.Request) -> httpx.Response:
        seen = {"path": request.url.path, "query": request.url.query.decode()}
        return httpx.Response(201, content=_streamed(json.dumps(seen).encode()))

    api.upstream.respond = respond
    async with api.client() as client:
        reply = await client.post("/upstream/d/tokenize?x=1", json={"content": "a"}, headers=AUTH)
        nameless = await client.get("/upstream/", headers=AUTH)
    assert reply.status_code == 201
    assert reply.json() == {"path": "/tokenize", "query": "x=1"}
    assert api.upstream.seen[0].method == "POST"
    assert json.loads(api.upstream.bodies[0]) == {"content": "a"}
    assert api.source.acquired == [("d", None, False)]  # no slot for /slots
    assert nameless.status_code == 404


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return math.nan


async def _streamed(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_a_client_hanging_up_after_done_was_served(api: Api) -> None:
    async def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=_streamed(TOKEN + FINAL)
        )

    api.upstream.respond = respond
    body = json.dumps(chat(stream=True)).encode()
    port = int(api.url.rpartition(":")[2])
    for _ in range(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while b"data: [DONE]" not in received:  # as a client does: stop reading at [DONE]
            received += await stream.receive_some()
        await stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    served = {"model": "demo", "endpoint": "chat_completions", "status": "200"}
    assert _sample(api.metrics, "llamad_requests_total", **served) == 20
    assert _sample(api.metrics, "llamad_tokens_total", model="demo", direction="out") == 40


async def test_a_client_hanging_up_at_done_before_the_upstream_body_ends_was_served(
    api: Api,
) -> None:
    # llama-server writes [DONE] and the end of its chunked body apart; a
    # client that hangs up in between was served all the same.
    body_end = trio.Event()

    async def events() -> AsyncIterator[bytes]:
        yield TOKEN + FINAL
        await body_end.wait()

    async def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())

    api.upstream.respond = respond
    body = json.dumps(chat(stream=True)).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", int(api.url.rpartition(":")[2]))
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    received = b""
    while b"data: [DONE]" not in received:
        received += await stream.receive_some()
    await stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    body_end.set()
    await trio.testing.wait_all_tasks_blocked()
    served = {"model": "demo", "endpoint": "chat_completions", "status": "200"}
    assert _sample(api.metrics, "llamad_requests_total", **served) == 1
    gone = {"model": "demo", "endpoint": "chat_completions", "status": "499"}
    assert math.isnan(_sample(api.metrics, "llamad_requests_total", **gone))  # none counted
