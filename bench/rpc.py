"""What RPC costs: the same model local vs split over two loopback workers, side by side.

One llamad runs two ``[workers.*]`` (ggml-rpc-server, one thread each) and the
same GGUF twice: ``local`` (every layer on this machine's CPU, one thread) and
``split`` (``n_gpu_layers = 99`` over both workers, so every layer's weights
and compute are in the workers and each token's activations cross loopback
TCP twice per worker). Rounds alternate which goes first; each round asks both
for the same reply (``ignore_eos``, a fixed length) in a new conversation and
records llama-server's own tokens/s and the time to the first token as the
client sees it.

    .venv/bin/python -m bench.rpc [--rounds 7] [--tokens 200] [--model PATH] [--json out.json]
    (or as one of all the benchmarks: scripts/bench --only rpc)

The default model is the demo model (2 tiny layers: RPC's fixed cost per
token dominates); ``--model`` measures a real one (e.g. SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path

from bench.common import Figure, interleave, running_daemon, shared_demo_models
from llamad.protocol import Chat, ChatDelta, ChatDone, ChatOptions, Load, Loaded


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def config(model: Path) -> str:
    ports = (_free_port(), _free_port())
    workers = "".join(
        f"[workers.w{i}]\nport = {port}\nthreads = 1\n" for i, port in enumerate(ports, 1)
    )
    common = f'path = "{model}"\nctx_size = 1024\nargs = ["--threads", "1"]\n'
    return (
        workers
        + f"[models.local]\n{common}"
        + f'[models.split]\n{common}workers = ["w1", "w2"]\nn_gpu_layers = 99\n'
    )


def measure(rounds: int, tokens: int, model: Path | None) -> dict[str, dict[str, list[float]]]:
    """Per model: tokens/s (llama-server's) and time to first token (ms, at the client)."""
    path = model or shared_demo_models()["demo"]
    found: dict[str, dict[str, list[float]]] = {
        name: {"tok_s": [], "ttft": [], "load": []} for name in ("local", "split")
    }
    with running_daemon(config(path)) as daemon, daemon.client(timeout=300) as client:
        for name in ("local", "split"):
            loaded = client.call(lambda i, n=name: Load(id=i, model=n))  # type: ignore[misc]
            assert isinstance(loaded, Loaded), loaded
            found[name]["load"].append(loaded.ready_seconds * 1000)
        options = ChatOptions(max_tokens=tokens, ignore_eos=True, temperature=0.0)

        def ask(name: str) -> None:
            began = time.perf_counter()
            first: float | None = None
            done: ChatDone | None = None
            for message in client.stream(
                lambda i: Chat(id=i, content="Tell me a story.", model=name, options=options)
            ):
                if isinstance(message, ChatDelta) and first is None:
                    first = time.perf_counter()
                if isinstance(message, ChatDone):
                    done = message
            assert done is not None and done.message.status == "complete", done
            stats = done.message.stats
            assert stats is not None and stats.tokens_per_second and first is not None
            found[name]["tok_s"].append(stats.tokens_per_second)
            found[name]["ttft"].append((first - began) * 1000)

        ask("local")  # warm both before measuring
        ask("split")
        interleave(rounds, lambda: ask("local"), lambda: ask("split"))
    return found


def figures(rounds: int = 7, tokens: int = 200, model: Path | None = None) -> list[Figure]:
    found = measure(rounds, tokens, model)
    which = model.name if model else "demo model"
    local, split = found["local"], found["split"]
    return [
        Figure(
            f"split over 2 loopback workers: tokens/s ({which})",
            "tok/s",
            split["tok_s"],
            baseline=local["tok_s"],
            baseline_name="the same model local, 1 thread",
            note=f"{tokens}-token replies, llama-server's own rate; every layer in the workers",
        ),
        Figure(
            f"split over 2 loopback workers: first token ({which})",
            "ms",
            split["ttft"],
            baseline=local["ttft"],
            baseline_name="the same model local",
            note=f"chat sent -> first delta at the client; load (spawn -> ready) "
            f"{statistics.median(split['load']):.0f} ms split vs "
            f"{statistics.median(local['load']):.0f} ms local",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the demo model)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    got = figures(args.rounds, args.tokens, args.model)
    for figure in got:
        base = statistics.median(figure.baseline or [float("nan")])
        print(f"{figure.name}: {figure.median:.1f} {figure.unit} (local {base:.1f}); {figure.note}")
    if args.json:
        args.json.write_text(json.dumps([f.as_json() for f in got], indent=2))


if __name__ == "__main__":
    main()
