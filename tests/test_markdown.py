"""The Markdown renderer: constructs at fixed widths, streaming, width limits."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llama_tui.markdown import IncrementalRenderer, Line, display_width, render

DOC = """# Title here

Some **bold** and *italic* text with `code` and a [link](http://x.y) that wraps.

- item one is long enough to wrap a bit more than once
- item two
  - nested

> quoted text here

---

```python
def add(a, b):
    return a + b
```

```
x = [1, 2, 3]
for i in x:
    print(i)
```

Final paragraph 日本語 text.
"""


def plain(lines: list[Line]) -> list[str]:
    return ["".join(span.text for span in line) for line in lines]


def spans(lines: list[Line]) -> list:
    return [span for line in lines for span in line]


def test_constructs_at_40_columns() -> None:
    lines = render(DOC, 40)
    text = plain(lines)
    assert text[0] == "Title here"
    assert "heading" in lines[0][0].style
    assert "Some bold and italic text with code and" in text
    assert "• item one is long enough to wrap a bit" in text
    assert "  more than once" in text  # hanging indent
    assert "  • nested" in text
    assert "│ quoted text here" in text
    assert "─" * 40 in text
    assert "╭─ python" in text and "╰─" in text
    assert "  def add(a, b):" in text
    styles = {span.text: span.style for span in spans(lines)}
    assert "bold" in styles["bold"] and "italic" in styles["italic"] and "code" in styles["code"]
    assert "link" in styles["link"] and styles["(http://x.y)"] == frozenset({"dim"})


def test_code_is_highlighted_by_fence_or_guess() -> None:
    lines = render(DOC, 60)
    colours = {span.text: span.color for span in spans(lines)}
    assert colours["def"] is not None and colours["def"].startswith("Keyword")
    assert colours["for"] is not None and colours["for"].startswith("Keyword")  # guessed


def test_code_is_cut_not_wrapped() -> None:
    lines = render("```\n" + "x" * 100 + "\n```\n", 30)
    assert len(lines) == 3
    assert plain(lines)[1].endswith("…") and display_width(plain(lines)[1]) <= 30


def test_wide_characters_count_double() -> None:
    assert display_width("日本語") == 6
    assert display_width("e\u0301") == 1
    for line in render("日本語 " * 30, 21):
        assert sum(display_width(span.text) for span in line) <= 21


def test_half_written_input_renders() -> None:
    assert plain(render("some **bold", 40)) == ["some **bold"]
    assert plain(render("```python\ndef f(", 40))[0] == "╭─ python"
    assert plain(render("```python\ndef f(", 40))[-1] == "╰─"


def test_streaming_equals_whole_render_for_every_prefix() -> None:
    for width in (20, 60):
        renderer = IncrementalRenderer(width)
        for end in range(len(DOC) + 1):
            assert renderer.update(DOC[:end]) == render(DOC[:end], width), (width, end)
        blocks = plain(render(DOC, width)).count("") + 1
        # Each finished block was rendered once; only the open one (the last:
        # no blank line after it yet) again and again.
        assert renderer.finished_renders == blocks - 1


def test_replaced_text_starts_over() -> None:
    renderer = IncrementalRenderer(40)
    renderer.update("first paragraph\n\nsecond")
    assert plain(renderer.update("other text")) == ["other text"]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab *_`#>-[]()\n日x1."), max_size=200), st.integers(10, 50))
def test_no_line_is_wider_than_the_width(text: str, width: int) -> None:
    for line in render(text, width):
        assert sum(display_width(span.text) for span in line) <= width
