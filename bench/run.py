"""Run every llamad benchmark, print one table, write the figures as JSON.

    scripts/bench                      # all of them (about 3-4 minutes on 2 cores)
    scripts/bench --quick              # fewer rounds (about a minute)
    scripts/bench --only relay_overhead,history --json /tmp/out.json

Every figure is measured side by side with its baseline in the same run,
interleaved round by round; the table gives the median, the spread (min-max,
or p5-p95 from 20 samples up), the baseline's median, the ratio of the two
medians (or the median of per-round ratios, where the note says so), the goal
and whether it is met.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, Figure, fmt


@dataclass(frozen=True)
class Bench:
    name: str
    what: str
    run: Callable[[bool], list[Figure]]


def _relay_overhead(quick: bool) -> list[Figure]:
    from bench import relay

    return relay.overhead(rounds=3 if quick else 7, max_tokens=1000 if quick else 2000)


def _relay_capacity(quick: bool) -> list[Figure]:
    from bench import relay

    if quick:
        return relay.capacity(rounds=1, single_tokens=20_000, streams=50, per_stream=1_000)
    return relay.capacity(rounds=3, single_tokens=50_000, streams=50, per_stream=2_000)


def _http_relay(quick: bool) -> list[Figure]:
    from bench import http_relay

    return http_relay.overhead(rounds=3 if quick else 7, max_tokens=1000 if quick else 2000)


def _http_capacity(quick: bool) -> list[Figure]:
    from bench import http_relay

    return http_relay.capacity(rounds=1 if quick else 3, tokens=20_000 if quick else 50_000)


def _router(quick: bool) -> list[Figure]:
    from bench import router

    return router.run(
        rounds=3 if quick else 10,
        real_rounds=1 if quick else 8,  # real first tokens vary by 10-20 ms round to round
        short=50,
        long=500 if quick else 2000,
        real_long=300,  # SmolLM2 under the router stops near 1,200 tokens even with ignore_eos
        threads=router.default_threads(),
    )


def _switch(quick: bool) -> list[Figure]:
    from bench import switch

    return switch.figures(rounds=6 if quick else 15)


def _cli(quick: bool) -> list[Figure]:
    from bench import cli_latency

    return cli_latency.figures(rounds=10 if quick else 30)


def _history(quick: bool) -> list[Figure]:
    from bench import history_scale

    return history_scale.run(quick)


def _memory(quick: bool) -> list[Figure]:
    from bench import memory

    return memory.run(rounds=1 if quick else 3)


def _memory_estimate(quick: bool) -> list[Figure]:
    from bench import memory_estimate

    cases = memory_estimate.CASES[::2] if quick else memory_estimate.CASES
    return memory_estimate.figures(cases)


def _real_models(quick: bool) -> list[Figure]:
    from bench import real_models

    return real_models.figures(quick)


def _tui(quick: bool) -> list[Figure]:
    from bench import tui_frame

    return tui_frame.figures(rounds=50 if quick else 200)


def _pool(quick: bool) -> list[Figure]:
    from bench import pool

    return pool.figures(rounds=4 if quick else 10)


def _rpc(quick: bool) -> list[Figure]:
    from bench import rpc

    return rpc.figures(rounds=3 if quick else 7, tokens=100 if quick else 200)


BENCHES = [
    Bench("relay_overhead", "demo model: direct vs Unix socket vs WebSocket", _relay_overhead),
    Bench("relay_capacity", "fast synthetic upstream: 1 and 50 streams", _relay_capacity),
    Bench("http_relay", "demo model: direct vs the HTTP API (OpenAI SSE)", _http_relay),
    Bench("http_capacity", "fast synthetic upstream through the HTTP API", _http_capacity),
    Bench("router", "llamad vs llama.cpp's router mode, same binary and models", _router),
    Bench("switch", "load B: llamad vs llama-server alone", _switch),
    Bench("cli", "llamactl status vs python -c pass", _cli),
    Bench("history", "LMDB store: appends, 10k conversations, 100k messages", _history),
    Bench("memory", "llamad RSS idle and with 500 WebSockets", _memory),
    Bench("tui", "llama-tui frame time, 1,000 messages", _tui),
    Bench("pool", "swaps under pressure; first token while another model loads", _pool),
    Bench("rpc", "the same model local vs split over 2 loopback workers", _rpc),
    Bench("memory_estimate", "GGUF memory estimate vs llama-server RSS/PSS", _memory_estimate),
    Bench("real_models", "SmolLM2/Gemma: load via llamad vs alone, relay", _real_models),
]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def table(figures: list[Figure]) -> str:
    header = ("figure", "median", "spread", "baseline", "ratio", "goal", "met?")
    rows: list[tuple[str, ...]] = []
    for f in figures:
        low, high, _ = f.spread()
        spread = f"{fmt(low, '')}-{fmt(high, f.unit)}" if len(f.samples) > 1 else "-"
        baseline = fmt(statistics.median(f.baseline), f.unit) if f.baseline else "-"
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else "-"
        goal = f.goal.describe(f.unit) if f.goal else "-"
        met = {True: "yes", False: "NO", None: "-"}[f.met]
        if f.failed:
            met = "NO (failed)"
        rows.append((f.name, fmt(f.median, f.unit), spread, baseline, ratio, goal, met))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {1, 2, 3, 4}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), line(tuple("-" * w for w in widths))]
    out += [line(r) for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results.json", help="where to write JSON"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument(
        "--only", help="comma-separated: " + ",".join(b.name for b in BENCHES), default=""
    )
    args = parser.parse_args(argv)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(wanted) - {b.name for b in BENCHES}
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}")
    selected = [b for b in BENCHES if not wanted or b.name in wanted]

    started = datetime.datetime.now(datetime.UTC)
    info = machine()
    print(
        f"llamad benchmarks, {started:%Y-%m-%d %H:%M} UTC, {info['cpu']}, {info['cores']} cores, "
        f"Python {info['python']}{', quick' if args.quick else ''}; "
        f"load average {os.getloadavg()[0]:.2f} (other work on the machine skews figures)",
        flush=True,
    )
    figures: list[Figure] = []
    results: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for bench in selected:
        print(f"  {bench.name}: {bench.what} ...", end="", flush=True)
        began = time.perf_counter()
        try:
            got = bench.run(args.quick)
        except Exception as exc:  # one broken benchmark must not hide the others
            took = time.perf_counter() - began
            errors[bench.name] = traceback.format_exc()
            print(f" FAILED after {took:.1f} s: {exc!r}", flush=True)
            continue
        took = time.perf_counter() - began
        print(f" {took:.1f} s", flush=True)
        figures += got
        results.append(
            {"bench": bench.name, "seconds": took, "figures": [f.as_json() for f in got]}
        )

    print()
    print(table(figures))
    notes = [f for f in figures if f.note]
    if notes:
        print("\nnotes:")
        for f in notes:
            print(f"  {f.name}: {f.note}")
    for name, trace in errors.items():
        print(f"\n{name} failed:\n{trace}", file=sys.stderr)
    missed = [f.name for f in figures if f.met is False]
    print(
        f"\n{len(figures)} figures, {len(missed)} goals missed, {len(errors)} benchmarks failed; "
        f"load average now {os.getloadavg()[0]:.2f}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "date": started.isoformat(timespec="seconds"),
                "machine": info,
                "argv": sys.argv[1:] if argv is None else argv,
                "quick": args.quick,
                "seconds": (datetime.datetime.now(datetime.UTC) - started).total_seconds(),
                "loadavg_at_end": list(os.getloadavg()),
                "benchmarks": results,
                "errors": errors,
                "missed": missed,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
