"""What each stage of the relay costs per token, counted in instructions.

Wall time is too noisy on a shared 2-core machine, and llama-server's pacing
decides how many tokens each read brings. So this runs llamad's own relay
code in one process against an in-process upstream that writes one SSE event
per HTTP chunk, in llama-server's exact format, and waits until the reader has
taken it before writing the next: every read carries exactly one token, the
worst case and the real one (llama-server writes each token as it is made).

Stages, each a superset of the one before where it says ``+``:

- ``raw``: trio's ``receive_some`` on the upstream socket (the floor);
- ``httpx``: ``upstream.stream_chat`` (httpx, SSE, chunk decoding);
- ``direct``: ``upstream.stream_chat_direct`` (no httpx);
- ``direct+hub``: + a ``ChatDelta`` published on the ``EventHub``, a subscriber
  task taking ``batches()`` and sending each event as the control socket
  does (``dispatch._event_message``, the Unix transport's peer: msgpack,
  frame, lock, send timeout) to a client socket that another task reads;
- ``httpx+hub``: the same on top of ``httpx``;
- ``direct+hub+ws``: as ``direct+hub``, but sent through the WebSocket
  transport's peer (msgpack, trio-websocket) to a WebSocket client.

With ``--callgrind`` each stage runs under ``valgrind --tool=callgrind`` twice
(``--tokens`` and a tenth of it) and the difference gives instructions per
token, free of start-up costs; without it, CPU µs per token (``process_time``).

    .venv/bin/python -m bench.relay_cost [--tokens 2000] [--callgrind] [--stages raw,httpx]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio

if TYPE_CHECKING:
    from llamad.dispatch import Peer

STAGES = ("raw", "httpx", "direct", "httpx+hub", "direct+hub", "direct+hub+ws")
WORDS = [" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", "."]
_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nX-Accel-Buffering: no\r\n"
    b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"Keep-Alive: timeout=5, max=100\r\n\r\n"
)


def _event(payload: str) -> bytes:
    event = b"data: " + payload.encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _token_chunk(word: str) -> bytes:
    body = msgspec.json.encode(
        {
            "choices": [{"finish_reason": None, "index": 0, "delta": {"content": word}}],
            "created": 1796085992,
            "id": "chatcmpl-JDEsySW7U39AhhsgUEW1ZLGY3ATgtcNo",
            "model": "demo.gguf",
            "system_fingerprint": "b0-unknown",
            "object": "chat.completion.chunk",
        }
    ).decode()
    return _event(body)


TOKEN_CHUNKS = [_token_chunk(w) for w in WORDS]
ROLE = _event(
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}]}'
)
FINAL = (
    _event(
        '{"choices":[{"finish_reason":"length","index":0,"delta":{}}],"timings":{"predicted_n":1}}'
    )
    + _event("[DONE]")
    + b"0\r\n\r\n"
)


async def _upstream(listener: trio.SocketListener, tokens: int, taken: list[trio.Event]) -> None:
    """Answer one request: one token per chunk, each after the reader took the last."""
    stream = await listener.accept()
    async with stream:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(65536)
        # The head and the role chunk go with the first token, as one read.
        first = _HEAD + ROLE
        for n in range(tokens):
            await stream.send_all(first + TOKEN_CHUNKS[n % len(TOKEN_CHUNKS)])
            first = b""
            await taken[n].wait()
        await stream.send_all(FINAL)


async def _raw_chunks(path: str) -> AsyncIterator[bytes]:
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        while data := await stream.receive_some(65536):
            if data.endswith(b"\r\n0\r\n\r\n"):
                return
            yield data


def _reader(stage: str, path: Path) -> Callable[[], AsyncIterator[object]]:
    from llamad import upstream
    from llamad.llama_server import Endpoint
    from llamad.supervisor import http_client

    payload = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    endpoint = Endpoint(socket_path=path)
    if stage == "raw":
        return lambda: _raw_chunks(str(path))
    if stage.startswith("direct"):  # looked up here: older trees (--variant) lack it
        return lambda: upstream.stream_chat_direct(endpoint, payload)

    async def through_httpx() -> AsyncIterator[object]:
        async with http_client(endpoint, timeout=10.0, keepalive=False) as client:
            async for chunk in upstream.stream_chat(client, payload):
                yield chunk

    return through_httpx


async def run_stage(stage: str, tokens: int) -> float:
    """Relay ``tokens`` tokens through ``stage``; the CPU seconds it took."""
    from llamad.dispatch import _event_message
    from llamad.events import ChatEvent, EventHub
    from llamad.protocol import ChatDelta

    directory = Path(tempfile.mkdtemp(prefix="llamad-relay-cost-", dir="/tmp"))
    path = directory / "up.sock"
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen()
    listener = trio.SocketListener(sock)
    taken = [trio.Event() for _ in range(tokens + 1)]
    hub = EventHub()
    client_end, daemon_end = _socket_pair()
    began = time.process_time()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_upstream, listener, tokens, taken)
            with hub.subscribe(frozenset({"chat"}), key="c") as subscription:
                if "+hub" in stage:
                    peer = await _peer(stage, nursery, client_end, daemon_end)

                    async def forward() -> None:  # as dispatch's _chat loop does
                        async for batch in subscription.batches():
                            for event in batch:
                                await peer.send(_event_message(1, event))

                    nursery.start_soon(forward)
                seen = 0
                async for chunk in _reader(stage, path)():
                    if "+hub" in stage:
                        text = getattr(chunk, "text", "")
                        if text:
                            hub.publish(
                                ChatEvent("c", ChatDelta(id=0, conversation="c", seq=2, text=text))
                            )
                    if seen < tokens:
                        taken[seen].set()
                    seen += 1
                    # Let the forwarding task run as the real daemon would between reads.
                    await trio.lowlevel.checkpoint()
                await daemon_end.aclose()
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return time.process_time() - began


async def _peer(
    stage: str,
    nursery: trio.Nursery,
    client_end: trio.SocketStream,
    daemon_end: trio.SocketStream,
) -> Peer:
    """The daemon's sending half of one client connection, and a client reading it."""
    from trio_websocket import ConnectionClosed, wrap_client_stream, wrap_server_stream

    from llamad.transport.unix import _FramePeer
    from llamad.transport.websocket import _WebSocketPeer

    if not stage.endswith("+ws"):

        async def read_frames() -> None:
            while await client_end.receive_some(262144):
                pass

        nursery.start_soon(read_frames)
        return _FramePeer(daemon_end)
    accepted: list[Peer] = []
    ready = trio.Event()

    async def serve() -> None:
        request = await wrap_server_stream(nursery, daemon_end)
        accepted.append(_WebSocketPeer(await request.accept(), json=False))
        ready.set()

    nursery.start_soon(serve)
    client = await wrap_client_stream(nursery, client_end, "localhost", "/")

    async def read_messages() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await client.get_message()

    nursery.start_soon(read_messages)
    await ready.wait()
    return accepted[0]


def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    one, two = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(one)),
        trio.SocketStream(trio.socket.from_stdlib_socket(two)),
    )


def _callgrind_instructions(stage: str, tokens: int) -> int:
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "callgrind.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "bench.relay_cost",
                "--one",
                stage,
                "--tokens",
                str(tokens),
            ],
            check=True,
            capture_output=True,
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        match = re.search(rb"^(?:summary|totals): (\d+)", out.read_bytes(), re.MULTILINE)
        if match is None:
            raise RuntimeError("callgrind wrote no instruction total")
        return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of CPU timing")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--callgrind", action="store_true", help="instructions per token")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one run, under callgrind
    args = parser.parse_args()
    if args.one:
        trio.run(run_stage, args.one, args.tokens)
        return
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if args.callgrind:
        small = max(1, args.tokens // 10)
        print(f"instructions per token (callgrind, ({args.tokens} - {small} tokens) difference)")
        for stage in stages:
            per_token = (
                _callgrind_instructions(stage, args.tokens) - _callgrind_instructions(stage, small)
            ) / (args.tokens - small)
            print(f"  {stage:12} {per_token:10,.0f}", flush=True)
        return
    samples: dict[str, list[float]] = {stage: [] for stage in stages}
    for round_no in range(args.rounds + 1):
        for stage in stages[round_no % len(stages) :] + stages[: round_no % len(stages)]:
            seconds = trio.run(run_stage, stage, args.tokens)
            if round_no:  # the first round warms up
                samples[stage].append(seconds / args.tokens * 1e6)
    print(f"CPU µs per token, {args.tokens} tokens, median of {args.rounds} interleaved rounds")
    for stage, values in samples.items():
        print(
            f"  {stage:12} {statistics.median(values):8.1f}  ({min(values):.1f}-{max(values):.1f})"
        )


if __name__ == "__main__":
    main()
