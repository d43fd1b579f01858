"""The TUI's I/O shell: terminal, keys, llamad, repaint.

Four tasks in one nursery: ``_keys`` (waits for stdin with
``trio.lowlevel.wait_readable``, then reads with ``inkey(timeout=0)``, since
blessed's async reader is asyncio-only), ``_network`` (connects, reconnects
with backoff, applies every message to the view), ``_painter`` (the only task
that writes to the terminal: at most 30 frames a second, only changed rows,
inside synchronized output) and ``_signals`` (SIGWINCH). Decisions live in
``llama_tui.view``.
"""

from __future__ import annotations

import base64
import functools
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import blessed
import trio

from llama_tui.connection import Connection, Disconnected, connect
from llama_tui.markdown import Line
from llama_tui.view import (
    AnswerToolCall,
    AttachImage,
    CancelReply,
    CompletePath,
    CopyLastReply,
    Delete,
    EditInEditor,
    Export,
    Intent,
    LoadModel,
    OpenConversation,
    Outgoing,
    Quit,
    Rename,
    SearchAll,
    Send,
    View,
)
from llamad.concurrency import first_leaf
from llamad.protocol import (
    ApproveTool,
    Cancel,
    Chat,
    ChatDelta,
    ChatDone,
    ChatOptions,
    ChatStarted,
    Conversation,
    ConversationReply,
    Conversations,
    DeleteConversation,
    Error,
    ExportConversation,
    Exported,
    GetConversation,
    ImagePart,
    ListConversations,
    Load,
    Ok,
    QueuePosition,
    RenameConversation,
    Request,
    SearchHistory,
    SearchResults,
    ServerMessage,
    StateChanged,
    Status,
    StatusReply,
    Subscribe,
    TextPart,
    ToolCallEvent,
    read_image_file,
)

FRAME_INTERVAL_SEC = 1 / 30
_SYNC_BEGIN, _SYNC_END = "\x1b[?2026h", "\x1b[?2026l"
_CODE_BLOCK = re.compile(r"^(?:```|~~~)[^\n]*\n(.*?)^(?:```|~~~)", re.MULTILINE | re.DOTALL)
ANIMATION_INTERVAL_SEC = 0.1

# Pygments token types to terminal colours (the first matching prefix wins).
_TOKEN_COLOURS = (
    ("Comment", "bright_black"),
    ("Keyword", "magenta"),
    ("Name.Function", "blue"),
    ("Name.Class", "blue"),
    ("Name.Builtin", "cyan"),
    ("Literal.String", "green"),
    ("Literal.Number", "yellow"),
    ("Operator", "cyan"),
)
_STYLE_ATTRS = (
    ("bold", "bold"),
    ("heading", "bold"),
    ("italic", "italic"),
    ("link", "underline"),
    ("code", "cyan"),
    ("quote", "dim"),
    ("dim", "dim"),
    ("rule", "dim"),
    ("fence", "dim"),
    ("reverse", "reverse"),
)


@dataclass
class Options:
    socket: Path | None = None
    url: str | None = None
    conversation: str | None = None
    new: bool = False
    model: str | None = None
    token_file: Path | None = None


class App:
    def __init__(self, term: blessed.Terminal, options: Options) -> None:
        self.term = term
        self.options = options
        self.view = View()
        self._ids = itertools.count(1)
        self._connection: Connection | None = None
        self._dirty = trio.Event()
        self._frame: list[str] = []
        self._searches: dict[int, str] = {}  # request id -> the text searched for
        self._exports: dict[int, str] = {}  # request id -> where to write it
        self._reload_after: set[str] = set()  # conversations retried or edited: read back
        # Reads that settle messages sent just before a drop: request id -> conversation.
        self._reconciling: dict[int, str] = {}
        self._refresh_on_ok: set[int] = set()  # renames and deletes: reload the list after
        self._escape_out = ""  # a control sequence (OSC 52) for the painter to write
        self._suspended = False  # $EDITOR has the terminal
        # Requests go from several tasks; a stream takes one writer at a time
        # (trio raises BusyResourceError for a second).
        self._sending = trio.Lock()
        self._opened = False

    # ----------------------------------------------------------- plumbing

    def invalidate(self, full: bool = False) -> None:
        if full:
            self._frame = []
        self._dirty.set()

    async def request(self, make: Callable[..., Request]) -> int:
        request_id = next(self._ids)
        if self._connection is None:
            self.view.notice = "not connected to llamad; try again in a moment"
            self.invalidate()
            return request_id
        try:
            async with self._sending:
                await self._connection.send(make(id=request_id))
        except Disconnected as exc:
            self.view.notice = str(exc)
        return request_id

    async def flush(self) -> None:
        """Send every message of the outbox that may go now (see ``View.sendable``)."""
        connection = self._connection
        if connection is None:
            return
        for item in self.view.sendable():
            request_id = next(self._ids)
            # Marked before the await: the reply may be read before send returns.
            self.view.mark_sent(item, request_id, time.time())
            try:
                async with self._sending:
                    await connection.send(_chat_request(item, request_id))
            except Disconnected:
                return  # it is "sent", so the reconnect checks whether it arrived
        self.invalidate()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._painter)
            nursery.start_soon(self._network)
            nursery.start_soon(self._signals)
            nursery.start_soon(self._animate)
            await self._keys()
            nursery.cancel_scope.cancel()

    # --------------------------------------------------------------- keys

    async def _keys(self) -> None:
        stdin = sys.stdin.fileno()
        while True:
            await trio.lowlevel.wait_readable(stdin)
            while True:
                key = self.term.inkey(timeout=0)
                if not key:
                    break
                name = key.name or "" if key.is_sequence else ""
                # The raw text matters for named keys too: blessed names both
                # "\r" (Enter) and "\n" (Ctrl+J) KEY_ENTER.
                char = (key.text or "") if name == "BRACKETED_PASTE" else str(key)
                intent = self.view.key(name, char)
                if isinstance(intent, Quit):
                    return
                if intent is not None:
                    await self._carry_out(intent)
                self.invalidate()

    async def _carry_out(self, intent: Intent) -> None:
        view = self.view
        match intent:
            case Send():
                await self.flush()
            case LoadModel(name):
                await self.request(functools.partial(Load, model=name, wait=False))
            case OpenConversation(None):
                pass  # the view shows the new conversation already
            case OpenConversation(conversation):
                assert conversation is not None
                view.current = conversation
                view.scroll = 0
                if conversation not in view.generating:
                    await self.request(
                        functools.partial(GetConversation, conversation=conversation)
                    )
            case CancelReply(conversation):
                await self.request(functools.partial(Cancel, conversation=conversation))
            case SearchAll(text):
                request_id = await self.request(functools.partial(SearchHistory, text=text))
                self._searches[request_id] = text
            case Rename(conversation, title):
                self._refresh_on_ok.add(
                    await self.request(
                        functools.partial(
                            RenameConversation, conversation=conversation, title=title
                        )
                    )
                )
            case Delete(conversation):
                self._refresh_on_ok.add(
                    await self.request(
                        functools.partial(DeleteConversation, conversation=conversation)
                    )
                )
                view.current = None
            case Export(conversation, path):
                request_id = await self.request(
                    functools.partial(ExportConversation, conversation=conversation, format="md")
                )
                self._exports[request_id] = path
            case AttachImage(path):
                read = await trio.to_thread.run_sync(read_image, path)
                if isinstance(read, str):
                    view.notice = read
                else:
                    view.attachments.append(read)
                    view.notice = f"attached {read.name}; it goes with your next message"
            case CompletePath(partial):
                completed, choices = await trio.to_thread.run_sync(complete_path, partial)
                view.input = f"/image {completed}"
                if len(choices) > 1:
                    shown = "  ".join(choices[:8]) + ("  …" if len(choices) > 8 else "")
                    view.notice = shown
            case AnswerToolCall(conversation, call, approve):
                await self.request(
                    functools.partial(
                        ApproveTool, conversation=conversation, call=call, approve=approve
                    )
                )
            case EditInEditor(text):
                view.input = await self._edit(text)
                self.invalidate(full=True)
            case CopyLastReply(code_block):
                replies = [
                    e for e in view.entries.get(view.current or "", []) if e.role == "assistant"
                ]
                text = replies[-1].text if replies else ""
                what = "the last reply"
                if code_block is not None:
                    blocks = _CODE_BLOCK.findall(text)
                    index = code_block - 1 if code_block else len(blocks) - 1
                    text = blocks[index] if blocks and 0 <= index < len(blocks) else ""
                    what = f"code block {index + 1}"
                if text:
                    payload = base64.b64encode(text.encode()).decode()
                    # OSC 52: the terminal puts it on the clipboard, even over ssh.
                    self._escape_out = f"\x1b]52;c;{payload}\x07"
                    view.notice = f"copied {what}"
                else:
                    view.notice = "nothing to copy"
            case Quit():
                pass

    async def _edit(self, text: str) -> str:
        """Hand the terminal to $EDITOR; the painter stays quiet meanwhile."""
        editor = shlex.split(os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi")
        term = self.term
        self._suspended = True
        sys.stdout.write(term.exit_fullscreen + term.normal_cursor)
        sys.stdout.flush()
        try:
            return await trio.to_thread.run_sync(_run_editor, editor, text)
        except OSError as exc:
            self.view.notice = f"cannot run {editor[0]}: {exc.strerror}"
            return text
        finally:
            sys.stdout.write(term.enter_fullscreen + term.hide_cursor)
            sys.stdout.flush()
            self._suspended = False

    # ------------------------------------------------------------ network

    async def _network(self) -> None:
        backoff = 0.5
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    self._connection = await connect(
                        nursery,
                        socket_path=self.options.socket,
                        url=self.options.url,
                        token_file=self.options.token_file,
                    )
                    backoff = 0.5
                    await self._on_connected()
                    while True:
                        self._apply(await self._connection.receive())
                        self.invalidate()
            except Exception as exc:
                reason = _reason(exc)
            self._connection = None
            self.view.connected = False
            self.view.connection_lost()
            deadline = time.monotonic() + backoff
            while (left := deadline - time.monotonic()) > 0:
                self.view.connection = f"{reason}; retrying in {left:.0f} s"
                self.invalidate()
                await trio.sleep(min(left, 1.0))
            self.view.connection = "connecting…"
            backoff = min(backoff * 2, 5.0)

    async def _on_connected(self) -> None:
        self.view.connected = True
        self.view.connection = "connected"
        self.view.notice = ""
        await self.request(functools.partial(Subscribe, topics=["state"]))
        await self.request(functools.partial(Status))
        await self.request(functools.partial(ListConversations, limit=200))
        if self.view.current is not None:  # back after a reconnect: where we were
            await self.request(functools.partial(GetConversation, conversation=self.view.current))
        for conversation in self.view.unsure_conversations():
            read = functools.partial(GetConversation, conversation=conversation)
            self._reconciling[await self.request(read)] = conversation
        if self.options.model and not self._opened:
            await self.request(functools.partial(Load, model=self.options.model, wait=False))
        await self.flush()

    def _apply(self, message: ServerMessage) -> None:
        view = self.view
        match message:
            case StatusReply(models=models, default_model=default_model):
                view.models = {m.name: m for m in models}
                view.active_model = default_model
            case StateChanged(model=status):
                view.models[status.name] = status
                if status.state in ("starting", "ready"):
                    view.active_model = status.name
                if status.state == "ready" and view.notice.startswith("Loading"):
                    view.notice = ""
                if status.state == "failed":
                    view.notice = f"{status.name} failed: {status.reason}"
            case Conversations(conversations=conversations):
                view.conversations = conversations
                view.reconcile_new(conversations)
                self._nursery.start_soon(self.flush)
                if not self._opened:
                    self._opened = True
                    first = self.options.conversation or (
                        None if self.options.new or not conversations else conversations[0].id
                    )
                    if first is not None:
                        self._nursery.start_soon(
                            self._carry_out, OpenConversation(_resolve(first, conversations))
                        )
            case ConversationReply(id=request_id, conversation=conversation, messages=messages):
                view.set_messages(conversation.id, messages)
                if self._reconciling.pop(request_id, None) is not None:
                    view.reconcile(conversation.id, messages)
                    self._nursery.start_soon(self.flush)
            case ChatStarted(id=request_id, conversation=conversation, user=user):
                item = view.started(request_id, conversation.id)
                if item is not None and item.kind != "chat":  # that turn is being replaced
                    view.drop_last_turn(conversation.id, keep_message=item.kind == "retry")
                    self._reload_after.add(conversation.id)
                if all(c.id != conversation.id for c in view.conversations):
                    view.conversations.insert(0, conversation)
                view.add_user(conversation.id, user)
            case ChatDelta(conversation=conversation, text=text):
                view.add_delta(conversation, text)
            case ToolCallEvent(conversation=conversation, call=call):
                view.tool_call(conversation, call)
            case ChatDone(message=reply):
                view.finish(reply.conversation, reply)
                self._nursery.start_soon(
                    self.request, functools.partial(ListConversations, limit=200)
                )
                if reply.conversation in self._reload_after:  # show exactly what is stored
                    self._reload_after.discard(reply.conversation)
                    self._nursery.start_soon(
                        self.request,
                        functools.partial(GetConversation, conversation=reply.conversation),
                    )
                self._nursery.start_soon(self.flush)  # anything waiting for this reply
            case SearchResults(id=request_id, hits=hits):
                view.show_results(hits, self._searches.pop(request_id, ""))
            case Exported(id=request_id, content=content):
                asked = self._exports.pop(request_id, "")
                try:
                    path = (
                        _write_new(Path(asked).expanduser(), content, replace=True)
                        if asked
                        else _write_new(_export_path(view), content, replace=False)
                    )
                    view.notice = f"exported to {path}"
                except OSError as exc:
                    view.notice = f"cannot export: {exc.strerror or exc}"
            case Ok(id=request_id, message=text) if request_id in self._refresh_on_ok:
                self._refresh_on_ok.discard(request_id)
                view.notice = text
                self._nursery.start_soon(
                    self.request, functools.partial(ListConversations, limit=200)
                )
            case QueuePosition(position=position):
                view.notice = f"waiting for a free slot: position {position}"
            case Error(id=request_id, message=text):
                unread = self._reconciling.pop(request_id, None) if request_id else None
                if unread is not None:  # e.g. deleted meanwhile: send again, to be refused
                    view.reconcile(unread, [])
                    self._nursery.start_soon(self.flush)
                if request_id is None or not view.refused(request_id, text):
                    view.notice = text
            case _:
                pass

    # ----------------------------------------------------------- painting

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGWINCH) as signals:
            async for _ in signals:
                self.invalidate(full=True)

    async def _animate(self) -> None:
        """Spinner and loading timer tick while something is in progress; notices expire."""
        expiry_painted: float | None = None
        while True:
            await trio.sleep(ANIMATION_INTERVAL_SEC)
            view = self.view
            if view.loading() is not None or view.waiting_first_token or view.generating:
                self.invalidate()
            expires = view.notice_expires()
            if expires is not None and expires != expiry_painted and time.time() >= expires:
                expiry_painted = expires
                self.invalidate()

    async def _painter(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            if not self._suspended:
                self.paint()
            await trio.sleep(FRAME_INTERVAL_SEC)  # at most 30 frames a second

    def paint(self) -> None:
        term = self.term
        width, height = term.width, term.height
        rows = [self.encode_line(line, width) for line in self.view.layout(width, height)]
        if len(self._frame) != len(rows):
            self._frame = [""] * len(rows)
            out = [term.home + term.clear]
        else:
            out = []
        for y, row in enumerate(rows):
            if row != self._frame[y]:
                out.append(term.move_yx(y, 0) + row + term.normal + term.clear_eol)
        self._frame = rows
        cursor_row = height - 2
        out.append(self._escape_out)
        self._escape_out = ""
        # Synchronized output (DEC 2026) written directly: blessed's context
        # manager first queries the terminal, and the painter must never wait on
        # a terminal that does not answer. Terminals without it ignore these.
        frame = "".join(out) + term.move_yx(cursor_row, 0)
        sys.stdout.write(f"{_SYNC_BEGIN}{frame}{_SYNC_END}")
        sys.stdout.flush()

    def encode_line(self, line: Line, width: int) -> str:
        term = self.term
        out: list[str] = []
        for span in line:
            codes = "".join(
                getattr(term, attr) for style, attr in _STYLE_ATTRS if style in span.style
            )
            if span.color is not None:
                colour = next(
                    (c for prefix, c in _TOKEN_COLOURS if span.color.startswith(prefix)), None
                )
                if colour is not None:
                    codes += getattr(term, colour)
            out.append(f"{codes}{span.text}{term.normal}" if codes else span.text)
        return "".join(out)


def _run_editor(editor: list[str], text: str) -> str:
    """Blocking: edit ``text`` in a temporary file; returns what was saved."""
    with tempfile.NamedTemporaryFile("w+", suffix=".md", delete=False) as handle:
        handle.write(text)
        path = Path(handle.name)
    try:
        subprocess.run([*editor, str(path)], check=False)
        return path.read_text().rstrip("\n")
    finally:
        path.unlink(missing_ok=True)


def _chat_request(item: Outgoing, request_id: int) -> Chat:
    content: str | list[TextPart | ImagePart] = item.text
    if item.images:
        content = [TextPart(text=item.text), *item.images]
    return Chat(
        id=request_id,
        content=content,
        conversation=item.conversation,
        model=item.model,
        options=ChatOptions(system=item.system),
        retry=item.kind == "retry",
        edit=item.kind == "edit",
    )


def export_dir() -> Path:
    """Where ``/export`` without a path writes: the user's Downloads folder (XDG)."""
    from platformdirs import user_downloads_dir

    return Path(user_downloads_dir())


def _export_path(view: View) -> Path:
    conversation = next((c for c in view.conversations if c.id == view.current), None)
    title = conversation.title if conversation is not None else ""
    slug = "".join(ch if ch.isalnum() else "-" for ch in title.lower()).strip("-")[:40]
    slug = "-".join(part for part in slug.split("-") if part) or "conversation"
    handle = conversation.handle if conversation is not None and conversation.handle else ""
    return export_dir() / (f"{slug}-{handle}.md" if handle else f"{slug}.md")


def _write_new(path: Path, content: str, *, replace: bool) -> Path:
    """Write ``content`` to ``path`` (or, unless ``replace``, to ``name-2.md``… if it exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path
    for number in itertools.count(2):
        try:
            with candidate.open("w" if replace else "x") as handle:
                handle.write(content)
        except FileExistsError:
            candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
        else:
            return candidate
    raise AssertionError("unreachable")


def _resolve(query: str, conversations: Sequence[Conversation]) -> str:
    """``--conversation``: a handle or an id prefix, among the listed conversations."""
    wanted = query.strip().lower()
    for conversation in conversations:
        if conversation.handle == wanted:
            return conversation.id
    for conversation in conversations:
        if conversation.id.startswith(wanted):
            return conversation.id
    return query


def _reason(exc: BaseException) -> str:
    """One line for the status bar, from whatever ended the connection."""
    cause = first_leaf(exc)
    return str(cause) or type(cause).__name__


def read_image(text: str) -> ImagePart | str:
    """An image file for the next message, or why not; llamad checks what it is."""
    try:
        return read_image_file(Path(text).expanduser())
    except ValueError as exc:
        return str(exc)


def complete_path(partial: str) -> tuple[str, list[str]]:
    """Tab completion for ``/image``: the longest common completion and the choices."""
    expanded = os.path.expanduser(partial) if partial else ""
    folder, prefix = os.path.split(expanded)
    try:
        names = sorted(n for n in os.listdir(folder or ".") if n.startswith(prefix))
    except OSError:
        return partial, []
    if not prefix.startswith("."):
        names = [n for n in names if not n.startswith(".")]
    if not names:
        return partial, []
    common = os.path.commonprefix(names)  # noqa: RUF071 - names in one folder: by character
    completed = partial[: len(partial) - len(prefix)] + common
    if len(names) == 1 and os.path.isdir(os.path.join(folder or ".", common)):
        completed += "/"
    return completed, names
