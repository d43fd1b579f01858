#!/usr/bin/env python3
"""A stand-in for llama-server, only for faults the real one cannot show.

It accepts llama-server's command line (``--host PATH`` or ``--host H --port P``)
and answers ``/health`` with 200. Extra flags choose the fault:

  --fake-ignore-sigterm   keep running after SIGTERM (tests the SIGKILL escalation)
  --fake-crash            exit 1 at once, before listening (a crash loop)
  --fake-children N       fork N children that sleep in the same process group
  --fake-never-ready      answer /health with 503 forever
  --fake-ready-after S    answer /health with 503 for S seconds (a slow model load)
  --fake-start-log PATH   append one line (the pid) to PATH at every start
  --fake-crash-if PATH    like --fake-crash, but only while PATH exists
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import socketserver
import sys
import time


class Handler(http.server.BaseHTTPRequestHandler):
    never_ready = False
    ready_at = 0.0  # monotonic time from which /health answers 200

    def do_GET(self) -> None:
        loading = self.never_ready or time.monotonic() < self.ready_at
        status = 503 if loading else 200
        body = b'{"status":"ok"}' if status == 200 else b'{"error":"loading"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def address_string(self) -> str:
        return "unix"


class UnixHTTPServer(socketserver.UnixStreamServer):
    def get_request(self):  # type: ignore[no-untyped-def]
        request, _ = super().get_request()
        return request, ("local", 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", "-m")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--fake-ignore-sigterm", action="store_true")
    parser.add_argument("--fake-crash", action="store_true")
    parser.add_argument("--fake-children", type=int, default=0)
    parser.add_argument("--fake-never-ready", action="store_true")
    parser.add_argument("--fake-ready-after", type=float, default=0.0)
    parser.add_argument("--fake-start-log")
    parser.add_argument("--fake-crash-if")
    args, _unknown = parser.parse_known_args()
    print(f"fake llama-server pid {os.getpid()} starting", flush=True)
    if args.fake_start_log:
        with open(args.fake_start_log, "a") as starts:
            starts.write(f"{os.getpid()}\n")
    if args.fake_crash or (args.fake_crash_if and os.path.exists(args.fake_crash_if)):
        print("fake llama-server: crashing on purpose", flush=True)
        sys.exit(1)
    if args.fake_ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for _ in range(args.fake_children):
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(1)
    Handler.never_ready = args.fake_never_ready
    Handler.ready_at = time.monotonic() + args.fake_ready_after
    server: socketserver.BaseServer
    if args.host.endswith(".sock") or args.host.startswith("/"):
        server = UnixHTTPServer(args.host, Handler)
    else:
        server = http.server.HTTPServer((args.host, args.port), Handler)
    print("fake llama-server listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
