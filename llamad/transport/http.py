"""The HTTP API: OpenAI- and Anthropic-compatible endpoints in front of the models.

A small hand-routed ASGI application served by hypercorn's trio worker (no
HTTP parsing here). Every request that names a model acquires it from the
model source (the pool: loading, evicting, queueing as it decides) and is
relayed to that model's llama-server; streamed answers pass through event by
event as they arrive, with the ``model`` field rewritten to the name the
client asked for (``llamad.openai_api``). Nothing is stored in chat history.

Access, in this order, for every request: the ``Host`` must be a loopback
name or listed in ``allowed_hosts`` (DNS rebinding); a request with an
``Origin`` is refused unless the origin is listed (CORS headers, preflights
included, only for listed origins); then an API key (``llamad.api_keys``),
except for ``GET /health`` and preflights. ``/metrics`` needs a key that is
not limited to some models, since it covers every model.

Errors are one JSON object in OpenAI's shape (Anthropic's on ``/v1/messages``)
with the status of the ``LlamadError`` raised; never a traceback or an empty
body. A client that disconnects cancels its request upstream at once.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    LifespanScope,
    Scope,
)

from llamad.api_keys import ApiKey, KeyRing, offered_key
from llamad.concurrency import beside
from llamad.config import Config, ModelConfig, is_loopback
from llamad.errors import (
    Forbidden,
    LlamadError,
    MethodNotAllowed,
    NotFound,
    QueueFull,
    TooLarge,
    Unauthorized,
)
from llamad.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from llamad.metrics import Metrics
from llamad.openai_api import (
    RELAYED,
    StreamRewriter,
    Usage,
    error_body,
    is_anthropic_path,
    model_entry,
    model_list,
    model_replacement,
    parse_relay_body,
    rewrite_model,
    sse_error_event,
    usage_of_body,
    with_model_defaults,
)
from llamad.protocol import ModelStatus
from llamad.transport.websocket import check_host_and_origin
from llamad.upstream import UpstreamResponse, read_all

log = logging.getLogger(__name__)

# The WebSocket's message limit too. A chat's images are at most 10 MiB each
# (llamad.images), 13.4 MiB as base64: one fits, a runaway upload does not.
MAX_BODY_BYTES = 16 * 1024 * 1024
CLIENT_GONE = "499"  # the requests metric's status when the client went away (nginx's code)
_JSON = b"application/json"
_SSE = b"text/event-stream"


class Lease(Protocol):
    """What the HTTP API uses of a lease: the model's name and requests to its server."""

    @property
    def name(self) -> str: ...

    def exchange(
        self, method: str, target: str, body: bytes, headers: Mapping[str, str]
    ) -> AbstractAsyncContextManager[UpstreamResponse]:
        """One request to the model's server; ``llamad.upstream.exchange_direct``."""
        ...


class ModelSource(Protocol):
    """What the HTTP API uses of the model pool (``llamad.pool.ModelPool``)."""

    @property
    def config(self) -> Config: ...

    def resolve(self, name: str) -> ModelConfig: ...

    def statuses(self) -> dict[str, ModelStatus]: ...

    def acquire(
        self, name: str, *, keep_alive: float | None = None, slot: bool = True
    ) -> AbstractAsyncContextManager[Lease]:
        """Hold ``name`` loaded (and, with ``slot``, one of its slots) for one request."""
        ...


@dataclass(frozen=True)
class HttpSettings:
    """Who may use the API. ``keys`` None: ``auth = "none"`` (loopback only)."""

    keys: KeyRing | None
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = MAX_BODY_BYTES


class ClientGone(Exception):
    """The client disconnected; its request is cancelled upstream."""


@dataclass
class _Exchange:
    """One request and what has been answered so far."""

    scope: HTTPScope
    receive: ASGIReceiveCallable
    send: ASGISendCallable
    method: str
    path: str
    headers: dict[str, str]
    received: float  # trio.current_time() when the request arrived
    cors: list[tuple[bytes, bytes]] = field(default_factory=list)
    started: bool = False  # the status line went out
    sse: bool = False
    finished: bool = False
    upstream_done: bool = False  # llama-server's answer is complete (its last event relayed)
    key: ApiKey | None = None
    metric_model: str = ""  # the configured model, once known
    endpoint: str = ""

    @property
    def anthropic(self) -> bool:
        return is_anthropic_path(self.path)

    async def start(
        self, status: int, content_type: bytes, extra: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        headers = [(b"content-type", content_type), *self.cors, *extra]
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool) -> None:
        if not more:
            self.finished = True
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def answer(
        self,
        status: int,
        data: bytes,
        content_type: bytes = _JSON,
        extra: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        length = (b"content-length", str(len(data)).encode())
        await self.start(status, content_type, [length, *extra])
        await self.body(data, more=False)


def _headers(scope: HTTPScope) -> dict[str, str]:
    fields: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
    return fields


class HttpApi:
    """The ASGI application. ``settings`` may be replaced at any time (reload)."""

    def __init__(
        self, source: ModelSource, settings: HttpSettings, metrics: Metrics | None = None
    ) -> None:
        self.source = source
        self.settings = settings
        self.metrics = metrics

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(scope, receive, send)
            return
        if scope["type"] != "http":  # a WebSocket upgrade: llamad's WebSocket is elsewhere
            await send({"type": "websocket.close", "code": 1008, "reason": "no WebSocket here"})
            return
        exchange = _Exchange(
            scope, receive, send, scope["method"].upper(), scope["path"], _headers(scope),
            trio.current_time(),
        )  # fmt: skip
        try:
            await self._handle(exchange)
        except ClientGone:
            self._count(exchange, CLIENT_GONE)
        except LlamadError as exc:
            await self._fail(exchange, exc)
        except Exception:
            log.exception("HTTP API: internal error on %s %s", exchange.method, exchange.path)
            await self._fail(exchange, None)

    # ------------------------------------------------------------ answering

    async def _fail(self, exchange: _Exchange, exc: LlamadError | None) -> None:
        if exc is None:
            status, code = 500, "internal"
            message = "internal error in llamad; see `journalctl --user -u llamad`"
        else:
            status, code, message = exc.http_status, exc.code, str(exc)
        self._count(exchange, str(status))
        if exchange.finished:
            return
        anthropic = exchange.anthropic
        if exchange.started:
            # The status line is gone: end the stream with an error event.
            if exchange.sse:
                event = sse_error_event(status, code, message, anthropic=anthropic)
                await exchange.body(event, more=False)
            else:
                await exchange.body(b"", more=False)
            return
        extra: list[tuple[bytes, bytes]] = []
        if isinstance(exc, QueueFull):
            extra.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
        if isinstance(exc, Unauthorized):
            extra.append((b"www-authenticate", b'Bearer realm="llamad"'))
        if isinstance(exc, TooLarge):
            # The rest of the body is not read; the connection cannot be reused.
            extra.append((b"connection", b"close"))
        if isinstance(exc, MethodNotAllowed):
            extra.append((b"allow", exc.allow.encode()))
        await exchange.answer(
            status, error_body(status, code, message, anthropic=anthropic), extra=extra
        )

    def _count(self, exchange: _Exchange, status: str) -> None:
        if self.metrics is not None and exchange.endpoint:
            self.metrics.request_done(exchange.metric_model, exchange.endpoint, status)

    # -------------------------------------------------------------- routing

    async def _handle(self, exchange: _Exchange) -> None:
        settings = self.settings
        # HTTP/2 carries the host as :authority.
        host = exchange.headers.get("host") or exchange.headers.get(":authority", "")
        rejection = check_host_and_origin(
            host,
            exchange.headers.get("origin"),
            allowed_origins=settings.allowed_origins,
            allowed_hosts=settings.allowed_hosts,
        )
        if rejection is not None:
            log.warning(
                "HTTP API refused %s %s: %s", exchange.method, exchange.path, rejection.reason
            )
            raise Forbidden(rejection.reason)
        origin = exchange.headers.get("origin")
        if origin is not None:
            exchange.cors = [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"vary", b"Origin"),
                (b"access-control-expose-headers", b"retry-after"),
            ]
        method, path = exchange.method, exchange.path
        if method == "OPTIONS" and "access-control-request-method" in exchange.headers:
            await self._preflight(exchange)
            return
        if path == "/health":
            _allow(method, "GET, HEAD")
            await exchange.answer(200, b'{"status":"ok"}')
            return
        # Counted from here on, refused keys included.
        exchange.endpoint = RELAYED.get(path, "upstream" if path.startswith("/upstream/") else "")
        exchange.key = self._authenticate(exchange)
        if path in RELAYED:
            _allow(method, "POST")
            await self._relay(exchange)
        elif path == "/v1/models" or path.startswith("/v1/models/"):
            _allow(method, "GET")
            await self._models(exchange, path.removeprefix("/v1/models").lstrip("/"))
        elif path.startswith("/upstream/"):
            await self._upstream(exchange)
        elif path == "/metrics":
            _allow(method, "GET")
            await self._metrics(exchange)
        else:
            raise NotFound(
                f"no route {path!r}; llamad serves /v1/chat/completions, /v1/completions, "
                "/v1/embeddings, /v1/responses, /v1/messages, /v1/models, /upstream/MODEL/..., "
                "/metrics and /health"
            )

    async def _preflight(self, exchange: _Exchange) -> None:
        requested = exchange.headers.get("access-control-request-headers", "")
        await exchange.answer(
            204,
            b"",
            extra=[
                (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS"),
                (b"access-control-allow-headers", requested.encode("latin-1")),
                (b"access-control-max-age", b"600"),
            ],
        )

    def _authenticate(self, exchange: _Exchange) -> ApiKey | None:
        keys = self.settings.keys
        if keys is None:
            return None
        offered = offered_key(exchange.headers)
        found = keys.find(offered) if offered else None
        if found is None:
            what = "a wrong API key" if offered else "no API key"
            raise Unauthorized(
                f"{what}: send `Authorization: Bearer KEY` (or `x-api-key: KEY`); "
                "`llamactl api-key` prints llamad's key"
            )
        return found

    def _allowed(self, exchange: _Exchange, model: str) -> bool:
        return exchange.key is None or exchange.key.allows(model)

    def _check_model_allowed(self, exchange: _Exchange, model: ModelConfig, asked: str) -> None:
        if not self._allowed(exchange, model.name):
            key = exchange.key
            assert key is not None and key.models is not None
            allowed = ", ".join(sorted(key.models)) or "none"
            raise Forbidden(
                f"API key {key.name!r} may not use model {asked!r}; it may use: {allowed}"
            )

    # ---------------------------------------------------------- endpoints

    async def _models(self, exchange: _Exchange, model_id: str) -> None:
        listing = model_list(
            self.source.config,
            self.source.statuses(),
            functools.partial(self._allowed, exchange),
            anthropic="anthropic-version" in exchange.headers,
        )
        if not model_id:
            await exchange.answer(200, _dumps(listing))
            return
        entry = model_entry(listing, model_id)
        if entry is None:
            self.source.resolve(model_id)  # unknown: 404 naming the configured models
            raise Forbidden(f"this API key may not use model {model_id!r}")
        await exchange.answer(200, _dumps(entry))

    async def _metrics(self, exchange: _Exchange) -> None:
        if exchange.key is not None and not exchange.key.unrestricted:
            raise Forbidden(
                f"API key {exchange.key.name!r} is limited to some models; /metrics covers "
                "every model and needs a key without a models list"
            )
        if self.metrics is None:
            raise NotFound("metrics are not collected in this llamad")
        await exchange.answer(200, self.metrics.render(), METRICS_CONTENT_TYPE.encode())

    async def _relay(self, exchange: _Exchange) -> None:
        raw = await self._read_body(exchange)
        request = parse_relay_body(raw)
        model = self.source.resolve(request.model)
        exchange.metric_model = model.name
        self._check_model_allowed(exchange, model, request.model)
        body = with_model_defaults(request, model, exchange.path)
        await beside(
            functools.partial(self._relay_to, exchange, request.model, request.keep_alive, body),
            functools.partial(_until_disconnect, exchange),
        )

    async def _relay_to(
        self, exchange: _Exchange, asked: str, keep_alive: float | None, body: bytes
    ) -> None:
        headers = {
            "Content-Type": "application/json",
            "Accept": exchange.headers.get("accept", "*/*"),
        }
        async with (
            self.source.acquire(asked, keep_alive=keep_alive) as lease,
            lease.exchange("POST", exchange.path, body, headers) as response,
        ):
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                usage, first = await self._relay_stream(exchange, response, asked)
            else:
                usage, first = await self._relay_whole(exchange, response, asked)
        if self.metrics is not None:
            self.metrics.request_done(
                lease.name, exchange.endpoint, str(response.status), usage, first
            )

    async def _relay_stream(
        self, exchange: _Exchange, response: UpstreamResponse, asked: str
    ) -> tuple[Usage, float | None]:
        exchange.sse = True
        await exchange.start(
            response.status,
            _SSE,
            [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")],
        )
        rewriter = StreamRewriter(asked)
        first: float | None = None
        # One task reads and writes: while a write to a slow client waits, what
        # llama-server sends piles up in the socket and goes out as one piece
        # next time (its buffer bounds what a stuck client holds back).
        # Once text flows, reads may wait for the batch window: a fast model's
        # tokens go out several to a write, not one wake-up each. Not once the
        # last event came: a client may hang up as soon as it has it, and the
        # request was served.
        while data := await response.read(batch=first is not None and not rewriter.ended):
            out = rewriter.feed(data)
            if first is None and rewriter.saw_token:
                first = trio.current_time() - exchange.received
            exchange.upstream_done = rewriter.ended
            if out:
                await exchange.body(out, more=True)
        exchange.upstream_done = True
        await exchange.body(rewriter.flush(), more=False)
        return rewriter.usage, first

    async def _relay_whole(
        self, exchange: _Exchange, response: UpstreamResponse, asked: str
    ) -> tuple[Usage, float | None]:
        data = await read_all(response)
        content_type = response.headers.get("content-type", "application/json")
        if content_type.startswith("application/json"):
            data = rewrite_model(data, model_replacement(asked))
        usage = usage_of_body(data)
        await exchange.answer(response.status, data, content_type.encode("latin-1"))
        return usage, usage.prompt_seconds

    async def _upstream(self, exchange: _Exchange) -> None:
        """``/upstream/MODEL/PATH``: any request, passed through to that model's llama-server."""
        name, _, rest = exchange.path.removeprefix("/upstream/").partition("/")
        if not name:
            raise NotFound("name a model: /upstream/MODEL/PATH, e.g. /upstream/demo/props")
        model = self.source.resolve(name)
        exchange.metric_model = model.name
        self._check_model_allowed(exchange, model, name)
        body = await self._read_body(exchange)
        query = exchange.scope["query_string"]
        target = "/" + rest + ("?" + query.decode("latin-1") if query else "")
        headers = dict(exchange.headers)  # the relay drops hop-by-hop and credential fields
        await beside(
            functools.partial(self._pass_through, exchange, name, target, headers, body),
            functools.partial(_until_disconnect, exchange),
        )

    async def _pass_through(
        self, exchange: _Exchange, name: str, target: str, headers: dict[str, str], body: bytes
    ) -> None:
        # No slot: /slots or /metrics must answer while every slot is generating.
        async with (
            self.source.acquire(name, slot=False) as lease,
            lease.exchange(exchange.method, target, body, headers) as response,
        ):
            content_type = response.headers.get("content-type", "application/octet-stream")
            exchange.sse = content_type.startswith("text/event-stream")
            await exchange.start(response.status, content_type.encode("latin-1"))
            while data := await response.read():
                await exchange.body(data, more=True)
            exchange.upstream_done = True
            await exchange.body(b"", more=False)
        if self.metrics is not None:
            self.metrics.request_done(lease.name, exchange.endpoint, str(response.status))

    async def _read_body(self, exchange: _Exchange) -> bytes:
        """The whole request body, refused (413) past the limit before it is all read."""
        limit = self.settings.max_body_bytes
        too_large = TooLarge(
            f"the request body is over llamad's limit of {limit // (1024 * 1024)} MiB; "
            "send smaller or fewer images, or split the input"
        )
        declared = exchange.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await exchange.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _allow(method: str, allow: str) -> None:
    if method not in (m.strip() for m in allow.split(",")):
        raise MethodNotAllowed(method, allow)


async def _until_disconnect(exchange: _Exchange) -> None:
    """Raises ``ClientGone`` when the client disconnects before the answer is complete."""
    while True:
        message = await exchange.receive()
        if message["type"] == "http.disconnect":
            # The server reports the end of every exchange as a disconnect,
            # also one that ended because the whole answer went out; and a
            # client may hang up once it has read "[DONE]", before the last
            # empty chunk: the request was served all the same.
            if exchange.finished or exchange.upstream_done:
                return
            raise ClientGone


async def _lifespan(
    scope: LifespanScope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    del scope
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# ------------------------------------------------------------------ serving


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    app: HttpApi,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn on HOST:PORT; reports the bound port once listening."""
    config = HypercornConfig()
    config.bind = [listen_address(host, port)]
    config.accesslog = None
    server_log = logging.getLogger("llamad.http.server")
    server_log.setLevel(logging.WARNING)  # not hypercorn's "Running on … (CTRL + C to quit)"
    config.errorlog = server_log
    config.include_server_header = False
    config.keep_alive_timeout = 30.0  # clients reuse a connection between a user's turns
    config.graceful_timeout = 1.0
    if not is_loopback(host):
        log.warning(
            "the HTTP API listens on %s, which is not a loopback address: anyone who can "
            "reach it and has an API key can use your models",
            host,
        )
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(functools.partial(hypercorn.trio.serve, app, config))
        task_status.started(int(binds[0].rpartition(":")[2]))
