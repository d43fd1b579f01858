"""The pure parts of talking to llama-server: SSE, chunks, errors, context fitting."""

from __future__ import annotations

import pytest

from llamad.errors import ContextOverflow, UpstreamError
from llamad.upstream import (
    SSEDecoder,
    interpret_chunk,
    refusal_message,
    turns_to_drop,
)


def test_sse_events_split_across_reads() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"lo"}}]}\r\n\r\n'
        b": keep-alive comment\n\n"
        b"data: [DONE]\n\n"
    )
    decoder = SSEDecoder()
    events: list[bytes] = []
    for i in range(0, len(stream), 7):
        events += decoder.feed(stream[i : i + 7])
    assert [interpret_chunk(e).text for e in events[:2]] == ["Hel", "lo"]
    assert interpret_chunk(events[2]).done
    assert len(events) == 3


def test_last_chunk_carries_timings() -> None:
    chunk = interpret_chunk(
        b'{"choices":[{"delta":{},"finish_reason":"length"}],'
        b'"timings":{"predicted_n":20,"predicted_per_second":1500.5}}'
    )
    assert chunk.finish_reason == "length"
    assert chunk.timings == {"predicted_n": 20, "predicted_per_second": 1500.5}


def test_error_chunk_and_garbage() -> None:
    with pytest.raises(UpstreamError, match="llama-server: boom"):
        interpret_chunk(b'{"error":{"message":"boom"}}')
    with pytest.raises(UpstreamError, match="not JSON"):
        interpret_chunk(b"{nope")


def test_refusals_are_one_readable_line() -> None:
    context = refusal_message(
        400,
        b'{"error":{"code":400,"message":"the request exceeds the available context size",'
        b'"type":"exceed_context_size_error"}}',
    )
    assert isinstance(context, ContextOverflow)
    assert "raise ctx_size" in str(context)
    other = refusal_message(500, b'{"error":{"message":"out of memory"}}')
    assert str(other) == "llama-server refused the request (HTTP 500): out of memory"
    assert "\n" not in str(refusal_message(502, b"<html>\nbad gateway\n</html>"))


@pytest.mark.parametrize(
    ("turns", "fixed", "budget", "dropped"),
    [
        ([10, 10, 10], 5, 100, 0),
        ([50, 30, 10], 5, 40, 2),  # 5 + 10 fits only once both older turns go
        ([50, 30, 10], 5, 46, 1),  # 5 + 30 + 10 = 45 fits after dropping one
        ([10], 0, 10, 0),
    ],
)
def test_turns_to_drop(turns: list[int], fixed: int, budget: int, dropped: int) -> None:
    assert turns_to_drop(turns, fixed, budget) == dropped


def test_newest_turn_alone_too_big() -> None:
    with pytest.raises(ContextOverflow, match="needs about 105 tokens"):
        turns_to_drop([10, 100], 5, 50)


def test_streamed_tool_calls_are_assembled_in_index_order() -> None:
    from llamad.upstream import ToolCallAssembler

    pieces = [
        b'{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","type":"function",'
        b'"function":{"name":"calculator","arguments":""}}]}}]}',
        b'{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"c2",'
        b'"function":{"name":"file_search","arguments":"{\\"text\\":"}}]}}]}',
        b'{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"expr"}}]}}]}',
        b'{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":'
        b'"ession\\": \\"2**64\\"}"}}]}}]}',
        b'{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"arguments":"\\"x\\"}"}}]}}]}',
        b'{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}',
    ]
    assembler = ToolCallAssembler()
    chunks = [interpret_chunk(piece) for piece in pieces]
    for chunk in chunks:
        assembler.feed(chunk.tool_calls)
    assert chunks[-1].finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments) for c in assembler.calls()] == [
        ("c1", "calculator", '{"expression": "2**64"}'),
        ("c2", "file_search", '{"text":"x"}'),
    ]


def test_malformed_tool_call_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="malformed tool call"):
        interpret_chunk(b'{"choices":[{"delta":{"tool_calls":["nonsense"]}}]}')
