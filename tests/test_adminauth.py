"""Who may call the admin API (adminauth.py): a table of tokens, headers and listen
addresses, and the Bearer parser."""

from __future__ import annotations

import pytest

from nwbcache_proxy.adminauth import authorize, bearer, host_of, is_loopback

TOKEN = b"s3cret-token-0123456789"
LOOP = ("127.0.0.1",)
HOST = {"Host": "127.0.0.1:8080"}


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
        # No token: loopback alone, not relayed by a proxy, a loopback Host.
        (None, HOST, LOOP, None),
        (None, HOST, ("::1",), None),
        (None, HOST, ("localhost",), None),
        (None, HOST, ("127.0.0.2",), None),
        (None, {"Host": "localhost:8080"}, LOOP, None),
        (None, {"Host": "[::1]:8080"}, LOOP, None),
        (None, {"Host": "localhost"}, LOOP, None),
        (None, {"Host": "evil.example:8080"}, LOOP, 403),  # DNS rebinding
        (None, {"Host": "10.0.0.5:8080"}, LOOP, 403),
        (None, {}, LOOP, 403),
        (None, HOST, ("0.0.0.0",), 403),
        (None, HOST, ("::",), 403),
        (None, HOST, ("10.0.0.5",), 403),
        (None, HOST, ("labcache.example.org",), 403),
        (None, HOST, ("127.0.0.1", "0.0.0.0"), 403),
        (None, {**HOST, "X-Forwarded-For": "10.1.2.3"}, LOOP, 403),
        (None, {**HOST, "Forwarded": "for=10.1.2.3"}, LOOP, 403),
        (None, {**HOST, "X-Real-IP": "10.1.2.3"}, LOOP, 403),
        (None, {**HOST, "Via": "1.1 nginx"}, LOOP, 403),
        # A token sent to a daemon without one is not needed, and not refused.
        (None, {**HOST, "Authorization": "Bearer anything"}, LOOP, None),
        # Web pages: refused whatever the token.
        (None, {**HOST, "Origin": "https://evil.example"}, LOOP, 403),
        (None, {**HOST, "Sec-Fetch-Site": "cross-site"}, LOOP, 403),
        (TOKEN, {"Authorization": f"Bearer {TOKEN.decode()}", "Origin": "null"}, LOOP, 403),
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
        assert "--admin-token-file" in refusal.message or "web pages" in refusal.message


@pytest.mark.parametrize(
    ("content_type", "status"),
    [("application/json", None), ("application/json; charset=utf-8", None),
     ("text/plain", 415), ("application/x-www-form-urlencoded", 415), (None, 415)],
)  # fmt: skip
def test_a_post_must_say_json(content_type: str | None, status: int | None) -> None:
    """A page may POST text/plain or a form to any origin without asking first;
    application/json it may not."""
    headers = {**HOST, **({"Content-Type": content_type} if content_type else {})}
    refusal = authorize(None, headers, listen_hosts=LOOP, method="POST")
    assert (refusal.status if refusal else None) == status
    assert authorize(None, HOST, listen_hosts=LOOP, method="GET") is None


@pytest.mark.parametrize(
    ("value", "host"),
    [("127.0.0.1:8080", "127.0.0.1"), ("localhost", "localhost"), ("[::1]:80", "[::1]"),
     ("[::1]", "[::1]"), ("example.org:1", "example.org"), ("", "")],
)  # fmt: skip
def test_host_of(value: str, host: str) -> None:
    assert host_of(value) == host


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
