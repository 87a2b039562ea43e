"""Who may call the admin API (adminauth.py): a table of tokens, headers and listen
addresses, and the Bearer parser."""

from __future__ import annotations

import pytest

from nwbcache_proxy.adminauth import authorize, bearer, is_loopback

TOKEN = b"s3cret-token-0123456789"
LOOP = ("127.0.0.1",)


@pytest.mark.parametrize(
    ("token", "headers", "hosts", "status"),
    [
        # A token: required everywhere, loopback included.
        (TOKEN, {"Authorization": f"Bearer {TOKEN.decode()}"}, LOOP, None),
        (TOKEN, {"Authorization": f"bearer  {TOKEN.decode()} "}, ("0.0.0.0",), None),
        (TOKEN, {}, LOOP, 401),
        (TOKEN, {"Authorization": "Bearer wrong"}, LOOP, 401),
        (TOKEN, {"Authorization": f"Basic {TOKEN.decode()}"}, LOOP, 401),
        (TOKEN, {"Authorization": "Bearer"}, LOOP, 401),
        (TOKEN, {"Authorization": f"Bearer {TOKEN.decode()}x"}, LOOP, 401),
        # No token: loopback alone, and not relayed by a proxy.
        (None, {}, LOOP, None),
        (None, {}, ("::1",), None),
        (None, {}, ("localhost",), None),
        (None, {}, ("127.0.0.2",), None),
        (None, {}, ("0.0.0.0",), 403),
        (None, {}, ("::",), 403),
        (None, {}, ("10.0.0.5",), 403),
        (None, {}, ("labcache.example.org",), 403),
        (None, {}, ("127.0.0.1", "0.0.0.0"), 403),
        (None, {"X-Forwarded-For": "10.1.2.3"}, LOOP, 403),
        (None, {"Forwarded": "for=10.1.2.3"}, LOOP, 403),
        (None, {"X-Real-IP": "10.1.2.3"}, LOOP, 403),
        (None, {"Via": "1.1 nginx"}, LOOP, 403),
        # A token sent to a daemon without one is not needed, and not refused.
        (None, {"Authorization": "Bearer anything"}, LOOP, None),
    ],
)
def test_authorize(
    token: bytes | None, headers: dict[str, str], hosts: tuple[str, ...], status: int | None
) -> None:
    refusal = authorize(token, headers, listen_hosts=hosts)
    assert (refusal.status if refusal else None) == status
    if refusal is not None:
        assert TOKEN.decode() not in refusal.message  # never echoed
        assert "wrong" not in refusal.message or refusal.status == 401
        assert refusal.challenge == (status == 401)
    if refusal is not None and refusal.status == 403:
        assert "--admin-token-file" in refusal.message


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer abc", b"abc"),
        ("BEARER abc", b"abc"),
        ("  Bearer   abc  ", b"abc"),
        ("Bearer", None),
        ("Bearer ", None),
        ("Token abc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer(value: str | None, token: bytes | None) -> None:
    assert bearer(value) == token


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("[::1]", True), ("localhost", True), ("0.0.0.0", False), ("", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
