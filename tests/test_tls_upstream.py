"""An HTTPS upstream read through the daemon, end to end: the S3 emulator over
TLS with a certificate of a test CA, the daemon trusting that CA the way
OpenSSL is told to (SSL_CERT_FILE), and the bytes compared with the origin's.

Real S3 and DANDI are HTTPS: the cold path there is wireconn.TLSConnection,
the sink of a fetch run, its pauses for disk jobs, and resumption after a
reset, all over TLS.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import trustme

from nwbcache_proxy.config import Settings
from tests.support.daemons import DaemonThread
from tests.support.helpers import origin_host, proxied, scrape, value
from tests.support.s3emu import Fault, S3Emulator

BS = 64 * 1024
DATA = os.urandom(3 * 1024 * 1024 + 12_345)


@pytest.fixture
def tls_origin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Emulator]:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    emu = S3Emulator()
    emu.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(emu.tls)
    with emu:
        yield emu


@pytest.fixture
def daemon(tls_origin: S3Emulator, tmp_path: Path) -> Iterator[DaemonThread]:
    settings = Settings(
        port=0,
        cache_dir=tmp_path / "cache",
        allow_upstream=(origin_host(tls_origin),),
        block_size=BS,
        retry_base_delay=0.01,
        first_byte_timeout=5.0,
        read_timeout=5.0,
        s3_listen="off",
    )
    d = DaemonThread(settings).start()
    try:
        yield d
    finally:
        d.stop()


def test_an_https_object_is_read_exactly_cold_and_warm(
    tls_origin: S3Emulator, daemon: DaemonThread
) -> None:
    tls_origin.put("/b/obj", DATA)
    url = proxied(daemon.url, tls_origin, "/b/obj")
    assert url.startswith(f"{daemon.url}/https/")
    cold = requests.get(url, timeout=60)
    assert cold.status_code == 200 and cold.headers["X-Cache"] in ("MISS", "PARTIAL")
    assert cold.content == DATA
    tls_origin.wait_idle()
    asked = len(tls_origin.requests("/b/obj"))
    for start, end in [(0, 99), (BS - 3, 5 * BS + 7), (len(DATA) - 1000, len(DATA) - 1)]:
        r = requests.get(url, headers={"Range": f"bytes={start}-{end}"}, timeout=30)
        assert (r.status_code, r.headers["X-Cache"]) == (206, "HIT")
        assert r.content == DATA[start : end + 1]
    assert len(tls_origin.requests("/b/obj")) == asked  # all from the cache
    # Few connections for many requests: they are kept alive over TLS too.
    peers = {e.peer for e in tls_origin.requests("/b/obj")}
    assert len(peers) < asked
    samples = scrape(daemon.url)
    opened = value(samples, "nwbcache_upstream_connections_total", how="opened")
    reused = value(samples, "nwbcache_upstream_connections_total", how="reused")
    assert opened == len(peers) and opened + reused >= asked


def test_a_reset_mid_body_over_tls_is_resumed_byte_exact(
    tls_origin: S3Emulator, daemon: DaemonThread
) -> None:
    tls_origin.put("/b/cut", DATA)
    tls_origin.inject(
        Fault.RESET_MID_BODY, count=2, path="/b/cut", with_range=True, after_bytes=100_000
    )
    r = requests.get(proxied(daemon.url, tls_origin, "/b/cut"), timeout=60)
    assert r.status_code == 200 and r.content == DATA
    tls_origin.wait_idle()
    faults = [e.fault for e in tls_origin.requests("/b/cut")]
    assert faults.count(Fault.RESET_MID_BODY) == 2  # both cuts happened, and were resumed
