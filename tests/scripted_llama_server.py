#!/usr/bin/env python3
"""A stand-in for llama-server that answers chats from a script and records them.

For what a random-weights model cannot be made to do on cue: call a given tool
with given arguments, or answer as a vision model. It takes llama-server's
command line (``--host PATH`` or ``--host H --port P``) plus:

  --script FILE    JSON list, one entry per /v1/chat/completions request, in
                   order: {"text": "..."} streams that text;
                   {"tool_calls": [{"name": ..., "arguments": {...}}]} streams
                   those calls. After the list ends it answers {"text": "done"}.
  --record FILE    appends each chat request body as one JSON line
  --vision         /props reports the vision modality (as with --mmproj)

It streams in llama-server's format: role chunk, content or tool-call chunks
(arguments split in two pieces), a finish chunk with timings, then [DONE].
"""

from __future__ import annotations

import argparse
import http.server
import json
import socketserver
import sys
from pathlib import Path
from typing import Any, ClassVar


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: ClassVar[list[dict[str, Any]]] = []
    record: Path | None = None
    vision = False
    answered = 0

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/props":
            self._json(
                200,
                {
                    "default_generation_settings": {"n_ctx": 4096},
                    "modalities": {"vision": self.vision, "audio": False},
                },
            )
        else:
            self._json(200, {"status": "ok"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path == "/apply-template":
            self._json(200, {"prompt": "<|im_start|>user\n<|im_end|>\n"})
        elif self.path == "/tokenize":
            self._json(200, {"tokens": list(range(len(body.get("content", "")) // 4 + 1))})
        elif self.path == "/v1/chat/completions":
            self._chat(body)
        else:
            self._json(404, {"error": {"message": "not found"}})

    def _chat(self, body: dict[str, Any]) -> None:
        if self.record is not None:
            with self.record.open("a") as out:
                out.write(json.dumps(body) + "\n")
        index = Handler.answered
        Handler.answered += 1
        step = self.script[index] if index < len(self.script) else {"text": "done"}
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self._event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        finish = "stop"
        if "tool_calls" in step:
            finish = "tool_calls"
            for position, call in enumerate(step["tool_calls"]):
                arguments = json.dumps(call["arguments"])
                half = len(arguments) // 2
                first = {"name": call["name"], "arguments": arguments[:half]}
                self._event(_tool_delta(position, f"call_{index}_{position}", first))
                self._event(_tool_delta(position, None, {"arguments": arguments[half:]}))
        else:
            for word in step["text"].split(" "):
                self._event({"choices": [{"index": 0, "delta": {"content": word + " "}}]})
        self._event(
            {
                "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
                "timings": {"prompt_n": 10, "predicted_n": 5, "predicted_per_second": 1000.0},
            }
        )
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def log_message(self, format: str, *args: object) -> None:
        pass

    def address_string(self) -> str:
        return "unix"


def _tool_delta(index: int, call_id: str | None, function: dict[str, str]) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": function}
    if call_id is not None:
        call |= {"id": call_id, "type": "function"}
    return {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # type: ignore[no-untyped-def]
        request, _ = super().get_request()
        return request, ("local", 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--script")
    parser.add_argument("--record")
    parser.add_argument("--vision", action="store_true")
    args, _unknown = parser.parse_known_args()
    Handler.script = json.loads(Path(args.script).read_text()) if args.script else []
    Handler.record = Path(args.record) if args.record else None
    Handler.vision = args.vision
    server: socketserver.BaseServer
    if args.host.startswith("/"):
        server = UnixHTTPServer(args.host, Handler)
    else:
        server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    print("scripted llama-server listening", flush=True)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
