"""The model pool: swaps under memory pressure, and a resident model while another loads.

Two figures, each against a baseline measured in the same run:

* **swaps**: 20 chats alternating between two models, sent together, with
  room for one model (``max_models = 1``): how many model loads it took,
  against the naive one load per request.
* **first token while another model loads**: a chat to a resident model,
  interleaved round by round, once with nothing else happening and once while
  another model is loading (a real model when one is installed, whose load
  takes long enough to overlap; else a demo model).

    .venv/bin/python -m bench.pool [--rounds 10]
    (or as one of all the benchmarks: scripts/bench --only pool)
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

from bench.common import (
    Daemon,
    Figure,
    Goal,
    model_table,
    real_models,
    running_daemon,
    shared_demo_models,
)
from llamad.protocol import (
    Chat,
    ChatDelta,
    ChatOptions,
    Load,
    StateChanged,
    Subscribe,
    Unload,
)

REQUESTS = 20


def _chat(daemon: Daemon, model: str, tokens: int = 4) -> float:
    """Seconds from sending a chat to its first delta."""
    with daemon.client(timeout=120) as client:
        began = time.perf_counter()
        first = None
        options = ChatOptions(max_tokens=tokens, ignore_eos=True)
        for message in client.stream(
            lambda i: Chat(id=i, content="go", model=model, options=options)
        ):
            if first is None and isinstance(message, ChatDelta):
                first = time.perf_counter() - began
        assert first is not None
        return first


def swaps() -> int:
    """Model loads for 20 alternating chats sent together, room for one model."""
    models = shared_demo_models()
    tables = "".join(model_table(n, p) for n, p in models.items())
    with running_daemon(tables, daemon_extra="max_models = 1\n") as daemon:
        loads = 0
        done = threading.Event()
        subscribed = threading.Event()

        def count() -> None:
            nonlocal loads
            with daemon.client(timeout=None) as client:
                last: dict[str, str] = {}
                for message in client.events(lambda i: Subscribe(id=i, topics=["state"])):
                    subscribed.set()
                    if done.is_set():
                        return
                    if isinstance(message, StateChanged):
                        status = message.model
                        if status.state == "starting" and last.get(status.name) != "starting":
                            loads += 1
                        last[status.name] = status.state

        counter = threading.Thread(target=count, daemon=True)
        counter.start()
        subscribed.wait(10)
        names = list(models) * (REQUESTS // 2)
        threads = [threading.Thread(target=_chat, args=(daemon, name)) for name in names]
        for thread in threads:
            thread.start()
            time.sleep(0.002)  # in this order
        for thread in threads:
            thread.join(120)
        time.sleep(0.2)
        done.set()
        return loads


def first_token_while_loading(rounds: int, other: tuple[str, Path]) -> dict[str, list[float]]:
    models = shared_demo_models()
    name, path = other
    tables = model_table("demo", models["demo"]) + model_table(name, path, ctx_size=2048)
    samples: dict[str, list[float]] = {"quiet": [], "loading": []}
    with running_daemon(tables, default_model="demo") as daemon:
        daemon.wait_ready("demo")
        _chat(daemon, "demo")  # warm
        for _ in range(rounds):
            samples["quiet"].append(_chat(daemon, "demo"))
            with daemon.client(timeout=120) as loader:
                request = loader.send(lambda i: Load(id=i, model=name))
                time.sleep(0.05)  # the load is under way
                samples["loading"].append(_chat(daemon, "demo"))
                while True:  # until the load's final reply
                    message = loader.receive_for(request)
                    if not isinstance(message, StateChanged):
                        break
                loader.call(lambda i: Unload(id=i, model=name))
    return samples


def _other_model() -> tuple[str, Path]:
    found = real_models()
    for name in ("gemma3", "smollm2"):  # the slower to load first: it overlaps more chats
        if name in found:
            return name, found[name]
    return "demo-b", shared_demo_models()["demo-b"]


def figures(rounds: int = 10) -> list[Figure]:
    loads = swaps()
    other = _other_model()
    timing = first_token_while_loading(rounds, other)
    quiet = [v * 1000 for v in timing["quiet"]]
    loading = [v * 1000 for v in timing["loading"]]
    return [
        Figure(
            f"swaps for {REQUESTS} alternating chats, room for one model",
            "loads",
            [float(loads)],
            baseline=[float(REQUESTS)],
            baseline_name="one swap per request",
            goal=Goal("ratio", "<=", 0.25),
            note="demo/demo-b sent together, max_models = 1",
        ),
        Figure(
            "first token of a resident model while another loads",
            "ms",
            loading,
            baseline=quiet,
            baseline_name="nothing loading",
            goal=Goal("ratio", "<=", 1.10),
            note=f"demo resident; {other[0]} loading; interleaved rounds; "
            f"median {statistics.median(loading):.1f} vs {statistics.median(quiet):.1f} ms",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    for figure in figures(args.rounds):
        print(f"{figure.name}: {figure.median:.1f} {figure.unit} (ratio {figure.ratio:.2f})")


if __name__ == "__main__":
    main()
