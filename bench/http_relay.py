"""HTTP API benchmarks: what llamad's OpenAI-compatible relay costs a stream.

Overhead (``overhead``): the same streamed chat completion from the demo model
on the real llama-server (same prompt, seed, ``max_tokens``, ``ignore_eos``),
read two ways per round in rotating order: (a) straight from the llama-server
process llamad supervises (its Unix socket), (b) through llamad's HTTP API
(``POST /v1/chat/completions`` over TCP with the API key; every event's
``model`` rewritten on the way). Reported: streaming tokens/s (first token to
last) via / direct, and the time to first token added.

Capacity (``capacity``): llamad runs ``bench/fast_upstream.py`` instead of
llama-server, which streams as fast as it can; tokens/s relayed for one
stream, llamad's CPU time per 1,000 tokens, and the same client reading the
fast upstream directly as the baseline.

    .venv/bin/python -m bench --only http_relay,http_capacity
"""

from __future__ import annotations

import json
import socket
import statistics
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    Daemon,
    Figure,
    Goal,
    cpu_seconds,
    interleave,
    model_table,
    running_daemon,
)
from bench.common import shared_demo_models as demo_models
from bench.relay import FAST_UPSTREAM, SEED
from bench.streams import SSEParser, Stream, completion_payload, direct_stream, read_streams


def _tcp_opener(address: str) -> Callable[[], socket.socket]:
    host, _, port = address.rpartition(":")

    def open_() -> socket.socket:
        sock = socket.create_connection((host.strip("[]"), int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return open_


def http_stream(address: str, key: str, model: str, max_tokens: int) -> Stream:
    """The same chat completion as ``direct_stream``, through llamad's HTTP API."""
    payload = {"model": model, **completion_payload(max_tokens, seed=SEED)}
    body = json.dumps(payload).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Accept: */*\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    return Stream(_tcp_opener(address), request, SSEParser())


def _address_and_key(daemon: Daemon) -> tuple[str, str]:
    status = daemon.status()
    assert status.http is not None and status.api_key_file is not None
    return status.http, Path(status.api_key_file).read_text().strip()


def overhead(rounds: int = 7, max_tokens: int = 2000) -> list[Figure]:
    table = model_table("demo", demo_models()["demo"], ctx_size=4096)
    with running_daemon(table, default_model="demo") as daemon:
        endpoint = Path(daemon.wait_ready("demo").endpoint)
        address, key = _address_and_key(daemon)
        runs: dict[str, list[Stream]] = {"direct": [], "http": []}

        def direct() -> None:
            stream = direct_stream(endpoint, max_tokens, seed=SEED)
            read_streams([stream])
            runs["direct"].append(stream)

        def via_http() -> None:
            stream = http_stream(address, key, "demo", max_tokens)
            read_streams([stream])
            runs["http"].append(stream)

        interleave(1, direct, via_http)  # warm-up
        runs = {name: [] for name in runs}
        interleave(rounds, direct, via_http)

    counts = {name: sorted({s.tokens for s in streams}) for name, streams in runs.items()}
    direct_rate = [s.rate for s in runs["direct"]]
    http_rate = [s.rate for s in runs["http"]]
    direct_ttft = [s.ttft * 1000 for s in runs["direct"]]
    http_ttft = [s.ttft * 1000 for s in runs["http"]]
    ratios = [v / d for v, d in zip(http_rate, direct_rate, strict=True)]
    added = [v - d for v, d in zip(http_ttft, direct_ttft, strict=True)]
    return [
        Figure(
            "HTTP API relay tokens/s (OpenAI SSE)",
            "tok/s",
            http_rate,
            baseline=direct_rate,
            baseline_name="llama-server direct",
            ratio=statistics.median(ratios),
            goal=Goal("ratio", ">=", 0.99),
            note=f"{max_tokens} tokens/stream, demo model; tokens seen {counts}; "
            "ratio = median of per-round ratios",
        ),
        Figure(
            "HTTP API added first-token time",
            "ms",
            added,
            baseline=direct_ttft,
            baseline_name="direct TTFT",
            ratio=statistics.median(http_ttft) / statistics.median(direct_ttft),
            goal=Goal("value", "<=", 1.0),  # issue 15 (issue 13: 2 ms)
            note="per round: via TTFT - direct TTFT (new TCP connection and key check "
            f"included); via TTFT median {statistics.median(http_ttft):.2f} ms",
        ),
    ]


def capacity(rounds: int = 3, tokens: int = 50_000) -> list[Figure]:
    table = model_table("fast", demo_models()["demo"], ctx_size=100_000)
    with running_daemon(table, binary=FAST_UPSTREAM, default_model="fast") as daemon:
        endpoint = Path(daemon.wait_ready("fast").endpoint)
        address, key = _address_and_key(daemon)
        llamad = daemon.psutil
        results: dict[str, list[float]] = {"direct": [], "http": [], "cpu": []}
        short: list[int] = []

        def direct() -> None:
            stream = direct_stream(endpoint, tokens)
            wall = read_streams([stream])
            results["direct"].append(stream.tokens / wall)

        def via_http() -> None:
            stream = http_stream(address, key, "fast", tokens)
            before = cpu_seconds(llamad)
            wall = read_streams([stream])
            results["cpu"].append((cpu_seconds(llamad) - before) / tokens * 1e6)
            results["http"].append(stream.tokens / wall)
            if stream.tokens < tokens:
                short.append(stream.tokens)

        interleave(1, direct, via_http)
        for values in results.values():
            values.clear()
        interleave(rounds, direct, via_http)

    return [
        Figure(
            "HTTP API relay capacity, 1 stream",
            "tok/s",
            results["http"],
            baseline=results["direct"],
            baseline_name="fast upstream direct",
            goal=Goal("value", ">=", 30_000),
            note=f"{tokens} tokens, request to last byte"
            + (f"; SHORT: streams ended after {short} tokens" if short else ""),
            failed=bool(short),
        ),
        Figure(
            "HTTP API llamad CPU per 1k tokens, 1 stream",
            "ms CPU/1k tok",
            results["cpu"],
            note="llamad user+system time / tokens relayed, flat out",
        ),
    ]
