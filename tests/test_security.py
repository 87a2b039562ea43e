"""Security defaults: secrets stay out of logs, redirects stay on the allow-list."""

from __future__ import annotations

import http.server
import logging
import os
import threading
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.support.daemons import DaemonThread
from tests.support.helpers import origin_host, proxied, wait_until
from tests.support.s3emu import Fault, S3Emulator

KEY = "/dandiarchive/blobs/sec/ret/object"
DATA = os.urandom(100_000)


def test_presigned_signature_never_reaches_logs(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    origin.put(KEY, DATA)
    daemon = make_daemon(block_size=16 * 1024)
    secret = "SECRETSIGNATURE0123456789"
    query = f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=CREDSECRET&X-Amz-Signature={secret}"
    origin.inject(Fault.SLOWDOWN, count=1, method="GET")  # a retry, so retries get logged
    origin.inject(Fault.RESET_MID_BODY, count=1, method="GET")
    r = requests.get(proxied(daemon.url, origin, KEY, query), timeout=30)
    assert r.content == DATA
    # the signature went upstream (S3 needs it) ...
    assert any(secret in e.query for e in origin.requests(KEY))
    # ... and nowhere into the daemon's logs (urllib3, the test's own client, may log it).
    # The access line is written when the handler returns, which can be a
    # moment after the client has the last byte.
    wait_until(lambda: "nwbcache.access" in {r.name for r in caplog.records}, 5, interval=0.02)
    daemon_log = "\n".join(
        caplog.handler.format(r)
        for r in caplog.records
        if r.name.startswith(("nwbcache", "aiohttp"))
    )
    assert "retrying" in daemon_log  # the logs we searched do describe the request
    assert "nwbcache.access" in {r.name for r in caplog.records}
    assert secret not in daemon_log
    assert "CREDSECRET" not in daemon_log


class _Redirector(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def redirector() -> Iterator[tuple[http.server.HTTPServer, type[_Redirector]]]:
    handler = type("Handler", (_Redirector,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()


def test_redirect_to_allowed_host_is_followed(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    redirector: tuple[http.server.HTTPServer, type[_Redirector]],
) -> None:
    server, handler = redirector
    handler.target = origin.url
    origin.put(KEY, DATA)
    redirect_host = f"127.0.0.1:{server.server_address[1]}"
    daemon = make_daemon(allow_upstream=(redirect_host, origin_host(origin)))
    r = requests.get(
        f"{daemon.url}/http/{redirect_host}{KEY}", headers={"Range": "bytes=5-104"}, timeout=30
    )
    assert r.status_code == 206
    assert r.content == DATA[5:105]


def test_redirect_to_other_host_is_refused_and_not_fetched(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    redirector: tuple[http.server.HTTPServer, type[_Redirector]],
) -> None:
    server, handler = redirector
    handler.target = origin.url  # the origin is NOT on this daemon's allow-list
    origin.put(KEY, DATA)
    redirect_host = f"127.0.0.1:{server.server_address[1]}"
    daemon = make_daemon(allow_upstream=(redirect_host,))
    r = requests.get(f"{daemon.url}/http/{redirect_host}{KEY}", timeout=30)
    assert r.status_code == 403
    assert "not allowed" in r.text
    assert origin.log == []


def test_default_bind_is_loopback_only() -> None:
    from nwbcache_proxy.config import Settings

    assert Settings().host == "127.0.0.1"
