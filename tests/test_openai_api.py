"""The OpenAI/Anthropic wire shapes, with plain bytes: no server, no I/O."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamad.config import ModelConfig, parse_config
from llamad.errors import BadRequest
from llamad.openai_api import (
    StreamRewriter,
    Usage,
    error_body,
    model_entry,
    model_list,
    model_replacement,
    parse_keep_alive,
    parse_relay_body,
    rewrite_model,
    sse_error_event,
    usage_of_body,
    with_model_defaults,
)
from llamad.protocol import ModelStatus

# Exactly what llama-server 11434 streams (captured from the real server).
CHUNK = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" take"}}],'
    b'"created":1796086066,"id":"chatcmpl-w3j","model":"demo.gguf",'
    b'"system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}\n\n'
)
ROLE = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
    b'"content":null}}],"created":1,"id":"c","model":"demo.gguf","object":"chat.completion.chunk"}'
    b"\n\n"
)
FINAL = (
    b'data: {"choices":[],"created":1,"id":"c","model":"demo.gguf",'
    b'"object":"chat.completion.chunk","usage":{"completion_tokens":3,"prompt_tokens":54,'
    b'"total_tokens":57},"timings":{"cache_n":53,"prompt_n":1,"prompt_ms":0.368,'
    b'"predicted_n":3,"predicted_ms":0.337,"predicted_per_second":5934.7}}\n\ndata: [DONE]\n\n'
)


def test_every_event_names_the_model_asked_for() -> None:
    rewriter = StreamRewriter("my-model")
    out = rewriter.feed(ROLE + CHUNK + CHUNK + FINAL)
    events = [e for e in out.split(b"\n\n") if e and e != b"data: [DONE]"]
    assert len(events) == 4
    assert all(json.loads(e[6:])["model"] == "my-model" for e in events)
    assert out.endswith(b"data: [DONE]\n\n")
    assert rewriter.usage == Usage(54, 3, 5934.7, 0.000368)


def test_an_event_split_across_reads_waits_for_its_end_and_nothing_else_does() -> None:
    rewriter = StreamRewriter("m")
    cut = len(CHUNK) // 2
    first = rewriter.feed(ROLE + CHUNK[:cut])
    assert first.count(b'"model":"m"') == 1  # the complete event went out at once
    assert not rewriter.saw_token  # the role chunk is not a token
    second = rewriter.feed(CHUNK[cut:])
    assert json.loads(second[6:-2])["model"] == "m"
    assert rewriter.saw_token
    assert rewriter.flush() == b""


def test_a_model_field_inside_generated_text_is_left_alone() -> None:
    # The model wrote JSON-looking text; inside a JSON string its quotes are escaped.
    content = json.dumps('say {"model": "x"} and more')
    event = b'data: {"choices":[{"delta":{"content":' + content.encode() + b'}}],"model":"d"}\n\n'
    decoded = json.loads(StreamRewriter("asked").feed(event)[6:])
    assert decoded["model"] == "asked"
    assert decoded["choices"][0]["delta"]["content"] == 'say {"model": "x"} and more'


def test_names_that_need_escaping_are_written_as_json() -> None:
    name = 'we\\ird"name'
    body = rewrite_model(b'{"model": "demo.gguf", "x": 1}', model_replacement(name))
    assert json.loads(body)["model"] == name


def test_anthropic_stream_usage_is_read_from_start_and_delta_events() -> None:
    start = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","model":"x",'
        b'"usage":{"cache_read_input_tokens":53,"input_tokens":1,"output_tokens":0}}}\n\n'
    )
    delta = (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":" day"}}\n\n'
    )
    end = (
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"max_tokens"},'
        b'"usage":{"output_tokens":2}}\n\n'
    )
    rewriter = StreamRewriter("claude-ish")
    out = rewriter.feed(start) + rewriter.feed(delta + end)
    assert b'"model":"claude-ish"' in out
    assert rewriter.saw_token
    assert (rewriter.usage.prompt_tokens, rewriter.usage.completion_tokens) == (54, 2)


def test_usage_of_a_whole_answer_and_of_a_stream_with_only_timings() -> None:
    body = b'{"usage":{"prompt_tokens":4,"completion_tokens":3},"timings":{"prompt_ms":2.0}}'
    usage = usage_of_body(body)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.prompt_seconds) == (4, 3, 0.002)
    assert usage_of_body(b"not json") == Usage()
    only_timings = Usage()
    only_timings.update({"timings": {"cache_n": 53, "prompt_n": 1, "predicted_n": 9}})
    assert (only_timings.prompt_tokens, only_timings.completion_tokens) == (54, 9)


def test_relay_body_needs_json_object_and_model() -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_relay_body(b"{bad")
    with pytest.raises(BadRequest, match="JSON object"):
        parse_relay_body(b"[1]")
    with pytest.raises(BadRequest, match="names no model"):
        parse_relay_body(b'{"messages": []}')
    raw = b'{"model": "demo", "stream": true}'
    request = parse_relay_body(raw)
    assert (request.model, request.stream, request.keep_alive) == ("demo", True, None)
    assert request.body is raw  # passed upstream untouched


def test_keep_alive_is_taken_out_of_the_body() -> None:
    request = parse_relay_body(b'{"model": "demo", "keep_alive": "5m", "max_tokens": 3}')
    assert request.keep_alive == 300.0
    assert json.loads(request.body) == {"model": "demo", "max_tokens": 3}


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(0, 0.0), (-1, -1.0), (30, 30.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
     ("-1", -1.0), ("250ms", 0.25), (1.5, 1.5)],
)  # fmt: skip
def test_keep_alive_like_ollama(value: object, seconds: float) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", [True, "soon", "5 minutes", None, float("inf"), [1]])
def test_bad_keep_alive_is_refused(value: object) -> None:
    with pytest.raises(BadRequest, match="keep_alive"):
        parse_keep_alive(value)


def test_errors_in_openai_and_anthropic_shapes() -> None:
    openai = json.loads(error_body(404, "unknown_model", "unknown model 'x'"))
    assert openai == {
        "error": {
            "message": "unknown model 'x'",
            "type": "not_found_error",
            "param": None,
            "code": "unknown_model",
        }
    }
    anthropic = json.loads(error_body(429, "queue_full", "busy", anthropic=True))
    assert anthropic == {"type": "error", "error": {"type": "rate_limit_error", "message": "busy"}}
    huge = json.loads(error_body(400, "bad_request", "x\n" * 5000))
    assert "\n" not in huge["error"]["message"] and len(huge["error"]["message"]) <= 1000
    event = sse_error_event(503, "cancelled", "stopped", anthropic=True)
    assert event.startswith(b"event: error\ndata: {") and event.endswith(b"\n\n")


def test_model_list_has_aliases_state_and_respects_the_key(tmp_path: Path) -> None:
    config = parse_config(
        '[models.a]\npath = "a.gguf"\naliases = ["x"]\n[models.b]\npath = "b.gguf"\n',
        source=tmp_path / "models.toml",
    )
    statuses = {"a": ModelStatus(name="a", state="ready", since=0.0, in_flight=2)}
    listing = model_list(config, statuses, lambda name: True)
    assert [m["id"] for m in listing["data"]] == ["a", "x", "b"]
    assert listing["object"] == "list"
    assert listing["data"][0]["llamad"] == {"state": "ready", "in_flight": 2, "waiting": 0}
    assert listing["data"][1]["llamad"]["alias_of"] == "a"
    assert listing["data"][2]["llamad"] == {"state": "stopped"}
    only_b = model_list(config, statuses, lambda name: name == "b")
    assert [m["id"] for m in only_b["data"]] == ["b"]
    anthropic = model_list(config, statuses, lambda name: True, anthropic=True)
    assert anthropic["first_id"] == "a" and anthropic["last_id"] == "b"
    assert anthropic["data"][0]["type"] == "model"
    assert model_entry(listing, "x") is not None and model_entry(listing, "nope") is None


def _defaults_model() -> ModelConfig:
    text = (
        '[models.m]\npath = "/m.gguf"\ntemperature = 0.2\nmax_tokens = 300\n'
        'system_prompt = "Be brief."\n'
    )
    return parse_config(text, source=Path("/etc/llamad/models.toml"), env={}).models["m"]


def test_model_defaults_fill_what_a_request_leaves_out() -> None:
    model = _defaults_model()
    chat = parse_relay_body(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    body = json.loads(with_model_defaults(chat, model, "/v1/chat/completions"))
    assert (body["temperature"], body["max_tokens"]) == (0.2, 300)
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    # What the request sets wins, its own system message included.
    own = parse_relay_body(
        b'{"model": "m", "temperature": 1.0, "max_completion_tokens": 5, '
        b'"messages": [{"role": "system", "content": "Mine."}]}'
    )
    body = json.loads(with_model_defaults(own, model, "/v1/chat/completions"))
    assert body["temperature"] == 1.0 and "max_tokens" not in body
    assert body["messages"] == [{"role": "system", "content": "Mine."}]
    # Anthropic's max_tokens is the client's; its system prompt is a field.
    anthropic = parse_relay_body(b'{"model": "m", "max_tokens": 9, "messages": []}')
    body = json.loads(with_model_defaults(anthropic, model, "/v1/messages"))
    assert (body["max_tokens"], body["temperature"], body["system"]) == (9, 0.2, "Be brief.")
    embeddings = parse_relay_body(b'{"model": "m", "input": "x"}')
    assert with_model_defaults(embeddings, model, "/v1/embeddings") == embeddings.body


@pytest.mark.parametrize(
    "last",
    [
        b"data: [DONE]\n\n",
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
        b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n',
    ],
    ids=["chat and text completions", "anthropic messages", "responses"],
)
def test_the_last_event_of_each_stream_shape_is_noticed(last: bytes) -> None:
    rewriter = StreamRewriter("m")
    rewriter.feed(ROLE + CHUNK)
    assert not rewriter.ended
    rewriter.feed(last[:5])  # not whole yet
    assert not rewriter.ended
    rewriter.feed(last[5:])
    assert rewriter.ended
