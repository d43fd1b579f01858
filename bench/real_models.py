"""Figures with the real models (SmolLM2-135M-Instruct, Gemma 3 270M).

Load (``load_figures``): interleaved rounds of (a) the bench spawning the
llama-server command llamad would run and timing spawn -> /health 200, and
(b) llamad switching to the same model (``Load`` over the control socket, timed
end to end), alternating SmolLM2 and Gemma so every llamad load is a switch.
The figure is (b) minus llama-server's own spawn -> ready inside that same
load, so the hundreds of milliseconds that a model's load varies by on a busy
machine cancel out; (a) is the baseline.

Relay (``relay_figures``): a SmolLM2 reply of a fixed length (same prompt,
seed, temperature, ``ignore_eos``) read straight from its llama-server, through
llamad's Unix socket and through its WebSocket, in rotating order per round:
tokens/s (first token to last) via / direct, and the time to first token llamad
adds.

    .venv/bin/python -m bench.real_models
    (or as one of all the benchmarks: scripts/bench --only real_models)
"""

from __future__ import annotations

import statistics
import time

from bench.common import Figure, Goal, model_table, running_daemon, server_binary
from bench.memory_estimate import REAL
from bench.relay import relay_figures, relay_runs
from bench.switch import direct_load
from llamad.protocol import Load, Loaded


def _models() -> dict[str, str]:
    missing = [str(p) for p in REAL.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: run scripts/fetch-models")
    return {name: str(path) for name, path in REAL.items()}


def load_figures(rounds: int = 8) -> list[Figure]:
    paths = _models()
    binary = server_binary()
    tables = "".join(model_table(name, REAL[name], ctx_size=512) for name in paths)
    direct: dict[str, list[float]] = {name: [] for name in paths}
    via: dict[str, list[float]] = {name: [] for name in paths}
    own: dict[str, list[float]] = {name: [] for name in paths}
    # Room for one model: every load is a switch (the other is unloaded first).
    with (
        running_daemon(tables, default_model="smol", daemon_extra="max_models = 1\n") as daemon,
        daemon.client(60) as client,
    ):
        daemon.wait_ready("smol", timeout=60)
        for round_no in range(2 * rounds):
            target = "gemma" if round_no % 2 == 0 else "smol"
            direct[target].append(direct_load(binary, REAL[target], daemon.work / "direct.sock"))
            began = time.perf_counter()
            reply = client.call(lambda i, t=target: Load(id=i, model=t))  # type: ignore[misc]
            via[target].append(time.perf_counter() - began)
            assert isinstance(reply, Loaded)
            own[target].append(reply.ready_seconds)
    figures = []
    for name, label in (("smol", "SmolLM2-135M"), ("gemma", "Gemma 3 270M")):
        ms_via = [v * 1000 for v in via[name]]
        ms_own = [v * 1000 for v in own[name]]
        ms_direct = [v * 1000 for v in direct[name]]
        # Paired within each load: llama-server's own spawn -> ready varies by
        # hundreds of ms on a busy machine, llamad's share around it does not.
        added = [v - o for v, o in zip(ms_via, ms_own, strict=True)]
        figures.append(
            Figure(
                f"{label}: switch through llamad, over llama-server's own load",
                "ms",
                added,
                baseline=ms_direct,
                baseline_name="llama-server alone, spawn->200",
                ratio=statistics.median(ms_via) / statistics.median(ms_direct),
                goal=Goal("value", "<=", 30.0),
                note=f"per load: end to end - llama-server's spawn->ready in that load; "
                f"end to end {statistics.median(ms_via):.0f} ms, llama-server under llamad "
                f"{statistics.median(ms_own):.0f} ms, llama-server alone (started by the "
                f"bench, same command) {statistics.median(ms_direct):.0f} ms; ctx 512, 1 thread",
            )
        )
    return figures


def smollm2_relay_figures(rounds: int = 9, max_tokens: int = 200) -> list[Figure]:
    _models()
    runs = relay_runs("smol", REAL["smol"], ctx_size=2048, rounds=rounds, max_tokens=max_tokens)
    return relay_figures(runs, "SmolLM2 relay", f"{max_tokens} tokens/stream")


def figures(quick: bool = False) -> list[Figure]:
    return load_figures(3 if quick else 8) + smollm2_relay_figures(3 if quick else 9)


def main() -> None:
    for figure in figures():
        print(f"{figure.name}: {figure.median:.1f} {figure.unit}  ({figure.note})")


if __name__ == "__main__":
    main()
