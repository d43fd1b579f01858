"""Markdown to styled terminal lines: a pure function of text and width.

``render(text, width)`` returns lines of ``Span``s (text + style names + an
optional pygments token type for code colour); the app turns them into escape
codes. ``IncrementalRenderer`` is what streaming uses: a message only grows, so
blocks that are finished (ended by a blank line, or a closed code fence) are
rendered once and kept; only the block still being written is rendered again
on each delta. Half-written input (an unclosed ``**`` or fence) always renders.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name, guess_lexer
from pygments.util import ClassNotFound

Style = frozenset[str]
_NONE: Style = frozenset()


@dataclass(frozen=True, slots=True)
class Span:
    text: str
    style: Style = _NONE
    color: str | None = None  # pygments token type name, for code


Line = tuple[Span, ...]

_FENCE = re.compile(r"^(\s*)(```|~~~)\s*([\w+#.-]*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_RULE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$")
_BULLET = re.compile(r"^(\s*)([-*+])\s+(.*)$")
_NUMBER = re.compile(r"^(\s*)(\d+[.)])\s+(.*)$")
_QUOTE = re.compile(r"^\s*>\s?(.*)$")
_INLINE = re.compile(
    r"(?P<code>`[^`]+`)|(?P<bold>\*\*[^*]+\*\*|__[^_]+__)|(?P<italic>\*[^*\s][^*]*\*|_[^_\s][^_]*_)"
    r"|(?P<link>\[[^\]]+\]\([^)\s]+\))"
)


def display_width(text: str) -> int:
    """Terminal columns: East Asian wide and full-width take 2, combining marks 0."""
    if text.isascii():
        return len(text)
    width = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def _inline(text: str, base: Style = _NONE) -> list[Span]:
    spans: list[Span] = []
    position = 0
    for match in _INLINE.finditer(text):
        if match.start() > position:
            spans.append(Span(text[position : match.start()], base))
        token = match.group(0)
        kind = match.lastgroup
        if kind == "code":
            spans.append(Span(token[1:-1], base | {"code"}))
        elif kind == "bold":
            spans.append(Span(token[2:-2], base | {"bold"}))
        elif kind == "italic":
            spans.append(Span(token[1:-1], base | {"italic"}))
        else:
            label, url = token[1:].split("](", 1)
            spans.append(Span(label, base | {"link"}))
            spans.append(Span(f" ({url[:-1]})", base | {"dim"}))
        position = match.end()
    if position < len(text):
        spans.append(Span(text[position:], base))
    return spans


def _split_long(word: str, width: int) -> list[str]:
    pieces, current = [], ""
    for char in word:
        if display_width(current + char) > width:
            pieces.append(current)
            current = ""
        current += char
    return [*pieces, current] if current else pieces


def _wrap(spans: list[Span], width: int, first: str, rest: str, lead_style: Style) -> list[Line]:
    """Word-wrap spans to ``width`` with a first-line prefix and a hanging indent."""
    width = max(width, 4)
    lines: list[Line] = []
    current: list[Span] = [Span(first, lead_style)] if first else []
    used = display_width(first)
    indent = display_width(rest)
    for span in spans:
        for word in re.split(r"(\s+)", span.text):
            if not word:
                continue
            if word.isspace():
                if used > indent:
                    current.append(Span(" ", span.style))
                    used += 1
                continue
            for piece in _split_long(word, width - indent):
                size = display_width(piece)
                if used + size > width and used > indent:
                    while current and current[-1].text == " ":
                        current.pop()
                    lines.append(tuple(current))
                    current = [Span(rest, lead_style)] if rest else []
                    used = indent
                current.append(Span(piece, span.style, span.color))
                used += size
    while current and current[-1].text == " ":
        current.pop()
    if current:
        lines.append(tuple(current))
    return lines


@lru_cache(maxsize=64)
def _lexer(language: str) -> Lexer | None:
    try:
        lexer: Lexer = get_lexer_by_name(language)
    except ClassNotFound:
        return None
    return lexer


def _code_lines(code: list[str], language: str, width: int) -> list[Line]:
    lexer = _lexer(language) if language else None
    if lexer is None and code:
        try:
            guessed = guess_lexer("\n".join(code))
            lexer = guessed if guessed.name != "Text only" else None
        except ClassNotFound:
            lexer = None
    label = language or (lexer.name.lower() if lexer is not None else "")
    lines: list[Line] = [(Span(f"╭─ {label}".rstrip(), frozenset({"fence"})),)]
    body = "\n".join(line.replace("\t", "    ") for line in code)
    tokens: list[list[tuple[str, str | None]]] = [[]]
    if lexer is not None:
        for token_type, value in lexer.get_tokens(body):
            name = str(token_type).removeprefix("Token.")
            for index, part in enumerate(value.split("\n")):
                if index:
                    tokens.append([])
                if part:
                    tokens[-1].append((part, name))
    else:
        tokens = [[(line, None)] for line in body.split("\n")]
    for row in tokens[: len(code)]:
        spans: list[Span] = [Span("  ", frozenset({"codeblock"}))]
        used = 2
        for text, colour in row:
            size = display_width(text)
            if used + size > width:  # code is cut, not wrapped: wrapping breaks it
                room = max(width - used - 1, 0)
                spans.append(Span(text[:room] + "…", frozenset({"codeblock"}), colour))
                break
            spans.append(Span(text, frozenset({"codeblock"}), colour))
            used += size
        lines.append(tuple(spans))
    lines.append((Span("╰─", frozenset({"fence"})),))
    return lines


def _block_lines(block: list[str], width: int) -> list[Line]:
    """One block: a fence, or a run of non-blank lines."""
    fence = _FENCE.match(block[0])
    if fence:
        marker = fence.group(2)
        closed = len(block) > 1 and block[-1].strip().startswith(marker)
        return _code_lines(block[1 : -1 if closed else None], fence.group(3), width)
    lines: list[Line] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            lines.extend(_wrap(_inline(" ".join(paragraph)), width, "", "", _NONE))
            paragraph.clear()

    for raw in block:
        if heading := _HEADING.match(raw):
            flush()
            style = frozenset({"heading", "bold"})
            lines.extend(_wrap(_inline(heading.group(2), style), width, "", "", style))
        elif _RULE.match(raw):
            flush()
            lines.append((Span("─" * width, frozenset({"rule"})),))
        elif item := _BULLET.match(raw) or _NUMBER.match(raw):
            flush()
            depth = len(item.group(1).expandtabs(4)) // 2
            marker = "•" if item.group(2) in "-*+" else item.group(2)
            first = "  " * depth + marker + " "
            lines.extend(_wrap(_inline(item.group(3)), width, first, " " * len(first), _NONE))
        elif quote := _QUOTE.match(raw):
            flush()
            style = frozenset({"quote"})
            lines.extend(_wrap(_inline(quote.group(1), style), width, "│ ", "│ ", style))
        else:
            paragraph.append(raw.strip())
    flush()
    return lines


def _blocks(text: str) -> tuple[list[list[str]], bool]:
    """Split into blocks; the bool says whether the last block is finished.

    A block ends at a blank line or a closing fence, and only once the text
    has gone past that line (a line without its newline may still grow).
    """
    lines = text.split("\n")
    complete = len(lines) - 1  # the last piece has no newline yet
    blocks: list[list[str]] = []
    current: list[str] = []
    fence: str | None = None
    finished = False
    for number, line in enumerate(lines):
        if number == complete and line == "":
            break  # the text ends with a newline: nothing more on this line yet
        finished = False
        ended = number < complete
        if fence is not None:
            current.append(line)
            if line.strip().startswith(fence) and ended:
                blocks.append(current)
                current, fence, finished = [], None, True
            continue
        match = _FENCE.match(line)
        if match:
            if current:
                blocks.append(current)
            current, fence = [line], match.group(2)
        elif not line.strip() and ended:
            if current:
                blocks.append(current)
                current = []
            finished = bool(blocks)
        else:
            current.append(line)
    if current:
        blocks.append(current)
        finished = False
    return blocks, finished


def render(text: str, width: int) -> list[Line]:
    """All of ``text`` as lines no wider than ``width`` (blank lines between blocks)."""
    blocks, _ = _blocks(text)
    out: list[Line] = []
    for index, block in enumerate(blocks):
        if index:
            out.append(())
        out.extend(_block_lines(block, width))
    return out


class IncrementalRenderer:
    """``update(text)`` with a growing text re-renders only the unfinished last block."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.blocks_rendered = 0  # every block render, the open block's included
        self.finished_renders = 0  # renders of finished blocks: once each, ever
        self._text = ""
        self._done: list[list[Line]] = []  # finished blocks, rendered
        self._done_chars = 0  # how much of the text they cover
        self._lines: list[Line] = []

    def update(self, text: str) -> list[Line]:
        if text == self._text:
            return self._lines
        if not text.startswith(self._text[: self._done_chars]):
            self._done, self._done_chars = [], 0  # replaced, not grown: start over
        self._text = text
        tail = text[self._done_chars :]
        blocks, last_finished = _blocks(tail)
        # Every block but the last is finished; so is the last when the text ends
        # after it. Keep those, and remember where the open one starts.
        keep = len(blocks) if last_finished else len(blocks) - 1
        open_from = self._done_chars
        if keep > 0:
            consumed = _chars_of_blocks(tail, keep)
            for block in blocks[:keep]:
                self._done.append(_block_lines(block, self.width))
                self.blocks_rendered += 1
                self.finished_renders += 1
            open_from += consumed
            self._done_chars = open_from
            blocks = blocks[keep:]
        lines: list[Line] = []
        for index, rendered in enumerate(self._done):
            if index:
                lines.append(())
            lines.extend(rendered)
        for block in blocks:
            if lines:
                lines.append(())
            lines.extend(_block_lines(block, self.width))
            self.blocks_rendered += 1
        self._lines = lines
        return lines


def _chars_of_blocks(text: str, count: int) -> int:
    """How many characters of ``text`` the first ``count`` blocks (and blanks after) take."""
    position = 0
    seen = 0
    fence: str | None = None
    in_block = False
    for line in text.split("\n"):
        end = position + len(line) + 1
        if fence is not None:
            if line.strip().startswith(fence):
                fence, in_block, seen = None, False, seen + 1
                if seen == count:
                    return min(end, len(text))
            position = end
            continue
        match = _FENCE.match(line)
        if match:
            if in_block:
                seen += 1
                if seen == count:
                    return position
            fence, in_block = match.group(2), True
        elif not line.strip():
            if in_block:
                seen += 1
                in_block = False
                if seen == count:
                    return min(end, len(text))
        else:
            in_block = True
        position = end
    return len(text)
