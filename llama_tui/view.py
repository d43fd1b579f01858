"""The TUI's pure core: what is on screen, what a key means, where things go.

No terminal and no I/O here: ``View`` holds the state, ``View.key`` turns a
key into an ``Intent`` for the app to carry out, and ``View.layout`` turns the
state into rows of styled spans for a given terminal size. The app owns the
terminal and paints those rows; tests check them as plain text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from llama_tui.markdown import IncrementalRenderer, Line, Span, display_width
from llamad.protocol import (
    Conversation,
    ImagePart,
    Message,
    MessageStats,
    ModelStatus,
    SearchHit,
    ToolCall,
)

SIDEBAR_WIDTH = 26
SIDEBAR_MIN_TERMINAL = 80  # narrower terminals hide the sidebar automatically
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

Mode = Literal["chat", "picker", "help", "find", "results", "confirm", "approve"]


@dataclass(frozen=True)
class Send:
    text: str


@dataclass(frozen=True)
class LoadModel:
    name: str


@dataclass(frozen=True)
class OpenConversation:
    conversation: str | None  # None: a new one


@dataclass(frozen=True)
class CancelReply:
    conversation: str


@dataclass(frozen=True)
class SearchAll:
    text: str


@dataclass(frozen=True)
class Rename:
    conversation: str
    title: str


@dataclass(frozen=True)
class Delete:
    conversation: str


@dataclass(frozen=True)
class Export:
    conversation: str
    path: str  # "" for a name made from the title


@dataclass(frozen=True)
class CopyLastReply:
    code_block: int | None = None  # 1-based; None copies the whole reply, 0 the last block


@dataclass(frozen=True)
class EditInEditor:
    text: str


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class AttachImage:
    path: str


@dataclass(frozen=True)
class CompletePath:
    """Tab after ``/image ``: complete the path in the input (the app lists folders)."""

    partial: str


@dataclass(frozen=True)
class AnswerToolCall:
    conversation: str
    call: str
    approve: bool


Intent = (
    Send
    | LoadModel
    | OpenConversation
    | CancelReply
    | SearchAll
    | Rename
    | Delete
    | Export
    | CopyLastReply
    | EditInEditor
    | Quit
    | AttachImage
    | CompletePath
    | AnswerToolCall
)

HELP = [
    ("Enter", "send the message"),
    ("Alt+Enter, Ctrl+J", "new line in the message"),
    ("Ctrl+E", "write the message in $EDITOR"),
    ("↑ / ↓", "earlier prompts (on the first line of the input)"),
    ("PgUp / PgDn, Home / End", "scroll the conversation"),
    ("Ctrl+L, /model", "choose a model"),
    ("Ctrl+N, /new", "new conversation"),
    ("Ctrl+F, /find TEXT", "find in this conversation; n / N: next / previous"),
    ("/search TEXT", "search every conversation; Enter opens a hit"),
    ("/rename TITLE, /delete", "rename or delete this conversation"),
    ("/export [PATH]", "save this conversation as Markdown"),
    ("/copy, /copy code [N]", "copy the last reply, or its Nth code block (OSC 52)"),
    ("/image PATH (Tab completes)", "attach an image to the next message"),
    ("Ctrl+T", "expand or collapse tool calls"),
    ("mouse wheel", "scroll (hold Shift to select text with the mouse)"),
    ("Ctrl+↑ / Ctrl+↓", "previous / next conversation"),
    ("Ctrl+B", "show or hide the conversation list"),
    ("Esc", "stop the reply being generated"),
    ("Ctrl+C", "stop the reply; twice: quit"),
    ("Ctrl+Q", "quit"),
    ("F1, ?", "this help (any key closes it)"),
]


@dataclass
class Entry:
    """One message on screen, with its Markdown rendered once per width."""

    role: str
    text: str
    status: str = "complete"
    model: str | None = None
    error: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    images: list[ImagePart] = field(default_factory=list)
    _renderer: IncrementalRenderer | None = None
    _width: int = 0

    def lines(self, width: int) -> list[Line]:
        if self._renderer is None or self._width != width:
            self._renderer = IncrementalRenderer(width)
            self._width = width
        return self._renderer.update(self.text)


def _entry(message: Message) -> Entry:
    return Entry(
        message.role,
        message.text,
        message.status,
        message.model,
        message.error,
        list(message.tool_calls),
        message.images,
    )


@dataclass
class View:
    conversations: list[Conversation] = field(default_factory=list)
    current: str | None = None
    entries: dict[str, list[Entry]] = field(default_factory=dict)
    generating: set[str] = field(default_factory=set)
    waiting_first_token: set[str] = field(default_factory=set)
    models: dict[str, ModelStatus] = field(default_factory=dict)
    active_model: str | None = None
    connection: str = "connecting…"
    connected: bool = False
    input: str = ""
    history: list[str] = field(default_factory=list)
    history_index: int | None = None
    scroll: int = 0  # rows above the bottom; 0 follows new text
    new_below: bool = False
    mode: Mode = "chat"
    picker_index: int = 0
    sidebar: bool = True
    last_stats: MessageStats | None = None
    notice: str = ""
    interrupts: int = 0  # Ctrl+C presses in a row
    find_query: str = ""
    find_index: int = 0  # which hit, counting from the newest
    find_hits: int = 0  # hits found by the last layout
    search_results: list[SearchHit] = field(default_factory=list)
    result_index: int = 0
    attachments: list[tuple[str, int]] = field(default_factory=list)  # name, bytes
    tools_expanded: bool = False
    approval: tuple[str, ToolCall] | None = None  # (conversation, call) waiting for y / n
    _draft: str = ""  # the message being written while the find prompt is open
    _result_query: str = ""

    # ------------------------------------------------------------ updates

    def set_messages(self, conversation: str, messages: list[Message]) -> None:
        self.entries[conversation] = [_entry(m) for m in messages if m.role != "system"]

    def add_user(self, conversation: str, message: Message) -> None:
        self.entries.setdefault(conversation, []).append(_entry(message))
        self.entries[conversation].append(Entry("assistant", "", "incomplete"))
        self.generating.add(conversation)
        self.waiting_first_token.add(conversation)

    def add_delta(self, conversation: str, text: str) -> None:
        entries = self.entries.setdefault(conversation, [Entry("assistant", "", "incomplete")])
        if entries[-1].role != "assistant":
            entries.append(Entry("assistant", "", "incomplete"))
        entries[-1].text += text
        self.waiting_first_token.discard(conversation)
        if conversation == self.current and self.scroll > 0:
            self.new_below = True

    def tool_call(self, conversation: str, call: ToolCall) -> None:
        """A tool call started, changed or ended in ``conversation``'s reply."""
        entries = self.entries.setdefault(conversation, [Entry("assistant", "", "incomplete")])
        if entries[-1].role != "assistant":
            entries.append(Entry("assistant", "", "incomplete"))
        calls = entries[-1].tool_calls
        known = [index for index, old in enumerate(calls) if old.id == call.id]
        if known:
            calls[known[0]] = call
        else:
            calls.append(call)
        self.waiting_first_token.discard(conversation)
        if call.status == "awaiting_approval":
            self.approval = (conversation, call)
            self.mode = "approve"
        elif self.approval is not None and self.approval[1].id == call.id:
            self.approval = None
            if self.mode == "approve":
                self.mode = "chat"

    def finish(self, conversation: str, message: Message) -> None:
        entries = self.entries.setdefault(conversation, [])
        if entries and entries[-1].role == "assistant":
            entries[-1] = _entry(message)
        else:
            entries.append(_entry(message))
        self.generating.discard(conversation)
        self.waiting_first_token.discard(conversation)
        if message.stats is not None:
            self.last_stats = message.stats
        if message.status == "error":
            self.notice = message.error

    def loading(self) -> ModelStatus | None:
        for status in self.models.values():
            if status.state in ("starting", "backoff"):
                return status
        return None

    # --------------------------------------------------------------- keys

    def key(self, name: str, char: str) -> Intent | None:
        """Apply a key; returns what the app must do, if anything.

        ``name`` is blessed's key name (``KEY_ENTER``…) or "" for a plain
        character in ``char``.
        """
        if name != "CTRL_C" and char != "\x03":
            self.interrupts = 0
        if name == "BRACKETED_PASTE":  # pasted text goes in whole, newlines and all
            if self.mode == "chat":
                self.input += char.replace("\r\n", "\n").replace("\r", "\n")
            return None
        if name in ("MOUSE_SCROLL_UP", "MOUSE_SCROLL_DOWN"):
            step = 3 if name == "MOUSE_SCROLL_UP" else -3
            self.scroll = max(self.scroll + step, 0)
            self.new_below = self.new_below and self.scroll > 0
            return None
        if self.mode == "help":
            self.mode = "chat"
            return None
        if self.mode == "picker":
            return self._picker_key(name, char)
        if self.mode == "find":
            return self._find_key(name, char)
        if self.mode == "results":
            return self._results_key(name, char)
        if self.mode == "confirm":
            self.mode = "chat"
            if char in ("y", "Y") and self.current is not None:
                return Delete(self.current)
            self.notice = "not deleted"
            return None
        if self.mode == "approve" and self.approval is not None:
            if char not in ("y", "Y", "n", "N") and name != "KEY_ESCAPE":
                return None  # a stray key must not answer for the user
            conversation, call = self.approval
            self.approval, self.mode = None, "chat"
            return AnswerToolCall(conversation, call.id, approve=char in ("y", "Y"))
        if char == "\x11":  # Ctrl+Q
            return Quit()
        if char == "\x03":  # Ctrl+C: stop the reply; twice in a row quits
            self.interrupts += 1
            if self.interrupts >= 2:
                return Quit()
            if self.current in self.generating:
                return CancelReply(self.current)
            self.notice = "Ctrl+C again quits"
            return None
        if name == "KEY_ESCAPE":
            if self.current in self.generating:
                return CancelReply(self.current)
            self.find_query = ""
            return None
        if name == "KEY_F1" or (char == "?" and not self.input):
            self.mode = "help"
            return None
        if char == "\x0c":  # Ctrl+L
            self._open_picker()
            return None
        if char == "\x0e":  # Ctrl+N
            return OpenConversation(None)
        if char == "\x05":  # Ctrl+E
            return EditInEditor(self.input)
        if char == "\x06":  # Ctrl+F
            self._draft, self.input, self.mode = self.input, "", "find"
            return None
        if char in ("n", "N") and not self.input and self.find_query:
            self.find_index += 1 if char == "n" else -1
            self.find_index %= max(self.find_hits, 1)
            return None
        if char == "\x02":  # Ctrl+B
            self.sidebar = not self.sidebar
            return None
        if char == "\x14":  # Ctrl+T
            self.tools_expanded = not self.tools_expanded
            return None
        if (name == "KEY_TAB" or char == "\t") and self.input.startswith("/image "):
            return CompletePath(self.input.removeprefix("/image ").lstrip())
        if char == "\n" or name == "KEY_ALT_ENTER":  # Ctrl+J / Alt+Enter: a new line
            self.input += "\n"
            return None
        if name == "KEY_ENTER" or char == "\r":
            return self._submit()
        if name == "KEY_BACKSPACE" or char in ("\x7f", "\x08"):
            self.input = self.input[:-1]
            return None
        if name == "KEY_PGUP":
            self.scroll += 10
            return None
        if name == "KEY_PGDOWN":
            self.scroll = max(self.scroll - 10, 0)
            self.new_below = self.new_below and self.scroll > 0
            return None
        if name == "KEY_HOME":
            self.scroll = 10**9  # clamped by layout
            return None
        if name == "KEY_END":
            self.scroll = 0
            self.new_below = False
            return None
        if name in ("KEY_CTRL_UP", "KEY_SUP"):
            return self._switch_conversation(-1)
        if name in ("KEY_CTRL_DOWN", "KEY_SDOWN"):
            return self._switch_conversation(1)
        if name in ("KEY_UP", "KEY_DOWN") and "\n" not in self.input:
            self._recall(-1 if name == "KEY_UP" else 1)
            return None
        if char and not name and char.isprintable():
            self.input += char
            return None
        return None

    def _submit(self) -> Intent | None:
        text = self.input.strip()
        if not text:
            return None
        self.input = ""
        self.history_index = None
        if not self.history or self.history[-1] != text:
            self.history.append(text)
        if text in ("/model", "/models"):
            self._open_picker()
            return None
        if text == "/new":
            return OpenConversation(None)
        if text == "/help":
            self.mode = "help"
            return None
        command, _, argument = text.partition(" ")
        argument = argument.strip()
        if command == "/find" and argument:
            self._start_find(argument)
            return None
        if command == "/search" and argument:
            return SearchAll(argument)
        if command == "/image":
            if not argument:
                self.notice = "give the image's path: /image PATH (Tab completes)"
                return None
            return AttachImage(argument)
        if command == "/copy":
            if argument.startswith("code"):
                number = argument.removeprefix("code").strip()
                return CopyLastReply(int(number) if number.isdigit() else 0)
            return CopyLastReply()
        if command in ("/rename", "/delete", "/export"):
            if self.current is None:
                self.notice = "open a conversation first"
                return None
            if command == "/rename" and argument:
                return Rename(self.current, argument)
            if command == "/delete":
                self.mode = "confirm"
                return None
            if command == "/export":
                return Export(self.current, argument)
        self.scroll = 0
        self.new_below = False
        return Send(text)

    def _start_find(self, query: str) -> None:
        self.find_query = query
        self.find_index = 0
        self.scroll = 0

    def _find_key(self, name: str, char: str) -> Intent | None:
        if name == "KEY_ESCAPE":
            self.mode, self.input = "chat", self._draft
        elif name == "KEY_ENTER" or char in ("\r", "\n"):
            query = self.input.strip()
            self.mode, self.input = "chat", self._draft
            if query:
                self._start_find(query)
        elif name == "KEY_BACKSPACE" or char in ("\x7f", "\x08"):
            self.input = self.input[:-1]
        elif char and not name and char.isprintable():
            self.input += char
        return None

    def show_results(self, hits: list[SearchHit], text: str) -> None:
        self.search_results = hits
        self.result_index = 0
        self.mode = "results"
        self.notice = (
            f"{len(hits)} messages contain {text!r}" if hits else f"nothing contains {text!r}"
        )
        self._result_query = text

    def _results_key(self, name: str, char: str) -> Intent | None:
        if name == "KEY_ESCAPE" or not self.search_results:
            self.mode = "chat"
        elif name == "KEY_UP":
            self.result_index = max(self.result_index - 1, 0)
        elif name == "KEY_DOWN":
            self.result_index = min(self.result_index + 1, len(self.search_results) - 1)
        elif name == "KEY_ENTER" or char in ("\r", "\n"):
            hit = self.search_results[self.result_index]
            self.mode = "chat"
            self._start_find(self._result_query)
            return OpenConversation(hit.conversation)
        return None

    def _recall(self, step: int) -> None:
        if not self.history:
            return
        index = len(self.history) if self.history_index is None else self.history_index
        index = min(max(index + step, 0), len(self.history))
        self.history_index = index
        self.input = self.history[index] if index < len(self.history) else ""

    def _switch_conversation(self, step: int) -> Intent | None:
        ids = [c.id for c in self.conversations]
        if not ids:
            return None
        index = ids.index(self.current) if self.current in ids else -1
        return OpenConversation(ids[(index + step) % len(ids)])

    def _open_picker(self) -> None:
        self.mode = "picker"
        names = list(self.models)
        self.picker_index = names.index(self.active_model) if self.active_model in names else 0

    def _picker_key(self, name: str, char: str) -> Intent | None:
        names = list(self.models)
        if name == "KEY_ESCAPE" or char in ("\x0c", "\x03"):
            self.mode = "chat"
        elif name == "KEY_UP":
            self.picker_index = max(self.picker_index - 1, 0)
        elif name == "KEY_DOWN":
            self.picker_index = min(self.picker_index + 1, len(names) - 1)
        elif (name == "KEY_ENTER" or char in ("\r", "\n")) and names:
            self.mode = "chat"
            return LoadModel(names[self.picker_index])
        return None

    # ------------------------------------------------------------- layout

    def layout(self, width: int, height: int, now: float | None = None) -> list[Line]:
        """The whole screen as ``height`` rows of spans, none wider than ``width``."""
        now = time.time() if now is None else now
        show_sidebar = self.sidebar and width >= SIDEBAR_MIN_TERMINAL
        side = SIDEBAR_WIDTH if show_sidebar else 0
        main_width = width - side - (1 if show_sidebar else 0)
        input_lines = self._input_lines(main_width)
        body_height = max(height - 1 - len(input_lines) - 1, 1)  # status bar, separator
        if self.mode == "help":
            body = self._help_rows(main_width, body_height)
        elif self.mode == "picker":
            body = self._picker_rows(main_width, body_height, now)
        elif self.mode == "results":
            body = self._result_rows(main_width, body_height)
        else:
            body = self._chat_rows(main_width, body_height, now)
        separator: Line = (Span("─" * main_width, frozenset({"dim"})),)
        main = [*body, separator, *input_lines]
        rows: list[Line] = []
        sidebar = self._sidebar_rows(side, height - 1) if show_sidebar else []
        for index in range(height - 1):
            row = main[index] if index < len(main) else ()
            if show_sidebar:
                left = sidebar[index] if index < len(sidebar) else ()
                row = (*_pad(left, side), Span("│", frozenset({"dim"})), *row)
            rows.append(row)
        rows.append(self._status_row(width, now))
        return rows

    def _chat_rows(self, width: int, height: int, now: float) -> list[Line]:
        lines: list[Line] = []
        for entry in self.entries.get(self.current or "", []):
            lines += list(self._entry_lines(entry, width, now))
        if not lines:
            hint = "Type a message and press Enter.  F1 for help, Ctrl+L for models."
            lines = [(Span(hint[:width], frozenset({"dim"})),)]
        max_scroll = max(len(lines) - height, 0)
        if self.find_query:
            lines, hits = _highlight(lines, self.find_query)
            self.find_hits = len(hits)
            if hits:
                # n / N walk from the newest hit backwards; centre it on screen.
                target = hits[-1 - (self.find_index % len(hits))]
                self.scroll = min(max(len(lines) - target - height // 2, 0), max_scroll)
        self.scroll = min(self.scroll, max_scroll)
        end = len(lines) - self.scroll
        visible = lines[max(end - height, 0) : end]
        if self.new_below and self.scroll > 0 and visible:
            visible[-1] = (Span("↓ new".rjust(width), frozenset({"bold"})),)
        return visible + [()] * (height - len(visible))

    def _entry_lines(self, entry: Entry, width: int, now: float) -> Iterator[Line]:
        if entry.role == "user":
            yield (Span("you", frozenset({"bold"})),)
        else:
            label = entry.model or self.active_model or "assistant"
            flag = "" if entry.status == "complete" else f" [{entry.status}]"
            yield (Span(f"{label}{flag}", frozenset({"bold", "heading"})),)
        for image in entry.images:
            yield (Span(image.label()[:width], frozenset({"dim"})),)
        for call in entry.tool_calls:
            yield from _tool_call_lines(call, width, expanded=self.tools_expanded)
        if (
            entry.role == "assistant"
            and not entry.text
            and entry.status == "incomplete"
            and all(
                call.status not in ("running", "awaiting_approval") for call in entry.tool_calls
            )
        ):
            frame = SPINNER[int(now * 10) % len(SPINNER)]
            yield (Span(f"{frame} thinking…", frozenset({"dim"})),)
        elif entry.text or not (entry.tool_calls or entry.images):
            yield from entry.lines(width)
        if entry.error:
            yield (Span(f"error: {entry.error}"[:width], frozenset({"bold"})),)
        yield ()

    def _input_lines(self, width: int) -> list[Line]:
        if self.mode == "confirm":
            return [(Span("Delete this conversation? y / n", frozenset({"bold"})),)]
        if self.mode == "approve" and self.approval is not None:
            call = self.approval[1].summary(limit=width).split(" → ")[0]
            return [(Span(f"Allow {call}? y / n"[:width], frozenset({"bold"})),)]
        prompt = "find: " if self.mode == "find" else "> "
        lines: list[Line] = []
        if self.attachments:
            names = ", ".join(f"{name} ({size // 1024 + 1} KB)" for name, size in self.attachments)
            lines.append((Span(f"attached: {names}"[:width], frozenset({"dim"})),))
        for index, text in enumerate(self.input.split("\n")[-5:]):
            lead = prompt if index == 0 else " " * len(prompt)
            shown = text[-(width - 3) :] if display_width(text) > width - 3 else text
            lines.append((Span(lead, frozenset({"bold"})), Span(shown)))
        return lines

    def _sidebar_rows(self, width: int, height: int) -> list[Line]:
        rows: list[Line] = [(Span("Conversations"[:width], frozenset({"bold"})),)]
        for conversation in self.conversations[: height - 1]:
            marker = "●" if conversation.id in self.generating else " "
            title = conversation.title or "(new)"
            text = f"{marker} {title}"
            text = text if display_width(text) <= width else text[: width - 1] + "…"
            style = frozenset({"bold"}) if conversation.id == self.current else frozenset()
            rows.append((Span(text, style),))
        return rows

    def _picker_rows(self, width: int, height: int, now: float) -> list[Line]:
        rows: list[Line] = [
            (Span("Choose a model (Enter loads it, Esc closes)", frozenset({"bold"})),),
            (),
        ]
        for index, (name, status) in enumerate(self.models.items()):
            marker = "›" if index == self.picker_index else " "
            state = status.state + (f": {status.reason}" if status.reason else "")
            text = f"{marker} {name:<16} {state}"[:width]
            rows.append(
                (Span(text, frozenset({"bold"}) if index == self.picker_index else frozenset()),)
            )
        return rows[:height] + [()] * (height - len(rows))

    def _result_rows(self, width: int, height: int) -> list[Line]:
        rows: list[Line] = [
            (Span("Search results (Enter opens, Esc closes)", frozenset({"bold"})),),
            (),
        ]
        titles = {c.id: c.title for c in self.conversations}
        for index, hit in enumerate(self.search_results[: height - 2]):
            marker = "›" if index == self.result_index else " "
            title = titles.get(hit.conversation, hit.title)
            text = f"{marker} {title[:24]:<24} {hit.role[:9]:<9} {hit.snippet}"
            text = text if display_width(text) <= width else text[: max(width - 1, 0)] + "…"
            bold = frozenset({"bold"}) if index == self.result_index else frozenset()
            rows.append((Span(text, bold),))
        return rows[:height] + [()] * (height - len(rows))

    def _help_rows(self, width: int, height: int) -> list[Line]:
        rows: list[Line] = [(Span("Keys (any key closes this)", frozenset({"bold"})),), ()]
        for keys, meaning in HELP:
            rows.append(
                (
                    Span(f"{keys:<26}"[:width], frozenset({"bold"})),
                    Span(meaning[: max(width - 26, 0)]),
                )
            )
        return rows[:height] + [()] * (height - len(rows))

    def _status_row(self, width: int, now: float) -> Line:
        parts: list[str] = []
        loading = self.loading()
        if loading is not None:
            parts.append(f"Loading {loading.name}… {max(now - loading.since, 0.0):.1f} s")
        elif self.active_model is not None:
            state = self.models.get(self.active_model)
            parts.append(f"{self.active_model} {state.state if state else ''}".strip())
        else:
            parts.append("no model")
        parts.append(self.connection)
        if self.last_stats is not None:
            stats = self.last_stats
            if stats.tokens_per_second:
                parts.append(f"{stats.tokens_per_second:.0f} tok/s")
            if stats.time_to_first_token_ms is not None:
                parts.append(f"first token {stats.time_to_first_token_ms:.0f} ms")
            if stats.prompt_tokens is not None and stats.completion_tokens is not None:
                parts.append(f"context {stats.prompt_tokens + stats.completion_tokens}")
        if self.find_query:
            found = (
                f"{self.find_index % self.find_hits + 1}/{self.find_hits}"
                if self.find_hits
                else "0"
            )
            parts.append(f"find {self.find_query!r}: {found} (n/N, Esc)")
        if self.notice:
            parts.append(self.notice)
        parts.append("F1 help")
        text = " │ ".join(parts)
        text = text if display_width(text) <= width else text[: max(width - 1, 0)] + "…"
        return (Span(text.ljust(width), frozenset({"reverse"})),)


def _tool_call_lines(call: ToolCall, width: int, *, expanded: bool) -> Iterator[Line]:
    """``▸ calculator(2**64) → 18446744073709551616``, or the whole call when expanded."""
    style = frozenset({"dim"}) if call.status in ("ok", "running") else frozenset({"bold"})
    if not expanded:
        line = f"▸ {call.summary(limit=max(width // 2 - 4, 10))}"
        yield (Span(line if display_width(line) <= width else line[: width - 1] + "…", style),)
        return
    yield (Span(f"▾ {call.name} [{call.status}]"[:width], style),)
    for label, text in (("arguments", call.arguments), ("result", call.result)):
        for index, piece in enumerate(text.splitlines() or [""]):
            lead = f"  {label}: " if index == 0 else " " * (len(label) + 4)
            yield (Span((lead + piece)[:width], frozenset({"dim"})),)


def _pad(line: Line, width: int) -> Line:
    used = sum(display_width(span.text) for span in line)
    if used >= width:
        return line
    return (*line, Span(" " * (width - used)))


def _highlight(lines: list[Line], query: str) -> tuple[list[Line], list[int]]:
    """Mark every occurrence of ``query`` (case-insensitive); returns the hit line indices."""
    needle = query.lower()
    out: list[Line] = []
    hits: list[int] = []
    for number, line in enumerate(lines):
        text = "".join(span.text for span in line)
        if needle not in text.lower():
            out.append(line)
            continue
        hits.append(number)
        marked = [False] * len(text)
        start = text.lower().find(needle)
        while start >= 0:
            for index in range(start, min(start + len(needle), len(text))):
                marked[index] = True
            start = text.lower().find(needle, start + 1)
        spans: list[Span] = []
        offset = 0
        for span in line:
            piece = ""
            state = None
            for index, char in enumerate(span.text):
                flag = marked[offset + index]
                if state is not None and flag != state:
                    style = span.style | {"reverse"} if state else span.style
                    spans.append(Span(piece, style, span.color))
                    piece = ""
                piece += char
                state = flag
            if piece:
                style = span.style | {"reverse"} if state else span.style
                spans.append(Span(piece, style, span.color))
            offset += len(span.text)
        out.append(tuple(spans))
    return out, hits
