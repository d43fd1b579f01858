"""The WebSocket handshake policy, without sockets."""

from __future__ import annotations

import pytest

from llamad.transport.websocket import (
    HandshakeGate,
    ReceiveBudget,
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


@pytest.mark.parametrize("host", ["LOCALHOST:8765", "LocalHost", "[::1]:8765"])
def test_host_names_are_compared_case_insensitively(host: str) -> None:
    assert check(headers(host=host, authorization=f"Bearer {TOKEN}"), "/") is None


def test_allowed_hosts_are_case_insensitive_too() -> None:
    fields = headers(host="BOX.lan:8765", authorization=f"Bearer {TOKEN}")
    assert check(fields, "/", (), ("box.LAN",)) is None
    assert isinstance(check(headers(host="other.lan"), "/", (), ("box.lan",)), Rejection)


def test_the_receive_budget_is_shared() -> None:
    budget = ReceiveBudget(limit=100)
    assert budget.take(60) and budget.take(40)
    assert not budget.take(1)
    budget.give(40)
    assert budget.take(30) and budget.held == 90


def test_the_handshake_gate_caps_per_peer_and_in_total() -> None:
    gate = HandshakeGate(per_peer=2, total=3)
    assert gate.admit("uid 1") and gate.admit("uid 1")
    assert not gate.admit("uid 1")  # per peer
    assert gate.admit("uid 2")
    assert not gate.admit("uid 3")  # in total
    gate.release("uid 1")
    assert gate.admit("uid 3") and gate.handshaking == 3
