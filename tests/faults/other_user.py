"""Acting as another local user in the drills: ``nobody``, through ``setpriv``.

The attacks these drills replay are those of another account on the same
machine, so they run for real under another uid. That needs root (as CI runs);
anywhere else the drills fail with that reason rather than pass untested.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these drills act as another user (setpriv to nobody): run them as root")


def world_tmp() -> Path:
    """A fresh stand-in for /tmp: world-writable and sticky, like the real one."""
    path = Path(tempfile.mkdtemp(prefix="llamad-w-", dir="/tmp"))
    os.chmod(path, 0o1777)
    return path


def as_nobody(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AS_NOBODY, *command], capture_output=True, text=True, check=check, timeout=30
    )


# An HTTP server run as nobody that answers like llama-server would, and notes
# every request it gets: a model socket or port answered by someone else.
IMPOSTOR_HTTP = r"""
import http.server, json, os, socket, socketserver, sys
where, record = sys.argv[1], sys.argv[2]

class Handler(http.server.BaseHTTPRequestHandler):
    def _note(self, body=b""):
        with open(record, "a") as out:
            out.write(f"{self.command} {self.path} {body[:200]!r}\n")
    def do_GET(self):
        self._note()
        body = b'{"status":"ok"}' if self.path == "/health" else b"{}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        self._note(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        chunk = {"choices": [{"delta": {"content": "INJECTED BY UID NOBODY"}}]}
        body = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
    def address_string(self):
        return "peer"

class Unix(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    def get_request(self):
        request, _ = super().get_request()
        return request, ("unix", 0)

class Tcp(socketserver.ThreadingMixIn, http.server.HTTPServer):
    allow_reuse_address = True

if where.isdigit():
    server = Tcp(("127.0.0.1", int(where)), Handler)
else:
    server = Unix(where, Handler)
    os.chmod(where, 0o777)
open(record, "a").close()
print("listening", flush=True)
server.serve_forever()
"""

# A Unix socket server run as nobody that records whatever a client sends it:
# a control socket answered by someone else.
IMPOSTOR_CONTROL = r"""
import os, socket, sys
where, record = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(where)
os.chmod(where, 0o777)
server.listen()
open(record, "ab").close()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    conn.settimeout(2)
    try:
        while data := conn.recv(65536):
            with open(record, "ab") as out:
                out.write(data)
    except OSError:
        pass
    conn.close()
"""


@contextmanager
def impostor(script: str, where: str, record: Path) -> Iterator[subprocess.Popen[str]]:
    """Run one of the impostor servers as nobody until the block ends."""
    process = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", script, where, str(record)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if line.strip() != "listening":
            process.kill()
            raise AssertionError(f"the impostor did not start: {process.stderr.read()}")  # type: ignore[union-attr]
        yield process
    finally:
        process.kill()
        process.communicate()


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)
