"""The frame codec and message schema, without sockets."""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamad.protocol import (
    MAX_FRAME_BYTES,
    Error,
    FrameDecoder,
    Load,
    ModelStatus,
    ProtocolError,
    StateChanged,
    Status,
    decode_request,
    decode_server_message,
    encode,
    encode_json,
    frame,
)


def test_roundtrip_request() -> None:
    request = Load(id=7, model="demo-b", wait=False)
    decoded = decode_request(encode(request))
    assert decoded == request


def test_json_uses_the_same_tags() -> None:
    assert msgspec.json.decode(encode_json(Status(id=1))) == {"type": "status", "id": 1}
    assert decode_request(b'{"type":"load","id":3,"model":"demo"}', json=True) == Load(
        id=3, model="demo"
    )


def test_server_message_roundtrip() -> None:
    status = ModelStatus(name="demo", state="ready", since=1.0, pid=42)
    message = StateChanged(id=3, model=status)
    assert decode_server_message(encode(message)) == message


def test_decoder_splits_and_joins_frames() -> None:
    payloads = [encode(Status(id=i)) for i in range(5)]
    stream = b"".join(frame(p) for p in payloads)
    decoder = FrameDecoder()
    got: list[bytes] = []
    for i in range(0, len(stream), 3):  # byte-by-byte-ish delivery
        got += decoder.feed(stream[i : i + 3])
    assert got == payloads
    assert not decoder.in_frame


def test_partial_frame_is_reported_in_progress() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(frame(b"abcdef")[:5]) == []
    assert decoder.in_frame


def test_oversized_length_rejected_before_body() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(struct.pack(">I", MAX_FRAME_BYTES + 1))
    assert info.value.code == "bad_frame"
    assert "exceeds" in str(info.value)


def test_wrong_shape_keeps_the_id() -> None:
    payload = msgspec.msgpack.encode({"type": "load", "id": 9, "model": 5})
    with pytest.raises(ProtocolError) as info:
        decode_request(payload)
    assert info.value.code == "bad_request"
    assert info.value.request_id == 9
    assert "model" in str(info.value)


def test_unknown_type() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(msgspec.msgpack.encode({"type": "explode", "id": 1}))
    assert info.value.code == "bad_request"


def test_not_msgpack() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(b"\xc1\xc1\xc1")
    assert info.value.code == "bad_frame"


@given(st.binary(max_size=256))
def test_random_bytes_never_escape_as_other_exceptions(data: bytes) -> None:
    decoder = FrameDecoder(max_frame=1024)
    try:
        for payload in decoder.feed(data):
            decode_request(payload)
    except ProtocolError:
        pass


def test_error_may_have_no_id() -> None:
    message = Error(id=None, code="bad_frame", message="x")
    assert decode_server_message(encode(message)) == message
