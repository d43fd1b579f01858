"""The OpenAI- and Anthropic-compatible wire shapes: pure, no I/O.

What the HTTP API (``llamad/transport/http.py``) needs to know about the
bodies it relays, kept apart so it is tested with plain bytes:

- which paths are relayed to a model and under which endpoint label;
- reading a request body (JSON object, a ``model`` name, Ollama's ``keep_alive``);
- error bodies in OpenAI's shape, and Anthropic's on ``/v1/messages``;
- ``GET /v1/models`` in OpenAI's list format (Anthropic's when the client is
  Anthropic's SDK), with llamad's state as an extra field;
- rewriting the ``model`` field of answers to the name the client asked for,
  in a JSON body or in every event of an SSE stream, without decoding the
  events that do not need it (the relay's hot path);
- the token counts and speeds llama-server reports (``usage``, ``timings``), for
  the metrics.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from llamad.config import Config, ModelConfig
from llamad.errors import BadRequest
from llamad.protocol import ModelStatus, one_line
from llamad.sampling import request_defaults, with_system_prompt

# Relayed to the model named in the body; the value is the endpoint label in metrics.
# llama-server 11434 serves each of these itself (read from its routes and tried).
RELAYED: Mapping[str, str] = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
}

MAX_ERROR_CHARS = 1000  # error messages quote what the client sent; bounded

# OpenAI's error "type" per status; the code field carries llamad's own code.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def is_anthropic_path(path: str) -> bool:
    """Whether answers on ``path`` use Anthropic's shapes (errors, model list)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_body(status: int, code: str, message: str, *, anthropic: bool = False) -> bytes:
    """An error in OpenAI's ``{"error": {...}}`` shape, or Anthropic's."""
    text = one_line(message, MAX_ERROR_CHARS)
    if anthropic:
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        return _dumps({"type": "error", "error": {"type": kind, "message": text}})
    kind = _OPENAI_TYPES.get(status, "server_error")
    return _dumps({"error": {"message": text, "type": kind, "param": None, "code": code}})


def sse_error_event(status: int, code: str, message: str, *, anthropic: bool = False) -> bytes:
    """The same error as the last event of a stream whose status line is already sent."""
    body = error_body(status, code, message, anthropic=anthropic)
    prefix = b"event: error\n" if anthropic else b""
    return prefix + b"data: " + body + b"\n\n"


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# ------------------------------------------------------------------ requests


@dataclass(frozen=True)
class RelayRequest:
    """A relayed request's body, read: the model asked for, and what goes upstream."""

    model: str
    keep_alive: float | None  # seconds; None: the model's own ttl
    stream: bool
    body: bytes  # the bytes for llama-server (the client's own unless something was removed)
    payload: dict[str, Any]


def parse_relay_body(raw: bytes) -> RelayRequest:
    """A relayed request's JSON body; ``BadRequest`` says what is wrong with it."""
    payload = parse_json_object(raw)
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(
            f'"model" must be a string naming a model, not {type(model).__name__} '
            "(GET /v1/models lists them)"
        )
    if not model:
        raise BadRequest(
            'the request names no model: add "model": "NAME" to the JSON body '
            "(GET /v1/models lists them)"
        )
    keep_alive = parse_keep_alive(payload["keep_alive"]) if "keep_alive" in payload else None
    body = raw
    if "keep_alive" in payload:
        # llamad's field, not llama-server's.
        del payload["keep_alive"]
        body = _dumps(payload)
    return RelayRequest(model, keep_alive, payload.get("stream") is True, body, payload)


def with_model_defaults(request: RelayRequest, model: ModelConfig, path: str) -> bytes:
    """The body for llama-server with ``model``'s generation defaults where the request has none.

    Chat and text completions get the sampling fields and the reply-length cap
    (``llamad.sampling``), chat completions the model's system prompt when the
    conversation has none; Anthropic messages the sampling fields and
    ``system``. Other endpoints (embeddings, responses) pass as they came.
    """
    payload = dict(request.payload)
    if path in ("/v1/chat/completions", "/v1/completions"):
        payload.update(request_defaults(model, payload))
        if path == "/v1/chat/completions" and isinstance(payload.get("messages"), list):
            payload["messages"] = with_system_prompt(model, payload["messages"])
    elif path == "/v1/messages":
        # Anthropic's API makes max_tokens the client's to give.
        defaults = request_defaults(model, payload)
        defaults.pop("max_tokens", None)
        payload.update(defaults)
        if "system" not in payload and model.sampling.system_prompt is not None:
            payload["system"] = model.sampling.system_prompt
    else:
        return request.body
    return request.body if payload == request.payload else _dumps(payload)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(value).__name__}")
    return value


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_keep_alive(value: object) -> float:
    """Ollama's ``keep_alive``: seconds, or ``"30s"``, ``"5m"``, ``"1h"``, ``"-1"``.

    0 unloads once the request is done (and nothing else uses the model); a
    negative value keeps the model resident until it is unloaded or evicted.
    """
    if isinstance(value, bool):
        raise BadRequest(f'keep_alive must be seconds or a duration like "5m", not {value}')
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match is not None:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise BadRequest(f'keep_alive must be seconds or a duration like "5m", not {value!r}')


# ------------------------------------------------------------------ models


def _model_entries(
    config: Config, statuses: Mapping[str, ModelStatus], allowed: Callable[[str], bool]
) -> Iterable[tuple[str, str, ModelStatus | None]]:
    """(listed id, configured name, status) for every model and alias the caller may use."""
    for name, model in config.models.items():
        if not allowed(name):
            continue
        status = statuses.get(name)
        yield name, name, status
        for alias in model.aliases:
            yield alias, name, status


def _llamad_fields(name: str, listed: str, status: ModelStatus | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"state": status.state if status else "stopped"}
    if listed != name:
        fields["alias_of"] = name
    if status is not None:
        if status.reason:
            fields["reason"] = status.reason
        fields["in_flight"] = status.in_flight
        fields["waiting"] = status.waiting
    return fields


def model_list(
    config: Config,
    statuses: Mapping[str, ModelStatus],
    allowed: Callable[[str], bool],
    *,
    created: int = 0,
    anthropic: bool = False,
) -> dict[str, Any]:
    """``GET /v1/models``: OpenAI's list (or Anthropic's), llamad's state under ``llamad``."""
    entries = list(_model_entries(config, statuses, allowed))
    if anthropic:
        data = [
            {
                "type": "model",
                "id": listed,
                "display_name": listed,
                "created_at": "1970-01-01T00:00:00Z",
                "llamad": _llamad_fields(name, listed, status),
            }
            for listed, name, status in entries
        ]
        return {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    return {
        "object": "list",
        "data": [
            {
                "id": listed,
                "object": "model",
                "created": created,
                "owned_by": "llamad",
                "llamad": _llamad_fields(name, listed, status),
            }
            for listed, name, status in entries
        ],
    }


def model_entry(listing: Mapping[str, Any], model_id: str) -> dict[str, Any] | None:
    """One model of a listing by id (``GET /v1/models/ID``)."""
    for entry in listing["data"]:
        if entry["id"] == model_id:
            return dict(entry)
    return None


# ----------------------------------------------------- rewriting the model name

# In compact or spaced JSON, the key "model" with a string value. Inside a JSON
# string every quote is escaped, so this never matches text a model wrote.
_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
# A token in any of the streamed shapes: chat deltas, completions text,
# Anthropic text/thinking/tool deltas, Responses' output_text deltas.
_TOKEN = re.compile(
    rb'"(?:content|text|delta|reasoning_content|thinking|partial_json|arguments)"\s*:\s*"[^"]'
)
_USAGE_MARKERS = (b'"usage"', b'"timings"')
# The last event of a stream: OpenAI's chat and text completions, Anthropic's
# messages, the Responses API.
_END_MARKERS = (b"data: [DONE]", b'"type":"message_stop"', b'"type":"response.completed"')
MAX_PENDING_EVENT = 1 << 20  # an SSE event longer than this goes out unrewritten


def model_replacement(name: str) -> bytes:
    """The bytes that replace every ``"model": "..."``; escaped for ``re.sub``."""
    return (b'"model":' + _dumps(name)).replace(b"\\", b"\\\\")


def rewrite_model(data: bytes, replacement: bytes) -> bytes:
    """``data`` with every ``"model"`` string field replaced (see ``model_replacement``)."""
    return _MODEL_FIELD.sub(replacement, data)


@dataclass
class Usage:
    """Token counts and speeds of one reply, as llama-server reported them."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_per_second: float | None = None  # generation speed (timings)
    prompt_seconds: float | None = None  # prompt processing: llama-server's first-token time

    def update(self, event: Mapping[str, Any]) -> None:
        """Take what one answer or stream event says; later events win."""
        for holder in (event, event.get("message"), event.get("response")):
            if isinstance(holder, Mapping):
                self._from_usage(holder.get("usage"))
        timings = event.get("timings")
        if isinstance(timings, Mapping):
            # A stream without stream_options.include_usage has only timings.
            prompt_n, cache_n = timings.get("prompt_n"), timings.get("cache_n", 0)
            if self.prompt_tokens is None and _count(prompt_n) and _count(cache_n):
                self.prompt_tokens = prompt_n + cache_n
            predicted_n = timings.get("predicted_n")
            if self.completion_tokens is None and _count(predicted_n):
                self.completion_tokens = predicted_n
            speed = timings.get("predicted_per_second")
            if _number(speed) and timings.get("predicted_n"):
                self.tokens_per_second = float(speed)
            prompt_ms = timings.get("prompt_ms")
            if _number(prompt_ms):
                self.prompt_seconds = float(prompt_ms) / 1000

    def _from_usage(self, usage: object) -> None:
        if not isinstance(usage, Mapping):
            return
        prompt = usage.get("prompt_tokens")
        if _count(prompt):
            self.prompt_tokens = prompt
        elif _count(usage.get("input_tokens")):
            # Anthropic counts cached prompt tokens apart.
            self.prompt_tokens = sum(
                usage.get(key) or 0
                for key in (
                    "input_tokens",
                    "cache_read_input_tokens",
                    "cache_creation_input_tokens",
                )
                if _count(usage.get(key))
            )
        for key in ("completion_tokens", "output_tokens"):
            value = usage.get(key)
            if _count(value):
                self.completion_tokens = value


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def usage_of_body(data: bytes) -> Usage:
    """The usage in a whole JSON answer (nothing when it is not JSON)."""
    usage = Usage()
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return usage
    if isinstance(value, dict):
        usage.update(value)
    return usage


class StreamRewriter:
    """Rewrites the ``model`` of every SSE event and notes usage and the first token.

    ``feed`` takes whatever bytes arrived and returns, at once, every complete
    event in them rewritten; an incomplete event waits for its end (llama-server
    writes whole events, so in practice nothing waits). Events are not decoded
    unless they carry usage, so the cost per token is a regular-expression pass
    over the bytes.
    """

    def __init__(self, model: str) -> None:
        self._replacement = model_replacement(model)
        self._tail = b""
        self.usage = Usage()
        self.saw_token = False
        self.ended = False  # the stream's last event has gone through

    def feed(self, data: bytes) -> bytes:
        if self._tail:
            data = self._tail + data
        end = data.rfind(b"\n\n")
        if end < 0:
            if len(data) <= MAX_PENDING_EVENT:
                self._tail = data
                return b""
            self._tail = b""
            return data
        complete, self._tail = data[: end + 2], data[end + 2 :]
        return self._process(complete)

    def flush(self) -> bytes:
        """What is left when the stream ends (an event without its blank line)."""
        rest, self._tail = self._tail, b""
        return self._process(rest) if rest else b""

    def _process(self, complete: bytes) -> bytes:
        if not self.saw_token and _TOKEN.search(complete):
            self.saw_token = True
        if not self.ended and any(marker in complete for marker in _END_MARKERS):
            self.ended = True
        if any(marker in complete for marker in _USAGE_MARKERS):
            for event in complete.split(b"\n\n"):
                if any(marker in event for marker in _USAGE_MARKERS):
                    self._note_usage(event)
        return _MODEL_FIELD.sub(self._replacement, complete)

    def _note_usage(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                value = json.loads(line[5:])
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(value, dict):
                self.usage.update(value)
