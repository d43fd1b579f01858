"""llama-tui frame time: a 1,000-message conversation, scrolled and streaming.

Measures what one repaint costs the TUI: ``View.layout`` plus turning spans
into terminal escape codes, at 120x40. Three cases, interleaved rounds:
a static frame, a frame after one streamed delta (the open block re-renders),
and a frame scrolled to the middle. Goal: ≤ 10 ms per frame.

    .venv/bin/python bench/tui_frame.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import blessed

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    term = blessed.Terminal(force_styling=True)
    app = App(term, Options())
    view = build(1000)
    app.view = view
    width, height = 120, 40

    def frame() -> float:
        began = time.perf_counter()
        for row in view.layout(width, height):
            app.encode_line(row, width)
        return time.perf_counter() - began

    first = frame()  # renders every message once (then cached per message)
    view.add_user(
        "c", Message(conversation="c", seq=1001, role="user", parts=[TextPart(text="go")])
    )
    static, streaming, scrolled = [], [], []
    for n in range(args.rounds):
        view.scroll = 0
        static.append(frame())
        view.add_delta("c", f"word{n} ")
        streaming.append(frame())
        view.scroll = 2500
        scrolled.append(frame())
    view.scroll = 0

    def ms(values: list[float]) -> str:
        q = statistics.quantiles(values, n=20)
        return f"median {statistics.median(values) * 1000:6.2f} ms, p95 {q[18] * 1000:6.2f} ms"

    print(f"llama-tui frame, 1,000 messages, {width}x{height}, {args.rounds} rounds")
    print(f"  first frame (renders all messages once): {first * 1000:7.1f} ms")
    print(f"  static frame:                            {ms(static)}")
    print(f"  frame after a streamed delta:            {ms(streaming)}  (goal <= 10 ms)")
    print(f"  frame scrolled to the middle:            {ms(scrolled)}")


if __name__ == "__main__":
    main()
