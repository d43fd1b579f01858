#!/usr/bin/env python3
"""A synthetic llama-server that streams chat completions as fast as it can.

For the relay-capacity benchmark: llamad runs it in place of llama-server
(``[daemon] llama_server = ".../bench/fast_upstream.py"``), so what limits
the tokens/s is llamad, not a model. It takes llama-server's command line
(``--host PATH`` for a Unix socket, or ``--host H --port P``; ``--ctx-size``,
``--parallel``; everything else is ignored) and answers what llamad asks:

- ``GET /health``: 200 ``{"status":"ok"}``
- ``GET /props``: ``n_ctx`` (from ``--ctx-size``) under ``default_generation_settings``
- ``POST /apply-template``, ``POST /tokenize``: plausible answers
- ``POST /v1/chat/completions`` with ``"stream": true``: ``max_tokens`` content
  chunks in llama-server's exact SSE format (one HTTP chunk per event, chunked
  transfer encoding), then the final chunk with ``finish_reason`` and
  ``timings``, then ``data: [DONE]``. The first token goes out alone (time to
  first token); the rest are written in batches of about ``--fast-write-bytes``,
  or, with ``--fast-rate R``, paced at R tokens/s per stream (about one write
  per millisecond) to measure llamad's cost per token below its breaking point.

One thread per connection; HTTP/1.1 keep-alive is honoured. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import socketserver
import sys
import time
from typing import Any

WORDS = [" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", "."]
ID = "chatcmpl-fastupstream0000000000000000"
MODEL = "fast-upstream"
FINGERPRINT = "b0-unknown"


def _chunk(event: bytes) -> bytes:
    """One HTTP/1.1 chunk holding one SSE event."""
    return b"%x\r\n%s\r\n" % (len(event), event)


def _event(payload: dict[str, Any] | str) -> bytes:
    body = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return b"data: " + body.encode() + b"\n\n"


def _delta(delta: dict[str, Any], finish: str | None, created: int) -> dict[str, Any]:
    return {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": created,
        "id": ID,
        "model": MODEL,
        "system_fingerprint": FINGERPRINT,
        "object": "chat.completion.chunk",
    }


CREATED = int(time.time())
ROLE_CHUNK = _chunk(_event(_delta({"role": "assistant", "content": None}, None, CREATED)))
TOKEN_CHUNKS = [_chunk(_event(_delta({"content": w}, None, CREATED))) for w in WORDS]
DONE_CHUNK = _chunk(_event("[DONE]"))
STREAM_HEADERS = (
    b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nX-Accel-Buffering: no\r\n"
    b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"Keep-Alive: timeout=5, max=100\r\n\r\n"
)


class Settings:
    n_ctx = 4096
    write_bytes = 16384
    rate = 0.0  # tokens/s per stream; 0: as fast as possible


def final_chunk(tokens: int, seconds: float) -> bytes:
    payload = _delta({}, "length", CREATED)
    payload["timings"] = {
        "cache_n": 0,
        "prompt_n": 1,
        "prompt_ms": 0.01,
        "prompt_per_token_ms": 0.01,
        "prompt_per_second": 100000.0,
        "predicted_n": tokens,
        "predicted_ms": seconds * 1000,
        "predicted_per_token_ms": seconds * 1000 / max(tokens, 1),
        "predicted_per_second": tokens / seconds if seconds > 0 else 0.0,
    }
    return _chunk(_event(payload))


class Handler(socketserver.BaseRequestHandler):
    request: socket.socket

    def handle(self) -> None:
        buffer = b""
        sock = self.request
        while True:
            while b"\r\n\r\n" not in buffer:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            while len(buffer) < length:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            body, buffer = buffer[:length], buffer[length:]
            keep = headers.get("connection", "").lower() != "close"
            if not self.respond(sock, method, path.split("?", 1)[0], body) or not keep:
                return

    def respond(self, sock: socket.socket, method: str, path: str, body: bytes) -> bool:
        if method == "GET" and path == "/health":
            return self.json(sock, {"status": "ok"})
        if method == "GET" and path == "/props":
            return self.json(
                sock,
                {
                    "default_generation_settings": {"n_ctx": Settings.n_ctx},
                    "total_slots": 1,
                    "model_path": MODEL,
                },
            )
        if method == "POST" and path == "/apply-template":
            template = "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
            return self.json(sock, {"prompt": template})
        if method == "POST" and path == "/tokenize":
            content = json.loads(body or b"{}").get("content", "")
            return self.json(sock, {"tokens": list(range(len(content) // 3 + 1))})
        if method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
            request = json.loads(body or b"{}")
            self.stream(sock, int(request.get("max_tokens") or 16))
            return True
        return self.json(sock, {"error": {"code": 404, "message": "File Not Found"}}, 404)

    def json(self, sock: socket.socket, payload: dict[str, Any], status: int = 200) -> bool:
        data = json.dumps(payload).encode()
        reason = b"OK" if status == 200 else b"Not Found"
        sock.sendall(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\nKeep-Alive: timeout=5, max=100\r\n\r\n%s"
            % (status, reason, len(data), data)
        )
        return True

    def stream(self, sock: socket.socket, tokens: int) -> None:
        began = time.perf_counter()
        sock.sendall(STREAM_HEADERS + ROLE_CHUNK + TOKEN_CHUNKS[0])
        pending: list[bytes] = []
        size = 0
        limit = Settings.write_bytes
        chunks = TOKEN_CHUNKS
        count = len(chunks)
        rate = Settings.rate
        # Paced: a batch every millisecond or so, each on time (no drift).
        batch = max(1, int(rate // 1000)) if rate else 0
        for n in range(1, tokens):
            chunk = chunks[n % count]
            pending.append(chunk)
            size += len(chunk)
            if batch and n % batch == 0:
                delay = began + n / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sock.sendall(b"".join(pending))
                pending.clear()
                size = 0
            elif size >= limit:
                sock.sendall(b"".join(pending))
                pending.clear()
                size = 0
        pending.append(final_chunk(tokens, time.perf_counter() - began))
        pending.append(DONE_CHUNK)
        pending.append(b"0\r\n\r\n")
        sock.sendall(b"".join(pending))


class ThreadingUnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        request, _ = self.socket.accept()
        return request, ("unix", 0)


class ThreadingTCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", "-m")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--ctx-size", "-c", type=int, default=4096)
    parser.add_argument("--fast-write-bytes", type=int, default=16384)
    parser.add_argument("--fast-rate", type=float, default=0.0, help="tokens/s per stream")
    args, _unknown = parser.parse_known_args()
    Settings.n_ctx = args.ctx_size
    Settings.write_bytes = args.fast_write_bytes
    Settings.rate = args.fast_rate
    server: socketserver.BaseServer
    if args.host.startswith("/") or args.host.endswith(".sock"):
        if os.path.exists(args.host):
            os.unlink(args.host)
        server = ThreadingUnixServer(args.host, Handler)
    else:
        server = ThreadingTCPServer((args.host, args.port), Handler)
    print(f"fast upstream pid {os.getpid()} listening on {args.host}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
