"""The WebSocket handshake policy, without sockets."""

from __future__ import annotations

import pytest

from llamad.transport.websocket import (
    Rejection,
    check_handshake,
    is_loopback,
    parse_listen_address,
)

TOKEN = "s3cret-token"


def check(
    fields: dict[str, str],
    path: str,
    origins: tuple[str, ...] = (),
    hosts: tuple[str, ...] = (),
) -> object:
    host = fields.pop("host", "")
    headers = [(k.replace("_", "-").encode(), v.encode()) for k, v in fields.items()]
    return check_handshake(host, headers, path, TOKEN, allowed_origins=origins, allowed_hosts=hosts)


def headers(**fields: str) -> dict[str, str]:
    return fields


def test_bearer_and_query_tokens_accepted() -> None:
    assert check(headers(host="127.0.0.1:8765", authorization=f"Bearer {TOKEN}"), "/") is None
    assert check(headers(host="localhost:8765"), f"/?token={TOKEN}") is None
    assert check(headers(host="[::1]:8765"), f"/ws?x=1&token={TOKEN}") is None


@pytest.mark.parametrize(
    ("fields", "path", "status"),
    [
        ({"host": "127.0.0.1:8765"}, "/", 401),
        ({"host": "127.0.0.1:8765", "authorization": "Bearer wrong"}, "/", 401),
        ({"host": "127.0.0.1:8765"}, "/?token=wrong", 401),
        ({"host": "evil.example:8765", "authorization": f"Bearer {TOKEN}"}, "/", 403),
        (
            {
                "host": "127.0.0.1:8765",
                "origin": "https://evil.example",
                "authorization": f"Bearer {TOKEN}",
            },
            "/",
            403,
        ),
    ],
)
def test_refusals(fields: dict[str, str], path: str, status: int) -> None:
    rejection = check(dict(fields), path)
    assert isinstance(rejection, Rejection) and rejection.status == status


def test_configured_origin_and_host_allowed() -> None:
    fields = headers(host="box.lan:8765", origin="http://box.lan", authorization=f"Bearer {TOKEN}")
    assert check(fields, "/", ("http://box.lan",), ("box.lan",)) is None


def test_listen_address() -> None:
    assert parse_listen_address("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert parse_listen_address("[::1]:0") == ("::1", 0)
    assert is_loopback("127.0.0.2") and is_loopback("localhost") and not is_loopback("0.0.0.0")
