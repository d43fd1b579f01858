"""The WebSocket against a real llamad: the handshake checks, JSON and msgpack clients."""

from __future__ import annotations

import base64
import gc
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from llamad.protocol import Status, StatusReply
from tests.conftest import Llamad, ready_daemon

pytestmark = pytest.mark.server

MakeLlamad = Callable[..., Llamad]


def ws_daemon(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> tuple[Llamad, str, str]:
    daemon = ready_daemon(make_llamad, demo_models)
    with daemon.client() as client:
        reply = client.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply) and reply.websocket is not None
    token_file = daemon.runtime_dir / "token"
    assert os.stat(token_file).st_mode & 0o777 == 0o600
    return daemon, reply.websocket, token_file.read_text().strip()


def handshake_status(address: str, path: str = "/", **headers: str) -> int:
    """Send a WebSocket upgrade by hand; return the HTTP status code."""
    host, port = address.rsplit(":", 1)
    fields = {
        "Host": address,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        **{k.replace("_", "-"): v for k, v in headers.items()},
    }
    request = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall((request + "\r\n").encode())
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(status_line.split()[1])


def test_handshake_checks(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    _, address, token = ws_daemon(make_llamad, demo_models)
    assert handshake_status(address) == 401
    assert handshake_status(address, Authorization="Bearer wrong") == 401
    assert handshake_status(address, f"/?token={token[:-1]}") == 401
    assert handshake_status(address, Authorization=f"Bearer {token}") == 101
    assert handshake_status(address, f"/?token={token}") == 101
    assert handshake_status(address, f"/?token={token}", Origin="https://evil.example") == 403
    assert handshake_status(address, f"/?token={token}", Host="evil.example:8765") == 403


async def test_json_and_msgpack_clients_chat(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    _, address, token = ws_daemon(make_llamad, demo_models)
    url = f"ws://{address}/?token={token}"
    async with open_websocket_url(url) as ws:
        # A JSON client, as docs/protocol.md describes it.
        await ws.send_message(
            json.dumps({"type": "chat", "id": 1, "content": "hi", "options": {"max_tokens": 8}})
        )
        kinds: list[str] = []
        text = ""
        while True:
            raw = await ws.get_message()
            assert isinstance(raw, str)  # a text request gets text replies
            message = json.loads(raw)
            assert message["id"] == 1
            kinds.append(message["type"])
            if message["type"] == "chat_delta":
                text += message["text"]
            if message["type"] == "chat_done":
                assert message["message"]["status"] == "complete"
                assert message["message"]["parts"] == [{"type": "text", "text": text}]
                break
        assert kinds[0] == "chat_started" and "chat_delta" in kinds
        # The same connection, now msgpack.
        await ws.send_message(msgspec.msgpack.encode({"type": "status", "id": 2}))
        raw = await ws.get_message()
        assert isinstance(raw, bytes)
        assert msgspec.msgpack.decode(raw)["type"] == "status_reply"


# trio-websocket's client leaves its socket to the garbage collector when the
# server closes the connection with 1009 mid-send: a test-side leak, not llamad's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_bad_messages_get_errors_and_disturb_nothing(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon, address, token = ws_daemon(make_llamad, demo_models)
    url = f"ws://{address}/?token={token}"
    async with open_websocket_url(url) as bystander, open_websocket_url(url) as ws:
        await ws.send_message("this is not json")
        error = json.loads(await ws.get_message())
        assert error["type"] == "error" and error["code"] == "bad_frame" and error["id"] is None
        await ws.send_message(json.dumps({"type": "load", "id": 4, "model": 5}))
        error = json.loads(await ws.get_message())
        assert error["code"] == "bad_request" and error["id"] == 4
        await ws.send_message(json.dumps({"type": "status", "id": 5}))
        assert json.loads(await ws.get_message())["type"] == "status_reply"  # still open
        # An oversized message closes that connection only.
        await ws.send_message(b"\x00" * (16 * 1024 * 1024 + 1))
        with pytest.raises(ConnectionClosed) as closed:
            with trio.fail_after(10):
                await ws.get_message()
        assert closed.value.reason.code == 1009
        del closed  # its traceback holds the connection and so the leaked socket
        await bystander.send_message(json.dumps({"type": "status", "id": 6}))
        assert json.loads(await bystander.get_message())["type"] == "status_reply"
    assert daemon.ctl("status").returncode == 0
    gc.collect()  # finalize the library's leaked client socket here, under this test's filter
