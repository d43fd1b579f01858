"""Remote model servers: a model served elsewhere, standing behind the same interface.

A ``[models.NAME]`` table with ``url`` names a server llamad does not run:
another llamad's HTTP API, a llama-server, or any OpenAI-compatible API.
``RemoteServer`` is its ``ModelServer`` (``llamad.server``): the same
``ModelMachine`` as a local model, with "spawn" meaning "check it answers and
serves the model" and the watchdog probing it on the same schedule, so it is
``starting``, ``ready``, ``backoff`` or ``failed`` for the same reasons, and
chats, the TUI and metrics see it like any other model. It costs no local
memory (the pool counts it so).

While it is unreachable the machine is *blocked* (``llamad.policy.Blocked``):
it waits in ``backoff`` without burning starts, and a check every
``health_interval_sec`` unblocks it when the server answers again.

``RemoteTransport`` makes the remote speak llama-server's dialect to the
rest of llamad: every request carries the API key (``Authorization: Bearer``),
an OpenAI request body carries the remote model name, and the few
llama-server endpoints the chat engine uses (``/props``, ``/tokenize``,
``/apply-template``) go to the server itself (a llama-server), through
``/upstream/MODEL/...`` (another llamad), or, for a server with neither, are
answered here with safe estimates: the context is ``ctx_size`` from
models.toml and a token is counted per byte, which never underestimates.
TLS certificates are always verified (``ca_file`` adds a private CA).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import httpx
import trio

from llamad.config import ModelConfig, remote_base
from llamad.errors import RemoteUnavailable
from llamad.events import EventHub, HubEvent, StateEvent
from llamad.policy import (
    BecameReady,
    Blocked,
    Exited,
    HealthProbed,
    SpawnBlocked,
    SpawnFailed,
)
from llamad.protocol import ModelStatus
from llamad.server import InFlight
from llamad.supervisor import MachineShell

log = logging.getLogger(__name__)

CHECK_TIMEOUT_SEC = 10.0
# What the chat engine asks of llama-server besides the OpenAI API.
LLAMA_PATHS = frozenset({"/props", "/tokenize", "/detokenize", "/apply-template", "/slots"})
Route = Literal["direct", "upstream", "estimate"]


@dataclass(frozen=True)
class RemoteEndpoint:
    """A remote server's root URL (never with the key)."""

    url: str

    @property
    def base_url(self) -> str:
        return self.url

    def describe(self) -> str:
        return self.url


def read_key(model: ModelConfig) -> str | None:
    """The API key from models.toml or its key file (blocking); ``OSError`` if unreadable."""
    if model.api_key is not None:
        return model.api_key
    if model.api_key_file is None:
        return None
    text = model.api_key_file.read_text(encoding="utf-8").strip()
    if not text:
        raise OSError(f"{model.api_key_file} is empty")
    return text.splitlines()[0].strip()


def tls_context(ca_file: Path | None) -> ssl.SSLContext | bool:
    """Verification always on: the system's CAs, or also ``ca_file``'s."""
    if ca_file is None:
        return True
    return ssl.create_default_context(cafile=str(ca_file))


# ---------------------------------------------------------- the transport


def estimated(path: str, body: bytes, ctx_size: int) -> httpx.Response | None:
    """llama-server's answer to ``path``, estimated for a server that has no such endpoint."""
    headers = {"x-llamad-estimate": "1"}
    match path:
        case "/props":
            settings = {"n_ctx": ctx_size}
            props = {"default_generation_settings": settings, "n_ctx": ctx_size}
            return httpx.Response(200, json=props, headers=headers)
        case "/tokenize":
            try:
                content = json.loads(body or b"{}").get("content", "")
            except (ValueError, AttributeError):
                content = ""
            # A token covers at least one byte: a count that never underestimates.
            count = len(content.encode()) if isinstance(content, str) else 0
            return httpx.Response(200, json={"tokens": [0] * count}, headers=headers)
        case "/apply-template":
            return httpx.Response(200, json={"prompt": ""}, headers=headers)
    return None


def with_model(body: bytes, name: str) -> bytes:
    """An OpenAI request body with ``model`` set to the remote's name for it."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict):
        return body
    data["model"] = name
    return json.dumps(data).encode()


class RemoteTransport(httpx.AsyncBaseTransport):
    """Requests in llama-server's dialect, sent as the remote server understands them."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        *,
        base: str,
        remote_name: str,
        key: Callable[[], str | None],
        ctx_size: int,
    ) -> None:
        self.inner = inner
        self.prefix = urlsplit(base).path.rstrip("/")
        self.remote_name = remote_name
        self.key = key
        self.ctx_size = ctx_size
        self.route: Route | None = None  # how the llama-server endpoints are reached

    def _request(self, request: httpx.Request, path: str, body: bytes) -> httpx.Request:
        headers = httpx.Headers(request.headers)
        # Only the remote's own key ever leaves: never a credential a caller passed on.
        for name in ("content-length", "authorization", "x-api-key"):
            headers.pop(name, None)
        key = self.key()
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        url = request.url.copy_with(path=self.prefix + path)
        return httpx.Request(
            request.method, url, headers=headers, content=body, extensions=request.extensions
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix(self.prefix) or "/"
        body = await request.aread()
        if path.startswith("/v1/") and request.method == "POST":
            body = with_model(body, self.remote_name)
        if path not in LLAMA_PATHS:
            return await self.inner.handle_async_request(self._request(request, path, body))
        routes: list[Route] = [self.route] if self.route else ["direct", "upstream", "estimate"]
        for route in routes:
            if route == "estimate":
                answer = estimated(path, body, self.ctx_size)
                if answer is not None:
                    self.route = "estimate"
                    return answer
                break
            target = path if route == "direct" else f"/upstream/{quote(self.remote_name)}{path}"
            response = await self.inner.handle_async_request(self._request(request, target, body))
            if response.status_code not in (404, 405) or self.route is not None:
                self.route = self.route or route
                return response
            await response.aclose()
        return httpx.Response(404, json={"error": {"message": f"{path} is not served"}})

    async def aclose(self) -> None:
        await self.inner.aclose()


# ------------------------------------------------------------- the server


class RemoteServer(MachineShell):
    """A model served elsewhere, supervised like a local one (see the module docstring)."""

    def __init__(self, model: ModelConfig, hub: EventHub, *, log_lines: int = 1000) -> None:
        super().__init__(model.name, model.supervision, hub, log_lines=log_lines)
        assert model.url is not None
        self.model = model
        self.endpoint = RemoteEndpoint(remote_base(model.url))
        self.requests = InFlight(model.name, self._count_changed)
        self.vision: bool | None = None
        self._key: str | None = None
        self._client: httpx.AsyncClient | None = None
        self._transport: RemoteTransport | None = None
        self._session = trio.CancelScope()
        self._in_session = False
        self._last_problem = ""
        self._uses_models_list = False  # no /health there: /v1/models is the probe

    @property
    def remote_name(self) -> str:
        return self.model.remote_model or self.model.name

    @property
    def in_flight(self) -> set[trio.CancelScope]:
        return self.requests.scopes

    # ------------------------------------------------------------- queries

    def status(self) -> ModelStatus:
        machine = self._machine
        return ModelStatus(
            name=self.model.name,
            state=machine.state,
            since=self._wall_since(),
            reason=machine.reason,
            restarts=machine.restarts,
            ready_seconds=machine.ready_seconds,
            in_flight=len(self.in_flight),
            aliases=list(self.model.aliases),
            endpoint=self.endpoint.describe(),
            tools=list(self.model.tools),
            vision=self.vision if machine.state == "ready" else None,
            remote=True,
        )

    def _event(self) -> HubEvent:
        return StateEvent(self.status())

    @property
    def client(self) -> httpx.AsyncClient:
        """The HTTP client for requests: key, model name and dialect handled by its transport."""
        if self._client is None:
            self._transport = RemoteTransport(
                httpx.AsyncHTTPTransport(
                    verify=tls_context(self.model.ca_file),
                    limits=httpx.Limits(max_keepalive_connections=0),
                ),
                base=self.endpoint.url,
                remote_name=self.remote_name,
                key=lambda: self._key,
                ctx_size=self.model.ctx_size,
            )
            self._client = httpx.AsyncClient(
                transport=self._transport,
                base_url=self.endpoint.url,
                timeout=httpx.Timeout(None, connect=CHECK_TIMEOUT_SEC),
            )
        return self._client

    # ------------------------------------------------------------ commands

    def update_config(self, model: ModelConfig) -> None:
        self.model = model
        self._machine.policy = model.supervision

    async def precheck(self) -> None:
        """Reachable, our key accepted, and the model served there; else ``RemoteUnavailable``."""
        if self.state in ("starting", "ready"):
            return
        problem = await self._load_key() or await self._check(full=True)
        if problem is not None:
            raise RemoteUnavailable(self.model.name, problem)
        self.unblock()

    async def drain(self, seconds: float, why: str) -> None:
        await self.requests.drain(seconds, why)

    def hold(self) -> contextlib.AbstractContextManager[trio.CancelScope]:
        return self.requests.hold()

    # ------------------------------------------------------------- the shell

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(super().run)
            nursery.start_soon(self._unblock_when_back)
            task_status.started()

    async def _cleanup(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _spawn(self) -> None:
        assert self._nursery is not None
        self._session = trio.CancelScope()
        self._in_session = True
        self._nursery.start_soon(self._run_session, self._session)

    def _signal(self, sig: int) -> None:
        # Nothing to kill: ending the session is the whole of a stop.
        if self._in_session and sig != signal.SIGCONT:
            self._in_session = False
            self._session.cancel()
            if self._last_problem:
                # It stopped answering: the restart waits until it answers again.
                self._events_send.send_nowait(Blocked(self._last_problem))
            self._events_send.send_nowait(Exited(code=0))

    async def _run_session(self, scope: trio.CancelScope) -> None:
        with scope:
            problem = await self._load_key()
            if problem is not None:
                self._note(problem)
                self._in_session = False
                self._events_send.send_nowait(SpawnFailed(problem))
                return
            problem = await self._check(full=True)
            if problem is not None:
                self._note(problem)
                self._in_session = False
                self._events_send.send_nowait(SpawnBlocked(problem))
                return
            self._last_problem = ""
            self.vision = await self._vision()
            self._note(f"ready: {self.endpoint.url} serves {self.remote_name!r}")
            self._events_send.send_nowait(BecameReady())
            while True:
                await trio.sleep(self.model.supervision.health_interval_sec)
                problem = await self._check(full=False)
                if problem is not None and problem != self._last_problem:
                    self._note(problem)
                self._last_problem = problem or ""
                self._events_send.send_nowait(HealthProbed(problem is None))

    async def _unblock_when_back(self) -> None:
        while True:
            await self.wait_until(lambda: self.state == "backoff" and bool(self.blocked))
            await trio.sleep(self.model.supervision.health_interval_sec)
            if self.state != "backoff" or not self.blocked:
                continue
            problem = await self._load_key() or await self._check(full=True)
            if problem is None:
                self._note(f"{self.endpoint.url} answers again")
                self.unblock()
            elif problem != self.blocked:
                self.block(problem)

    def _note(self, line: str) -> None:
        self._record_line(line)

    # ------------------------------------------------------------- checks

    async def _load_key(self) -> str | None:
        try:
            self._key = await trio.to_thread.run_sync(read_key, self.model)
        except OSError as exc:
            return f"cannot read its api_key_file: {exc.strerror or exc}"
        return None

    async def _get(self, path: str) -> httpx.Response:
        # Through the transport (the key), but with a timeout: a check must end.
        return await self.client.get(path, timeout=CHECK_TIMEOUT_SEC)

    async def _check(self, *, full: bool) -> str | None:
        """Why the server cannot serve the model now, or None.

        The watchdog (``full=False``) asks ``/health``; a start and a load
        (``full=True``) also ask ``/v1/models`` whether the model is there.
        """
        url = self.endpoint.url
        try:
            if not self._uses_models_list:
                health = await self._get("/health")
                if health.status_code in (404, 405):
                    self._uses_models_list = True
                elif health.status_code != 200:
                    code = health.status_code
                    return f"remote server {url} is not ready (/health answered {code})"
            if not full and not self._uses_models_list:
                return None
            listing = await self._get("/v1/models")
        except httpx.ConnectError as exc:
            return f"remote server {url} is not answering: {_connect_reason(exc)}"
        except httpx.TimeoutException:
            return f"remote server {url} is not answering: no answer within {CHECK_TIMEOUT_SEC:g} s"
        except httpx.HTTPError as exc:
            return f"remote server {url} is not answering: {exc}"
        if listing.status_code in (401, 403):
            fix = "check api_key" if self._key else "set api_key or api_key_file in models.toml"
            return f"remote server {url} refused our API key (HTTP {listing.status_code}): {fix}"
        if listing.status_code != 200:
            return f"remote server {url} answered /v1/models with HTTP {listing.status_code}"
        served = _model_ids(listing)
        if served is None:
            return f"remote server {url} sent /v1/models an answer that is not a model list"
        if full and self.remote_name not in served:
            listed = ", ".join(served[:10]) or "none"
            return (
                f"remote server {url} does not serve a model named {self.remote_name!r} "
                f"(it serves: {listed}); set remote_model in [models.{self.model.name}]"
            )
        return None

    async def _vision(self) -> bool | None:
        """Whether the remote model takes images, where it says (llama-server's /props)."""
        try:
            response = await self._get("/props")
            if response.headers.get("x-llamad-estimate"):
                return None
            modalities = response.json().get("modalities") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return bool(modalities.get("vision")) if isinstance(modalities, dict) else None


def _model_ids(response: httpx.Response) -> list[str] | None:
    try:
        data: Any = response.json()
    except ValueError:
        return None
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    ids: list[str] = []
    for entry in entries:
        if isinstance(entry, dict):
            ids += [str(entry[key]) for key in ("id", "name") if isinstance(entry.get(key), str)]
            ids += [a for a in entry.get("aliases") or [] if isinstance(a, str)]
    return list(dict.fromkeys(ids))


def _connect_reason(exc: httpx.ConnectError) -> str:
    """The reason a connection failed, in a few words (``connection refused``)."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        cause = pending.pop(0)
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f"its TLS certificate is not trusted ({cause.verify_message}); "
                "give its CA with ca_file = PATH (verification stays on)"
            )
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve its host name ({cause.strerror})"
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno).lower()
        if isinstance(cause, BaseExceptionGroup):
            pending += cause.exceptions
        pending += [e for e in (cause.__cause__, cause.__context__) if e is not None]
    text = str(exc)
    if "certificate verify failed" in text.lower():
        return f"its TLS certificate is not trusted ({text}); give its CA with ca_file = PATH"
    return text or "connection failed"
