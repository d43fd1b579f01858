"""The pure parts of talking to llama-server: SSE, chunks, errors, context fitting."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from llamad.errors import ContextOverflow, UpstreamError
from llamad.llama_server import Endpoint
from llamad.supervisor import http_client
from llamad.upstream import (
    _READ_BYTES,
    Chunk,
    ResponseReader,
    SSEDecoder,
    _FdReader,
    exchange_direct,
    exchange_httpx,
    in_words,
    interpret_chunk,
    merge_chunks,
    read_all,
    refusal_message,
    relay_request,
    stream_chat,
    stream_chat_direct,
    turns_to_drop,
)
from tests.conftest import short_tempdir


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


# ------------------------------------------------------- the typed fast path

LLAMA_SERVER_CHUNK = (
    b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" about"}}],'
    b'"created":1796085992,"id":"chatcmpl-JDEsySW7U39AhhsgUEW1ZLGY3ATgtcNo","model":"demo.gguf",'
    b'"system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}'
)

ODD_CHUNKS = [
    LLAMA_SERVER_CHUNK,
    b'{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}]}',
    b'{"choices":[{"finish_reason":"length","index":0,"delta":{}}],"timings":{"predicted_n":3}}',
    b'{"choices":[],"usage":{"completion_tokens":7}}',
    b'{"choices":null}',
    b"{}",
    b'{"choices":[{"delta":null,"finish_reason":"stop"}]}',
    b'{"choices":[{"delta":{"content":5}}]}',  # wrong types: the generic reading decides
    b'{"choices":[{"delta":{"content":"a"},"finish_reason":7}]}',
    b'{"choices":["x"]}',
    b'{"choices":{"delta":{}}}',
    b'{"choices":[{"delta":{"content":"a"}}],"timings":[1,2]}',
    b'{"choices":[{"delta":{"tool_calls":[{"index":true,"id":5,"function":"f"}]}}]}',
    b'{"choices":[{"delta":{"tool_calls":[{"function":{"name":"n","arguments":null}}]}}]}',
    b'{"choices":[{"delta":{"tool_calls":{"index":0}}}]}',
    b'{"choices":[{"delta":{"content":"\\u00e9\\"}}],\\n"}}]}',
    b" [DONE] ",
    b"[DONE]",
]

MALFORMED = [
    (b'{"error":{"message":"boom"}}', "llama-server: boom"),
    (b'{"error":null,"choices":[]}', "llama-server: "),
    (b"{nope", "not JSON"),
    (b'{"choices":[{"delta":{"content":"cut', "not JSON"),
    (LLAMA_SERVER_CHUNK[:-1], "not JSON"),
    (b"[1,2]", "unexpected chunk"),
    (b'"text"', "unexpected chunk"),
    (b'{"choices":[{"delta":{"tool_calls":["nonsense"]}}]}', "malformed tool call"),
]


@pytest.mark.parametrize("payload", ODD_CHUNKS)
def test_typed_reading_agrees_with_the_generic_one(payload: bytes) -> None:
    from llamad.upstream import _interpret_generic

    assert interpret_chunk(payload) == _interpret_generic(payload)


@pytest.mark.parametrize(("payload", "message"), MALFORMED)
def test_malformed_chunks_are_one_line_upstream_errors(payload: bytes, message: str) -> None:
    with pytest.raises(UpstreamError, match=re.escape(message)) as caught:
        interpret_chunk(payload)
    assert "\n" not in str(caught.value)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5), _containers, max_leaves=8
)


def _maybe(strategy: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return strategy | _json_values


_chunk_like = st.fixed_dictionaries(
    {},
    optional={
        "choices": _maybe(
            st.lists(
                _maybe(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "finish_reason": _maybe(st.sampled_from(["stop", "length"])),
                            "delta": _maybe(
                                st.fixed_dictionaries(
                                    {},
                                    optional={
                                        "content": _maybe(st.text(max_size=8)),
                                        "tool_calls": _maybe(
                                            st.lists(
                                                _maybe(
                                                    st.fixed_dictionaries(
                                                        {},
                                                        optional={
                                                            "index": _json_values,
                                                            "id": _json_values,
                                                            "function": _json_values,
                                                        },
                                                    )
                                                ),
                                                max_size=2,
                                            )
                                        ),
                                    },
                                )
                            ),
                        },
                    )
                ),
                max_size=2,
            )
        ),
        "timings": _json_values,
        "usage": _json_values,
        "error": _json_values,
        "model": _json_values,
    },
)


@given(_chunk_like)
@settings(max_examples=300, deadline=None)
def test_any_chunk_reads_the_same_both_ways(data: dict[str, object]) -> None:
    from llamad.upstream import _interpret_generic

    payload = json.dumps(data).encode()
    try:
        expected: Chunk | str = _interpret_generic(payload)
    except UpstreamError as exc:
        expected = str(exc)
    try:
        got: Chunk | str = interpret_chunk(payload)
    except UpstreamError as exc:
        got = str(exc)
    assert got == expected


# ------------------------------------------------------- one chunk per read


def test_merged_chunks_leave_a_reader_where_each_would() -> None:
    from llamad.upstream import ToolCallDelta, merge_chunks

    chunks = [
        Chunk(text="He"),
        Chunk(tool_calls=(ToolCallDelta(index=0, id="c1", name="calc"),)),
        Chunk(text="llo", timings={"predicted_n": 1}),
        Chunk(tool_calls=(ToolCallDelta(index=0, arguments="{}"),)),
        Chunk(finish_reason="stop", timings={"predicted_n": 2}, usage={"completion_tokens": 2}),
        Chunk(),
    ]
    merged = merge_chunks(chunks)
    assert merged.text == "Hello"
    assert merged.finish_reason == "stop"
    assert merged.timings == {"predicted_n": 2}
    assert merged.usage == {"completion_tokens": 2}
    assert [c.id or c.arguments for c in merged.tool_calls] == ["c1", "{}"]
    assert merge_chunks(chunks[:1]) is chunks[0]


def test_a_read_stops_at_done_and_keeps_what_came_before_an_error() -> None:
    from llamad.upstream import read_chunks

    hello = [
        b'{"choices":[{"delta":{"content":"Hel"}}]}',
        b'{"choices":[{"delta":{"content":"lo"}}]}',
    ]
    chunk, done, error = read_chunks(
        [*hello, b"[DONE]", b'{"choices":[{"delta":{"content":"x"}}]}']
    )
    assert (chunk.text if chunk else None, done, error) == ("Hello", True, None)
    chunk, done, error = read_chunks([*hello, b"{garbage", hello[0]])
    assert chunk is not None and chunk.text == "Hello" and not done
    assert isinstance(error, UpstreamError) and "not JSON" in str(error)
    assert read_chunks([]) == (None, False, None)
    assert read_chunks([b"[DONE]"]) == (None, True, None)


# ------------------------------------------------------- HTTP responses, sans I/O

CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def _feed_in_pieces(data: bytes, size: int) -> tuple[ResponseReader, bytes]:
    reader = ResponseReader()
    body = b"".join(reader.feed(data[i : i + size]) for i in range(0, len(data), size))
    return reader, body


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 100_000])
def test_a_chunked_body_survives_any_split(size: int) -> None:
    events = [b"data: {}\n\n", b"data: " + LLAMA_SERVER_CHUNK + b"\n\n", b"data: [DONE]\n\n"]
    reader, body = _feed_in_pieces(CHUNKED_HEAD + _chunked(*events), size)
    assert reader.status == 200
    assert reader.headers["content-type"] == "text/event-stream"
    assert body == b"".join(events)
    assert reader.complete
    reader.closed()  # a whole response: fine


def test_chunk_extensions_and_trailers_are_skipped() -> None:
    data = CHUNKED_HEAD + b"3;name=value\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
    reader, body = _feed_in_pieces(data, 4)
    assert (body, reader.complete) == (b"abc", True)


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_length_and_close_delimited_bodies(size: int) -> None:
    error = b'{"error":{"message":"no"}}'
    head = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(error)
    reader, body = _feed_in_pieces(head + error, size)
    assert (reader.status, body, reader.complete) == (400, error, True)
    reader, body = _feed_in_pieces(b"HTTP/1.0 500 Oops\r\n\r\nsome text", size)
    assert (reader.status, body, reader.complete) == (500, b"some text", False)
    reader.closed()
    assert reader.complete


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "bad HTTP status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad HTTP header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "bad Content-Length"),
        (CHUNKED_HEAD + b"zz\r\nabc\r\n", "malformed chunked body"),
        (CHUNKED_HEAD + b"3\r\nabcXY", "malformed chunked body"),
        (CHUNKED_HEAD + b"-3\r\nabc\r\n", "malformed chunked body"),
        (CHUNKED_HEAD + b"1" * 5000, "malformed chunked body"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000, "never ends"),
    ],
)
def test_malformed_responses_are_one_line_errors(data: bytes, message: str) -> None:
    with pytest.raises(UpstreamError, match=message) as caught:
        _feed_in_pieces(data, 4096)
    assert "\n" not in str(caught.value)


def test_heads_without_bodies() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 120\r\n\r\n"
    reader = ResponseReader(no_body=True)  # the answer to HEAD
    assert (reader.feed(head), reader.status, reader.complete) == (b"", 200, True)
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert (reader.status, reader.complete) == (204, True)
    reader.closed()


def test_a_relayed_request_is_framed_by_the_relay_and_keeps_no_credentials() -> None:
    headers = {
        "Authorization": "Bearer sk-llamad",
        "x-api-key": "sk-llamad",
        "Cookie": "a=b",
        "Host": "evil.example",
        "Transfer-Encoding": "chunked",
        "Content-Length": "999",
        "Connection": "keep-alive",
        "Accept": "text/event-stream",
        "X-Custom": "kept",
    }
    data = relay_request(
        Endpoint(socket_path=Path("/x.sock")), "POST", "/slots/0 x?action=save", b"{}", headers
    )
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /slots/0%20x?action=save HTTP/1.1"
    assert sorted(lines[1:]) == sorted(
        [
            "Host: llama-server",
            "Accept: text/event-stream",
            "X-Custom: kept",
            "Content-Length: 2",
            "Connection: close",
        ]
    )
    assert body == b"{}"
    get = relay_request(Endpoint(port=8080), "GET", "/props", b"", {})
    assert get == b"GET /props HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nConnection: close\r\n\r\n"


def test_a_response_cut_short_is_an_error() -> None:
    reader, _ = _feed_in_pieces(CHUNKED_HEAD + b"5\r\nab", 3)
    with pytest.raises(UpstreamError, match="closed the connection in the middle"):
        reader.closed()
    with pytest.raises(UpstreamError, match="closed the connection in the middle"):
        ResponseReader().closed()


# ------------------------------------------- streaming from the real llama-server

CHAT = {
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "temperature": 0.0,
    "seed": 7,
    "max_tokens": 60,
    "ignore_eos": True,
}


@dataclass
class RealServer:
    process: subprocess.Popen[bytes]
    endpoint: Endpoint


@contextlib.contextmanager
def real_server(
    binary: Path, model: Path, *, port: bool = False, ctx: int = 512
) -> Iterator[RealServer]:
    directory = short_tempdir()
    endpoint = Endpoint(port=_free_port()) if port else Endpoint(socket_path=directory / "s.sock")
    where = (
        ["--host", "127.0.0.1", "--port", str(endpoint.port)]
        if port
        else ["--host", str(endpoint.socket_path)]
    )
    command = [str(binary), "-m", str(model), "-c", str(ctx), "--threads", "1", *where]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        transport = (
            httpx.HTTPTransport(uds=str(endpoint.socket_path))
            if endpoint.socket_path
            else httpx.HTTPTransport()
        )
        with httpx.Client(transport=transport, base_url=endpoint.base_url, timeout=2) as probe:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if probe.get("/health").status_code == 200:
                        break
                assert process.poll() is None, "llama-server exited"
                assert time.monotonic() < deadline, "llama-server did not become ready"
                time.sleep(0.05)
        yield RealServer(process, endpoint)
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _collect(chunks: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in chunks]


def _read_whole(server: RealServer, request: dict[str, Any]) -> list[Chunk]:
    """The reference: the whole SSE body read at once by a plain client, then decoded."""
    endpoint = server.endpoint
    transport = (
        httpx.HTTPTransport(uds=str(endpoint.socket_path))
        if endpoint.socket_path
        else httpx.HTTPTransport()
    )
    with httpx.Client(transport=transport, base_url=endpoint.base_url, timeout=30) as client:
        body = client.post("/v1/chat/completions", json=request).content
    chunks = [interpret_chunk(event) for event in SSEDecoder().feed(body)]
    assert chunks[-1].done
    return chunks[:-1]


@pytest.mark.server
@pytest.mark.parametrize("port", [False, True], ids=["unix socket", "tcp port"])
async def test_direct_stream_reads_what_a_plain_client_reads(
    llama_server_binary: Path, demo_models: dict[str, Path], port: bool
) -> None:
    with real_server(llama_server_binary, demo_models["demo"], port=port) as server:
        whole = _read_whole(server, CHAT)
        direct = await _collect(stream_chat_direct(server.endpoint, CHAT))
    final = merge_chunks(direct)
    assert final.finish_reason == "length"
    assert final.timings is not None and final.timings["predicted_n"] == 60
    assert "".join(c.text for c in direct) == "".join(c.text for c in whole) != ""


# httpx leaves the generators under aiter_raw to the garbage collector when a
# reply is left at [DONE] (as stream_chat always has); trio reports them.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.server
async def test_the_httpx_stream_reads_the_same_merged_per_read(
    llama_server_binary: Path, demo_models: dict[str, Path]
) -> None:
    with real_server(llama_server_binary, demo_models["demo"]) as server:
        whole = _read_whole(server, CHAT)
        async with http_client(server.endpoint, timeout=30.0, keepalive=False) as client:
            chunks = await _collect(stream_chat(client, CHAT))
    assert "".join(c.text for c in chunks) == "".join(c.text for c in whole) != ""
    assert len(chunks) <= len(whole)  # never more chunks than events: merged per read
    final = merge_chunks(chunks)
    assert final.finish_reason == "length"
    assert final.timings is not None and final.timings["predicted_n"] == 60


@pytest.mark.server
async def test_a_batch_window_merges_tokens_and_loses_none(
    llama_server_binary: Path, demo_models: dict[str, Path]
) -> None:
    request = CHAT | {"max_tokens": 200}
    with real_server(llama_server_binary, demo_models["demo"], ctx=1024) as server:
        each = await _collect(stream_chat_direct(server.endpoint, request))
        batched = await _collect(stream_chat_direct(server.endpoint, request, batch_window=0.05))
    assert "".join(c.text for c in batched) == "".join(c.text for c in each)
    # The demo model makes hundreds of tokens per second: far fewer reads than tokens.
    assert len([c for c in batched if c.text]) < 100
    assert merge_chunks(batched).finish_reason == "length"


@pytest.mark.server
async def test_refusals_and_a_killed_server_are_one_line_errors(
    llama_server_binary: Path, demo_models: dict[str, Path]
) -> None:
    with real_server(llama_server_binary, demo_models["demo"], ctx=256) as server:
        too_long = CHAT | {"messages": [{"role": "user", "content": "word " * 2000}]}
        with pytest.raises(ContextOverflow):
            await _collect(stream_chat_direct(server.endpoint, too_long))
        endless = CHAT | {"max_tokens": 100_000}
        texts: list[str] = []
        with pytest.raises(UpstreamError) as caught:
            async for chunk in stream_chat_direct(server.endpoint, endless):
                texts.append(chunk.text)
                if len(texts) == 5:
                    server.process.kill()
    assert "closed the connection in the middle" in str(
        caught.value
    ) or "lost the connection" in str(caught.value)
    assert "\n" not in str(caught.value)
    with pytest.raises(UpstreamError, match="did not answer at") as refused:
        await _collect(stream_chat_direct(server.endpoint, CHAT))
    assert "\n" not in str(refused.value)


@pytest.mark.server
async def test_a_cancelled_stream_stops_at_once_and_frees_the_server(
    llama_server_binary: Path, demo_models: dict[str, Path]
) -> None:
    endless = CHAT | {"max_tokens": 100_000}
    with real_server(llama_server_binary, demo_models["demo"], ctx=8192) as server:
        texts: list[str] = []
        with trio.CancelScope() as scope:
            async for chunk in stream_chat_direct(server.endpoint, endless):
                texts.append(chunk.text)
                if len(texts) == 20:
                    scope.cancel()
        assert scope.cancelled_caught and len(texts) == 20
        # The closed socket told llama-server to stop: its one slot serves the next.
        again = await _collect(stream_chat_direct(server.endpoint, CHAT))
        assert merge_chunks(again).timings is not None
        assert "".join(c.text for c in again) == "".join(c.text for c in _read_whole(server, CHAT))


@pytest.mark.server
@pytest.mark.parametrize("port", [False, True], ids=["unix socket", "tcp port"])
async def test_a_relayed_exchange_reads_what_a_plain_client_reads(
    llama_server_binary: Path, demo_models: dict[str, Path], port: bool
) -> None:
    with real_server(llama_server_binary, demo_models["demo"], port=port) as server:
        whole = _read_whole(server, CHAT)
        body = json.dumps(CHAT).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        async with exchange_direct(
            server.endpoint, "POST", "/v1/chat/completions", body, headers, batch_window=0.01
        ) as response:
            assert response.status == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            pieces = [await response.read()]
            while piece := await response.read(batch=True):
                pieces.append(piece)
        async with exchange_direct(server.endpoint, "GET", "/props") as props:
            n_ctx = json.loads(await read_all(props))["default_generation_settings"]["n_ctx"]
        async with exchange_direct(server.endpoint, "HEAD", "/health") as health:
            assert (health.status, await health.read()) == (200, b"")
        async with exchange_direct(server.endpoint, "GET", "/no-such-thing") as missing:
            assert missing.status == 404 and b"error" in await read_all(missing)
    streamed = [interpret_chunk(e) for e in SSEDecoder().feed(b"".join(pieces))]
    assert streamed[-1].done
    assert "".join(c.text for c in streamed) == "".join(c.text for c in whole) != ""
    # The batch window joined tokens: fewer pieces than events.
    assert len(pieces) < len(streamed)
    assert n_ctx == 512


@pytest.mark.server
async def test_a_cancelled_exchange_frees_the_server_at_once(
    llama_server_binary: Path, demo_models: dict[str, Path]
) -> None:
    endless = json.dumps(CHAT | {"max_tokens": 100_000}).encode()
    with real_server(llama_server_binary, demo_models["demo"], ctx=8192) as server:
        with trio.CancelScope() as scope:
            async with exchange_direct(
                server.endpoint, "POST", "/v1/chat/completions", endless
            ) as response:
                for _ in range(20):
                    assert await response.read()
                scope.cancel()
                await trio.sleep(1)
        assert scope.cancelled_caught
        # The one slot is free for the next request at once.
        with trio.fail_after(5):
            again = await _collect(stream_chat_direct(server.endpoint, CHAT))
        assert merge_chunks(again).timings is not None


async def _scripted_upstream(reply: bytes, nursery: trio.Nursery) -> Endpoint:
    """A socket that answers any request with ``reply`` and closes: faults on cue."""
    path = short_tempdir() / "s.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(str(path))
    listener.listen()

    async def serve() -> None:
        with listener:
            connection, _ = await listener.accept()
            with connection:
                await connection.recv(65536)
                await connection.send(reply)

    nursery.start_soon(serve)
    return Endpoint(socket_path=path)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (CHUNKED_HEAD + _chunked(b"data: {nope\n\n"), "not JSON"),
        (CHUNKED_HEAD + b"zz\r\n", "malformed chunked body"),
        (CHUNKED_HEAD + _chunked(b"data: {}\n\n")[:-5], "closed the connection in the middle"),
        (CHUNKED_HEAD + _chunked(b"data: {}\n\n"), "ended its reply without [DONE]"),
        (
            b"HTTP/1.1 503 Unavailable\r\nContent-Length: 38\r\n\r\n"
            b'{"error":{"message":"Loading model"}}\n',
            "(HTTP 503): Loading model",
        ),
        (b"", "closed the connection in the middle"),
    ],
)
async def test_faults_only_a_broken_upstream_shows(reply: bytes, message: str) -> None:
    hello = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
    texts: list[str] = []
    async with trio.open_nursery() as nursery:
        endpoint = await _scripted_upstream(
            reply.replace(b"\r\n\r\n", b"\r\n\r\n" + b"%x\r\n%s\r\n" % (len(hello), hello), 1)
            if reply.startswith(CHUNKED_HEAD)
            else reply,
            nursery,
        )
        with pytest.raises(UpstreamError) as caught:
            async for chunk in stream_chat_direct(endpoint, CHAT):
                texts.append(chunk.text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    if reply.startswith(CHUNKED_HEAD) and "chunked" not in message:
        assert texts[:1] == ["Hi"]  # the events before the fault were handed on


async def _paced_upstream(
    gaps: list[float], nursery: trio.Nursery, *, end_gap: float = 0.001
) -> Endpoint:
    """A llama-server stand-in that sends one token after each gap, then the end of the reply."""
    path = short_tempdir() / "s.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(str(path))
    listener.listen()

    def chunk(event: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(event), event)

    async def serve() -> None:
        with listener:
            connection, _ = await listener.accept()
            with connection:
                await connection.recv(65536)
                await connection.send(CHUNKED_HEAD)
                for gap in gaps:
                    await trio.sleep(gap)
                    await connection.send(
                        chunk(b'data: {"choices":[{"delta":{"content":"t"}}]}\n\n')
                    )
                await trio.sleep(end_gap)
                finish = b'data: {"choices":[{"delta":{},"finish_reason":"length"}]}\n\n'
                await connection.send(chunk(finish))
                await trio.sleep(end_gap)
                await connection.send(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    nursery.start_soon(serve)
    return Endpoint(socket_path=path)


async def _timed_stream(endpoint: Endpoint, window: float) -> list[tuple[float, Chunk]]:
    return [
        (trio.current_time(), chunk)
        async for chunk in stream_chat_direct(endpoint, CHAT, batch_window=window)
    ]


async def test_the_batch_window_joins_a_fast_model_and_leaves_slower_ones_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        fast = await _paced_upstream([0.0005] * 40, nursery)
        joined = await _timed_stream(fast, 0.01)
        slow = await _paced_upstream([0.05] * 5, nursery)
        began = trio.current_time()
        each = await _timed_stream(slow, 0.01)
        # A token every 8 ms: under two per 10 ms window, so a sleep would bring one.
        medium = await _paced_upstream([0.008] * 5, nursery)
        medium_began = trio.current_time()
        unslept = await _timed_stream(medium, 0.01)
    # A token every 0.5 ms read every 10 ms: 40 tokens in a handful of reads.
    assert "".join(c.text for _, c in joined) == "t" * 40
    assert len([c for _, c in joined if c.text]) <= 4
    # A token every 50 ms: each read as it comes, none held back by the window...
    assert [round(at - began, 3) for at, c in each if c.text] == [0.05, 0.1, 0.15, 0.2, 0.25]
    # ...and the end of the reply (finish_reason, then [DONE]) is not waited for either.
    last_text = max(at for at, c in each if c.text)
    assert each[-1][0] - last_text < 0.005
    assert each[-1][1].finish_reason == "length"
    texts = [round(at - medium_began, 3) for at, c in unslept if c.text]
    assert texts == [0.008, 0.016, 0.024, 0.032, 0.04]


async def test_the_batch_window_never_waits_while_reads_fill_their_buffer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A flat-out stream is not capped at one buffer per window (it was: 46,000 tokens/s)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        waiting = b"data: {}\n\n" * (_READ_BYTES * 2 // 10 + 100)  # two full reads and a part
        theirs.sendall(waiting)
        reader = _FdReader(ours.fileno())
        began = trio.current_time()
        read = b""
        while len(read) < len(waiting):
            read += await reader.receive(batch_window=0.01)
        assert read == waiting
        assert trio.current_time() - began < 0.01  # not one window slept


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (CHUNKED_HEAD + b"5\r\nhel", "closed the connection in the middle"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "closed the connection in the middle"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "bad HTTP status line"),
    ],
)
async def test_a_broken_relayed_exchange_is_one_line_error(reply: bytes, message: str) -> None:
    async with trio.open_nursery() as nursery:
        endpoint = await _scripted_upstream(reply, nursery)
        with pytest.raises(UpstreamError, match=message) as caught:
            async with exchange_direct(endpoint, "GET", "/props") as response:
                await read_all(response)
    assert "\n" not in str(caught.value)


async def test_the_httpx_exchange_answers_the_same_shape() -> None:
    seen: list[httpx.Request] = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request)

        async def events() -> AsyncIterator[bytes]:
            yield b"data: x\n\n"
            yield b"data: y\n\n"

        return httpx.Response(200, content=events(), headers={"content-type": "text/event-stream"})

    transport = httpx.MockTransport(upstream)
    async with httpx.AsyncClient(transport=transport, base_url="http://remote") as client:
        headers = {"Authorization": "Bearer sk-llamad", "X-Custom": "kept"}
        async with exchange_httpx(client, "POST", "/v1/completions", b"{}", headers) as response:
            assert response.status == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert await read_all(response) == b"data: x\n\ndata: y\n\n"
    assert "authorization" not in seen[0].headers and seen[0].headers["x-custom"] == "kept"


async def test_the_httpx_exchange_hands_over_a_compressed_body_decoded() -> None:
    # The relay never passes Content-Encoding on: a remote server's gzip must be undone.
    answer = b'{"model":"remote","usage":{"prompt_tokens":3}}'

    async def compressed() -> AsyncIterator[bytes]:
        yield gzip.compress(answer)

    async def upstream(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "application/json", "content-encoding": "gzip"}
        return httpx.Response(200, content=compressed(), headers=headers)

    transport = httpx.MockTransport(upstream)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://remote") as client,
        exchange_httpx(client, "POST", "/v1/chat/completions", b"{}") as response,
    ):
        assert await read_all(response) == answer


def test_connection_failures_are_told_in_words() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    assert in_words(refused) == "connection refused"
    assert in_words(trio.TooSlowError()) == "it did not answer in time"
    closed = httpx.RemoteProtocolError("peer closed connection")
    assert in_words(closed) == "it closed the connection"
    assert "Error(" not in in_words(httpx.ConnectError("[Errno 111] Connection refused"))
