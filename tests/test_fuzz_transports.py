"""Fuzzing both transports against a real llamad (and the frame codec without one).

Hostile input goes to the Unix socket (length-prefixed msgpack) and to the
WebSocket (JSON text, msgpack binary, raw WebSocket frames): random bytes,
truncated frames, huge and zero length prefixes, well-formed msgpack/JSON of
the wrong shape, and every request type of ``llamad.protocol.Request`` mutated
from its msgspec definition (a field of the wrong type, a required field
dropped, unknown fields, a wrong tag). The properties:

- llamad never dies;
- every bad input gets one ``error`` reply (one readable line, no traceback,
  never ``internal``) or closes that connection only; valid requests in the mix
  get their normal answers;
- two well-behaved clients, one per transport, connected the whole time, see
  no disturbance: their chats (``ignore_eos``) stream every delta intact, their
  ``status`` calls are answered, no state changes, no disconnection.

The runs are derandomized, so CI is repeatable. More cases on demand::

    LLAMAD_FUZZ_EXAMPLES=50000 .venv/bin/python -m pytest tests/test_fuzz_transports.py
    LLAMAD_FUZZ_EXAMPLES=50000 LLAMAD_FUZZ_SEED=1234 ...   # a chosen seed

``LLAMAD_FUZZ_EXAMPLES`` is the total over the file, shared out by the same
proportions as CI; with it the runs are random and the seed is printed.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import itertools
import json
import os
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, assume, given, note, seed, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    TextMessage,
)
from wsproto.events import Request as WSRequest

from llamad.protocol import (
    HEADER_BYTES,
    MAX_FRAME_BYTES,
    Cancel,
    Chat,
    ChatDelta,
    ChatDone,
    ChatOptions,
    ChatStarted,
    ContextTrimmed,
    ConversationReply,
    Conversations,
    DeleteConversation,
    Error,
    Exported,
    FrameDecoder,
    GetConversation,
    HealthReply,
    ListConversations,
    Load,
    Loaded,
    LogLine,
    LogLines,
    Logs,
    Ok,
    ProtocolError,
    QueuePosition,
    Reload,
    Request,
    Restart,
    SearchResults,
    ServerMessage,
    StateChanged,
    Status,
    StatusReply,
    Subscribe,
    Unload,
    Watch,
    decode_request,
    decode_server_message,
    encode,
    encode_json,
    frame,
)
from tests.conftest import Llamad, demo_config, ready_daemon

MakeLlamad = Callable[..., Llamad]

# Reporting a failing example with a 200 kB payload warns; the failure is what matters.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

# ------------------------------------------------------------------ settings

EXAMPLES_ENV = "LLAMAD_FUZZ_EXAMPLES"
FUZZ_TIMEOUT_SEC = 5.0  # an answer later than this is a hang (and shrinking pays it per try)
SEED_ENV = "LLAMAD_FUZZ_SEED"
# The CI share of each test; LLAMAD_FUZZ_EXAMPLES scales them to its total.
CI_EXAMPLES = {
    "codec": 400,
    "decode": 600,
    "unix": 1000,
    "websocket": 900,
}

settings.register_profile(
    "llamad-fuzz",
    deadline=None,  # a real daemon answers; timing is not the property
    database=None,  # derandomized in CI: nothing to remember between runs
    derandomize=True,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=False,
)


def _fuzz_seed() -> int | None:
    """None in CI (derandomized); else one seed for the whole run, from the env or random."""
    if os.environ.get(EXAMPLES_ENV) is None and os.environ.get(SEED_ENV) is None:
        return None
    return int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))


FUZZ_SEED = _fuzz_seed()


def fuzz(kind: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The hypothesis settings (and seed) of one fuzz loop."""
    total = os.environ.get(EXAMPLES_ENV)
    examples = CI_EXAMPLES[kind]
    if total is not None:
        examples = max(1, int(total) * examples // sum(CI_EXAMPLES.values()))
    chosen = FUZZ_SEED
    profile = settings(
        settings.get_profile("llamad-fuzz"), max_examples=examples, derandomize=chosen is None
    )

    def apply(test: Callable[..., None]) -> Callable[..., None]:
        test = profile(test)
        if chosen is None:
            return test
        seeded = seed(chosen)(test)

        @functools.wraps(seeded)
        def announced(*args: Any, **kwargs: Any) -> None:
            # Shown with the failure (pytest prints a failing test's captured stderr).
            print(f"fuzz seed: {SEED_ENV}={chosen} {EXAMPLES_ENV}={total}", file=sys.stderr)
            seeded(*args, **kwargs)

        return announced

    return apply


# ---------------------------------------------------------------- strategies

REQUEST_TYPES: tuple[type[Any], ...] = get_args(Request)
TAGS = [mi.type_info(cls).tag for cls in REQUEST_TYPES]
KNOWN_MODELS = frozenset({"demo", "demo-b"})
MAX_INT = 2**64 - 1
MIN_INT = -(2**63)

# Strings an error message might quote back: line breaks, NULs, huge ones.
nasty_text = st.sampled_from(["\n", "a\r\nb", "\x00", "\u2028", "\x1b[2J", "x" * 5000, "\t"])
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(MIN_INT, MAX_INT)
    | st.floats()
    | st.text(max_size=20)
    | nasty_text
    | st.sampled_from(TAGS)
)
# Anything msgpack can carry (bytes, int keys); JSON: no bytes, str keys, any int.
msgpack_values = st.recursive(
    _scalars | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=12,
)
json_values = st.recursive(
    _scalars | st.integers(-(10**30), 10**30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _valid(t: mi.Type) -> st.SearchStrategy[Any]:
    """Values of the msgspec type ``t``, as they travel (dicts for Structs)."""
    match t:
        case mi.StrType():
            return (
                st.sampled_from(["demo", "demo-b", "", "0", "01"])
                | st.text(max_size=12)
                | nasty_text
            )
        case mi.IntType():
            return st.integers(-3, 200) | st.integers(MIN_INT, 2**63 - 1)
        case mi.FloatType():
            return st.floats(allow_nan=False, allow_infinity=False)
        case mi.BoolType():
            return st.booleans()
        case mi.BytesType():
            return st.binary(max_size=64)
        case mi.NoneType():
            return st.none()
        case mi.LiteralType(values=values):
            return st.sampled_from(values)
        case mi.ListType(item_type=item):
            return st.lists(_valid(item), max_size=3)
        case mi.UnionType(types=types):
            return st.one_of([_valid(member) for member in types])
        case mi.StructType():
            return _struct_dicts(t)
    raise AssertionError(f"no strategy for {t}")


def _struct_dicts(info: mi.StructType) -> st.SearchStrategy[dict[Any, Any]]:
    required = {f.encode_name: _valid(f.type) for f in info.fields if f.required}
    optional = {f.encode_name: _valid(f.type) for f in info.fields if not f.required}
    base = st.fixed_dictionaries(required, optional=optional)
    if info.tag_field is not None:
        tag_field, tag = info.tag_field, info.tag
        return base.map(lambda d: {tag_field: tag, **d})
    return base


# A valid request of each type as a dict, for every type in the Request union.
valid_request_dicts = st.one_of([_struct_dicts(mi.type_info(cls)) for cls in REQUEST_TYPES])


@st.composite
def mutated_requests(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> Any:
    """A request dict with one to three things wrong (sometimes still valid)."""
    request: dict[Any, Any] = dict(draw(valid_request_dicts))
    for _ in range(draw(st.integers(1, 3))):
        keys = sorted(request, key=str)
        match draw(st.sampled_from(["wrong_type", "drop", "unknown", "tag", "nest"])):
            case "wrong_type" if keys:
                request[draw(st.sampled_from(keys))] = draw(values)
            case "drop" if keys:
                del request[draw(st.sampled_from(keys))]
            case "unknown":
                request[draw(st.text(max_size=10))] = draw(values)
            case "tag":
                request["type"] = draw(
                    st.sampled_from(TAGS) | st.text(max_size=10) | nasty_text | values
                )
            case "nest" if keys:  # a field's valid value wrapped in a list or map
                key = draw(st.sampled_from(keys))
                request[key] = draw(st.sampled_from([[request[key]], {"value": request[key]}]))
            case _:
                pass
    if draw(st.integers(0, 9)) == 0:  # sometimes not a map at all
        return draw(st.sampled_from([list(request.values()), list(request.items())]))
    return request


def msgpack_bytes(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


def json_text(value: Any) -> str:
    # The standard library writes big ints and NaN/Infinity (not JSON: more bad input);
    # bytes travel as base64 in JSON, as msgspec expects them.
    return json.dumps(value, ensure_ascii=False, default=lambda b: base64.b64encode(b).decode())


# msgspec gives up at Python's recursion limit, counted from the caller's own
# stack depth: whether ~1000 levels decode depends on who decodes. The fuzz
# stays clear of that band, where this test and llamad may rightly disagree.
_depths = st.integers(1, 100) | st.integers(5_000, 200_000)


def _deep(depth: int, json_: bool) -> bytes:
    if json_:
        return b'{"type":"status","id":1,"x":' + b"[" * depth + b"]" * depth + b"}"
    return b"\x83\xa4type\xa6status\xa2id\x01\xa1x" + b"\x91" * depth + b"\xc0"


@st.composite
def flipped(draw: st.DrawFn, body: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding with a few bytes overwritten (e.g. inside a string: not UTF-8)."""
    data = bytearray(draw(body))
    for _ in range(draw(st.integers(1, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


msgpack_payloads = st.one_of(
    mutated_requests(msgpack_values).map(msgpack_bytes),
    flipped(valid_request_dicts.map(msgpack_bytes)),
    msgpack_values.map(msgpack_bytes),
    st.binary(max_size=64),
    valid_request_dicts.map(msgpack_bytes),
    _depths.map(lambda depth: _deep(depth, json_=False)),
)
json_payloads = st.one_of(
    mutated_requests(json_values).map(json_text),
    json_values.map(json_text),
    st.text(max_size=64),
    valid_request_dicts.map(json_text),
    _depths.map(lambda depth: _deep(depth, json_=True).decode()),
)


# ------------------------------------------------------------------ the oracle


def predict(payload: bytes, *, json_: bool) -> Request | ProtocolError:
    """What llamad will make of one message: the same decoder it uses."""
    try:
        return decode_request(payload, json=json_)
    except ProtocolError as exc:
        return exc


def disruptive(request: Request) -> bool:
    """Valid requests that would change the daemon's state under the bystanders."""
    match request:
        case Load(model=model) | Restart(model=model) | Chat(model=model):
            return model is None or model in KNOWN_MODELS  # else: unknown_model, no change
        case Unload() | Reload() | Cancel() | DeleteConversation():
            return True
    return False


STREAMING = (Subscribe, Watch)
FINAL = (Ok, Error, StatusReply, Loaded, HealthReply, LogLines, Conversations)
FINAL += (ConversationReply, SearchResults, Exported)
EVENTS = (StateChanged, LogLine, ChatStarted, QueuePosition, ContextTrimmed, ChatDelta, ChatDone)


def streams(request: Request) -> bool:
    return isinstance(request, STREAMING) or (isinstance(request, Logs) and request.follow)


def check_reply(message: ServerMessage) -> None:
    """Whatever llamad sends, to anyone: readable, and never a bug."""
    if isinstance(message, Error):
        assert message.code != "internal", message
        assert message.message and "\n" not in message.message, message
        assert "Traceback" not in message.message, message
        assert len(message.message) < 2000, message


# ------------------------------------------------------- a small sync WebSocket


class WSClosed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"WebSocket closed with code {code}")
        self.code = code


class SyncWebSocket:
    """A blocking WebSocket client (wsproto) that can also send raw bytes."""

    def __init__(self, address: str, token: str, timeout: float = 20.0) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._events: deque[Any] = deque()
        self._parts: list[Any] = []
        self.close_code: int | None = None
        self.sock.sendall(self.ws.send(WSRequest(host=address, target=f"/?token={token}")))
        event = self._next_event()
        assert not isinstance(event, RejectConnection), f"handshake refused: {event.status_code}"
        assert isinstance(event, AcceptConnection), event

    def _next_event(self) -> Any:
        while not self._events:
            if self.close_code is not None:
                raise WSClosed(self.close_code)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            self.ws.receive_data(data or None)
            self._events.extend(self.ws.events())
        return self._events.popleft()

    def send(self, data: str | bytes, fragments: int = 1) -> None:
        size = max(1, -(-len(data) // fragments))
        pieces = [data[i : i + size] for i in range(0, len(data), size)] or [data]
        out = b""
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            if isinstance(piece, str):
                out += self.ws.send(TextMessage(data=piece, message_finished=last))
            else:
                out += self.ws.send(BytesMessage(data=piece, message_finished=last))
        self.sock.sendall(out)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> str | bytes:
        """The next whole message; ``WSClosed`` once llamad closed the connection."""
        while True:
            event = self._next_event()
            if isinstance(event, Ping):
                with contextlib.suppress(Exception):
                    self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.close_code = event.code
                with contextlib.suppress(Exception):
                    self.sock.sendall(self.ws.send(event.response()))
                raise WSClosed(event.code)
            elif isinstance(event, TextMessage | BytesMessage):
                self._parts.append(event.data)
                if event.message_finished:
                    parts, self._parts = self._parts, []
                    return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)

    def close(self) -> None:
        self.sock.close()


def raw_ws_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """One WebSocket frame written by hand (so it may break the rules)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if masked else 0
    if len(payload) < 126:
        head += bytes([bit | len(payload)])
    elif len(payload) < 65536:
        head += bytes([bit | 126]) + struct.pack(">H", len(payload))
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", len(payload))
    if not masked:
        return head + payload
    key = b"\x1f\x2e\x3d\x4c"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


# ------------------------------------------------------------- the bystanders


@dataclass
class Bystander:
    """A well-behaved client: subscribed to everything, chatting and asking status.

    Runs in a thread for the whole fuzz loop; whatever goes wrong lands in
    ``problems`` (it must stay empty).
    """

    send: Callable[[Request], None]
    recv: Callable[[], ServerMessage]
    name: str
    stop: threading.Event = field(default_factory=threading.Event)
    problems: list[str] = field(default_factory=list)
    chats: int = 0
    statuses: int = 0
    last_case: list[object] = field(default_factory=lambda: [None])
    thread: threading.Thread | None = None

    MAX_TOKENS = 40
    PAUSE_SEC = 0.2  # between rounds: leave the 2-core CI machine to the fuzzing

    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self.thread.start()

    def finish(self) -> None:
        deadline = time.monotonic() + 20  # a short run: let it finish two rounds at least
        while self.chats < 2 and not self.problems and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), f"{self.name} hung"
        assert not self.problems, f"{self.name} was disturbed: {self.problems}"
        assert self.chats >= 2 and self.statuses >= 2, (self.name, self.chats, self.statuses)
        print(f"{self.name}: {self.chats} chats, {self.statuses} status calls", file=sys.stderr)

    def _problem(self, what: str) -> None:
        self.problems.append(f"{what} (last fuzz input: {self.last_case[0]!r:.300})")

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self._problem(f"{type(exc).__name__}: {exc}")

    def _run(self) -> None:
        self.send(Subscribe(id=1, topics=["state", "log"]))
        first = self._next()
        if first != Ok(id=1, message="subscribed"):
            self._problem(f"subscribe answered {first!r}")
        ids = itertools.count(2)
        while not self.stop.is_set() and not self.problems:
            chat_id, status_id = next(ids), next(ids)
            options = ChatOptions(max_tokens=self.MAX_TOKENS, ignore_eos=True, seed=chat_id)
            self.send(Chat(id=chat_id, content=f"count to {chat_id}", options=options))
            self.send(Status(id=status_id))
            self._exchange(chat_id, status_id)
            self.stop.wait(self.PAUSE_SEC)

    def _next(self) -> ServerMessage:
        while True:
            message = self.recv()
            check_reply(message)
            if isinstance(message, LogLine) and message.id == 1:
                continue  # llama-server's request log: fine
            if isinstance(message, StateChanged) and message.id == 1:
                # Counters (waiting, in_flight) move with every chat; the state must not.
                if (message.model.name, message.model.state) != ("demo", "ready"):
                    self._problem(f"state changed: {message.model}")
                continue
            return message

    def _exchange(self, chat_id: int, status_id: int) -> None:
        started: ChatStarted | None = None
        text = ""
        done = status = False
        while not (done and status):
            message = self._next()
            match message:
                case StatusReply(id=rid) if rid == status_id and not status:
                    status = True
                    self.statuses += 1
                    demo = next(m for m in message.models if m.name == "demo")
                    if not demo.expected or demo.state != "ready":
                        self._problem(f"status changed: {message}")
                case ChatStarted(id=rid) if rid == chat_id and started is None:
                    started = message
                case QueuePosition(id=rid) | ContextTrimmed(id=rid) if rid == chat_id:
                    pass
                case ChatDelta(id=rid) if rid == chat_id and started is not None:
                    if message.seq != started.reply_seq:
                        self._problem(f"delta of seq {message.seq}, not {started.reply_seq}")
                    if message.conversation != started.conversation.id:
                        self._problem(f"delta for {message.conversation}")
                    text += message.text
                case ChatDone(id=rid) if rid == chat_id and started is not None and not done:
                    done = True
                    self.chats += 1
                    reply = message.message
                    tokens = reply.stats.completion_tokens if reply.stats else None
                    if (
                        reply.status != "complete"
                        or reply.seq != started.reply_seq
                        or reply.text != text
                        or tokens != self.MAX_TOKENS
                    ):
                        self._problem(f"chat ended {reply!r}; the deltas said {text!r}")
                case _:
                    self._problem(f"unexpected {message!r}")
                    return


class UnixConnection:
    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.decoder = FrameDecoder()
        self.pending: deque[bytes] = deque()
        self.eof = False

    def send(self, request: Request) -> None:
        self.sock.sendall(frame(encode(request)))

    def recv_payload(self) -> bytes | None:
        """The next frame body, or None at EOF."""
        while not self.pending:
            if self.eof:
                return None
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                assert not self.decoder.in_frame, "llamad closed in the middle of a frame"
                return None
            self.pending.extend(self.decoder.feed(data))
        return self.pending.popleft()

    def recv(self) -> ServerMessage:
        payload = self.recv_payload()
        if payload is None:
            raise ConnectionError("llamad closed the connection")
        return decode_server_message(payload)

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def bystanders(daemon: Llamad, address: str, token: str) -> Iterator[list[Bystander]]:
    """One well-behaved client per transport, for the length of the block."""
    unix = UnixConnection(daemon.socket_path)
    ws = SyncWebSocket(address, token)

    def ws_send(request: Request) -> None:
        ws.send(encode_json(request).decode())

    def ws_recv() -> ServerMessage:
        data = ws.recv()
        assert isinstance(data, str), "a JSON request got a binary answer"
        return decode_server_message(data.encode(), json=True)

    clients = [
        Bystander(unix.send, unix.recv, "unix bystander"),
        Bystander(ws_send, ws_recv, "websocket bystander"),
    ]
    for client in clients:
        client.start()
    try:
        yield clients
        for client in clients:
            client.finish()
    finally:
        for client in clients:
            client.stop.set()
        unix.close()
        ws.close()


def fuzz_daemon(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> tuple[Llamad, str, str]:
    daemon = ready_daemon(make_llamad, demo_models)
    with daemon.client() as client:
        reply = client.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply) and reply.websocket is not None
    return daemon, reply.websocket, (daemon.runtime_dir / "token").read_text().strip()


def assert_alive(daemon: Llamad) -> None:
    assert daemon.process is not None
    assert daemon.process.poll() is None, f"llamad died:\n{daemon.log()[-3000:]}"


def assert_clean_log(daemon: Llamad) -> None:
    """A client's failure is logged with its traceback: there must be none."""
    log = daemon.log()
    assert "Traceback" not in log, log[-5000:]


# ------------------------------------------------------- pure: the frame codec


@fuzz("codec")
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(0, 3000), max_size=20),
)
def test_any_chunking_of_a_frame_stream_decodes_the_same(
    payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(frame(p) for p in payloads)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    decoder = FrameDecoder(max_frame=300)
    got: list[bytes] = []
    boundaries = set(itertools.accumulate(HEADER_BYTES + len(p) for p in payloads))
    for start, end in itertools.pairwise(bounds):
        got += decoder.feed(stream[start:end])
        assert decoder.in_frame == (end not in boundaries and end != 0)
    assert got == payloads
    assert not decoder.in_frame


@fuzz("codec")
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=10))
def test_garbage_only_ever_raises_protocol_error(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_frame=256)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    try:
        for start, end in itertools.pairwise(bounds):
            for payload in decoder.feed(data[start:end]):
                assert len(payload) <= 256
                predict(payload, json_=False)
    except ProtocolError as exc:
        assert exc.code == "bad_frame" and "exceeds" in str(exc)


@fuzz("decode")
@given(payload=msgpack_payloads, text=json_payloads)
def test_decode_request_fails_only_with_one_readable_line(payload: bytes, text: str) -> None:
    for body, json_ in ((payload, False), (text.encode(), True)):
        result = predict(body, json_=json_)
        if isinstance(result, ProtocolError):
            assert result.code in ("bad_frame", "bad_request")
            message = str(result)
            assert message and "\n" not in message and len(message) < 500, message
            check_reply(Error(id=result.request_id, code=result.code, message=message))
            # The reply itself must encode, in either encoding.
            encode(Error(id=result.request_id, code=result.code, message=message))
            encode_json(Error(id=result.request_id, code=result.code, message=message))


def test_frames_before_an_oversized_header_come_out_first() -> None:
    """Regression: one chunk of [frame, huge header] lost the frame (found by fuzzing)."""
    decoder = FrameDecoder(max_frame=16)
    chunk = frame(b"ok") + struct.pack(">I", 17)
    assert decoder.feed(chunk) == [b"ok"]
    with pytest.raises(ProtocolError) as info:
        decoder.feed(b"")
    assert info.value.code == "bad_frame"


@pytest.mark.parametrize("json_", [False, True])
def test_deep_nesting_is_a_bad_frame_not_a_recursion_error(json_: bool) -> None:
    """Regression: msgspec's RecursionError escaped decode_request (found by fuzzing)."""
    with pytest.raises(ProtocolError) as info:
        decode_request(_deep(100_000, json_), json=json_)
    assert info.value.code == "bad_frame" and "nested too deeply" in str(info.value)
    # A wrong id plus deep nesting: the id salvage must not blow up either.
    body = (
        b'{"type":"status","id":"x","z":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        if json_
        else b"\x83\xa4type\xa6status\xa2id\xa1x\xa1z" + b"\x91" * 100_000 + b"\xc0"
    )
    with pytest.raises(ProtocolError) as info:
        decode_request(body, json=json_)
    assert info.value.code == "bad_request"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"\xa1\xff", "bad_request"),  # not a map: the id salvage met the bad string
        (b"\x83\xa4type\xa4load\xa2id\x01\xa5model\xa2\xff\xfe", "bad_frame"),
    ],
)
def test_msgpack_string_not_utf8_is_a_protocol_error(body: bytes, code: str) -> None:
    """Regression: msgspec's UnicodeDecodeError escaped decode_request (found by fuzzing)."""
    with pytest.raises(ProtocolError) as info:
        decode_request(body)
    assert info.value.code == code
    with pytest.raises(ProtocolError):
        decode_server_message(body)


def test_error_messages_quoting_client_values_stay_one_short_line() -> None:
    """Regression: msgspec quotes the bad value, newlines and all (found by fuzzing)."""
    body = msgspec.msgpack.encode({"type": "subscribe", "id": 3, "topics": ["a\nb" * 10_000]})
    with pytest.raises(ProtocolError) as info:
        decode_request(body)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400 and "\\n" in message
    assert info.value.request_id == 3


# ------------------------------------------------------ the Unix socket, live


@dataclass(frozen=True)
class UnixCase:
    pieces: list[bytes]  # what is written, one sendall each
    describe: str


def _frame_items() -> st.SearchStrategy[bytes]:
    body = msgpack_payloads
    return st.one_of(
        body.map(frame),  # a whole frame of anything
        st.binary(min_size=1, max_size=40),  # bytes that are not a frame
        st.integers(MAX_FRAME_BYTES + 1, 2**32 - 1).map(lambda n: struct.pack(">I", n)),
        st.just(struct.pack(">I", 0)),  # an empty frame
        st.tuples(body.map(frame), st.integers(1, 64)).map(lambda t: t[0][: -t[1]]),  # cut short
        st.integers(1, MAX_FRAME_BYTES).map(lambda n: struct.pack(">I", n) + b"\x80"),
        valid_request_dicts.map(lambda d: frame(msgpack_bytes(d))),
    )


@st.composite
def unix_cases(draw: st.DrawFn) -> UnixCase:
    stream = b"".join(draw(st.lists(_frame_items(), min_size=1, max_size=4)))
    cuts = sorted(
        {c % (len(stream) + 1) for c in draw(st.lists(st.integers(0, 10**6), max_size=4))}
    )
    bounds = [0, *cuts, len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    return UnixCase(pieces, f"{len(stream)} bytes in {len(pieces)} writes: {stream[:200]!r}")


@dataclass
class Prediction:
    valid: list[Request]
    error: ProtocolError | None  # the error that ends the connection (bad_frame), if any
    complete: bool  # the stream ends on a frame boundary
    # Whole frames that are not valid requests: answered bad_request, the connection stays open.
    invalid: list[ProtocolError] = field(default_factory=list)


def predict_stream(stream: bytes) -> Prediction:
    """What llamad makes of a byte stream, worked out independently of FrameDecoder."""
    valid: list[Request] = []
    invalid: list[ProtocolError] = []
    pos = 0
    while len(stream) - pos >= HEADER_BYTES:
        (length,) = struct.unpack_from(">I", stream, pos)
        if length > MAX_FRAME_BYTES:
            return Prediction(valid, ProtocolError("bad_frame", "too large"), False, invalid)
        end = pos + HEADER_BYTES + length
        if end > len(stream):
            break
        result = predict(stream[pos + HEADER_BYTES : end], json_=False)
        pos = end
        if isinstance(result, ProtocolError):
            if result.code == "bad_request":  # the stream is still in sync
                invalid.append(result)
                continue
            return Prediction(valid, result, False, invalid)
        valid.append(result)
    return Prediction(valid, None, pos == len(stream), invalid)


def run_unix_case(daemon: Llamad, case: UnixCase) -> None:
    prediction = predict_stream(b"".join(case.pieces))
    assume(not any(disruptive(r) for r in prediction.valid))
    ids = {r.id for r in prediction.valid}
    answered: dict[int, int] = {}
    wanted = {i: sum(1 for r in prediction.valid if r.id == i) for i in ids}
    refusals = Counter(("bad_request", e.request_id) for e in prediction.invalid)
    refused: Counter[tuple[str, int | None]] = Counter()
    connection = UnixConnection(daemon.socket_path, timeout=FUZZ_TIMEOUT_SEC)
    messages: list[ServerMessage] = []
    try:
        for piece in case.pieces:
            try:
                connection.sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                assert prediction.error is not None, "llamad hung up on a good stream"
                break
        if prediction.error is None:
            # Valid requests are answered while the connection is open...
            # ...and so are frames that are not valid requests, each with bad_request.
            while any(answered.get(i, 0) < n for i, n in wanted.items()) or refused != refusals:
                message = connection.recv()
                check_reply(message)
                messages.append(message)
                if (
                    isinstance(message, Error)
                    and refused[(message.code, message.id)] < (refusals[(message.code, message.id)])
                ):
                    refused[(message.code, message.id)] += 1
                    continue
                assert message.id in ids, message
                if isinstance(message, FINAL):
                    answered[message.id] = answered.get(message.id, 0) + 1
            # ...and a client hanging up (maybe mid-frame) just ends the connection.
            connection.sock.shutdown(socket.SHUT_WR)
        while (payload := connection.recv_payload()) is not None:
            message = decode_server_message(payload)
            check_reply(message)
            messages.append(message)
    finally:
        connection.close()
    # The one error that ends the connection, if the stream has one; every other
    # message answers one of the valid requests that came before it.
    expected = None
    if prediction.error is not None:
        expected = (prediction.error.code, prediction.error.request_id)
        errors = [(m.code, m.id) for m in messages if isinstance(m, Error)]
        assert expected in errors, (expected, messages)
    for message in messages:
        is_the_error = isinstance(message, Error) and (message.code, message.id) == expected
        is_a_refusal = isinstance(message, Error) and (message.code, message.id) in refusals
        assert is_the_error or is_a_refusal or message.id in ids, (message, prediction)


@pytest.mark.server
def test_fuzz_unix_socket(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    daemon, address, token = fuzz_daemon(make_llamad, demo_models)
    began = time.monotonic()
    with bystanders(daemon, address, token) as watching:
        count = itertools.count()

        @fuzz("unix")
        @given(case=unix_cases())
        def fuzz_unix(case: UnixCase) -> None:
            note(case.describe)
            next(count)
            for client in watching:
                client.last_case[0] = case.describe
            run_unix_case(daemon, case)
            assert_alive(daemon)

        fuzz_unix()
    print(f"unix: {next(count)} inputs in {time.monotonic() - began:.1f} s", file=sys.stderr)
    assert_alive(daemon)
    assert_clean_log(daemon)


@pytest.mark.server
def test_bad_values_in_well_typed_requests_get_one_line_errors(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    """Regressions found by fuzzing, each answered on a connection that stays open.

    ``limit`` 0 reached the history store's ValueError and came back ``internal``
    with a traceback in the log; a 5,000-character model name came back whole.
    """
    daemon = make_llamad(demo_config(demo_models))
    daemon.start()
    connection = UnixConnection(daemon.socket_path)
    try:
        for request in (
            ListConversations(id=1, limit=0),
            GetConversation(id=2, conversation="0", limit=-5),
            Load(id=3, model="x\n" * 5000),
        ):
            connection.send(request)
            reply = connection.recv()
            assert isinstance(reply, Error) and reply.id == request.id, reply
            assert reply.code == ("unknown_model" if isinstance(request, Load) else "bad_request")
            check_reply(reply)
            assert len(reply.message) <= 1000
        connection.send(Status(id=4))
        assert isinstance(connection.recv(), StatusReply)
    finally:
        connection.close()
    assert_clean_log(daemon)


# ---------------------------------------------------------- the WebSocket, live


@dataclass(frozen=True)
class WSMessage:
    kind: str  # "text", "binary": a protocol message; "raw", "bad_utf8": breaks WebSocket
    data: str | bytes
    fragments: int = 1


def _ws_messages() -> st.SearchStrategy[WSMessage]:
    return st.one_of(
        st.builds(WSMessage, st.just("text"), json_payloads, st.integers(1, 3)),
        st.builds(WSMessage, st.just("binary"), msgpack_payloads, st.integers(1, 3)),
    )


def _ws_breakers() -> st.SearchStrategy[WSMessage]:
    """Input that is not valid WebSocket: llamad may close the connection for it."""
    return st.one_of(
        st.builds(WSMessage, st.just("raw"), st.binary(min_size=1, max_size=64)),
        st.builds(
            WSMessage,
            st.just("raw"),
            st.tuples(
                st.integers(0, 15), st.binary(max_size=200), st.booleans(), st.booleans()
            ).map(lambda t: raw_ws_frame(t[0], t[1], fin=t[2], masked=t[3])),
        ),
        st.builds(
            WSMessage,
            st.just("bad_utf8"),
            st.sampled_from([b"\xff", b"\xc3", b'{"type":"status","id":1,"x":"\xed\xa0\x80"}']),
        ),
    )


@st.composite
def ws_cases(draw: st.DrawFn) -> list[WSMessage]:
    messages = draw(st.lists(_ws_messages(), min_size=1, max_size=4))
    if draw(st.integers(0, 5)) == 0:
        messages.append(draw(_ws_breakers()))
    return messages


def run_ws_case(daemon: Llamad, address: str, token: str, case: list[WSMessage]) -> None:
    predictions: list[Request | ProtocolError | None] = []
    for message in case:
        if message.kind in ("text", "binary"):
            body = message.data.encode() if isinstance(message.data, str) else message.data
            result = predict(body, json_=message.kind == "text")
            assume(isinstance(result, ProtocolError) or not disruptive(result))
            predictions.append(result)
        else:
            predictions.append(None)
    connection = SyncWebSocket(address, token, timeout=FUZZ_TIMEOUT_SEC)
    streaming: set[tuple[int, bool]] = set()  # (id, JSON?) of subscriptions made

    def answer(text: bool) -> ServerMessage:
        """The next answer that is not an event of an earlier subscription."""
        while True:
            data = connection.recv()
            is_text = isinstance(data, str)
            reply = decode_server_message(data.encode() if is_text else data, json=is_text)
            check_reply(reply)
            if isinstance(reply, EVENTS) and (reply.id, is_text) in streaming:
                continue
            assert is_text == text, "the reply's encoding differs from the request's"
            return reply

    try:
        for message, prediction in zip(case, predictions, strict=True):
            if prediction is None:  # breaks the WebSocket protocol: llamad closes, or carries on
                if message.kind == "bad_utf8":
                    connection.send_raw(raw_ws_frame(0x1, bytes(message.data)))  # type: ignore[arg-type]
                else:
                    connection.send_raw(bytes(message.data))  # type: ignore[arg-type]
                connection.sock.shutdown(socket.SHUT_WR)
                with contextlib.suppress(WSClosed):
                    while True:
                        data = connection.recv()
                        reply = decode_server_message(
                            data.encode() if isinstance(data, str) else data,
                            json=isinstance(data, str),
                        )
                        check_reply(reply)
                if message.kind == "bad_utf8":
                    assert connection.close_code in (1007, 1006), connection.close_code
                return
            connection.send(message.data, message.fragments)
            reply = answer(message.kind == "text")
            if isinstance(prediction, ProtocolError):
                # A bad message gets one error and the connection stays open.
                assert isinstance(reply, Error), (reply, prediction)
                assert (reply.code, reply.id) == (prediction.code, prediction.request_id), (
                    reply,
                    prediction,
                )
            else:
                assert reply.id == prediction.id and isinstance(reply, FINAL), (reply, prediction)
                if streams(prediction):
                    streaming.add((prediction.id, message.kind == "text"))
        # Still open and in step after all that.
        connection.send(encode_json(Status(id=-7)).decode())
        assert answer(True).id == -7
    finally:
        connection.close()


@pytest.mark.server
def test_fuzz_websocket(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    daemon, address, token = fuzz_daemon(make_llamad, demo_models)
    began = time.monotonic()
    with bystanders(daemon, address, token) as watching:
        count = itertools.count()

        @fuzz("websocket")
        @given(case=ws_cases())
        def fuzz_ws(case: list[WSMessage]) -> None:
            note(repr(case)[:2000])
            next(count)
            for client in watching:
                client.last_case[0] = case
            run_ws_case(daemon, address, token, case)
            assert_alive(daemon)

        fuzz_ws()
    print(f"websocket: {next(count)} inputs in {time.monotonic() - began:.1f} s", file=sys.stderr)
    assert_alive(daemon)
    assert_clean_log(daemon)
