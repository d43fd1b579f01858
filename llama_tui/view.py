"""The TUI's pure core: what is on screen, what a key means, where things go.

No terminal and no I/O here: ``View`` holds the state, ``View.key`` turns a
key into an ``Intent`` for the app to carry out, and ``View.layout`` turns the
state into rows of styled spans for a given terminal size. The app owns the
terminal and paints those rows; tests check them as plain text.

A message the user sends goes into ``View.outbox`` first and stays there,
shown in its conversation, until llamad says it is stored (``chat_started``):
typed while llamad is away, it waits and goes when the connection is back;
sent just before the connection dropped, it is checked against the stored
history and sent again only if it did not arrive; refused, it goes back into
the input. A message is never dropped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from llama_tui.markdown import IncrementalRenderer, Line, Span, display_width, plain
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
NOTICE_SECONDS = 8.0  # a message in the status bar goes after this long
# A stopped model's reason ("switching to smol") explains the stop; after this
# long it is history, not news, and no longer shown beside the state.
STOPPED_REASON_SECONDS = 60.0
# Messages llamad stored within this long before the client sent one count as
# that one when checking whether it arrived before a connection dropped.
CLOCK_SLACK_SECONDS = 2.0

Mode = Literal["chat", "picker", "help", "find", "results", "confirm", "approve"]
OutgoingKind = Literal["chat", "retry", "edit"]
OutgoingState = Literal["queued", "sent", "unsure"]


@dataclass
class Outgoing:
    """A message (or a retry) that llamad has not yet confirmed storing.

    ``queued``: not sent (llamad away, or a reply still being written there);
    ``sent``: on the wire, waiting for ``chat_started``; ``unsure``: sent when
    the connection dropped, so it may or may not have arrived.
    """

    text: str
    conversation: str | None  # None: the new conversation numbered ``new_key``
    new_key: int = 0
    images: list[ImagePart] = field(default_factory=list)
    model: str | None = None
    system: str | None = None
    kind: OutgoingKind = "chat"
    state: OutgoingState = "queued"
    request_id: int | None = None
    sent_at: float = 0.0  # wall-clock time it was sent


@dataclass(frozen=True)
class Send:
    """A message joined the outbox: send whatever can go now."""

    item: Outgoing


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
    ("↑ on an empty input, /edit", "edit your last message; Enter replaces it and its reply"),
    ("↑ / ↓", "earlier prompts (on the first line of the input)"),
    ("/retry", "write the last reply again"),
    ("PgUp / PgDn, Home / End", "scroll the conversation"),
    ("Ctrl+L, /model", "choose a model"),
    ("/model NAME", "use NAME for this conversation's next replies"),
    ("Ctrl+N, /new", "new conversation"),
    ("/system TEXT", "a new conversation with this system prompt"),
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
    ("Esc", "stop the reply; or take back a message not sent yet"),
    ("Ctrl+C", "stop the reply; twice: quit"),
    ("Ctrl+Q", "quit"),
    ("//TEXT", "send a message that starts with /"),
    ("F1, ?, /help", "this help"),
]

COMMANDS = (
    "/model",
    "/system",
    "/retry",
    "/edit",
    "/new",
    "/find",
    "/search",
    "/rename",
    "/delete",
    "/export",
    "/copy",
    "/image",
    "/help",
)


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
    seq: int = 0
    _renderer: IncrementalRenderer | None = None
    _width: int = 0
    _plain: tuple[str, int, list[Line]] | None = None

    def lines(self, width: int) -> list[Line]:
        if self.role == "user":  # as typed: a user's code keeps its lines
            if self._plain is None or self._plain[:2] != (self.text, width):
                self._plain = (self.text, width, plain(self.text, width))
            return self._plain[2]
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
        message.seq,
    )


def _normal(text: str) -> str:
    return " ".join(text.split())


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
    interrupts: int = 0  # Ctrl+C presses in a row
    find_query: str = ""
    find_index: int = 0  # which hit, counting from the newest
    find_hits: int = 0  # hits found by the last layout
    search_results: list[SearchHit] = field(default_factory=list)
    result_index: int = 0
    attachments: list[ImagePart] = field(default_factory=list)  # go with the next message
    tools_expanded: bool = False
    approval: tuple[str, ToolCall] | None = None  # (conversation, call) waiting for y / n
    outbox: list[Outgoing] = field(default_factory=list)
    new_key: int = 0  # numbers the new conversation on screen while it has no id
    new_system: str | None = None  # the system prompt of that new conversation
    chosen_models: dict[str, str] = field(default_factory=dict)  # per slot, from /model
    editing: bool = False  # the input holds the last user message, to replace it
    help_scroll: int = 0
    _draft: str = ""  # the message being written while the find prompt is open
    _result_query: str = ""
    _notice: str = ""
    _notice_at: float = 0.0
    _quit_warned: bool = False
    _rows_seen: tuple[str, int, int] = ("", 0, 0)  # conversation, width, rows at last layout

    # ------------------------------------------------------------ notices

    @property
    def notice(self) -> str:
        """The status bar's message; it expires ``NOTICE_SECONDS`` after it was set."""
        return self._notice

    @notice.setter
    def notice(self, text: str) -> None:
        self._notice = text
        self._notice_at = time.time()

    def notice_expires(self) -> float | None:
        """When the shown notice goes (wall time), or None when there is none."""
        return self._notice_at + NOTICE_SECONDS if self._notice else None

    # ------------------------------------------------------------ updates

    def set_messages(self, conversation: str, messages: list[Message]) -> None:
        self.entries[conversation] = [_entry(m) for m in messages if m.role != "system"]

    def add_user(self, conversation: str, message: Message | None) -> None:
        """A reply begins: to ``message``, or (None: a retry) to the last user message."""
        entries = self.entries.setdefault(conversation, [])
        if message is not None:
            # An edited turn may come back with the seq it replaces.
            same = [i for i, e in enumerate(entries) if e.role == "user" and e.seq == message.seq]
            if same and message.seq:
                del entries[same[0] :]
            entries.append(_entry(message))
        entries.append(Entry("assistant", "", "incomplete"))
        self.generating.add(conversation)
        self.waiting_first_token.add(conversation)

    def drop_last_turn(self, conversation: str, *, keep_message: bool = False) -> None:
        """Take the last user message (or, ``keep_message``, only its reply) off the screen."""
        entries = self.entries.get(conversation, [])
        users = [i for i, e in enumerate(entries) if e.role == "user"]
        if users:
            del entries[users[-1] + (1 if keep_message else 0) :]

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
        if message.status == "error":  # the reason itself is shown, whole, in the conversation
            here = conversation == self.current and not self.scroll
            self.notice = "the reply failed (the reason is below it)" if here else message.error

    # ------------------------------------------------------------- outbox

    def slot(self) -> str:
        """The conversation on screen: its id, or a name for the new one."""
        return self.current or f"new:{self.new_key}"

    def _item_slot(self, item: Outgoing) -> str:
        return item.conversation or f"new:{item.new_key}"

    def open_new(self) -> None:
        """Show a new, empty conversation (it gets an id with its first message)."""
        self.current = None
        self.new_key += 1
        self.new_system = None
        self.editing = False
        self.scroll = 0
        self.new_below = False

    def sendable(self) -> list[Outgoing]:
        """Queued items that may go now, in order: one at a time per conversation.

        A conversation that is writing a reply, or has an item on its way or
        unconfirmed, waits; a new conversation sends its first message alone and
        the rest once llamad has named it.
        """
        busy = {self._item_slot(i) for i in self.outbox if i.state != "queued"}
        busy |= self.generating
        ready: list[Outgoing] = []
        for item in self.outbox:
            where = self._item_slot(item)
            if item.state == "queued" and where not in busy:
                ready.append(item)
            busy.add(where)
        return ready

    def mark_sent(self, item: Outgoing, request_id: int, now: float) -> None:
        item.state, item.request_id, item.sent_at = "sent", request_id, now

    def _take(self, request_id: int) -> Outgoing | None:
        for index, item in enumerate(self.outbox):
            if item.request_id == request_id and item.state != "queued":
                return self.outbox.pop(index)
        return None

    def started(self, request_id: int, conversation: str) -> Outgoing | None:
        """llamad stored the item sent as ``request_id`` in ``conversation``."""
        item = self._take(request_id)
        if item is None or item.conversation is not None:
            return item
        for other in self.outbox:  # the rest of that new conversation goes there too
            if other.conversation is None and other.new_key == item.new_key:
                other.conversation = conversation
        chosen = self.chosen_models.pop(f"new:{item.new_key}", None)
        if chosen is not None:
            self.chosen_models[conversation] = chosen
        if self.current is None and self.new_key == item.new_key:
            self.current = conversation
        return item

    def refused(self, request_id: int, reason: str) -> bool:
        """llamad refused the item sent as ``request_id``: it goes back into the input."""
        item = self._take(request_id)
        if item is None:
            return False
        if item.kind == "retry":
            self.notice = f"not retried: {reason}"
            return True
        if not self.input.strip():
            self.input = item.text
            self.attachments = item.images + self.attachments
            self.editing = item.kind == "edit"
            self.notice = f"not sent, back in the input: {reason}"
        else:
            self.history.append(item.text)
            self.notice = f"not sent (↑ recalls it): {reason}"
        return True

    def connection_lost(self) -> None:
        """What was on the wire may or may not have arrived; replies stop reaching us."""
        for item in self.outbox:
            if item.state == "sent":
                item.state = "unsure"
        self.generating.clear()
        self.waiting_first_token.clear()
        self.approval = None
        if self.mode == "approve":
            self.mode = "chat"

    def unsure_conversations(self) -> list[str]:
        """Conversations to read back after a reconnect, to settle unsure items."""
        return list(
            dict.fromkeys(
                i.conversation
                for i in self.outbox
                if i.state == "unsure" and i.conversation is not None
            )
        )

    def reconcile(self, conversation: str, messages: list[Message]) -> None:
        """Settle the unsure items of ``conversation`` against its stored messages."""
        unsure = [i for i in self.outbox if i.state == "unsure" and i.conversation == conversation]
        for item in unsure:
            if _arrived(item, messages):
                self.outbox.remove(item)
            else:
                item.state = "queued"

    def reconcile_new(self, conversations: list[Conversation]) -> None:
        """Settle unsure first messages of new conversations against the list."""
        for item in [i for i in self.outbox if i.state == "unsure" and i.conversation is None]:
            text = _normal(item.text)
            found = next(
                (
                    c
                    for c in conversations
                    if c.created >= item.sent_at - CLOCK_SLACK_SECONDS
                    and c.title
                    and text.startswith(c.title.removesuffix("…"))
                ),
                None,
            )
            if found is None:
                item.state = "queued"
                continue
            item.state = "sent"  # so that ``started`` takes it
            self.started(item.request_id or 0, found.id)

    def _outbox_lines(self, width: int) -> Iterator[Line]:
        slot = self.slot()
        for item in self.outbox:
            if self._item_slot(item) != slot:
                continue
            if item.kind == "retry":
                what = "write the last reply again"
                yield (Span(f"↻ {what}"[:width], frozenset({"dim"})),)
            else:
                label = "you (edited)" if item.kind == "edit" else "you"
                yield (Span(label, frozenset({"bold"})),)
                for image in item.images:
                    yield (Span(f"[image: {image.name}]"[:width], frozenset({"dim"})),)
                yield from plain(item.text, width)
            if item.state == "sent":
                state = "sending…"
            elif item.state == "unsure":
                state = "sent as llamad went away: checking whether it arrived"
            elif not self.connected:
                state = "not sent yet: will send when llamad is back (Esc takes it back)"
            else:
                state = "waiting for the reply before it to end (Esc takes it back)"
            yield (Span(f"⧗ {state}"[:width], frozenset({"dim"})),)
            yield ()

    def _take_back(self) -> bool:
        """Esc on a queued message: it comes back into the input instead of going."""
        slot = self.slot()
        queued = [i for i in self.outbox if i.state == "queued" and self._item_slot(i) == slot]
        if not queued or self.input.strip():
            return False
        item = queued[-1]
        self.outbox.remove(item)
        if item.kind != "retry":
            self.input = item.text
            self.attachments = item.images + self.attachments
            self.editing = item.kind == "edit"
        self.notice = "taken back; not sent"
        return True

    def chosen_model(self) -> str | None:
        """The model this conversation's next replies use (``/model NAME``), if chosen."""
        return self.chosen_models.get(self.slot())

    def _model_name(self, name: str) -> str | None:
        """``name`` (a model or an alias) as a configured model's name, or None."""
        if name in self.models:
            return name
        return next((m.name for m in self.models.values() if name in m.aliases), None)

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
            moves = {"KEY_DOWN": 1, "KEY_UP": -1, "KEY_PGDOWN": 10, "KEY_PGUP": -10}
            move = moves.get(name, 10 if char == " " else None)
            if move is None:
                self.mode, self.help_scroll = "chat", 0
            else:
                self.help_scroll = max(self.help_scroll + move, 0)  # clamped by layout
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
            return self._quit()
        if char == "\x03":  # Ctrl+C: stop the reply; twice in a row quits
            self.interrupts += 1
            if self.interrupts >= 2:
                return self._quit()
            if self.current in self.generating:
                return CancelReply(self.current)
            self.notice = "Ctrl+C again quits"
            return None
        if name == "KEY_ESCAPE":
            if self.current in self.generating:
                return CancelReply(self.current)
            if self.editing:
                self.editing, self.input = False, ""
                self.notice = "edit cancelled"
                return None
            if not self.find_query and self._take_back():
                return None
            self.find_query = ""
            return None
        if name == "KEY_F1" or (char == "?" and not self.input):
            self.mode, self.help_scroll = "help", 0
            return None
        if char == "\x0c":  # Ctrl+L
            self._open_picker()
            return None
        if char == "\x0e":  # Ctrl+N
            self.open_new()
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
        editable = name == "KEY_UP" and not self.input and self.history_index is None
        if editable and self._start_edit(quiet=True):
            return None
        if name in ("KEY_UP", "KEY_DOWN") and "\n" not in self.input:
            self.editing = False
            self._recall(-1 if name == "KEY_UP" else 1)
            return None
        if char and not name and char.isprintable():
            self.input += char
            return None
        return None

    def _quit(self) -> Quit | None:
        """Quit, unless messages are still unsent: then say so, and quit on the next try."""
        unsent = sum(1 for item in self.outbox if item.kind != "retry")
        if not unsent or self._quit_warned:
            return Quit()
        self._quit_warned = True
        self.notice = (
            f"{unsent} message{'s' if unsent > 1 else ''} not sent yet would be lost: "
            "quit again to quit anyway"
        )
        return None

    def _submit(self) -> Intent | None:
        text = self.input.strip()
        if not text and not self.attachments:
            return None
        if text.startswith("/") and not text.startswith("//"):
            return self._command(text)
        if text.startswith("//"):
            text = text[1:]  # "//etc" sends "/etc"
        return self._queue(text, "edit" if self.editing else "chat")

    def _remember(self, text: str) -> None:
        self.input = ""
        self.history_index = None
        if not self.history or self.history[-1] != text:
            self.history.append(text)

    def _queue(self, text: str, kind: OutgoingKind) -> Intent:
        if kind != "retry":
            self._remember(text)
        item = Outgoing(
            text=text,
            conversation=self.current,
            new_key=self.new_key,
            images=self.attachments if kind != "retry" else [],
            model=self.chosen_model(),
            system=self.new_system if self.current is None else None,
            kind=kind,
        )
        if kind != "retry":
            self.attachments = []
        self.editing = False
        self.outbox.append(item)
        if not self.connected:
            self.notice = "llamad is not connected: your message will be sent when it is back"
        self.scroll = 0
        self.new_below = False
        return Send(item)

    def _last_user_entry(self) -> Entry | None:
        users = [e for e in self.entries.get(self.current or "", []) if e.role == "user"]
        return users[-1] if users else None

    def _start_edit(self, *, quiet: bool = False) -> bool:
        """Put the last user message in the input; sending it replaces that turn."""
        last = self._last_user_entry()
        if last is None or self.current is None:
            if not quiet:
                self.notice = "nothing to edit: this conversation has no message of yours yet"
            return False
        if self.current in self.generating:
            if not quiet:
                self.notice = "wait for the reply to end (Esc stops it), then edit"
            return False
        self.input, self.editing = last.text, True
        return True

    def _command(self, text: str) -> Intent | None:
        """A line starting with "/": a command, never a message to the model."""
        command, _, argument = text.partition(" ")
        argument = argument.strip()
        known = command in COMMANDS or command == "/models"
        if not known:
            self.notice = f"unknown command {command}; commands: {' '.join(COMMANDS)} (// sends /)"
            return None  # the input stays, to be corrected
        self._remember(text)
        match command:
            case "/model" | "/models" if not argument:
                self._open_picker()
            case "/model" | "/models":
                name = self._model_name(argument) if self.models else argument
                if name is None:
                    self.input = text
                    self.notice = f"unknown model {argument!r}; models: {', '.join(self.models)}"
                    return None
                self.chosen_models[self.slot()] = name
                self.notice = f"this conversation's next replies use {name}"
                return LoadModel(name)
            case "/new":
                self.open_new()
                return OpenConversation(None)
            case "/system" if not argument:
                shown = self._system_prompt()
                self.notice = f"system prompt: {shown}" if shown else "usage: /system TEXT"
            case "/system":
                fresh = self.current is None and not self.entries.get(self.slot())
                if not fresh:
                    self.open_new()
                self.new_system = argument
                self.notice = "system prompt set for this new conversation"
                return None if fresh else OpenConversation(None)
            case "/retry":
                if self._last_user_entry() is None:
                    self.notice = "nothing to retry: this conversation has no message of yours yet"
                elif self.current in self.generating:
                    self.notice = "a reply is being written; Esc stops it, then /retry"
                else:
                    return self._queue("", "retry")
            case "/edit":
                self._start_edit()
            case "/help":
                self.mode, self.help_scroll = "help", 0
            case "/find" if argument:
                self._start_find(argument)
            case "/search" if argument:
                return SearchAll(argument)
            case "/find" | "/search":
                self.notice = f"usage: {command} TEXT"
            case "/image" if argument:
                return AttachImage(argument)
            case "/image":
                self.notice = "give the image's path: /image PATH (Tab completes)"
            case "/copy" if argument.startswith("code"):
                number = argument.removeprefix("code").strip()
                return CopyLastReply(int(number) if number.isdigit() else 0)
            case "/copy":
                return CopyLastReply()
            case "/rename" | "/delete" | "/export" if self.current is None:
                self.notice = "open a conversation first"
            case "/rename" if argument:
                return Rename(self.current or "", argument)
            case "/rename":
                self.notice = "usage: /rename TITLE"
            case "/delete":
                self.mode = "confirm"
            case "/export":
                return Export(self.current or "", argument)
        return None

    def _system_prompt(self) -> str | None:
        if self.current is None:
            return self.new_system
        return next((c.system_prompt for c in self.conversations if c.id == self.current), None)

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
        current = self.chosen_model() or self.active_model
        self.picker_index = names.index(current) if current in names else 0

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
            self.chosen_models[self.slot()] = names[self.picker_index]
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
        notice = self._live_notice(now)
        in_bar = display_width(" │ ".join([*self._status_parts(now), notice, "F1 help"])) <= width
        # A notice too long for the status bar is shown whole above the input.
        notice_lines = [] if in_bar or not notice else plain(notice, main_width)[:4]
        input_lines = [
            *(tuple(Span(s.text, frozenset({"bold"})) for s in row) for row in notice_lines),
            *input_lines,
        ]
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
        main = [*body, separator, *input_lines][: height - 1]
        rows: list[Line] = []
        sidebar = self._sidebar_rows(side, height - 1) if show_sidebar else []
        for index in range(height - 1):
            row = main[index] if index < len(main) else ()
            if show_sidebar:
                left = sidebar[index] if index < len(sidebar) else ()
                row = (*_pad(left, side), Span("│", frozenset({"dim"})), *row)
            rows.append(row)
        rows.append(self._status_row(width, now, notice if in_bar else ""))
        return rows

    def _chat_rows(self, width: int, height: int, now: float) -> list[Line]:
        lines: list[Line] = []
        if self.current is None and self.new_system:
            lines += [(Span("system", frozenset({"bold", "dim"})),)]
            lines += [(*row, Span("", frozenset({"dim"}))) for row in plain(self.new_system, width)]
            lines.append(())
        entries = self.entries.get(self.current or "", [])
        streaming = self.current in self.generating
        for index, entry in enumerate(entries):
            live = streaming and index == len(entries) - 1
            lines += list(self._entry_lines(entry, width, now, streaming=live))
        lines += list(self._outbox_lines(width))
        if not lines:
            hint = "Type a message and press Enter.  F1 for help, Ctrl+L for models."
            lines = [(Span(hint[:width], frozenset({"dim"})),)]
        # Scrolled up, the view holds still while text arrives below it.
        where = (self.slot(), width)
        if self.scroll > 0 and self._rows_seen[:2] == where:
            self.scroll += max(len(lines) - self._rows_seen[2], 0)
        self._rows_seen = (*where, len(lines))
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

    def _entry_lines(
        self, entry: Entry, width: int, now: float, *, streaming: bool = False
    ) -> Iterator[Line]:
        if entry.role == "user":
            yield (Span("you", frozenset({"bold"})),)
        else:
            label = entry.model or self.active_model or "assistant"
            if streaming and entry.status == "incomplete":
                flag = f" {SPINNER[int(now * 10) % len(SPINNER)]} writing"
            else:  # "incomplete" now means cut off (llamad stopped mid-reply)
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
        if entry.error:  # whole, wrapped: the reason is what the user needs
            for row in plain(f"error: {entry.error}", width):
                yield tuple(Span(span.text, frozenset({"bold"})) for span in row)
        yield ()

    def _input_lines(self, width: int) -> list[Line]:
        if self.mode == "confirm":
            return [(Span("Delete this conversation? y / n", frozenset({"bold"})),)]
        if self.mode == "approve" and self.approval is not None:
            call = self.approval[1].summary(limit=width).split(" → ")[0]
            return [(Span(f"Allow {call}? y / n"[:width], frozenset({"bold"})),)]
        prompt = "find: " if self.mode == "find" else "> "
        lines: list[Line] = []
        if self.editing and self.mode == "chat":
            hint = "editing your last message: Enter replaces it and its reply, Esc cancels"
            lines.append((Span(hint[:width], frozenset({"dim"})),))
        if self.attachments:
            names = ", ".join(
                f"{image.name} ({len(image.data) // 1024 + 1} KB)" for image in self.attachments
            )
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
            reason = shown_reason(status, now)
            state = status.state + (f": {reason}" if reason else "")
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
        keys_width = min(max(display_width(keys) for keys, _ in HELP) + 2, width // 2)
        body: list[Line] = []
        for keys, meaning in HELP:
            key_rows = plain(keys, keys_width - 2)
            meaning_rows = plain(meaning, max(width - keys_width, 1))
            for index in range(max(len(key_rows), len(meaning_rows))):
                key = _text(key_rows[index]) if index < len(key_rows) else ""
                text = _text(meaning_rows[index]) if index < len(meaning_rows) else ""
                pad = " " * (keys_width - display_width(key))
                body.append((Span(key + pad, frozenset({"bold"})), Span(text)))
        room = max(height - 2, 1)
        self.help_scroll = min(self.help_scroll, max(len(body) - room, 0))
        shown = body[self.help_scroll : self.help_scroll + room]
        more = self.help_scroll + room < len(body)
        title = "Keys (↓ PgDn: more; other keys close)" if more else "Keys (any key closes this)"
        if self.help_scroll:
            title += f"  [{self.help_scroll + 1}–{self.help_scroll + len(shown)} of {len(body)}]"
        rows: list[Line] = [(Span(title[:width], frozenset({"bold"})),), ()]
        rows += shown
        return rows[:height] + [()] * (height - len(rows))

    def _live_notice(self, now: float) -> str:
        return self._notice if self._notice and now - self._notice_at < NOTICE_SECONDS else ""

    def _status_row(self, width: int, now: float, notice: str) -> Line:
        parts = self._status_parts(now)
        if notice:
            parts.append(notice)
        # "F1 help" always shows: a long part is what gets cut.
        text, tail = " │ ".join(parts), " │ F1 help"
        if display_width(text + tail) > width:
            room = max(width - display_width(tail) - 1, 0)
            text = _cut_to(text, room) + "…"
        text += tail
        text = text if display_width(text) <= width else _cut_to(text, width)
        return (Span(text + " " * max(width - display_width(text), 0), frozenset({"reverse"})),)

    def _status_parts(self, now: float) -> list[str]:
        parts: list[str] = []
        loading = self.loading()
        if loading is not None:
            parts.append(f"Loading {loading.name}… {max(now - loading.since, 0.0):.1f} s")
        elif (shown := self.chosen_model() or self.active_model) is not None:
            state = self.models.get(shown)
            parts.append(f"{shown} {state.state if state else ''}".strip())
        else:
            parts.append("no model")
        parts.append(self.connection)
        if self.current in self.generating:  # the reply's own label may be scrolled away
            parts.append("replying… Esc stops")
        elif self.last_stats is not None:
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
        waiting = sum(1 for item in self.outbox if item.state != "sent")
        if waiting:
            parts.append(f"{waiting} unsent")
        return parts


def shown_reason(status: ModelStatus, now: float) -> str:
    """A model's reason if it still explains its state (see ``STOPPED_REASON_SECONDS``)."""
    if status.state == "stopped" and now - status.since >= STOPPED_REASON_SECONDS:
        return ""
    return status.reason


def _arrived(item: Outgoing, messages: list[Message]) -> bool:
    """Whether llamad stored ``item``: it is among ``messages``, its conversation's last."""
    recent = [m for m in messages if m.created >= item.sent_at - CLOCK_SLACK_SECONDS]
    if item.kind == "retry":
        return any(m.role == "assistant" for m in recent)
    text = _normal(item.text)
    return any(m.role == "user" and _normal(m.text) == text for m in recent)


def _text(line: Line) -> str:
    return "".join(span.text for span in line)


def _cut_to(text: str, columns: int) -> str:
    """The longest start of ``text`` at most ``columns`` wide."""
    out, used = [], 0
    for char in text:
        size = display_width(char)
        if used + size > columns:
            break
        out.append(char)
        used += size
    return "".join(out)


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
