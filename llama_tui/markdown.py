"""Markdown to styled terminal lines: a pure function of text and width.

``render(text, width)`` returns lines of ``Span``s (text, style names, and a
pygments token type name for code colour); the app turns them into escape
codes. Nothing here touches the terminal.

``IncrementalRenderer`` is what streaming uses: a reply only grows, so blocks
that are finished (ended by a blank line outside a fence, or a closed fence)
are rendered once and kept; only the block still being written is rendered
again on each delta. Its output is always equal to ``render`` of the same text.

Half-written input never raises and renders sensibly: an unclosed ``**`` stays
literal until it is closed, an unclosed fence is drawn as a code block whose
footer moves down as lines arrive.

Supported: ATX headings, paragraphs, ``**bold**``, ``*italic*``/``_italic_``,
`` `code` ``, ``[links](url)``, ``<autolinks>``, backslash escapes, bullet and
numbered lists (nested by indentation, hanging indent on wrap), block quotes
(nested, with any Markdown inside), horizontal rules, pipe tables (aligned when
they fit, one row per line when not) and fenced code blocks highlighted by
pygments.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

Style = frozenset[str]
"""Style names: bold, italic, code, link, heading, quote, rule, dim, codeblock, fence."""

_NONE: Style = frozenset()
_BOLD: Style = frozenset({"bold"})
_HEADING: Style = frozenset({"heading", "bold"})
_QUOTE: Style = frozenset({"quote"})
_RULE: Style = frozenset({"rule"})
_DIM: Style = frozenset({"dim"})
_FENCE_STYLE: Style = frozenset({"fence"})
_CODEBLOCK: Style = frozenset({"codeblock"})


@dataclass(frozen=True, slots=True)
class Span:
    """A run of text drawn in one style.

    ``color`` is set only inside code blocks: the pygments token type name
    (``"Keyword"``, ``"Name.Function"``, ``"Literal.String"``, ``"Comment"``…)
    for the app to map to a terminal colour; ``None`` means the default colour.
    """

    text: str
    style: Style = _NONE
    color: str | None = None


Line = tuple[Span, ...]
"""One terminal row; its spans' display widths add up to at most the render width."""


# --- widths -----------------------------------------------------------------

_WIDE = frozenset({"W", "F"})
_ZERO = frozenset({"Mn", "Me", "Cf"})


@lru_cache(maxsize=4096)
def _char_width(char: str) -> int:
    if unicodedata.category(char) in _ZERO:
        return 0  # combining marks, zero-width joiners, variation selectors
    return 2 if unicodedata.east_asian_width(char) in _WIDE else 1


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: East Asian wide/full-width 2, combining 0, else 1."""
    if text.isascii():
        return len(text)  # the common case, and the fast one
    return sum(map(_char_width, text))


def _cut(text: str, columns: int) -> tuple[str, str]:
    """Split ``text`` so the head is at most ``columns`` wide (never splits a wide char)."""
    if text.isascii():
        return text[:columns], text[columns:]
    used = 0
    for index, char in enumerate(text):
        size = _char_width(char)
        if used + size > columns:
            return text[:index], text[index:]
        used += size
    return text, ""


def _truncate(spans: Sequence[Span], width: int) -> Line:
    """Cut a line to ``width`` columns, ending it with "…" when anything was cut."""
    total = sum(display_width(span.text) for span in spans)
    if total <= width:
        return tuple(spans)
    out: list[Span] = []
    room = width - 1  # the ellipsis takes one column
    for span in spans:
        size = display_width(span.text)
        if size <= room:
            out.append(span)
            room -= size
            continue
        head, _ = _cut(span.text, room)
        out.append(Span(head + "…", span.style, span.color))
        return tuple(out)
    return tuple(out)  # unreachable: total > width means some span was cut


# --- inline -------------------------------------------------------------------

# One pass, left to right, first alternative wins. Emphasis needs a non-space
# just inside each delimiter (as CommonMark's flanking rule does) so that
# "2 * 3 * 4" and "a ** b" stay literal; underscores also need a non-word
# character outside, so snake_case_names are never italicised.
_INLINE = re.compile(
    r"(?P<escape>\\[!-/:-@\[-`{-~])"
    r"|(?P<code>(?P<ticks>`+)(?P<code_body>.+?)(?<!`)(?P=ticks)(?!`))"
    r"|(?P<image>!)?\[(?P<label>[^\]\n]+)\]\((?P<url>[^()\s]*(?:\([^()\s]*\)[^()\s]*)*)"
    r"(?:\s+\"[^\"]*\")?\)"
    r"|<(?P<autolink>(?:https?|ftp|mailto):[^\s<>]+)>"
    r"|\*\*\*(?=\S)(?P<bold_italic>.+?)(?<=\S)\*\*\*"
    r"|\*\*(?=\S)(?P<bold>.+?)(?<=\S)\*\*"
    r"|(?<!\w)__(?=\S)(?P<bold_u>.+?)(?<=\S)__(?!\w)"
    r"|\*(?=[^\s*])(?P<italic>.+?)(?<=[^\s*])\*"
    r"|(?<!\w)_(?=[^\s_])(?P<italic_u>.+?)(?<=[^\s_])_(?!\w)"
)
_SPECIAL = re.compile(r"[\\`\[<*_]")


def _inline(text: str, base: Style = _NONE) -> list[Span]:
    """Inline Markdown to spans; unmatched delimiters stay as they are."""
    if not _SPECIAL.search(text):
        return [Span(text, base)] if text else []
    spans: list[Span] = []
    position = 0
    for match in _INLINE.finditer(text):
        if match.start() > position:
            spans.append(Span(text[position : match.start()], base))
        position = match.end()
        group = match.group
        if group("escape"):
            spans.append(Span(match.group(0)[1], base))
        elif group("code_body") is not None:
            body = group("code_body")
            # CommonMark strips one space each side so `` `x` `` can show backticks.
            if len(body) > 2 and body[0] == body[-1] == " " and body.strip():
                body = body[1:-1]
            spans.append(Span(body, base | {"code"}))
        elif group("label") is not None:
            spans.extend(_inline(group("label"), base | {"link"}))
            if group("url"):
                spans.append(Span(f" ({group('url')})", base | _DIM))
        elif group("autolink") is not None:
            spans.append(Span(group("autolink"), base | {"link"}))
        elif group("bold_italic") is not None:
            spans.extend(_inline(group("bold_italic"), base | {"bold", "italic"}))
        elif group("bold") is not None or group("bold_u") is not None:
            spans.extend(_inline(group("bold") or group("bold_u"), base | {"bold"}))
        else:
            spans.extend(_inline(group("italic") or group("italic_u"), base | {"italic"}))
    if position < len(text):
        spans.append(Span(text[position:], base))
    return spans


# --- wrapping -------------------------------------------------------------------

_SPACES = re.compile(r"[ \t\n]+")


def _merge(spans: list[Span]) -> Line:
    """Join neighbouring spans of the same look: fewer spans to draw."""
    out: list[Span] = []
    for span in spans:
        if out and out[-1].style == span.style and out[-1].color == span.color:
            out[-1] = Span(out[-1].text + span.text, span.style, span.color)
        elif span.text:
            out.append(span)
    return tuple(out)


def _wrap(spans: list[Span], width: int, first: str = "", rest: str = "") -> list[Line]:
    """Word-wrap ``spans`` to ``width`` after a first-line prefix, with a hanging indent.

    The spans are laid end to end as one string (whitespace runs become one
    space) and each line is found with one ``rfind`` for the last space that
    fits, rather than word by word: this is the hot path of the renderer.
    Words may run across spans ("**bold**," is one word), so a line is only
    ever broken at a space, or inside a word too long for any line.
    """
    # Segments: (start offset in ``full``, style, colour), neighbours of one look merged.
    pieces: list[str] = []
    segments: list[tuple[int, Style, str | None]] = []
    length = 0
    for span in spans:
        text = span.text
        if "\t" in text or "\n" in text or "  " in text:
            text = _SPACES.sub(" ", text)
        if text.startswith(" ") and (not length or pieces[-1].endswith(" ")):
            text = text[1:]  # no leading space, and never two in a row
        if not text:
            continue
        if not segments or segments[-1][1] != span.style or segments[-1][2] != span.color:
            segments.append((length, span.style, span.color))
        pieces.append(text)
        length += len(text)
    full = "".join(pieces).rstrip(" ")
    length = len(full)
    starts = [segment[0] for segment in segments]
    columns: list[int] | None = None  # columns[i]: width of full[:i], for non-ASCII text only
    if not full.isascii():
        columns = [0]
        for char in full:
            columns.append(columns[-1] + _char_width(char))

    def line_of(prefix: str, begin: int, stop: int) -> Line:
        out = [Span(prefix)] if prefix else []
        index = bisect_right(starts, begin) - 1
        while begin < stop:
            _, style, color = segments[index]
            next_start = starts[index + 1] if index + 1 < len(starts) else length
            cut = min(stop, next_start)
            out.append(Span(full[begin:cut], style, color))
            begin = cut
            index += 1
        return tuple(out)

    lines: list[Line] = []
    prefix = first
    position = 0
    while position < length:
        room = width - display_width(prefix)
        if columns is None:
            limit = position + room  # the furthest end that fits
        else:
            limit = bisect_right(columns, columns[position] + room) - 1
        if limit >= length:
            lines.append(line_of(prefix, position, length))
            break
        cut = full.rfind(" ", position, limit + 1)
        if cut > position:
            lines.append(line_of(prefix, position, cut))
            position = cut + 1
        else:  # a word longer than the line: hard-wrap it
            limit = max(limit, position + 1)  # at least one character, whatever the room
            lines.append(line_of(prefix, position, limit))
            position = limit + 1 if full.startswith(" ", limit) else limit
        prefix = rest
    if not lines:
        lines.append((Span(first),) if first else ())
    return lines


# --- code -------------------------------------------------------------------------

# pygments' own guess_lexer is slow (it asks every lexer, 1-100 ms) and poor at
# short snippets ("def f(): ..." comes back as "Tera Term macro"), so the
# languages models write most are recognised by a few cheap patterns first.
_GUESSES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.MULTILINE))
    for name, pattern in (
        (
            "python",
            r"^\s*(?:def \w+\(.*\).*:|class \w+.*:|from [\w.]+ import |import \w+$|"
            r"if __name__ ==|elif .*:$|print\(.*\)$)",
        ),
        ("rust", r"^\s*(?:(?:pub )?fn \w+|let mut |use \w+::|impl\b)|println!\("),
        ("go", r"^\s*(?:package \w+$|func (?:\(\w+ \*?\w+\) )?\w+\()"),
        ("c", r"^#include\s*[<\"]"),
        (
            "javascript",
            r"^\s*(?:(?:const|let|var) \w+ = |function \w*\(|export |import .* from )"
            r"|console\.log\(|=> \{",
        ),
        ("sql", r"(?i)^\s*(?:select .+ from |insert into |create table |update \w+ set )"),
        ("html", r"(?i)^\s*<(?:!doctype|html|div|head|body|p|span)\b"),
        (
            "bash",
            r"^(?:#!/bin/(?:ba)?sh|\$ |(?:sudo |apt |apt-get |pip |npm |cd |ls |git |echo |"
            r"export \w+=|curl |mkdir |cargo ))",
        ),
        ("json", r"\A\s*[\[{]\s*\"[^\"]*\"\s*:"),
        ("yaml", r"\A(?:---\n)?[\w-]+:(?: .*)?\n(?:\s+- |\s+[\w-]+:)"),
    )
)
_GUESS_CONFIDENCE = 0.3  # guess_lexer's analyse_text score below which it is a shrug


@lru_cache(maxsize=64)
def _lexer(language: str) -> Any:
    """A pygments lexer for a fence's language name, or None."""
    from pygments.lexers import get_lexer_by_name
    from pygments.util import ClassNotFound

    try:
        # stripnl=False: leading blank lines must not be dropped, or rows shift.
        return get_lexer_by_name(language.lower(), stripnl=False, ensurenl=False)
    except (ClassNotFound, ValueError):
        return None


def _quick_guess(code: str) -> str | None:
    sample = code[:4000]
    for name, pattern in _GUESSES:
        if pattern.search(sample):
            return name
    return None


@lru_cache(maxsize=256)
def _slow_guess(code: str) -> str | None:
    """pygments' guess, only if it is confident; cached, as it is slow."""
    from pygments.lexers import guess_lexer

    sample = code[:4000]
    try:
        lexer = guess_lexer(sample)
        score = float(type(lexer).analyse_text(sample))
    except Exception:  # any lexer may fail on any text: plain is fine
        return None
    if score < _GUESS_CONFIDENCE or not lexer.aliases or lexer.aliases[0] == "text":
        return None
    return str(lexer.aliases[0])


def _guess(code: str, closed: bool) -> str | None:
    """A language for an unlabelled fence.

    pygments' full guess only runs on a closed fence: an open one is re-rendered
    on every streamed delta, and its text changes each time, so no cache helps.
    """
    if not code.strip():
        return None
    return _quick_guess(code) or (_slow_guess(code) if closed else None)


_COLORS: dict[Any, str | None] = {}  # pygments token type -> colour name


def _color(token_type: Any) -> str | None:
    color = _COLORS.get(token_type, "")
    if color == "":
        name = str(token_type).removeprefix("Token.").removeprefix("Token")
        # Plain text and whitespace get no colour, so they merge with neighbours.
        color = None if not name or name.startswith(("Text", "Whitespace")) else name
        _COLORS[token_type] = color
    return color


def _plain_rows(body: str) -> tuple[Line, ...]:
    return tuple((Span(row, _CODEBLOCK),) if row else () for row in body.split("\n"))


@lru_cache(maxsize=1024)
def _token_rows(body: str, language: str | None) -> tuple[Line, ...]:
    """The code's rows as highlighted spans (colour: pygments token type name).

    Cached: lexing is most of the cost of a message with code (pygments takes
    about 2 µs a character), and the rows do not depend on the width, so a
    resize re-lays out a conversation without lexing any of it again.
    """
    lexer = _lexer(language) if language else None
    if lexer is None:
        return _plain_rows(body)
    rows: list[list[Span]] = [[]]
    try:
        tokens = list(lexer.get_tokens(body))
    except Exception:  # a lexer bug must not break the chat view
        return _plain_rows(body)
    for token_type, value in tokens:
        color = _color(token_type)
        if "\n" not in value:
            if value:
                rows[-1].append(Span(value, _CODEBLOCK, color))
            continue
        for index, part in enumerate(value.split("\n")):
            if index:
                rows.append([])
            if part:
                rows[-1].append(Span(part, _CODEBLOCK, color))
    return tuple(_merge(row) for row in rows[: body.count("\n") + 1])


def _open_rows(body: str, language: str | None) -> tuple[Line, ...]:
    """Rows of a fence still being written: the complete lines, then the last one.

    The complete lines are lexed together (and cached, so that is once per
    line, not once per delta); the line being written is lexed on its own,
    which can colour it out of context (inside a multi-line string) until its
    newline arrives. The closed fence is lexed as a whole.
    """
    head, newline, tail = body.rpartition("\n")
    if not newline:
        return _token_rows(tail, language)
    return _token_rows(head, language) + _token_rows(tail, language)


def _fence_open(line: str) -> tuple[int, str, int, str] | None:
    """(indent, fence char, fence length, info) when ``line`` opens a fence."""
    stripped = line.lstrip(" \t")
    if not stripped.startswith(("```", "~~~")):
        return None
    char = stripped[0]
    length = len(stripped) - len(stripped.lstrip(char))
    indent = len(line) - len(stripped)
    return indent, char, length, stripped[length:].strip()


def _fence_closes(line: str, char: str, length: int) -> bool:
    stripped = line.strip()
    return len(stripped) >= length and stripped == char * len(stripped)


def _code_block(lines: list[str], width: int) -> list[Line]:
    """A fenced block: ``╭─ lang`` header, code indented two spaces, ``╰─`` footer.

    No right border and no wrapping, so that code copied off the terminal is
    still code; rows too long are cut with "…" instead.
    """
    opened = _fence_open(lines[0])
    assert opened is not None  # only fence blocks come here
    indent, char, length, info = opened
    closed = len(lines) > 1 and _fence_closes(lines[-1], char, length)
    code = lines[1 : -1 if closed else None]
    # Fences indented under a list item indent their code the same way: drop that.
    code = [row[min(indent, len(row) - len(row.lstrip(" "))) :] for row in code]
    body = "\n".join(code).replace("\t", "    ").replace("\r", "")
    language = info.split()[0] if info else None
    if language and _lexer(language) is None:
        label = language  # unknown to pygments: still say what it is, uncoloured
    else:
        language = language or _guess(body, closed)
        label = language or ""
    out: list[Line] = [_truncate([Span(f"╭─ {label}" if label else "╭─", _FENCE_STYLE)], width)]
    margin = Span("  ", _CODEBLOCK)
    rows = (_token_rows if closed else _open_rows)(body, language) if code else ()
    for row in rows:
        out.append(_merge([margin, *_truncate(row, width - 2)]))
    out.append((Span("╰─", _FENCE_STYLE),))
    return out


# --- blocks ------------------------------------------------------------------------

_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_HR = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_ITEM = re.compile(r"^([ \t]*)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*)|$)")
_QUOTE_LINE = re.compile(r"^ {0,3}>[ ]?")
_TABLE_ROW = re.compile(r"^\s*\|")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?\s*$")
_BULLETS = ("•", "◦", "▪")


def _prefix_fits(prefix: str, width: int) -> str:
    """Deep nesting must not push the text off the screen: keep half the width for it."""
    if display_width(prefix) <= width // 2:
        return prefix
    return prefix.lstrip()[: max(width // 2, 1)]


def _table(rows: list[str], width: int) -> list[Line]:
    """Pipe table rows: aligned columns when they fit the width, else one row per line."""
    cells = [[_inline(cell.strip()) for cell in row.strip().strip("|").split("|")] for row in rows]
    is_rule = [bool(_TABLE_RULE.match(row)) for row in rows]
    columns = max(len(row) for row in cells)
    widths = [0] * columns
    for row, rule in zip(cells, is_rule, strict=True):
        if not rule:
            for index, cell in enumerate(row):
                size = sum(display_width(span.text) for span in cell)
                widths[index] = max(widths[index], size)
    out: list[Line] = []
    separator = Span(" │ ", _DIM)
    if sum(widths) + 3 * (columns - 1) <= width:
        header = is_rule[1] if len(rows) > 1 else False
        for number, (row, rule) in enumerate(zip(cells, is_rule, strict=True)):
            if rule:
                out.append((Span("─┼─".join("─" * size for size in widths), _DIM),))
                continue
            spans: list[Span] = []
            for index in range(columns):
                cell = row[index] if index < len(row) else []
                if header and number == 0:
                    cell = [Span(span.text, span.style | _BOLD, span.color) for span in cell]
                pad = widths[index] - sum(display_width(span.text) for span in cell)
                if index:
                    spans.append(separator)
                spans.extend(cell)
                if index < columns - 1:
                    spans.append(Span(" " * pad))
            out.append(_merge(spans))
        return out
    for row, rule in zip(cells, is_rule, strict=True):
        if not rule:
            joined: list[Span] = []
            for index, cell in enumerate(row):
                if index:
                    joined.append(separator)
                joined.extend(cell)
            out.extend(_wrap(joined, width, "", "  "))
    return out


def _text_block(lines: list[str], width: int) -> list[Line]:
    """A run of non-blank lines outside a fence: headings, rules, lists, quotes, tables, text."""
    out: list[Line] = []
    paragraph: list[str] = []
    item: tuple[str, str, list[str]] | None = None  # (first prefix, hanging indent, text)
    quote: list[str] = []
    table: list[str] = []

    def flush() -> None:
        nonlocal item
        if paragraph:
            # A paragraph indented under a loose list item keeps that indent.
            lead = len(paragraph[0]) - len(paragraph[0].lstrip(" "))
            pad = _prefix_fits(" " * min(lead, 8), width)
            text = " ".join(row.strip() for row in paragraph)
            out.extend(_wrap(_inline(text), width, pad, pad))
            paragraph.clear()
        if item is not None:
            first, hang, parts = item
            text = " ".join(parts)
            out.extend(_wrap(_inline(text), width, first, hang))
            item = None
        if quote:
            inner = render("\n".join(quote), max(width - 2, 1))
            bar = Span("│ ", _QUOTE)
            for line in inner:
                spans = [Span(span.text, span.style | _QUOTE, span.color) for span in line]
                out.append((bar, *_merge(spans)) if width > 2 else _truncate(spans, width))
            quote.clear()
        if table:
            out.extend(_table(table, width))
            table.clear()

    for raw in lines:
        if quote and not _QUOTE_LINE.match(raw) and raw.strip():
            if _ATX.match(raw) or _HR.match(raw) or _ITEM.match(raw) or _fence_open(raw):
                flush()
            else:
                quote.append(raw)  # lazy continuation of the quoted paragraph
                continue
        if marker := _QUOTE_LINE.match(raw):
            if not quote:
                flush()
            quote.append(raw[marker.end() :])
        elif heading := _ATX.match(raw):
            flush()
            out.extend(_wrap(_inline(heading.group(2) or "", _HEADING), width))
        elif _HR.match(raw):
            flush()
            out.append((Span("─" * width, _RULE),))
        elif entry := _ITEM.match(raw):
            flush()
            depth = len(entry.group(1).expandtabs(4)) // 2
            token = entry.group(2)
            bullet = _BULLETS[min(depth, 2)] if token in "-*+" else token
            first = _prefix_fits("  " * depth + bullet + " ", width)
            item = (first, " " * display_width(first), [(entry.group(3) or "").strip()])
        elif _TABLE_ROW.match(raw):
            if not table:
                flush()
            table.append(raw)
        elif item is not None:
            item[2].append(raw.strip())  # continuation of the list item
        elif table and _TABLE_RULE.match(raw):
            table.append(raw)
        else:
            if table:
                flush()
            paragraph.append(raw)
    flush()
    return out


class _Block(NamedTuple):
    lines: list[str]
    fence: bool
    end: int  # offset just past the block (and the blank line or fence that ended it)
    finished: bool  # nothing appended to the text can change this block any more


def _blocks(text: str) -> list[_Block]:
    """Split ``text`` into blocks: fenced code, or runs of non-blank lines.

    A block is finished once a complete blank line follows it (outside a
    fence), its closing fence line is complete, or a fence opens after it.
    Only the last block can be unfinished. A line without its newline may
    still grow, so it never finishes anything.
    """
    blocks: list[_Block] = []
    current: list[str] = []
    fence: tuple[str, int] | None = None
    position = 0
    length = len(text)
    while position < length:
        newline = text.find("\n", position)
        ended = newline >= 0
        end = newline + 1 if ended else length
        line = text[position : newline if ended else length]
        start, position = position, end
        if fence is not None:
            current.append(line)
            if ended and _fence_closes(line, *fence):
                blocks.append(_Block(current, True, end, True))
                current, fence = [], None
            continue
        opened = _fence_open(line)
        if opened is not None:
            if current:
                blocks.append(_Block(current, False, start, True))
            current, fence = [line], (opened[1], opened[2])
        elif not line.strip():
            if ended and current:
                blocks.append(_Block(current, False, end, True))
                current = []
        else:
            current.append(line)
    if current:
        blocks.append(_Block(current, fence is not None, length, False))
    return blocks


def _render_block(block: _Block, width: int) -> list[Line]:
    return _code_block(block.lines, width) if block.fence else _text_block(block.lines, width)


def render(text: str, width: int) -> list[Line]:
    """Lay out Markdown ``text`` as lines at most ``width`` columns wide.

    Blocks are separated by one empty line (``()``). Never raises on partial
    or malformed input; the width holds for any ``width`` of 10 or more.
    """
    out: list[Line] = []
    for block in _blocks(text):
        rendered = _render_block(block, width)
        if out and rendered:  # a block with no lines (a bare ">") gets no blank line either
            out.append(())
        out.extend(rendered)
    return out


# C0 controls and DEL as their visible Control Pictures (U+2400...): typed or
# pasted text must never reach the terminal as a control sequence.
_CONTROL_PICTURES = {code: 0x2400 + code for code in range(32) if chr(code) not in "\n\t"}
_CONTROL_PICTURES[0x7F] = 0x2421


def plain(text: str, width: int) -> list[Line]:
    """``text`` as typed, for a user's own message: no Markdown, whitespace kept.

    One row per line of the text, wrapped at ``width`` columns: at the last
    space that fits (that one space is dropped), or inside a word longer than
    a row. Indentation stays; tabs become four columns.
    """
    width = max(width, 1)
    rows: list[Line] = []
    for typed in text.expandtabs(4).translate(_CONTROL_PICTURES).split("\n"):
        line = typed
        while display_width(line) > width:
            head, rest = _cut(line, width)
            space = head.rfind(" ")
            if space > 0 and head[:space].strip():
                head, rest = line[:space], line[space + 1 :]
            elif not head:  # a character wider than the row: it goes alone
                head, rest = line[:1], line[1:]
            rows.append((Span(head),))
            line = rest
        rows.append((Span(line),) if line else ())
    return rows


class IncrementalRenderer:
    """``render`` for a message that grows while it streams.

    ``update(text)`` takes the whole text so far. Finished blocks are rendered
    once and cached; only the open last block is rendered again. A text that
    is not a continuation of the last one (replaced, or edited inside a
    finished block) starts over. The result always equals ``render(text, width)``.
    """

    def __init__(self, width: int) -> None:
        """Render at ``width`` columns (make a new renderer when the width changes)."""
        self.width = width
        self.blocks_rendered = 0
        """Every block rendered, the open block's re-renders included."""
        self.finished_renders = 0
        """Renders of finished blocks: at most once per block, ever (until a restart)."""
        self._text = ""
        self._done_text = ""  # the prefix the finished blocks came from
        self._done: list[Line] = []  # the finished blocks' lines, separators included
        self._lines: list[Line] = []

    def update(self, text: str) -> list[Line]:
        """The lines for ``text``, the whole message so far. Do not mutate the result."""
        if text == self._text:
            return self._lines
        if not text.startswith(self._done_text):
            self._done_text, self._done = "", []  # replaced, not grown: start over
        self._text = text
        offset = len(self._done_text)
        done = self._done
        open_lines: list[Line] = []
        for block in _blocks(text[offset:]):
            rendered = _render_block(block, self.width)
            self.blocks_rendered += 1
            if block.finished:
                self.finished_renders += 1
                if done and rendered:
                    done.append(())
                done.extend(rendered)
                self._done_text = text[: offset + block.end]
            else:
                open_lines = rendered  # only the last block can be open
        # A fresh list each time: ``done`` keeps growing, and callers keep old results.
        lines = [*done, (), *open_lines] if done and open_lines else [*done, *open_lines]
        self._lines = lines
        return lines
