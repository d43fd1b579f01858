"""The control socket's transport (llamad/transport/unix.py): binding it safely, frame deadlines."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llamad.errors import StartupError
from llamad.ownership import UntrustedPath
from llamad.protocol import Error, FrameDecoder, decode_server_message
from llamad.transport.unix import FRAME_READ_TIMEOUT_SEC, bind_control_socket
from tests.conftest import Llamad, demo_config

MakeLlamad = Callable[..., Llamad]


def test_binds_0600_in_a_private_directory(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"
    listener = bind_control_socket(path)
    with listener:
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.stat(path.parent).st_mode & 0o777 == 0o700


def test_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(UntrustedPath, match="writable by other users"):
        bind_control_socket(shared / "control.sock")


def test_a_directory_of_ours_others_may_only_read_is_accepted_as_it_is(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(home, 0o755)
    with bind_control_socket(home / "llamad.sock"):
        assert os.stat(home).st_mode & 0o777 == 0o755  # not chmod-ed behind the user's back


def test_a_live_socket_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with bind_control_socket(path), pytest.raises(StartupError, match="already serving"):
        bind_control_socket(path)


@pytest.mark.server
def test_a_frame_must_end_within_the_deadline_of_its_first_byte(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    """One byte every 3 s keeps each read short, but the frame as a whole is
    dropped FRAME_READ_TIMEOUT_SEC after its first byte (the timer does not restart)."""
    daemon = make_llamad(demo_config(demo_models))
    daemon.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(daemon.socket_path))
        sock.settimeout(3.0)
        began = time.monotonic()
        sock.sendall(struct.pack(">I", 100))  # a frame of 100 bytes, never finished
        data = b""
        while time.monotonic() - began < 30:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b"x")  # one more byte, 3 s after the last
                continue
            if not chunk:
                break
            data += chunk
        took = time.monotonic() - began
    assert FRAME_READ_TIMEOUT_SEC - 0.5 <= took < FRAME_READ_TIMEOUT_SEC + 3, took
    (reply,) = [decode_server_message(p) for p in FrameDecoder().feed(data)]
    assert isinstance(reply, Error) and reply.code == "bad_frame"
    assert reply.message == "frame not completed within 10 s of its first byte"
