"""Relay benchmarks: what llamad costs a stream of tokens.

Overhead (``overhead``): a long generation from the demo model on the real
llama-server (same prompt, seed, temperature, ``max_tokens``, ``ignore_eos``),
read three ways per round, in rotating order: (a) straight from the
llama-server process llamad supervises (its Unix socket, from ``status``),
(b) through llamad's control socket, (c) through llamad's WebSocket (msgpack,
connection opened before the clock starts), each read by the same kind of
one-thread client (bench/streams.py). Reported: streaming tokens/s (first
token to last) via / direct, the time to first token added by llamad, and
each client's CPU time per token in the notes.

Capacity (``capacity``): llamad runs ``bench/fast_upstream.py`` instead of
llama-server, which streams as fast as it can; tokens/s relayed for one stream
and in total for 50 concurrent streams (``parallel = 50``), llamad's CPU time
per 1,000 tokens, and the same client reading the fast upstream directly as
the baseline.

    .venv/bin/python -m bench --only relay_overhead,relay_capacity
"""

from __future__ import annotations

import statistics
from pathlib import Path

import psutil

from bench.common import (
    ROOT,
    Daemon,
    Figure,
    Goal,
    cpu_seconds,
    interleave,
    model_table,
    running_daemon,
    shared_demo_models,
)
from bench.streams import (
    FrameParser,
    Stream,
    direct_stream,
    llamad_stream,
    read_one,
    read_streams,
    websocket_stream,
)
from llamad.protocol import Load

FAST_UPSTREAM = ROOT / "bench" / "fast_upstream.py"
SEED = 42


def _endpoint(daemon: Daemon, model: str) -> Path:
    status = daemon.wait_ready(model)
    return Path(status.endpoint)


def relay_runs(
    name: str, path: Path, *, ctx_size: int, rounds: int, max_tokens: int
) -> dict[str, list[Stream]]:
    """Interleaved rounds of one stream each: direct, via the Unix socket, via the WebSocket."""
    table = model_table(name, path, ctx_size=ctx_size)
    with running_daemon(table, default_model=name) as daemon:
        endpoint = _endpoint(daemon, name)
        status = daemon.status()
        assert status.websocket is not None
        address, token = status.websocket, daemon.token()
        runs: dict[str, list[Stream]] = {"direct": [], "unix": [], "websocket": []}

        # The same one-thread client for all three (bench/streams.py); the
        # WebSocket's connection and handshake come before its clock starts.
        def direct() -> None:
            runs["direct"].append(read_one(direct_stream(endpoint, max_tokens, seed=SEED)))

        def unix() -> None:
            runs["unix"].append(read_one(llamad_stream(daemon.socket_path, max_tokens, seed=SEED)))

        def websocket() -> None:
            stream = websocket_stream(address, token, max_tokens, seed=SEED)
            runs["websocket"].append(read_one(stream))

        interleave(1, direct, unix, websocket)  # warm-up: caches, first-use measurements
        runs = {key: [] for key in runs}
        interleave(rounds, direct, unix, websocket)
    return runs


def overhead(rounds: int = 7, max_tokens: int = 2000) -> list[Figure]:
    runs = relay_runs(
        "demo", shared_demo_models()["demo"], ctx_size=4096, rounds=rounds, max_tokens=max_tokens
    )
    counts = {key: {s.tokens for s in streams} for key, streams in runs.items()}
    return relay_figures(
        runs, "relay", f"{max_tokens} tokens/stream, demo model; tokens seen {counts}"
    )


def relay_figures(runs: dict[str, list[Stream]], prefix: str, note: str) -> list[Figure]:
    """Tokens/s (ratio to direct) and added first-token time, per transport."""
    direct_rate = [s.rate for s in runs["direct"]]
    direct_ttft = [s.ttft * 1000 for s in runs["direct"]]
    direct_cpu = _client_cpu(runs["direct"])
    figures = []
    for key, label in (("unix", "Unix socket"), ("websocket", "WebSocket")):
        rate = [s.rate for s in runs[key]]
        cut = [
            s.tokens
            for s in runs[key]
            if isinstance(s.parser, FrameParser) and s.parser.reply is None
        ]
        ratios = [v / d for v, d in zip(rate, direct_rate, strict=True)]
        figures.append(
            Figure(
                f"{prefix} tokens/s via {label}",
                "tok/s",
                rate,
                baseline=direct_rate,
                baseline_name="llama-server direct",
                ratio=statistics.median(ratios),
                goal=Goal("ratio", ">=", 0.99),  # issue 15 (0.97 before)
                note=note
                + "; ratio = median of per-round ratios"
                + f"; client CPU per token {_client_cpu(runs[key])}, direct's {direct_cpu}"
                + (f"; CUT OFF after {cut} tokens (SubscriberTooSlow)" if cut else ""),
                failed=bool(cut),
            )
        )
        ttft = [s.ttft * 1000 for s in runs[key]]
        added = [v - d for v, d in zip(ttft, direct_ttft, strict=True)]
        stored = [
            (s.parser.started - s.sent) * 1000
            for s in runs[key]
            if isinstance(s.parser, FrameParser) and s.parser.started
        ]
        figures.append(
            Figure(
                f"{prefix} added first-token time via {label}",
                "ms",
                added,
                baseline=direct_ttft,
                baseline_name="direct TTFT",
                ratio=statistics.median(ttft) / statistics.median(direct_ttft),
                goal=Goal("value", "<=", 2.0),  # issue 15 (5 ms before)
                note="per round: via TTFT - direct TTFT; ratio = via/direct TTFT medians; "
                f"request -> chat_started (user message committed) median "
                f"{statistics.median(stored):.1f} ms, "
                f"via TTFT median {statistics.median(ttft):.1f} ms",
            )
        )
    return figures


def _client_cpu(streams: list[Stream]) -> str:
    """The bench client's median CPU time per token read, as text."""
    per_token = [s.cpu / s.tokens * 1e6 for s in streams if s.cpu and s.tokens]
    return f"{statistics.median(per_token):.1f} µs" if per_token else "not measured"


def capacity(
    rounds: int = 3,
    single_tokens: int = 50_000,
    streams: int = 50,
    per_stream: int = 2_000,
    paced_rate: float = 10_000,
) -> list[Figure]:
    demo = shared_demo_models()["demo"]
    table = model_table("fast", demo, ctx_size=100_000, parallel=streams) + model_table(
        "paced", demo, ctx_size=100_000, args=["--fast-rate", str(paced_rate)]
    )
    paced_tokens = int(paced_rate)  # one second per stream
    with running_daemon(table, binary=FAST_UPSTREAM, default_model="fast") as daemon:
        endpoint = _endpoint(daemon, "fast")
        llamad = daemon.psutil
        upstream = psutil.Process(daemon.model("fast").pid or 0)
        me = psutil.Process()
        results: dict[str, list[float]] = {
            "direct1": [],
            "via1": [],
            "directN": [],
            "viaN": [],
            "cpu1": [],
            "cpuN": [],
            "client_cpu1": [],
            "upstream_cpu1": [],
        }

        cutoffs: dict[str, list[int]] = {}

        def run(name: str, make: list[Stream]) -> None:
            before = cpu_seconds(llamad), cpu_seconds(me), cpu_seconds(upstream)
            wall = read_streams(make)
            after = cpu_seconds(llamad), cpu_seconds(me), cpu_seconds(upstream)
            tokens = sum(s.tokens for s in make)
            expected = single_tokens if len(make) == 1 else per_stream * len(make)
            if tokens < expected:
                # llamad closed the connection early (see the figure's note).
                cutoffs.setdefault(name, []).extend(
                    s.tokens for s in make if s.tokens < expected // len(make)
                )
            results[name].append(tokens / wall)
            # CPU seconds per token * 1e6 = CPU ms per 1,000 tokens. Per token
            # llamad received from upstream (it reads them all even when it cut
            # its client off), so the figure stays the cost of relaying one.
            if name.startswith("via"):
                results["cpu1" if name == "via1" else "cpuN"].append(
                    (after[0] - before[0]) / expected * 1e6
                )
            if name == "via1":
                results["client_cpu1"].append((after[1] - before[1]) / max(tokens, 1) * 1e6)
            if name == "direct1":
                results["upstream_cpu1"].append((after[2] - before[2]) / tokens * 1e6)

        control = daemon.socket_path

        def direct1() -> None:
            run("direct1", [direct_stream(endpoint, single_tokens)])

        def via1() -> None:
            run("via1", [llamad_stream(control, single_tokens)])

        def direct_n() -> None:
            run("directN", [direct_stream(endpoint, per_stream) for _ in range(streams)])

        def via_n() -> None:
            run("viaN", [llamad_stream(control, per_stream) for _ in range(streams)])

        steps = (direct1, via1, direct_n, via_n)
        # Warm-up (first-use /props and template measurements, thread pools), then rounds.
        for step in steps:
            step()
        for values in results.values():
            values.clear()
        cutoffs.clear()
        interleave(rounds, *steps)

        # Below the breaking point: one stream paced at paced_rate tokens/s, so
        # llamad keeps up and its CPU time per token is the whole relay cost.
        with daemon.client() as client:
            client.call(lambda i: Load(id=i, model="paced"))
        llamad_paced: list[float] = []
        paced_seen: list[float] = []
        for n in range(rounds + 1):
            stream = llamad_stream(control, paced_tokens)
            before_cpu = cpu_seconds(llamad)
            read_streams([stream])
            if n:  # the first is a warm-up (the new model's /props, template)
                llamad_paced.append((cpu_seconds(llamad) - before_cpu) / paced_tokens * 1e6)
                paced_seen.append(stream.tokens)

    def cut(name: str, wanted: int) -> str:
        got = cutoffs.get(name)
        if not got:
            return ""
        return (
            f"; CUT OFF: {len(got)} streams ended after {min(got)}-{max(got)} of {wanted} "
            "tokens (llamad closed the connection: SubscriberTooSlow)"
        )

    ms_per_1k = "ms CPU/1k tok"
    return [
        Figure(
            "relay capacity, 1 stream",
            "tok/s",
            results["via1"],
            baseline=results["direct1"],
            baseline_name="fast upstream direct",
            goal=Goal("value", ">=", 20_000),
            note=f"{single_tokens} tokens; the client's own CPU "
            f"{statistics.median(results['client_cpu1']):.2f} ms/1k tok"
            + cut("via1", single_tokens),
            failed=bool(cutoffs.get("via1")),
        ),
        Figure(
            f"relay capacity, {streams} streams total",
            "tok/s",
            results["viaN"],
            baseline=results["directN"],
            baseline_name="fast upstream direct",
            note=f"{streams} x {per_stream} tokens, Unix socket clients, parallel = {streams}"
            + cut("viaN", per_stream),
            failed=bool(cutoffs.get("viaN")),
        ),
        Figure(
            "llamad CPU per 1k tokens, 1 stream",
            ms_per_1k,
            results["cpu1"],
            baseline=results["upstream_cpu1"],
            baseline_name="fast upstream's own CPU",
            note="llamad user+system time / tokens read from upstream (a cut-off client "
            "costs no sends: then this is below the real relay cost)",
        ),
        Figure(
            f"llamad CPU per 1k tokens, {streams} streams",
            ms_per_1k,
            results["cpuN"],
        ),
        Figure(
            f"llamad CPU per 1k tokens, 1 stream paced {paced_rate:,.0f}/s",
            ms_per_1k,
            llamad_paced,
            note=f"tokens delivered {sorted(set(paced_seen))} of {paced_tokens}",
            failed=any(seen < paced_tokens for seen in paced_seen),
        ),
        Figure(
            "relay ceiling from paced CPU cost (1 core)",
            "tok/s",
            [1e6 / v for v in llamad_paced if v > 0],
            note="1000 / (llamad CPU ms per 1k tokens, paced): what one core allows",
        ),
    ]
