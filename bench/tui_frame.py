"""llama-tui frame time: a 1,000-message conversation, scrolled and streaming.

Measures what one repaint costs the TUI: ``View.layout`` plus turning spans
into terminal escape codes, at 120x40. Three cases, interleaved rounds:
a static frame, a frame after one streamed delta (the open block re-renders),
and a frame scrolled to the middle. Goal: ≤ 10 ms per frame.

    .venv/bin/python -m bench.tui_frame [--rounds 200]
    (or as one of all the benchmarks: scripts/bench --only tui)
"""

from __future__ import annotations

import argparse
import statistics
import time

import blessed

from bench.common import Figure, Goal
from llama_tui.app import App, Options
from llama_tui.view import View
from llamad.protocol import Conversation, Message, ModelStatus, TextPart

SAMPLE = """Here is **a reply** with `code`, a list and a block:

- first point, long enough to wrap around the terminal width at least once or twice
- second point

```python
def add(a: int, b: int) -> int:
    return a + b
```

And a closing paragraph with *emphasis* and a [link](https://example.org)."""


def build(messages: int) -> View:
    view = View()
    view.conversations = [Conversation(id="c", title="bench")]
    view.current = "c"
    view.models = {"demo": ModelStatus(name="demo", state="ready", since=0.0)}
    view.active_model = "demo"
    view.set_messages(
        "c",
        [
            Message(
                conversation="c",
                seq=n + 1,
                role="user" if n % 2 == 0 else "assistant",
                parts=[TextPart(text=f"question {n}" if n % 2 == 0 else SAMPLE)],
            )
            for n in range(messages)
        ],
    )
    return view


def measure(rounds: int, messages: int = 1000) -> dict[str, list[float]]:
    """Seconds per frame: static, after a streamed delta, scrolled; interleaved rounds."""
    term = blessed.Terminal(force_styling=True)
    app = App(term, Options())
    view = build(messages)
    app.view = view
    width, height = WIDTH, HEIGHT

    def frame() -> float:
        began = time.perf_counter()
        for row in view.layout(width, height):
            app.encode_line(row, width)
        return time.perf_counter() - began

    first = frame()  # renders every message once (then cached per message)
    view.add_user(
        "c", Message(conversation="c", seq=messages + 1, role="user", parts=[TextPart(text="go")])
    )
    static: list[float] = []
    streaming: list[float] = []
    scrolled: list[float] = []
    for n in range(rounds):
        view.scroll = 0
        static.append(frame())
        view.add_delta("c", f"word{n} ")
        streaming.append(frame())
        view.scroll = 2500
        scrolled.append(frame())
    view.scroll = 0
    return {"first": [first], "static": static, "streaming": streaming, "scrolled": scrolled}


WIDTH, HEIGHT = 120, 40


def figures(rounds: int = 200) -> list[Figure]:
    samples = {key: [v * 1000 for v in values] for key, values in measure(rounds).items()}
    return [
        Figure(
            "TUI frame after a streamed delta",
            "ms",
            samples["streaming"],
            baseline=samples["static"],
            baseline_name="static frame",
            goal=Goal("value", "<=", 10.0),
            note=f"1,000 messages, {WIDTH}x{HEIGHT}; first frame {samples['first'][0]:.0f} ms",
        ),
        Figure(
            "TUI frame scrolled to the middle",
            "ms",
            samples["scrolled"],
            baseline=samples["static"],
            baseline_name="static frame",
            goal=Goal("value", "<=", 10.0),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    samples = measure(args.rounds)

    def ms(values: list[float]) -> str:
        q = statistics.quantiles(values, n=20)
        return f"median {statistics.median(values) * 1000:6.2f} ms, p95 {q[18] * 1000:6.2f} ms"

    print(f"llama-tui frame, 1,000 messages, {WIDTH}x{HEIGHT}, {args.rounds} rounds")
    print(f"  first frame (renders all messages once): {samples['first'][0] * 1000:7.1f} ms")
    print(f"  static frame:                            {ms(samples['static'])}")
    print(f"  frame after a streamed delta:            {ms(samples['streaming'])}  (goal <= 10 ms)")
    print(f"  frame scrolled to the middle:            {ms(samples['scrolled'])}")


if __name__ == "__main__":
    main()
