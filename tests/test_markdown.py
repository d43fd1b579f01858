"""The Markdown renderer: each construct at fixed widths, streaming, widths, highlighting."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llama_tui.markdown import IncrementalRenderer, Line, Span, display_width, render

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

| Name | Size |
|------|------|
| a    | 10   |

Final paragraph 日本語 text.
"""


def plain(lines: list[Line]) -> list[str]:
    return ["".join(span.text for span in line) for line in lines]


def spans(lines: list[Line]) -> list[Span]:
    return [span for line in lines for span in line]


def styles(lines: list[Line]) -> dict[str, frozenset[str]]:
    return {span.text: span.style for span in spans(lines)}


def width_of(line: Line) -> int:
    return sum(display_width(span.text) for span in line)


# --- constructs -------------------------------------------------------------


def test_document_at_40_columns() -> None:
    assert plain(render(DOC, 40)) == [
        "Title here",
        "",
        "Some bold and italic text with code and",
        "a link (http://x.y) that wraps.",
        "",
        "• item one is long enough to wrap a bit",
        "  more than once",
        "• item two",
        "  ◦ nested",
        "",
        "│ quoted text here",
        "",
        "─" * 40,
        "",
        "╭─ python",
        "  def add(a, b):",
        "      return a + b",
        "╰─",
        "",
        "╭─ python",
        "  x = [1, 2, 3]",
        "  for i in x:",
        "      print(i)",
        "╰─",
        "",
        "Name │ Size",
        "─────┼─────",
        "a    │ 10",
        "",
        "Final paragraph 日本語 text.",
    ]


def test_headings() -> None:
    for level in range(1, 7):
        lines = render("#" * level + " Head *line* ##", 40)
        assert plain(lines) == ["Head line"]
        assert {"heading", "bold"} <= lines[0][0].style
        assert lines[0][-1].style == frozenset({"heading", "bold", "italic"})
    assert plain(render("#hashtag", 40)) == ["#hashtag"]  # no space: not a heading


def test_inline_styles() -> None:
    lines = render("**b** *i* _u_ `c` ***bi*** [t](http://u) <http://a.b> \\*no\\*", 80)
    assert plain(lines) == ["b i u c bi t (http://u) http://a.b *no*"]
    got = styles(lines)
    assert got["b"] == {"bold"} and got["i"] == {"italic"} and got["u"] == {"italic"}
    assert got["c"] == {"code"} and got["bi"] == {"bold", "italic"}
    assert got["t"] == {"link"} and got[" (http://u)"] == {"dim"}
    assert got["http://a.b"] == {"link"}


def test_nested_inline_styles() -> None:
    lines = render("**bold `code` and [link](u)**", 80)
    got = styles(lines)
    assert got["code"] == {"bold", "code"} and got["link"] == {"bold", "link"}


def test_things_that_are_not_emphasis() -> None:
    text = "snake_case_name and 2 * 3 * 4 and a ** b"
    lines = render(text, 80)
    assert plain(lines) == [text]
    assert all(not span.style for span in spans(lines))


def test_paragraph_wraps_by_words_and_keeps_punctuation_with_its_word() -> None:
    lines = render("aaaa **bbbb**, cc", 9)
    assert plain(lines) == ["aaaa", "bbbb, cc"]
    assert [span.text for span in lines[1]] == ["bbbb", ", cc"]


def test_long_words_are_hard_wrapped() -> None:
    assert plain(render("x " + "y" * 25, 10)) == ["x", "yyyyyyyyyy", "yyyyyyyyyy", "yyyyy"]


def test_lists_hang_their_indent_and_nest() -> None:
    text = (
        "- one two three four five\n  - six seven eight nine\n    - ten\n"
        "1. first item wraps here\n10) tenth"
    )
    assert plain(render(text, 16)) == [
        "• one two three",
        "  four five",
        "  ◦ six seven",
        "    eight nine",
        "    ▪ ten",
        "1. first item",
        "   wraps here",
        "10) tenth",
    ]


def test_list_item_continuation_lines_join_the_item() -> None:
    assert plain(render("- first line\n  continues\n- second", 40)) == [
        "• first line continues",
        "• second",
    ]


def test_block_quotes_prefix_every_line_and_nest() -> None:
    lines = render("> a quoted line that wraps\n> > inner", 14)
    assert plain(lines) == ["│ a quoted", "│ line that", "│ wraps", "│ │ inner"]
    assert lines[0][0] == Span("│ ", frozenset({"quote"}))
    assert all("quote" in span.style for span in spans(lines))


def test_horizontal_rules_span_the_width() -> None:
    for marker in ("---", "***", "___", "- - -"):
        lines = render(f"above\n\n{marker}\n\nbelow", 12)
        assert plain(lines) == ["above", "", "─" * 12, "", "below"]
        assert lines[2][0].style == {"rule"}


def test_code_block_frame_and_styles() -> None:
    lines = render("~~~python\nx = 1\n~~~", 30)
    assert plain(lines) == ["╭─ python", "  x = 1", "╰─"]
    assert lines[0][0].style == {"fence"} and lines[-1][0].style == {"fence"}
    assert all(span.style == {"codeblock"} for span in lines[1])


def test_code_is_cut_not_wrapped_and_tabs_are_spaces() -> None:
    lines = render("```\n" + "x" * 100 + "\n\tindented\n```\n", 30)
    text = plain(lines)
    assert len(lines) == 4
    assert text[1] == "  " + "x" * 27 + "…" and width_of(lines[1]) == 30
    assert text[2] == "      indented"


def test_wide_code_is_cut_by_columns() -> None:
    lines = render("```\n" + "日本語" * 10 + "\n```", 20)
    assert width_of(lines[1]) <= 20 and plain(lines)[1].endswith("…")


def test_tables_align_when_they_fit_and_fall_back_when_not() -> None:
    table = "| a | bb |\n|---|---|\n| ccc | d |"
    lines = render(table, 40)
    assert plain(lines) == ["a   │ bb", "────┼───", "ccc │ d"]
    assert "bold" in lines[0][0].style
    narrow = render("| " + "word " * 10 + "| x |", 20)
    assert all(width_of(line) <= 20 for line in narrow)


# --- widths -------------------------------------------------------------------


def test_display_width() -> None:
    assert display_width("abc") == 3
    assert display_width("日本語") == 6
    assert display_width("ｆｕｌｌ") == 8  # full-width forms
    assert display_width("e\u0301") == 1  # combining acute accent
    assert display_width("") == 0


def test_wide_characters_wrap_by_columns() -> None:
    lines = render("日本語 " * 30, 21)
    assert all(width_of(line) <= 21 for line in lines)
    assert plain(lines)[0] == "日本語 日本語 日本語"  # 20 columns: a fourth would be 27
    long = render("漢" * 25, 10)
    assert plain(long)[:2] == ["漢" * 5, "漢" * 5]


# --- code highlighting -------------------------------------------------------------


def test_python_fence_is_highlighted() -> None:
    lines = render("```python\ndef add(a, b):\n    return a + b  # sum\n```", 60)
    colours = {span.text: span.color for span in spans(lines)}
    assert colours["def"] == "Keyword"
    assert colours["add"] == "Name.Function"
    assert colours["# sum"] is not None and colours["# sum"].startswith("Comment")


def test_unlabelled_python_is_guessed() -> None:
    lines = render("```\ndef add(a, b):\n    return a + b\n```", 60)
    assert plain(lines)[0] == "╭─ python"
    assert {span.text: span.color for span in spans(lines)}["def"] == "Keyword"


def test_unguessable_code_is_plain_text() -> None:
    lines = render("```\nhello there\n```", 60)
    assert plain(lines) == ["╭─", "  hello there", "╰─"]
    assert all(span.color is None for span in spans(lines))


def test_unknown_language_is_shown_but_not_coloured() -> None:
    lines = render("```nosuchlang\ndef x\n```", 60)
    assert plain(lines)[0] == "╭─ nosuchlang"
    assert all(span.color is None for span in spans(lines))


def test_leading_blank_lines_in_code_keep_their_rows() -> None:
    lines = render("```python\n\n\nx = 1\n```", 40)
    assert plain(lines) == ["╭─ python", "  ", "  ", "  x = 1", "╰─"]


# --- half-written input --------------------------------------------------------------


def test_unclosed_bold_is_literal_then_bold() -> None:
    assert plain(render("some **bold", 40)) == ["some **bold"]
    lines = render("some **bold**", 40)
    assert plain(lines) == ["some bold"] and styles(lines)["bold"] == {"bold"}


def test_unclosed_fence_renders_as_code_then_closes() -> None:
    partial = render("```python\ndef f(", 40)
    assert plain(partial) == ["╭─ python", "  def f(", "╰─"]
    assert {span.text: span.color for span in spans(partial)}["def"] == "Keyword"
    done = "```python\ndef f():\n    pass\n```\n\nafter"
    assert plain(render(done, 40)) == ["╭─ python", "  def f():", "      pass", "╰─", "", "after"]


def test_every_prefix_renders_and_the_end_matches() -> None:
    text = "# T\n\n**bold** `code` [l](u)\n\n```python\nx = 1\n```\n\n- a\n- b\n"
    for end in range(len(text) + 1):
        render(text[:end], 20)  # never raises
    assert render(text, 20) == render(text.rstrip("\n"), 20)


# --- incremental ---------------------------------------------------------------------


def test_streaming_equals_render_for_every_prefix() -> None:
    for width in (20, 60):
        renderer = IncrementalRenderer(width)
        for end in range(len(DOC) + 1):
            assert renderer.update(DOC[:end]) == render(DOC[:end], width), (width, end)


def test_finished_blocks_are_rendered_once() -> None:
    renderer = IncrementalRenderer(40)
    for end in range(len(DOC) + 1):
        renderer.update(DOC[:end])
    blocks = plain(render(DOC, 40)).count("") + 1
    # Every block but the last (no blank line follows it) finished exactly once.
    assert renderer.finished_renders == blocks - 1
    before = renderer.blocks_rendered
    renderer.update(DOC + "\nmore")
    # The blank line finished "Final paragraph" (rendered once more, finally), and
    # "more" is the new open block.
    assert renderer.blocks_rendered == before + 2
    assert renderer.finished_renders == blocks
    for end in range(len("more text here")):
        renderer.update(DOC + "\nmore text here"[: end + 5])
    assert renderer.finished_renders == blocks  # nothing finished was rendered again


def test_closed_fence_is_cached_while_text_streams_after_it() -> None:
    renderer = IncrementalRenderer(40)
    text = "```python\nx = 1\n```\n"
    renderer.update(text)
    assert renderer.finished_renders == 1
    for word in ("after", "after the", "after the fence"):
        assert renderer.update(text + word) == render(text + word, 40)
    assert renderer.finished_renders == 1


def test_replaced_text_starts_over() -> None:
    renderer = IncrementalRenderer(40)
    renderer.update("first paragraph\n\nsecond")
    assert plain(renderer.update("other text")) == ["other text"]
    assert plain(renderer.update("other text\n\nmore")) == ["other text", "", "more"]


def test_results_are_not_changed_by_later_updates() -> None:
    renderer = IncrementalRenderer(40)
    first = renderer.update("one\n\ntwo")
    snapshot = list(first)
    renderer.update("one\n\ntwo\n\nthree\n\nfour")
    assert first == snapshot


# --- properties -------------------------------------------------------------------------

_ALPHABET = st.sampled_from(["a", "b", " ", " ", "*", "_", "`", "```", "#", ">", "-", "1.", "|"])
_TEXT = st.lists(
    st.one_of(_ALPHABET, st.sampled_from(["\n", "\n\n", "日", "e\u0301", "\t", "[x](y)"])),
    max_size=80,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(_TEXT, st.integers(10, 50))
def test_no_line_is_wider_than_the_width(text: str, width: int) -> None:
    for line in render(text, width):
        assert width_of(line) <= width


@settings(max_examples=200, deadline=None)
@given(_TEXT, st.integers(10, 50), st.lists(st.integers(0, 400), max_size=6))
def test_streaming_equals_render_for_random_text(text: str, width: int, cuts: list[int]) -> None:
    renderer = IncrementalRenderer(width)
    for end in [*sorted(cuts), len(text)]:
        assert renderer.update(text[:end]) == render(text[:end], width)
