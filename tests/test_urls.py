"""nwbcache.urls: URL forms, the proxied round trip, rejections, cache keys,
the allow-list and log redaction."""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import quote, unquote

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nwbcache.urls import (
    DANDI_HOSTS,
    SIGNATURE_PARAMS,
    SIGNATURE_PREFIXES,
    AllowList,
    AllowRule,
    InvalidURL,
    UpstreamURL,
    cache_key,
    is_signature_param,
    original_url,
    parse_upstream_url,
    proxied_url,
    redact_url,
    upstream_from_proxy_path,
)

PROXY = "http://127.0.0.1:8080"
BLOB = "/blobs/2a3/b4c/2a3b4c5d-6e7f-4a1b-9c2d-0123456789ab"
VHOST = "dandiarchive.s3.amazonaws.com"
SIGV4 = (
    "X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus-east-2%2Fs3%2Faws4_request"
    "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
)


def U(scheme: str, host: str, port: int | None, path: str, query: str = "") -> UpstreamURL:
    return UpstreamURL(scheme, host, port, path, query)


# -- parsing every URL form ------------------------------------------------

PARSE_CASES = [
    pytest.param(f"https://{VHOST}{BLOB}", U("https", VHOST, None, BLOB), id="virtual-hosted"),
    pytest.param(
        f"https://s3.us-east-2.amazonaws.com/dandiarchive{BLOB}",
        U("https", "s3.us-east-2.amazonaws.com", None, f"/dandiarchive{BLOB}"),
        id="path-style",
    ),
    pytest.param(f"s3://dandiarchive{BLOB}", U("https", VHOST, None, BLOB), id="s3-uri"),
    pytest.param(
        f"s3://DandiArchive{BLOB}?versionId=abc",
        U("https", VHOST, None, BLOB, "versionId=abc"),
        id="s3-uri-case-and-version",
    ),
    pytest.param(
        "s3://my.dotted.bucket/key",
        U("https", "s3.amazonaws.com", None, "/my.dotted.bucket/key"),
        id="s3-dotted-bucket-path-style",
    ),
    pytest.param(
        f"https://{VHOST}{BLOB}?{SIGV4}", U("https", VHOST, None, BLOB, SIGV4), id="presigned"
    ),
    pytest.param(
        f"https://{VHOST}{BLOB}?versionId=3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY",
        U("https", VHOST, None, BLOB, "versionId=3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY"),
        id="version-id",
    ),
    pytest.param("http://minio:9000/b/k", U("http", "minio", 9000, "/b/k"), id="port"),
    pytest.param(
        "https://h.example:443/k", U("https", "h.example", 443, "/k"), id="explicit-default-port"
    ),
    pytest.param("http://h.example:08080/k", U("http", "h.example", 8080, "/k"), id="port-zeros"),
    pytest.param("http://[::1]:9000/b/k", U("http", "[::1]", 9000, "/b/k"), id="ipv6"),
    pytest.param(
        "http://[2001:DB8:0:0::1]/k", U("http", "[2001:db8::1]", None, "/k"), id="ipv6-canonical"
    ),
    pytest.param("http://10.0.0.7:9000/k", U("http", "10.0.0.7", 9000, "/k"), id="ipv4"),
    pytest.param(
        "HTTPS://DandiArchive.S3.AmazonAWS.com/K", U("https", VHOST, None, "/K"), id="case"
    ),
    pytest.param("https://h/a/b%20c", U("https", "h", None, "/a/b%20c"), id="space-encoded"),
    pytest.param("https://h/caf%C3%A9", U("https", "h", None, "/caf%C3%A9"), id="unicode-encoded"),
    pytest.param("https://h/café", U("https", "h", None, "/caf%C3%A9"), id="unicode-raw-escaped"),
    pytest.param("https://h/a%2Fb%2fc", U("https", "h", None, "/a%2Fb%2fc"), id="encoded-slash"),
    pytest.param("https://h/%7E+x~", U("https", "h", None, "/%7E+x~"), id="never-re-encoded"),
    pytest.param("https://h//lead", U("https", "h", None, "//lead"), id="empty-segment"),
    pytest.param("https://h/a...b/...", U("https", "h", None, "/a...b/..."), id="dots-not-segment"),
    pytest.param("https://h/k#frag", U("https", "h", None, "/k"), id="fragment-dropped"),
    pytest.param("https://h/k?", U("https", "h", None, "/k"), id="empty-query"),
    pytest.param("https://h/k?a=1&a=2&b", U("https", "h", None, "/k", "a=1&a=2&b"), id="raw-query"),
    pytest.param("https://h/k?a=%C3%A9", U("https", "h", None, "/k", "a=%C3%A9"), id="query-enc"),
    pytest.param("https://h/k?a=é", U("https", "h", None, "/k", "a=%C3%A9"), id="query-raw"),
    pytest.param("https://h/@a:b", U("https", "h", None, "/@a:b"), id="at-in-path"),
]


@pytest.mark.parametrize(("url", "expected"), PARSE_CASES)
def test_parse_upstream_url(url: str, expected: UpstreamURL) -> None:
    assert parse_upstream_url(url) == expected


@pytest.mark.parametrize(
    ("u", "netloc", "effective_port", "url"),
    [
        (U("https", "h", None, "/k"), "h", 443, "https://h/k"),
        (U("http", "h", None, "/k"), "h", 80, "http://h/k"),
        (U("http", "h", 9000, "/k", "a=1"), "h:9000", 9000, "http://h:9000/k?a=1"),
        (U("https", "[::1]", 8443, "/k"), "[::1]:8443", 8443, "https://[::1]:8443/k"),
        (U("https", "h", 443, "/k"), "h:443", 443, "https://h:443/k"),
    ],
)
def test_upstream_url_properties(
    u: UpstreamURL, netloc: str, effective_port: int, url: str
) -> None:
    assert (u.netloc, u.effective_port, u.url) == (netloc, effective_port, url)


def test_repr_redacts_signature() -> None:
    u = parse_upstream_url(f"https://{VHOST}{BLOB}?{SIGV4}")
    assert "0f1e2d3c" not in repr(u)
    assert "X-Amz-Signature=REDACTED" in repr(u)


# -- rejections -------------------------------------------------------------

PARSE_REJECTS = [
    ("ftp://h/k", "unsupported scheme"),
    ("file:///etc/passwd", "unsupported scheme"),
    ("h.example/k", "not an absolute URL"),
    ("/blobs/k", "not an absolute URL"),
    ("https://user@h/k", "credentials"),
    ("https://user:pw@h/k", "credentials"),
    ("https:///k", "no host"),
    ("https://:443/k", "no host"),
    ("https://h:0/k", "port"),
    ("https://h:65536/k", "port"),
    ("https://h:abc/k", "port"),
    ("https://h:/k", "port"),
    ("https://h:-1/k", "port"),
    ("https://h:１２/k", "port"),
    ("https://h", "no object path"),
    ("https://h/", "no object path"),
    ("https://h?x=1", "no object path"),
    ("s3://dandiarchive", "no object path"),
    ("s3://ab/k", "bucket"),
    ("s3:///k", "bucket"),
    ("s3://user@bucket/k", "bucket"),
    ("https://h/a b", "whitespace"),
    ("https://h/a\tb", "whitespace"),
    ("https://h/a\nb", "whitespace"),
    ("https://h/a\x00b", "control"),
    ("https://h/a\x7fb", "control"),
    (" https://h/k", "whitespace"),
    ("https://h/a\\b", "backslash"),
    ("https://h\\@evil/k", "backslash"),
    ("https://h/a\u00a0b", "whitespace"),
    ("https://h/a\u200bb", "invisible"),
    ("https://h/a\u202eb", "invisible"),
    ("https://h/a\x85b", "invisible"),
    ("https://h/a/../k", "'..'"),
    ("https://h/a/./k", "'..'"),
    ("https://h/..", "'..'"),
    ("https://h/a/%2e%2e/k", "'..'"),
    ("https://h/a/%2E/k", "'..'"),
    ("https://h/a/.%2e/k", "'..'"),
    ("https://h/a%2F..%2Fk", "'..'"),
    ("https://h/a%5C..%5Ck", "'..'"),
    ("https://h/a%zz", "%XX"),
    ("https://h/a%2", "%XX"),
    ("https://h..example/k", "host"),
    ("https://h.example./k", "host"),
    ("https://h!x/k", "host"),
    ("https://exämple.org/k", "punycode"),
    ("https://::1/k", "brackets"),
    ("https://[::1/k", "unterminated"),
    ("https://[::g]/k", "IPv6"),
    ("https://[1.2.3.4]/k", "IPv6"),
    ("https://[fe80::1%25eth0]/k", "zone"),
    ("https://[::1]x/k", "after the IPv6"),
    ("https://2130706433/k", "IPv4"),
    ("https://0177.0.0.1/k", "IPv4"),
    ("https://1.2.3.999/k", "IPv4"),
]


@pytest.mark.parametrize(("url", "why"), PARSE_REJECTS)
def test_parse_upstream_url_rejects(url: str, why: str) -> None:
    with pytest.raises(InvalidURL) as info:
        parse_upstream_url(url)
    assert isinstance(info.value, ValueError)
    assert why in str(info.value)


def test_parse_rejects_unencodable_surrogate() -> None:
    # surrogateescape maps U+DC80..U+DCFF back to raw bytes; other lone
    # surrogates cannot be sent at all.
    assert parse_upstream_url("https://h/k\udcff").path == "/k%FF"
    with pytest.raises(InvalidURL, match="not valid Unicode"):
        parse_upstream_url("https://h/k\ud800")


SECRET = "S3CR3TS1GNATUR3"


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://h/k?X-Amz-Signature={SECRET}",
        f"https://user@h/k?X-Amz-Signature={SECRET}",
        f"https://h:bad/k?X-Amz-Signature={SECRET}",
        f"https://h/a b?X-Amz-Signature={SECRET}",
        f"https://h/../k?X-Amz-Signature={SECRET}",
        f"https://h/?X-Amz-Signature={SECRET}",
        f"https://h?X-Amz-Signature={SECRET}",
        f"h/k?X-Amz-Signature={SECRET}://x",
        f"https?X-Amz-Signature={SECRET}://h/k",
    ],
)
def test_error_messages_never_echo_signatures(url: str) -> None:
    with pytest.raises(InvalidURL) as info:
        parse_upstream_url(url)
    assert SECRET not in str(info.value)


# -- the daemon side: proxy path -> upstream -------------------------------

PROXY_PATH_CASES = [
    ("/https/host:9000/a/b%20c", "", U("https", "host", 9000, "/a/b%20c")),
    (f"/https/{VHOST}{BLOB}", SIGV4, U("https", VHOST, None, BLOB, SIGV4)),
    ("/http/[::1]:9000/b/k", "versionId=v1", U("http", "[::1]", 9000, "/b/k", "versionId=v1")),
    ("/http/%5B::1%5D:9000/b/k", "", U("http", "[::1]", 9000, "/b/k")),
    ("/http/%5b%3A%3a1%5d%3a9000/b/k", "", U("http", "[::1]", 9000, "/b/k")),
    ("/HTTPS/Host.Example/K", "", U("https", "host.example", None, "/K")),
    ("/https/h/%2F", "", U("https", "h", None, "/%2F")),
    ("/https/h//k", "", U("https", "h", None, "//k")),
    ("/https/h/caf%C3%A9/%E2%9C%93", "", U("https", "h", None, "/caf%C3%A9/%E2%9C%93")),
    ("/https/h/k", "a=é", U("https", "h", None, "/k", "a=%C3%A9")),
]


@pytest.mark.parametrize(("path", "query", "expected"), PROXY_PATH_CASES)
def test_upstream_from_proxy_path(path: str, query: str, expected: UpstreamURL) -> None:
    assert upstream_from_proxy_path(path, query) == expected


PROXY_PATH_REJECTS = [
    ("/ftp/h/k", "", "/http/ or /https/"),
    ("/s3/bucket/k", "", "/http/ or /https/"),
    ("/", "", "/http/ or /https/"),
    ("/status", "", "/http/ or /https/"),
    ("https/h/k", "", "must start with '/'"),
    ("", "", "must start with '/'"),
    ("/https", "", "no upstream host"),
    ("/https/", "", "no upstream host"),
    ("/https//k", "", "no upstream host"),
    ("/https/h", "", "no object path"),
    ("/https/h/", "", "no object path"),
    ("/https/user@h/k", "", "credentials"),
    ("/https/h%40evil/k", "", "credentials"),
    ("/https/h%2Fevil/k", "", "host"),
    ("/https/h:0/k", "", "port"),
    ("/https/h:99999/k", "", "port"),
    ("/https/h:x/k", "", "port"),
    ("/https/h/../k", "", "'..'"),
    ("/https/h/a/..", "", "'..'"),
    ("/https/h/./k", "", "'..'"),
    ("/https/h/a/%2e%2e/k", "", "'..'"),
    ("/https/h/a/%2E%2e/k", "", "'..'"),
    ("/https/h/a/%2E/k", "", "'..'"),
    ("/https/h/%2e%2e%2fk", "", "'..'"),
    ("/https/h/a\\b", "", "backslash"),
    ("/https/h/a\x00b", "", "control"),
    ("/https/h/a\x1bb", "", "control"),
    ("/https/h/a\x7fb", "", "control"),
    ("/https/h/a b", "", "whitespace"),
    ("/https/h%0a/k", "", "upstream host"),
    ("/https/h/k?x=1", "", "query string separately"),
    ("/https/h/k#f", "", "'#'"),
    ("/https/h/k", "a=1\r\nX-Injected: 1", "query string"),
    ("/https/h/k", "a=1#f", "'#'"),
    ("/https/h/a%zz", "", "%XX"),
]


@pytest.mark.parametrize(("path", "query", "why"), PROXY_PATH_REJECTS)
def test_upstream_from_proxy_path_rejects(path: str, query: str, why: str) -> None:
    with pytest.raises(InvalidURL) as info:
        upstream_from_proxy_path(path, query)
    assert why in str(info.value)


# -- the client side: proxied_url / original_url ------------------------------

PROXIED_CASES = [
    (f"https://{VHOST}{BLOB}", PROXY, f"{PROXY}/https/{VHOST}{BLOB}"),
    (f"https://{VHOST}{BLOB}", PROXY + "/", f"{PROXY}/https/{VHOST}{BLOB}"),
    (f"s3://dandiarchive{BLOB}", PROXY, f"{PROXY}/https/{VHOST}{BLOB}"),
    (
        f"https://s3.us-east-2.amazonaws.com/dandiarchive{BLOB}",
        PROXY,
        f"{PROXY}/https/s3.us-east-2.amazonaws.com/dandiarchive{BLOB}",
    ),
    (f"https://{VHOST}{BLOB}?{SIGV4}", PROXY, f"{PROXY}/https/{VHOST}{BLOB}?{SIGV4}"),
    ("http://[::1]:9000/b/k%2Fx", PROXY, f"{PROXY}/http/[::1]:9000/b/k%2Fx"),
    ("https://h/k", "http://lab-cache:8080/cache", "http://lab-cache:8080/cache/https/h/k"),
    ("https://h/k", "http://lab-cache:8080/cache/", "http://lab-cache:8080/cache/https/h/k"),
    ("https://h/k", "https://Cache.Lab.Example/a/b", "https://cache.lab.example/a/b/https/h/k"),
    ("https://h/k", "127.0.0.1:8080", f"{PROXY}/https/h/k"),
    ("https://h/k", f"  {PROXY}\n", f"{PROXY}/https/h/k"),
    ("https://h/café", PROXY, f"{PROXY}/https/h/caf%C3%A9"),
    # Idempotent: proxying a proxied URL again does not nest it.
    (f"{PROXY}/https/{VHOST}{BLOB}", PROXY, f"{PROXY}/https/{VHOST}{BLOB}"),
    ("http://c:1/p/https/h/k?a=1", "http://c:1/p", "http://c:1/p/https/h/k?a=1"),
]


@pytest.mark.parametrize(("url", "proxy", "expected"), PROXIED_CASES)
def test_proxied_url(url: str, proxy: str, expected: str) -> None:
    assert proxied_url(url, proxy) == expected


@pytest.mark.parametrize(
    ("proxy", "why"),
    [
        ("", "NWBCACHE_URL"),
        ("   ", "NWBCACHE_URL"),
        ("ftp://h:21", "http:// or https://"),
        ("http://h:8080?x=1", "query"),
        ("http://h:8080/#x", "query"),
        ("http://user@h:8080", "credentials"),
        ("http://h:0", "port"),
        ("http://h:8080/a/../b", "'..'"),
        ("http://h 8080", "whitespace"),
    ],
)
def test_proxied_url_bad_proxy(proxy: str, why: str) -> None:
    with pytest.raises(InvalidURL) as info:
        proxied_url("https://h/k", proxy)
    assert why in str(info.value)


@pytest.mark.parametrize(
    ("url", "proxy"),
    [
        (f"{PROXY}/status", PROXY),
        (f"{PROXY}/https/h", PROXY),
        ("http://c:1/other/https/h/k", "http://c:1/p"),
    ],
)
def test_proxied_url_refuses_the_proxy_itself(url: str, proxy: str) -> None:
    with pytest.raises(InvalidURL, match="points at the proxy itself"):
        proxied_url(url, proxy)


def test_proxied_url_reads_env_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NWBCACHE_URL", raising=False)
    with pytest.raises(InvalidURL, match="NWBCACHE_URL"):
        proxied_url("https://h/k")
    monkeypatch.setenv("NWBCACHE_URL", "http://envhost:1234/pre/")
    assert proxied_url("https://h/k") == "http://envhost:1234/pre/https/h/k"
    monkeypatch.setenv("NWBCACHE_URL", "http://other:1")
    assert proxied_url("https://h/k") == "http://other:1/https/h/k"
    # An explicit proxy wins over the environment.
    assert proxied_url("https://h/k", PROXY) == f"{PROXY}/https/h/k"


ORIGINAL_CASES = [
    (f"{PROXY}/https/{VHOST}{BLOB}", PROXY, f"https://{VHOST}{BLOB}"),
    (f"{PROXY}/https/{VHOST}{BLOB}?{SIGV4}", PROXY, f"https://{VHOST}{BLOB}?{SIGV4}"),
    (f"{PROXY}/http/[::1]:9000/b/k", PROXY, "http://[::1]:9000/b/k"),
    ("http://c:1/cache/https/h/a%20b", "http://c:1/cache/", "https://h/a%20b"),
    ("http://localhost:8080/https/h/k", PROXY, "https://h/k"),  # only the prefix must match
    (f"{PROXY}/https/h/k#frag", PROXY, "https://h/k"),
]


@pytest.mark.parametrize(("proxied", "proxy", "expected"), ORIGINAL_CASES)
def test_original_url(proxied: str, proxy: str, expected: str) -> None:
    assert original_url(proxied, proxy) == expected


def test_original_url_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NWBCACHE_URL", raising=False)
    assert original_url(f"{PROXY}/https/h/k") == "https://h/k"
    monkeypatch.setenv("NWBCACHE_URL", "http://c:1/cache")
    assert original_url("http://c:1/cache/https/h/k") == "https://h/k"
    with pytest.raises(InvalidURL, match="prefix"):
        original_url("http://c:1/https/h/k")


@pytest.mark.parametrize(
    ("proxied", "proxy", "why"),
    [
        ("http://c:1/other/https/h/k", "http://c:1/cache", "prefix"),
        ("http://c:1/cache", "http://c:1/cache", "prefix"),
        ("http://c:1/cache/https/h", "http://c:1/cache", "no object path"),
        ("http://c:1/cachex/https/h/k", "http://c:1/cache", "prefix"),
        (f"https://{VHOST}{BLOB}", PROXY, "/http/ or /https/"),
        (f"{PROXY}/https/h/../k", PROXY, "'..'"),
    ],
)
def test_original_url_rejects(proxied: str, proxy: str, why: str) -> None:
    with pytest.raises(InvalidURL) as info:
        original_url(proxied, proxy)
    assert why in str(info.value)


@pytest.mark.slow
def test_client_module_stays_light() -> None:
    code = (
        "import sys, nwbcache, nwbcache.urls\n"
        "heavy = {'aiohttp', 'yarl', 'requests', 'fsspec', 'remfile', 'h5py'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# -- cache keys ---------------------------------------------------------------

SIGV4_OTHER = SIGV4.replace("0f1e2d3c", "99999999").replace("20240101T", "20250202T")
SIGV2 = "AWSAccessKeyId=AKIAEXAMPLE&Expires=1700000000&Signature=abc%2Bdef%3D"

SAME_KEY = [
    pytest.param(f"https://{VHOST}{BLOB}?{SIGV4}", f"https://{VHOST}{BLOB}?{SIGV4_OTHER}", id="v4"),
    pytest.param(f"https://{VHOST}{BLOB}?{SIGV4}", f"https://{VHOST}{BLOB}", id="v4-vs-unsigned"),
    pytest.param(f"https://{VHOST}{BLOB}?{SIGV2}", f"https://{VHOST}{BLOB}", id="v2-vs-unsigned"),
    pytest.param(
        f"https://{VHOST}{BLOB}?X-Amz-Security-Token=t1&{SIGV4}",
        f"https://{VHOST}{BLOB}?X-Amz-Security-Token=t2&{SIGV4_OTHER}",
        id="session-token",
    ),
    pytest.param(
        f"https://{VHOST}{BLOB}?versionId=v1&{SIGV4}",
        f"https://{VHOST}{BLOB}?{SIGV4_OTHER}&versionId=v1",
        id="version-and-signature",
    ),
    pytest.param(
        "https://h/k?response-content-disposition=attachment", "https://h/k", id="response-override"
    ),
    pytest.param("https://h/k?versionId=v&partNumber=2", "https://h/k?partNumber=2&versionId=v"),
    pytest.param("https://h:443/k", "https://h/k", id="default-https-port"),
    pytest.param("http://h:80/k", "http://h/k", id="default-http-port"),
    pytest.param("https://H.Example/k", "https://h.example/k", id="host-case"),
    pytest.param(f"s3://dandiarchive{BLOB}", f"https://{VHOST}{BLOB}", id="s3-uri"),
    pytest.param("https://h/k?x-amz-signature=a", "https://h/k?X-AMZ-SIGNATURE=b", id="name-case"),
]


@pytest.mark.parametrize(("a", "b"), SAME_KEY)
def test_cache_key_same(a: str, b: str) -> None:
    assert cache_key(parse_upstream_url(a)) == cache_key(parse_upstream_url(b))


DIFFERENT_KEY = [
    pytest.param("https://h/k?versionId=v1", "https://h/k?versionId=v2", id="version"),
    pytest.param("https://h/k?versionId=v1", "https://h/k", id="version-vs-none"),
    pytest.param("https://h/k?versionId=v1", "https://h/k?versionid=v1", id="param-case"),
    pytest.param("https://h/k?partNumber=1", "https://h/k?partNumber=2", id="part"),
    pytest.param("http://h/k", "https://h/k", id="scheme"),
    pytest.param("https://h:9000/k", "https://h:9001/k", id="port"),
    pytest.param("https://h:443/k", "http://h:443/k", id="port-not-default-for-http"),
    pytest.param("https://h/k", "https://h/K", id="path-case"),
    pytest.param("https://h/a/b", "https://h/a/c", id="path"),
    pytest.param("https://h/k", "https://g/k", id="host"),
]


@pytest.mark.parametrize(("a", "b"), DIFFERENT_KEY)
def test_cache_key_different(a: str, b: str) -> None:
    assert cache_key(parse_upstream_url(a)) != cache_key(parse_upstream_url(b))


@pytest.mark.parametrize(
    ("url", "key"),
    [
        (f"https://{VHOST}{BLOB}?{SIGV4}", f"https://{VHOST}{BLOB}"),
        ("https://h:443/k?b=2&versionId=v&a=1", "https://h/k?a=1&b=2&versionId=v"),
        ("http://h:9000/a%2Fb%20c?Signature=s", "http://h:9000/a%2Fb%20c"),
        ("https://[::1]:8443/k?&&versionId=v&", "https://[::1]:8443/k?versionId=v"),
        ("https://h/k?flag&AWSAccessKeyId=x", "https://h/k?flag"),
    ],
)
def test_cache_key_exact(url: str, key: str) -> None:
    assert cache_key(parse_upstream_url(url)) == key


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("X-Amz-Signature", True),
        ("x-amz-credential", True),
        ("X-Amz-Security-Token", True),
        ("X-Amz-Anything-New", True),
        ("Signature", True),
        ("Expires", True),
        ("AWSAccessKeyId", True),
        ("response-content-type", True),
        ("X%2DAmz-Signature", True),
        ("versionId", False),
        ("partNumber", False),
        ("signatures", False),
        ("x-amz", False),
        ("", False),
    ],
)
def test_is_signature_param(name: str, expected: bool) -> None:
    assert is_signature_param(name) is expected


def test_signature_tables_are_lowercase() -> None:
    assert all(name == name.lower() for name in SIGNATURE_PARAMS)
    assert all(prefix == prefix.lower() for prefix in SIGNATURE_PREFIXES)
    assert {"signature", "expires", "awsaccesskeyid", "x-amz-security-token"} <= SIGNATURE_PARAMS
    assert {"x-amz-", "response-"} <= set(SIGNATURE_PREFIXES)


# -- allow-list ---------------------------------------------------------------

ALLOW_CASES = [
    # The default DANDI list.
    (DANDI_HOSTS, f"https://{VHOST}{BLOB}", True),
    (DANDI_HOSTS, f"s3://dandiarchive{BLOB}", True),
    (DANDI_HOSTS, f"http://{VHOST}{BLOB}", True),
    (DANDI_HOSTS, f"https://{VHOST}:443{BLOB}", True),
    (DANDI_HOSTS, f"https://{VHOST}:80{BLOB}", False),
    (DANDI_HOSTS, f"https://{VHOST}:8443{BLOB}", False),
    (DANDI_HOSTS, f"https://s3.us-east-2.amazonaws.com/dandiarchive{BLOB}", True),
    (DANDI_HOSTS, f"https://s3.amazonaws.com/dandiarchive{BLOB}", True),
    (DANDI_HOSTS, "https://s3.us-east-2.amazonaws.com/dandiarchive-evil/k", False),
    (DANDI_HOSTS, "https://s3.us-east-2.amazonaws.com/otherbucket/k", False),
    (DANDI_HOSTS, "https://s3.us-east-2.amazonaws.com/dandiarchive%2Fx/k", False),
    (DANDI_HOSTS, "https://s3.us-west-2.amazonaws.com/dandiarchive/k", False),
    (DANDI_HOSTS, f"https://evil.example{BLOB}", False),
    (DANDI_HOSTS, f"https://{VHOST}.evil.example{BLOB}", False),
    (DANDI_HOSTS, f"s3://otherbucket{BLOB}", False),
    # Ports.
    (["localhost:9000"], "http://localhost:9000/b/k", True),
    (["localhost:9000"], "http://localhost/b/k", False),
    (["localhost:9000"], "http://localhost:9001/b/k", False),
    (["localhost"], "http://localhost/b/k", True),
    (["localhost"], "http://localhost:80/b/k", True),
    (["localhost"], "https://localhost:443/b/k", True),
    (["localhost"], "http://localhost:443/b/k", False),
    (["localhost"], "http://localhost:9000/b/k", False),
    (["[::1]:9000"], "http://[::1]:9000/b/k", True),
    (["[0:0::1]:9000"], "http://[::1]:9000/b/k", True),
    (["[::1]:9000"], "http://[::2]:9000/b/k", False),
    (["127.0.0.1:9000"], "http://127.0.0.1:9000/b/k", True),
    # Host case.
    (["DandiArchive.S3.AmazonAWS.com"], f"https://{VHOST}{BLOB}", True),
    ([VHOST], f"https://DANDIARCHIVE.s3.amazonaws.com{BLOB}", True),
    # Path prefixes match whole segments; paths are case-sensitive.
    (["h/a/b"], "https://h/a/b/c", True),
    (["h/a/b"], "https://h/a/b", True),
    (["h/a/b/"], "https://h/a/b/c", True),
    (["h/a/b"], "https://h/a/bc", False),
    (["h/a/b"], "https://h/a", False),
    (["h/a/b"], "https://h/A/b/c", False),
    (["h/"], "https://h/anything", True),
    # Several entries; an empty list permits nothing.
    (["a.example", "b.example:8080"], "http://b.example:8080/k", True),
    (["a.example", "b.example:8080"], "http://c.example/k", False),
    ([], "https://h/k", False),
]


@pytest.mark.parametrize(("entries", "url", "permitted"), ALLOW_CASES)
def test_allow_list(entries: list[str], url: str, permitted: bool) -> None:
    assert AllowList.parse(entries).permits(parse_upstream_url(url)) is permitted


@pytest.mark.parametrize(
    ("entry", "rule"),
    [
        ("h.example", AllowRule("h.example", None, "")),
        ("  H.Example:9000  ", AllowRule("h.example", 9000, "")),
        (
            "s3.us-east-2.amazonaws.com/dandiarchive/",
            AllowRule("s3.us-east-2.amazonaws.com", None, "/dandiarchive"),
        ),
        ("[::1]:9000/b", AllowRule("[::1]", 9000, "/b")),
        ("h/a%20b/c", AllowRule("h", None, "/a%20b/c")),
    ],
)
def test_allow_list_parse(entry: str, rule: AllowRule) -> None:
    assert AllowList.parse([entry]).entries == (rule,)


def test_allow_list_parse_single_string_is_one_entry() -> None:
    assert AllowList.parse("h.example:9000").entries == (AllowRule("h.example", 9000, ""),)


def test_allow_rule_str_round_trips() -> None:
    rules = AllowList.parse((*DANDI_HOSTS, "[::1]:9000/b")).entries
    assert tuple(str(rule) for rule in rules) == (*DANDI_HOSTS, "[::1]:9000/b")


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("https://h.example", "without a scheme"),
        ("h:0", "port"),
        ("h:abc", "port"),
        ("h:", "port"),
        ("user@h", "credentials"),
        ("h?x=1", "'?'"),
        ("h/a/../b", "'..'"),
        ("h/a b", "whitespace"),
        ("::1", "brackets"),
        ("[::1", "unterminated"),
        ("h..example", "host"),
        ("/prefix-only", "no host"),
    ],
)
def test_allow_list_rejects(entry: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        AllowList.parse(["ok.example", entry])
    assert isinstance(info.value, InvalidURL)
    assert why in str(info.value)


# -- redaction ------------------------------------------------------------------

REDACT_CASES = [
    ("https://h/k", "https://h/k"),
    ("https://h/k?versionId=v", "https://h/k?versionId=v"),
    (
        "https://h/k?versionId=v&X-Amz-Signature=abc&a=1",
        "https://h/k?versionId=v&X-Amz-Signature=REDACTED&a=1",
    ),
    (
        f"https://h/k?{SIGV2}",
        "https://h/k?AWSAccessKeyId=REDACTED&Expires=REDACTED&Signature=REDACTED",
    ),
    ("https://h/k?x-amz-signature=abc", "https://h/k?x-amz-signature=REDACTED"),
    ("https://h/k?X%2DAmz-Signature=abc", "https://h/k?X%2DAmz-Signature=REDACTED"),
    ("https://h/k?X-Amz-Signature=", "https://h/k?X-Amz-Signature="),
    ("https://h/k?X-Amz-Signature", "https://h/k?X-Amz-Signature"),
    ("https://h/k?Signature=a=b&c=d", "https://h/k?Signature=REDACTED&c=d"),
    ("https://h/k?a=1#Signature=abc", "https://h/k?a=1#Signature=REDACTED"),
    ("https://h/Signature=keep/k", "https://h/Signature=keep/k"),
    ("https://user:pw@h/k?a=1", "https://REDACTED@h/k?a=1"),
    (f"{PROXY}/https/h/k?Expires=1&b=2", f"{PROXY}/https/h/k?Expires=REDACTED&b=2"),
    ("not a url ?Signature=x", "not a url ?Signature=REDACTED"),
]


@pytest.mark.parametrize(("url", "expected"), REDACT_CASES)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


# -- properties -----------------------------------------------------------------


def _is_dot_segment_path(path: str) -> bool:
    for segment in path.split("/"):
        for part in unquote(segment).replace("\\", "/").split("/"):
            if part in (".", ".."):
                return True
    return False


_CHARS = st.characters(codec="utf-8", exclude_categories=["Cs"])
_LABELS = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=10)
_DNS_HOSTS = (
    st.lists(_LABELS, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda h: not all(label.isdigit() for label in h.split(".")))
)
HOSTS = st.one_of(
    _DNS_HOSTS,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a.compressed}]"),
)
PORTS = st.none() | st.integers(1, 65535)
SEGMENTS = st.one_of(
    st.text(_CHARS, max_size=12).map(lambda s: quote(s, safe="!$&'()*+,;=:@~")),
    st.sampled_from(["", "%2F", "%2f", "a%2Fb", "%20", "%C3%A9", "%e2%9c%93", "[x]", "...", "+"]),
)
PATHS = (
    st.lists(SEGMENTS, min_size=1, max_size=6)
    .map(lambda segments: "/" + "/".join(segments))
    .filter(lambda p: p != "/" and not _is_dot_segment_path(p))
)
_QTEXT = st.text(_CHARS, max_size=10).map(lambda s: quote(s, safe="-_.~!$'()*+,;:@/?"))
QUERIES = st.lists(st.one_of(_QTEXT, st.tuples(_QTEXT, _QTEXT).map("=".join)), max_size=5).map(
    "&".join
)
UPSTREAMS = st.builds(UpstreamURL, st.sampled_from(["http", "https"]), HOSTS, PORTS, PATHS, QUERIES)
PROXIES = st.sampled_from(
    [PROXY, PROXY + "/", "http://localhost:9999/cache", "https://cache.lab.example/nwb/v1/"]
)
_PROXY_NETLOCS = {"127.0.0.1:8080", "localhost:9999", "cache.lab.example"}


@settings(deadline=None)
@given(u=UPSTREAMS, proxy=PROXIES)
def test_round_trip(u: UpstreamURL, proxy: str) -> None:
    assume(u.netloc not in _PROXY_NETLOCS)
    assert parse_upstream_url(u.url) == u
    proxied = proxied_url(u.url, proxy)
    base = proxy.rstrip("/")
    assert proxied.startswith(base + "/")
    path, _, query = proxied[len(base) :].partition("?")
    assert upstream_from_proxy_path(path, query) == u
    assert original_url(proxied, proxy) == u.url
    assert proxied_url(proxied, proxy) == proxied  # idempotent
    assert cache_key(upstream_from_proxy_path(path, query)) == cache_key(u)


_SECRET_NAMES = st.sampled_from(
    [*sorted(SIGNATURE_PARAMS), "X-Amz-Signature", "X-Amz-Credential", "response-expires"]
).flatmap(lambda n: st.sampled_from([n, n.upper(), n.lower(), n.title()]))
_SECRET_VALUES = st.text("ABCDEF0123456789%+/=", min_size=1, max_size=40).map(
    lambda s: "S3CR3T" + s
)
_PLAIN_NAMES = st.sampled_from(["versionId", "partNumber", "a", "flag", "x-id"])
_PLAIN_VALUES = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._~", max_size=12)


@settings(deadline=None)
@given(
    u=UPSTREAMS.filter(lambda u: "S3CR3T" not in u.url),
    params=st.lists(
        st.one_of(
            st.tuples(st.just(True), _SECRET_NAMES, _SECRET_VALUES),
            st.tuples(st.just(False), _PLAIN_NAMES, _PLAIN_VALUES),
        ),
        max_size=8,
    ),
    data=st.data(),
)
def test_redact_never_leaks_and_cache_key_ignores_signatures(
    u: UpstreamURL, params: list[tuple[bool, str, str]], data: st.DataObject
) -> None:
    plain = [f"{n}={v}" for secret, n, v in params if not secret]
    shuffled = data.draw(st.permutations([f"{n}={v}" for _, n, v in params]))
    signed = UpstreamURL(u.scheme, u.host, u.port, u.path, "&".join(shuffled))
    redacted = redact_url(signed.url)
    assert "S3CR3T" not in redacted
    assert "S3CR3T" not in repr(signed)
    for param in plain:
        assert param in redacted
    unsigned = UpstreamURL(u.scheme, u.host, u.port, u.path, "&".join(plain))
    assert cache_key(signed) == cache_key(unsigned)
    assert "S3CR3T" not in cache_key(signed)
