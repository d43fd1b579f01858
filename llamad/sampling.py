"""Per-model generation defaults, applied to requests that do not set them.

models.toml may give every model (and ``[daemon]``, for all of them)
``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repeat_penalty``,
``max_tokens`` and ``system_prompt`` (``llamad.config.Sampling``). The chat
engine and the HTTP API both call these pure functions, so a chat and an
OpenAI-style request to the same model get the same defaults:

- ``request_defaults(model, options)`` -> the fields to put into a
  ``/v1/chat/completions`` body: the model's values, with every value the
  request sets winning. ``max_tokens`` is always there: a reply stops at the cap
  and llama-server reports ``finish_reason: "length"``.
- ``system_prompt(model, requested)`` -> the system message of a new
  conversation.
- ``with_system_prompt(model, messages)`` -> OpenAI-style messages with the
  model's system prompt in front when they have none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from llamad.config import ModelConfig
from llamad.protocol import ChatOptions

# Request fields of llama-server's /v1/chat/completions that models.toml can default.
REQUEST_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens")
# Other spellings a request may use for the reply-length cap.
_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict")


def _requested(options: ChatOptions | Mapping[str, Any] | None) -> Mapping[str, Any]:
    if options is None:
        return {}
    if isinstance(options, ChatOptions):
        return msgspec.structs.asdict(options)
    return options


def request_defaults(
    model: ModelConfig, options: ChatOptions | Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Sampling fields for a request to ``model``: its defaults, the request's values winning.

    ``options`` is a chat's ``ChatOptions`` or an HTTP request's JSON body. Only
    fields with a value are returned (None leaves the choice to llama-server).
    A request that caps the reply another way (``max_completion_tokens``,
    ``n_predict``) gets no ``max_tokens`` added.
    """
    requested = _requested(options)
    fields: dict[str, Any] = {}
    for name in REQUEST_FIELDS:
        value = requested.get(name)
        if value is None:
            if name == "max_tokens" and any(
                requested.get(other) is not None for other in _LENGTH_FIELDS
            ):
                continue
            value = getattr(model.sampling, name)
        if value is not None:
            fields[name] = value
    return fields


def system_prompt(model: ModelConfig, requested: str | None) -> str | None:
    """The system prompt of a new conversation: the request's, else the model's default."""
    return requested if requested is not None else model.sampling.system_prompt


def with_system_prompt(
    model: ModelConfig, messages: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """OpenAI-style ``messages`` with the model's system prompt first, when they have none."""
    prompt = model.sampling.system_prompt
    if prompt is None or any(message.get("role") == "system" for message in messages):
        return list(messages)
    return [{"role": "system", "content": prompt}, *messages]
