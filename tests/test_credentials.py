"""credentials: what a request presents upstream, its fingerprint and its expiry, as tables."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from nwbcache.urls import parse_upstream_url
from nwbcache_proxy.credentials import Credentials, anonymous, of_request

SIGV4 = (
    "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261202%2Fus-east-2%2Fs3"
    "%2Faws4_request&X-Amz-Date=20261202T101500Z&X-Amz-Expires=3600"
    "&X-Amz-SignedHeaders=host&X-Amz-Signature=abc123"
)
SIGV2 = "AWSAccessKeyId=AKIA&Expires=1800000000&Signature=xyz%3D"


@pytest.mark.parametrize(
    ("query", "authorization", "present", "names"),
    [
        ("", None, False, []),
        ("versionId=3", None, False, []),
        ("", "", False, []),  # an empty header is no credential
        ("", "Bearer t0k3n", True, []),
        (SIGV2, None, True, ["AWSAccessKeyId", "Expires", "Signature"]),
        (
            f"versionId=3&{SIGV4}&response-content-type=x",
            None,
            True,
            [
                "X-Amz-Algorithm",
                "X-Amz-Credential",
                "X-Amz-Date",
                "X-Amz-Expires",
                "X-Amz-Signature",
                "X-Amz-SignedHeaders",
            ],
        ),
        ("response-content-disposition=attachment", None, False, []),
        ("x-amz-security-token=T", None, True, ["x-amz-security-token"]),
    ],
)
def test_of_request(query: str, authorization: str | None, present: bool, names: list[str]) -> None:
    creds = of_request(query, authorization)
    assert creds.present is present
    assert [name for name, _ in creds.params] == names


def test_fingerprints_tell_credentials_and_objects_apart_and_hide_them() -> None:
    a = of_request(SIGV4, None)
    b = of_request(SIGV4.replace("abc123", "abc124"), None)
    none = of_request("", None)
    token = of_request("", "Bearer t0k3n")
    prints = {
        a.fingerprint("https://h/k"),
        b.fingerprint("https://h/k"),
        a.fingerprint("https://h/other"),
        none.fingerprint("https://h/k"),
        token.fingerprint("https://h/k"),
        of_request("", "Bearer t0k3m").fingerprint("https://h/k"),
    }
    assert len(prints) == 6
    # the order of parameters does not matter, and nothing of the secret shows
    shuffled = of_request("&".join(reversed(SIGV4.split("&"))), None)
    assert shuffled.fingerprint("https://h/k") == a.fingerprint("https://h/k")
    assert "abc123" not in a.fingerprint("https://h/k")
    assert none.fingerprint("https://h/k") == Credentials().fingerprint("https://h/k")


@pytest.mark.parametrize(
    ("query", "expires_at"),
    [
        (SIGV4, datetime(2026, 12, 2, 10, 15, tzinfo=UTC).timestamp() + 3600),
        (SIGV2, 1_800_000_000.0),
        ("X-Amz-Date=20261202T101500Z&X-Amz-Signature=s", None),  # no lifetime
        ("X-Amz-Date=yesterday&X-Amz-Expires=60&X-Amz-Signature=s", None),
        ("X-Amz-Date=20261202T101500Z&X-Amz-Expires=-5&X-Amz-Signature=s", None),
        ("Expires=soon&Signature=s", None),
        ("", None),
    ],
)
def test_expires_at(query: str, expires_at: float | None) -> None:
    assert of_request(query, None).expires_at() == expires_at


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"https://b.s3.amazonaws.com/k?{SIGV4}", "https://b.s3.amazonaws.com/k"),
        (
            f"https://b.s3.amazonaws.com/k?versionId=7&{SIGV2}",
            "https://b.s3.amazonaws.com/k?versionId=7",
        ),
        ("http://127.0.0.1:9000/b/k", "http://127.0.0.1:9000/b/k"),
    ],
)
def test_anonymous_drops_only_the_credentials(url: str, expected: str) -> None:
    assert anonymous(parse_upstream_url(url)).url == expected
