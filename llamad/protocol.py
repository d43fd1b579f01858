"""The wire format shared by llamad and every client.

This module is the single source of truth for what travels on the control
socket: typed, frozen msgspec Structs in two tagged unions (``Request`` from
clients, ``ServerMessage`` from the daemon) plus a sans-I/O frame codec.
It imports nothing of the daemon and no I/O library, so ``llamactl`` can use it
without paying for trio (``read_image_file``, shared by both clients, is its
one read of a file). ``docs/protocol.md`` describes the same thing in prose.

Framing on the Unix socket: a 4-byte big-endian unsigned length, then that many
bytes of msgpack. The length is checked against ``MAX_FRAME_BYTES`` before any
of the body is read.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

PROTOCOL_VERSION: Final = 1
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
MAX_IMAGE_BYTES: Final = 10 * 1024 * 1024  # per attached image; fits inside one frame
_HEADER = struct.Struct(">I")
HEADER_BYTES: Final = _HEADER.size

ModelState = Literal["stopped", "starting", "ready", "stopping", "backoff", "failed"]
HealthLevel = Literal["ok", "warning", "critical"]
ErrorCode = Literal[
    "bad_frame",  # the bytes are not a frame or not msgpack; the connection is closed
    "bad_request",  # a request that cannot be served as sent (see docs/protocol.md)
    "unknown_model",
    "model_file_missing",
    "model_failed",
    "does_not_fit",  # not enough memory for the model even after every allowed eviction
    "timeout",  # a load waited too long (for requests in flight on what it must evict)
    "cancelled",  # a request in flight on a model that had to stop
    "queue_full",  # the model's max_concurrent is reached
    "config_error",
    "not_found",
    "busy",  # e.g. a reply is already being generated in that conversation
    "storage",  # the history could not be written; nothing stored was changed
    "history_unavailable",  # llamad runs without history (data directory not writable)
    "upstream",  # llama-server failed or refused
    "permission_denied",
    "unauthorized",
    "forbidden",
    "too_large",
    "internal",
]
LogTopic = Literal["state", "log", "workers"]


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    pass


# ---------------------------------------------------------------- shared data


class ExitInfo(msgspec.Struct, frozen=True, kw_only=True):
    """How a llama-server process ended: an exit code or a signal name."""

    code: int | None = None
    signal: str | None = None

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {self.signal}"
        return f"exited with code {self.code}"


class ModelMemory(msgspec.Struct, frozen=True, kw_only=True):
    """A model's memory in bytes: estimated from the GGUF before start, measured after."""

    estimated_host: int = 0
    estimated_gpu: int = 0
    measured_rss: int | None = None  # the running server's resident set
    measured_pss: int | None = None  # ...with shared pages divided among their users
    measured_gpu: int | None = None  # from nvidia-smi, where there is one


class PoolMemory(msgspec.Struct, frozen=True, kw_only=True):
    """The pool's budget (None: no limit) and what the resident models use of it."""

    budget_host: int | None = None
    budget_gpu: int | None = None
    max_models: int | None = None
    used_host: int = 0
    used_gpu: int = 0


class ModelStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a client may show about one configured model."""

    name: str
    state: ModelState
    since: float  # wall-clock (Unix) time the state was entered
    reason: str = ""  # human explanation of the state, empty when nothing to say
    pid: int | None = None
    restarts: int = 0  # automatic restarts since the last user load/restart
    last_exit: ExitInfo | None = None
    ready_seconds: float | None = None  # spawn -> /health 200 of the last start
    waiting: int = 0  # requests waiting for this model to be ready, or for a slot
    in_flight: int = 0  # requests being served by this model
    path: str = ""
    file_exists: bool = True
    aliases: list[str] = []
    endpoint: str = ""  # where llama-server listens: a socket path or host:port
    tools: list[str] = []  # the llamad tools offered to this model
    vision: bool | None = None  # accepts images; None until a running server said
    memory: ModelMemory = ModelMemory()
    last_used: float | None = None  # Unix time a request last finished with it
    unload_at: float | None = None  # Unix time it unloads for being idle, if it will
    pinned: bool = False  # loaded at start, never evicted or unloaded for being idle
    expected: bool = False  # should be running (loaded and not since unloaded or evicted)
    ctx_size: int = 0
    parallel: int = 1
    remote: bool = False  # served elsewhere (url): ``endpoint`` is that server's URL
    rpc: list[str] = []  # the RPC workers ("host:port") its layers are split over
    # From the GGUF file's header (None/"" when it cannot be read) and models.toml:
    size: int | None = None  # bytes on disk, every part of a split model
    quantization: str = ""  # e.g. "Q4_K_M"
    context_length: int | None = None  # the context the model was trained with
    source: str = ""  # where it was configured: "models.toml", "models_dirs", "ollama"...
    mmproj: str = ""  # the vision projector passed as --mmproj
    warnings: list[str] = []  # e.g. a base model without a chat template


class WorkerDevice(msgspec.Struct, frozen=True, kw_only=True):
    """One device a worker offers, with its memory in bytes as the worker reported it."""

    name: str = ""  # as ggml names it ("CPU", "CUDA0"); "" when only the index is known
    description: str = ""
    free: int | None = None
    total: int | None = None


class WorkerStatus(msgspec.Struct, frozen=True, kw_only=True):
    """An RPC worker: one this llamad runs ([workers.NAME]) or one a model's ``rpc`` names."""

    name: str  # [workers.NAME], or the address for a worker on another machine
    address: str  # "host:port" a model connects to
    local: bool  # run and supervised by this llamad
    # Local: the supervisor's state. Elsewhere: "ready" when it answered the last
    # check, "backoff" when it did not, "stopped" before it was ever checked.
    state: ModelState
    since: float  # wall-clock (Unix) time the state was entered
    reason: str = ""
    pid: int | None = None
    restarts: int = 0
    last_exit: ExitInfo | None = None
    version: str = ""  # the RPC protocol version it reported ("7.0.0")
    devices: list[WorkerDevice] = []
    used_by: list[str] = []  # the configured models split over it
    serving: str | None = None  # the model of ours connected to it now (one at a time)


# --------------------------------------------------------- chat and history


class TextPart(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="text"):
    text: str


class ImagePart(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="image"):
    """An image in a message.

    A client sends ``data`` (and a ``name`` for people); llamad checks the
    bytes and fills in the rest. Stored and listed messages carry everything
    but ``data``: the bytes live once per ``digest`` in the history store.
    """

    data: bytes = b""  # base64 in JSON, raw in msgpack
    name: str = ""  # for people only; the type always comes from the bytes
    mime: str = ""
    width: int = 0
    height: int = 0
    size: int = 0  # bytes
    digest: str = ""  # sha256 of the bytes

    def label(self) -> str:
        """How a conversation shows it: ``[image: cat.png 640x480]`` (with a real times sign)."""
        what = self.name or self.mime or "image"
        return f"[image: {what} {self.width}×{self.height}]"


# Message content is a list of parts, so new kinds join this union as tagged
# Structs without changing existing records.
Part = TextPart | ImagePart
Role = Literal["system", "user", "assistant", "tool"]
MessageStatus = Literal["complete", "incomplete", "cancelled", "error"]
ToolCallStatus = Literal["running", "awaiting_approval", "ok", "error", "denied", "timeout"]


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """One call a model made to a llamad tool, and what came of it."""

    id: str
    name: str
    arguments: str  # the JSON object as the model wrote it
    status: ToolCallStatus = "running"
    result: str = ""  # what the model was told (the answer, or why there is none)
    round: int = 1  # which model -> tools round of the reply made it

    def summary(self, limit: int = 60) -> str:
        """``calculator(2**64) → 18446744073709551616``: one line for people."""
        call = f"{self.name}({_short(_argument_text(self.arguments), limit)})"
        outcome = {
            "running": "…",
            "awaiting_approval": "waiting for approval",
            "denied": "denied",
            "timeout": "timed out",
        }.get(self.status)
        return f"{call} → {outcome or _short(self.result, limit)}"


def _argument_text(arguments: str) -> str:
    try:
        parsed = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return arguments
    if not isinstance(parsed, dict):
        return arguments
    shown = [v if isinstance(v, str) else msgspec.json.encode(v).decode() for v in parsed.values()]
    if len(shown) == 1:
        return shown[0]
    return ", ".join(f"{key}={value}" for key, value in zip(parsed, shown, strict=True))


def _short(text: str, limit: int) -> str:
    return one_line(" ".join(text.split()), limit)


def image_size_problem(name: str, size: int) -> str | None:
    """Why an image of ``size`` bytes is refused, or None (checked on both sides)."""
    if size <= MAX_IMAGE_BYTES:
        return None
    limit = MAX_IMAGE_BYTES // (1024 * 1024)
    return f"{name} is {size / 1e6:.1f} MB; the limit is {limit} MiB — scale it down first"


def read_image_file(path: Path) -> ImagePart:
    """An image file as a part to send; ``ValueError`` with one line if it cannot be.

    Only the size is checked here: llamad reads the type from the bytes.
    """
    try:
        problem = image_size_problem(path.name, path.stat().st_size)
        if problem is not None:
            raise ValueError(problem)
        return ImagePart(data=path.read_bytes(), name=path.name)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None


class MessageStats(msgspec.Struct, frozen=True, kw_only=True):
    finish_reason: str | None = None  # "stop", "length", ...
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_per_second: float | None = None
    time_to_first_token_ms: float | None = None
    duration_ms: float | None = None


class Message(msgspec.Struct, frozen=True, kw_only=True):
    conversation: str
    seq: int  # 1, 2, 3... within the conversation
    role: Role
    parts: list[Part]
    status: MessageStatus = "complete"
    model: str | None = None
    created: float = 0.0  # Unix time
    stats: MessageStats | None = None
    error: str = ""  # why, when status is "error"
    tool_calls: list[ToolCall] = []  # an assistant reply's calls, in the order made

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.parts if isinstance(part, TextPart))

    @property
    def images(self) -> list[ImagePart]:
        return [part for part in self.parts if isinstance(part, ImagePart)]


HANDLE_CHARS: Final = 6
# Crockford's base32 in lower case: no i, l, o or u, so a handle read aloud or
# copied by hand is not mistyped.
_HANDLE_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"


def conversation_handle(conversation_id: str) -> str:
    """The short name of a conversation: its id's last 30 random bits in base32.

    UUIDv7 ids begin with the time, so every recent conversation shares a long
    prefix; the tail is random, so six characters tell them apart. llamad
    keeps handles unique; an id that is not a UUID gets an empty handle.
    """
    digits = conversation_id.replace("-", "")
    if len(digits) != 32:
        return ""
    try:
        value = int(digits[-8:], 16)
    except ValueError:
        return ""
    return "".join(
        _HANDLE_ALPHABET[(value >> (5 * place)) & 31] for place in reversed(range(HANDLE_CHARS))
    )


class Conversation(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # UUIDv7: time-ordered; clients may use any unique prefix
    title: str
    handle: str = ""  # short and unique: accepted wherever an id is (conversation_handle)
    model: str | None = None
    system_prompt: str | None = None
    created: float = 0.0
    updated: float = 0.0
    message_count: int = 0


class SearchHit(msgspec.Struct, frozen=True, kw_only=True):
    conversation: str
    title: str
    seq: int
    role: Role
    snippet: str  # the match with some context either side


class ChatOptions(msgspec.Struct, frozen=True, kw_only=True):
    temperature: float | None = None
    max_tokens: int | None = None
    system: str | None = None  # system prompt; stored on a new conversation
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past end-of-sequence (benchmarks, tests)
    tools: list[str] | None = None  # offer these tools instead of the model's own list
    keep_alive: float | None = None  # seconds to stay loaded once idle (0 now, < 0 for ever)


# ------------------------------------------------------------------- requests


class _Request(_Message, frozen=True, kw_only=True):
    id: int


class Status(_Request, frozen=True, kw_only=True, tag="status"):
    """Daemon and model states. Reply: ``StatusReply``."""


class Load(_Request, frozen=True, kw_only=True, tag="load"):
    """Make ``model`` (a name or alias) resident, evicting idle models if memory requires.

    With ``only``, every other model is unloaded first. With ``wait`` the
    daemon streams ``StateChanged`` events for the model and ends with
    ``Loaded`` or ``Error``; without it, it replies ``Ok`` at once.
    """

    model: str
    wait: bool = True
    only: bool = False


class Unload(_Request, frozen=True, kw_only=True, tag="unload"):
    """Stop ``model`` (default: every running model). Reply: ``Ok``."""

    model: str | None = None


class Restart(_Request, frozen=True, kw_only=True, tag="restart"):
    """Stop and start ``model`` (default: the last loaded one); replies like ``Load``."""

    model: str | None = None
    wait: bool = True


class Health(_Request, frozen=True, kw_only=True, tag="health"):
    """A monitoring verdict over every expected model, or over ``model`` alone."""

    model: str | None = None


class Logs(_Request, frozen=True, kw_only=True, tag="logs"):
    """The last ``lines`` output lines of ``model`` (default: the last loaded one).

    Reply: ``LogLines``; with ``follow`` then one ``LogLine`` event per new line
    until the client disconnects.
    """

    model: str | None = None
    lines: int = 100
    follow: bool = False


class Reload(_Request, frozen=True, kw_only=True, tag="reload"):
    """Re-read models.toml. Reply: ``Ok`` or ``Error`` (``config_error``)."""


class Subscribe(_Request, frozen=True, kw_only=True, tag="subscribe"):
    """Receive events (``StateChanged``, ``LogLine``) named with this request's id."""

    topics: list[LogTopic] = msgspec.field(default_factory=lambda: ["state"])


class Chat(_Request, frozen=True, kw_only=True, tag="chat"):
    """Send a user message and stream the reply.

    ``conversation``: an id (or unique prefix), or None for a new one.
    ``model``: the model to answer (loaded if needed); default the
    conversation's own model, then the last loaded, then ``default_model``.
    Answer: ``chat_started`` (the user
    message is stored), any of ``state_changed`` / ``queue_position`` /
    ``context_trimmed``, ``chat_delta`` per piece of text, and finally
    ``chat_done`` (the stored reply) or ``error``.

    ``retry``: regenerate the reply to the conversation's last user message,
    replacing the last reply (``content`` is ignored). ``edit``: replace the
    last user message (and its reply) with ``content``, then generate. Both
    need ``conversation`` and a user message in it (``bad_request`` otherwise).
    """

    content: str | list[Part]
    conversation: str | None = None
    model: str | None = None
    options: ChatOptions = ChatOptions()
    retry: bool = False  # regenerate the reply to the last user message (content ignored)
    edit: bool = False  # replace the last user message (and its reply) with ``content``


class Cancel(_Request, frozen=True, kw_only=True, tag="cancel"):
    """Stop the reply being generated in ``conversation``; what came is kept."""

    conversation: str


class ApproveTool(_Request, frozen=True, kw_only=True, tag="approve_tool"):
    """Answer a ``tool_call`` event whose status is ``awaiting_approval``."""

    conversation: str
    call: str  # the call's id
    approve: bool


class Watch(_Request, frozen=True, kw_only=True, tag="watch"):
    """Receive the chat events of ``conversation``, whoever started them."""

    conversation: str


class ListConversations(_Request, frozen=True, kw_only=True, tag="list_conversations"):
    limit: int = 50
    before: str | None = None  # the ``next`` cursor of the previous page


class GetConversation(_Request, frozen=True, kw_only=True, tag="get_conversation"):
    conversation: str
    limit: int = 100  # the last ``limit`` messages...
    before: int | None = None  # ...before this seq


class RenameConversation(_Request, frozen=True, kw_only=True, tag="rename_conversation"):
    conversation: str
    title: str


class DeleteConversation(_Request, frozen=True, kw_only=True, tag="delete_conversation"):
    conversation: str


class SearchHistory(_Request, frozen=True, kw_only=True, tag="search_history"):
    text: str
    limit: int = 50


class ExportConversation(_Request, frozen=True, kw_only=True, tag="export_conversation"):
    conversation: str
    format: Literal["md", "json"] = "md"


Request = (
    Status
    | Load
    | Unload
    | Restart
    | Health
    | Logs
    | Reload
    | Subscribe
    | Chat
    | Cancel
    | ApproveTool
    | Watch
    | ListConversations
    | GetConversation
    | RenameConversation
    | DeleteConversation
    | SearchHistory
    | ExportConversation
)


# ------------------------------------------------------------ replies/events


class Ok(_Message, frozen=True, kw_only=True, tag="ok"):
    id: int
    message: str = ""


class Error(_Message, frozen=True, kw_only=True, tag="error"):
    """A failed request. ``id`` is None when the request could not be read."""

    id: int | None
    code: ErrorCode
    message: str


class StatusReply(_Message, frozen=True, kw_only=True, tag="status_reply"):
    id: int
    version: str
    pid: int
    uptime: float
    config_path: str
    models: list[ModelStatus]
    websocket: str | None = None  # "host:port" of the WebSocket, when enabled
    memory: PoolMemory = PoolMemory()
    history: str | None = None  # why the chat history is unavailable, when it is
    # Where a new chat that names no model goes: the model loaded last, else
    # [daemon] default_model, else the only resident model; None when there is none.
    default_model: str | None = None
    http: str | None = None  # "host:port" of the HTTP API (OpenAI/Anthropic), when enabled
    api_key_file: str | None = None  # where llamad's own API key is (read it; never sent)
    workers: list[WorkerStatus] = []  # RPC workers run here or used by a model


class Loaded(_Message, frozen=True, kw_only=True, tag="loaded"):
    """The end of a waited ``Load``/``Restart``: the model is ready."""

    id: int
    model: str
    seconds: float  # request received -> ready, as the daemon measured it
    ready_seconds: float  # llama-server's own spawn -> /health 200


class HealthReply(_Message, frozen=True, kw_only=True, tag="health_reply"):
    id: int
    level: HealthLevel
    summary: str  # one line naming each model that is not OK
    models: list[ModelStatus] = []  # the expected models that are not ready


class LogLines(_Message, frozen=True, kw_only=True, tag="log_lines"):
    id: int
    model: str
    lines: list[str]


class StateChanged(_Message, frozen=True, kw_only=True, tag="state_changed"):
    """Event: a model entered a state. ``id`` names the request it answers."""

    id: int
    model: ModelStatus


class WorkerChanged(_Message, frozen=True, kw_only=True, tag="worker_changed"):
    """Event (topic ``workers``): an RPC worker entered a state."""

    id: int
    worker: WorkerStatus


class LogLine(_Message, frozen=True, kw_only=True, tag="log_line"):
    """Event: one line of a model's llama-server output."""

    id: int
    model: str
    line: str


class ChatStarted(_Message, frozen=True, kw_only=True, tag="chat_started"):
    """Event: the user message is committed to disk; the reply will be ``reply_seq``."""

    id: int
    conversation: Conversation
    user: Message | None  # None for a retry: the last user message is answered again
    reply_seq: int


class QueuePosition(_Message, frozen=True, kw_only=True, tag="queue_position"):
    """Event: every slot of the model is busy; this chat is ``position`` in line (1 = next)."""

    id: int
    conversation: str
    position: int


class ContextTrimmed(_Message, frozen=True, kw_only=True, tag="context_trimmed"):
    """Event: the oldest ``dropped_turns`` turns were left out to fit the model's context."""

    id: int
    conversation: str
    dropped_turns: int
    n_ctx: int


class ChatDelta(_Message, frozen=True, kw_only=True, tag="chat_delta"):
    id: int
    conversation: str
    seq: int
    text: str


class ToolCallEvent(_Message, frozen=True, kw_only=True, tag="tool_call"):
    """Event: a reply's tool call started, waits for approval, or finished."""

    id: int
    conversation: str
    seq: int  # the reply it belongs to
    call: ToolCall


class ChatDone(_Message, frozen=True, kw_only=True, tag="chat_done"):
    """The stored reply: status ``complete``, ``cancelled`` or ``error``."""

    id: int
    message: Message


class Conversations(_Message, frozen=True, kw_only=True, tag="conversations"):
    id: int
    conversations: list[Conversation]
    next: str | None = None  # pass as ``before`` for the next page


class ConversationReply(_Message, frozen=True, kw_only=True, tag="conversation"):
    id: int
    conversation: Conversation
    messages: list[Message]
    more: bool  # older messages exist before the first one returned


class SearchResults(_Message, frozen=True, kw_only=True, tag="search_results"):
    id: int
    hits: list[SearchHit]


class Exported(_Message, frozen=True, kw_only=True, tag="exported"):
    id: int
    format: Literal["md", "json"]
    content: str


ServerMessage = (
    Ok
    | Error
    | StatusReply
    | Loaded
    | HealthReply
    | LogLines
    | StateChanged
    | WorkerChanged
    | LogLine
    | ChatStarted
    | QueuePosition
    | ContextTrimmed
    | ChatDelta
    | ToolCallEvent
    | ChatDone
    | Conversations
    | ConversationReply
    | SearchResults
    | Exported
)


# ---------------------------------------------------------------- the codec


class ProtocolError(Exception):
    """Bytes that cannot be a message. ``request_id`` is set when it was readable."""

    def __init__(self, code: ErrorCode, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.request_id = request_id


class FrameDecoder:
    """Sans-I/O: feed bytes as they arrive, get back complete frame bodies.

    Raises ``ProtocolError`` as soon as a header announces a body larger than
    ``max_frame`` so a hostile length never makes us buffer it (frames complete
    before that header are returned first; the following ``feed`` raises).
    """

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    @property
    def in_frame(self) -> bool:
        """True while a frame has started but not finished (for the read timeout)."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        while len(self._buffer) >= HEADER_BYTES:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self._max_frame:
                if frames:
                    # The frames before the bad header come out first, in order;
                    # the next ``feed`` (``feed(b"")`` will do) raises. Raising at
                    # once dropped them, so whether they were served depended on
                    # how the bytes were split (found by tests/test_fuzz_transports.py).
                    break
                raise ProtocolError(
                    "bad_frame",
                    f"frame of {length} bytes exceeds the {self._max_frame}-byte limit",
                )
            end = HEADER_BYTES + length
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[HEADER_BYTES:end]))
            del self._buffer[:end]
        return frames


def frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its length."""
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"message of {len(payload)} bytes exceeds the frame limit")
    return _HEADER.pack(len(payload)) + payload


_msgpack_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()
# Decoders are built on first use: each costs about a millisecond to build, and
# a client needs one of the four (``llamactl status`` pays for every import).
_RequestDecoder = msgspec.msgpack.Decoder[Request] | msgspec.json.Decoder[Request]
_ServerDecoder = msgspec.msgpack.Decoder[ServerMessage] | msgspec.json.Decoder[ServerMessage]
_request_decoders: dict[bool, _RequestDecoder] = {}
_server_decoders: dict[bool, _ServerDecoder] = {}


def _request_decoder(json: bool) -> _RequestDecoder:
    decoder = _request_decoders.get(json)
    if decoder is None:
        decoder = msgspec.json.Decoder(Request) if json else msgspec.msgpack.Decoder(Request)
        _request_decoders[json] = decoder
    return decoder


def _server_decoder(json: bool) -> _ServerDecoder:
    decoder = _server_decoders.get(json)
    if decoder is None:
        decoder = (
            msgspec.json.Decoder(ServerMessage) if json else msgspec.msgpack.Decoder(ServerMessage)
        )
        _server_decoders[json] = decoder
    return decoder


def encode(message: _Message) -> bytes:
    """msgpack body of ``message`` (no length prefix)."""
    return _msgpack_encoder.encode(message)


def encode_json(message: _Message) -> bytes:
    return _json_encoder.encode(message)


def _salvage_id(payload: bytes, json: bool) -> int | None:
    """The ``id`` of an invalid request, so its error reply can name it."""
    try:
        raw: Any = msgspec.json.decode(payload) if json else msgspec.msgpack.decode(payload)
    # Found by fuzzing: deep nesting raises RecursionError, a msgpack str that is
    # not UTF-8 raises UnicodeDecodeError; neither is a DecodeError.
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None
    if isinstance(raw, dict):
        value = raw.get("id")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


_MAX_ERROR_DETAIL = 300  # characters of msgspec's explanation kept in an error reply


def one_line(text: str, limit: int = _MAX_ERROR_DETAIL) -> str:
    """``text`` as one printable line of at most ``limit`` characters.

    msgspec's messages quote the offending value (``Invalid enum value 'a<newline>b'``),
    which a client controls: without this an error reply could span lines or
    megabytes (found by tests/test_fuzz_transports.py).
    """
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def decode_request(payload: bytes, *, json: bool = False) -> Request:
    """Decode one request body or raise ``ProtocolError`` saying what is wrong."""
    try:
        return _request_decoder(json).decode(payload)
    except msgspec.ValidationError as exc:
        raise ProtocolError(
            "bad_request", f"invalid request: {one_line(str(exc))}", _salvage_id(payload, json)
        ) from None
    except msgspec.DecodeError as exc:
        encoding = "JSON" if json else "msgpack"
        raise ProtocolError(
            "bad_frame", f"frame is not valid {encoding}: {one_line(str(exc))}"
        ) from None
    # msgspec raises these two (not DecodeError) for deeply nested input, e.g.
    # b"\x91" * 100_000, and for a msgpack str that is not UTF-8, e.g. b"\xa1\xff".
    # They used to escape: the connection dropped with no reply and a logged
    # traceback (found by tests/test_fuzz_transports.py).
    except RecursionError:
        encoding = "JSON" if json else "msgpack"
        raise ProtocolError(
            "bad_frame", f"frame is not valid {encoding}: nested too deeply"
        ) from None
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            "bad_frame", f"frame is not valid msgpack: a string is not UTF-8 ({exc.reason})"
        ) from None


def decode_server_message(payload: bytes, *, json: bool = False) -> ServerMessage:
    try:
        return _server_decoder(json).decode(payload)
    # RecursionError, UnicodeDecodeError: as in decode_request (clients must not crash either).
    except (
        msgspec.ValidationError,
        msgspec.DecodeError,
        RecursionError,
        UnicodeDecodeError,
    ) as exc:
        raise ProtocolError(
            "bad_frame", f"unreadable message from llamad: {one_line(str(exc))}"
        ) from None
