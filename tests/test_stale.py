"""Freshness that follows the object: stale-if-error, background revalidation, immutable
objects, only-if-cached, and remembered 404s."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from nwbcache_proxy import versions
from tests.support.client_support import require_hook, script_env
from tests.support.daemons import DaemonThread
from tests.support.helpers import origin_host, proxied, scrape, value, wait_until
from tests.support.s3emu import Fault, S3Emulator

BS = 16 * 1024
DATA = os.urandom(6 * BS + 5)
OFFLINE = {"Cache-Control": "only-if-cached"}


def read(url: str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.get(url, headers=headers or {}, timeout=30)


def stale_served(daemon: DaemonThread) -> float:
    return value(scrape(daemon.url), "nwbcache_stale_served_total")


def test_cached_bytes_are_served_stale_while_upstream_fails_or_is_gone(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put("/m/obj", DATA)
    daemon = make_daemon(block_size=BS, revalidate_after=0.3)
    url = proxied(daemon.url, origin, "/m/obj")
    assert read(url).content == DATA
    time.sleep(0.4)
    origin.inject(Fault.SLOWDOWN, count=10_000)  # every request now: 503 SlowDown
    for _ in range(3):
        r = read(url, {"Range": "bytes=100-20000"})
        assert (r.status_code, r.content) == (206, DATA[100:20001])
        assert r.headers["X-Cache"] == "STALE"
    assert read(url).content == DATA
    origin.stop_thread()  # gone: connection refused
    time.sleep(0.1)
    r = read(url, {"Range": f"bytes={BS - 3}-{3 * BS}"})
    assert (r.status_code, r.content) == (206, DATA[BS - 3 : 3 * BS + 1])
    assert r.headers["X-Cache"] == "STALE"
    assert requests.head(url, timeout=30).headers["X-Cache"] == "STALE"
    assert stale_served(daemon) >= 6


def test_a_stale_object_is_revalidated_in_the_background_without_a_body(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put("/m/reval", DATA)
    daemon = make_daemon(block_size=BS, revalidate_after=0.3)
    url = proxied(daemon.url, origin, "/m/reval")
    assert read(url).content == DATA
    time.sleep(0.4)
    origin.wait_idle()
    origin.clear_log()
    r = read(url, {"Range": "bytes=0-99"})
    assert (r.content, r.headers["X-Cache"]) == (DATA[:100], "STALE")  # at once
    wait_until(lambda: any(e.status == 304 for e in origin.requests("/m/reval")), 5)
    origin.wait_idle()
    [check] = origin.requests("/m/reval")
    assert (check.status, check.bytes_sent) == (304, 0)
    assert check.headers.get("If-None-Match") == r.headers["ETag"]
    r = read(url, {"Range": "bytes=0-99"})
    assert (r.content, r.headers["X-Cache"]) == (DATA[:100], "HIT")  # confirmed: fresh again


def test_a_change_found_in_the_background_is_served_next(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put("/m/change", DATA)
    daemon = make_daemon(block_size=BS, revalidate_after=0.3)
    url = proxied(daemon.url, origin, "/m/change")
    assert read(url).content == DATA
    new = os.urandom(len(DATA) + 7)
    origin.put("/m/change", new)
    time.sleep(0.4)
    assert read(url, {"Range": "bytes=0-99"}).content == DATA[:100]  # stale, at once
    wait_until(lambda: read(url, {"Range": "bytes=0-99"}).content == new[:100], 5)
    assert read(url).content == new


def test_immutable_objects_are_never_revalidated_however_old(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = "/dandiarchive/blobs/abc/def/0a1b2c3d-0000-4000-8000-000000000009"
    origin.put(blob, DATA)
    origin.put("/m/mutable", DATA)
    daemon = make_daemon(
        block_size=BS,
        revalidate_after=3600,
        stale_if_error=3600,
        immutable=(f"{origin_host(origin)}/dandiarchive/blobs",),
    )
    immutable_url = proxied(daemon.url, origin, blob)
    mutable_url = proxied(daemon.url, origin, "/m/mutable")
    versioned_url = proxied(daemon.url, origin, "/m/mutable", "versionId=3")
    for url in (immutable_url, mutable_url, versioned_url):
        assert read(url).content == DATA
    origin.wait_idle()
    origin.stop_thread()
    a_day_later = time.time() + 86_400
    monkeypatch.setattr(versions, "time", SimpleNamespace(time=lambda: a_day_later))
    for url in (immutable_url, versioned_url):
        r = read(url, {"Range": "bytes=5-5000"})
        assert (r.status_code, r.content, r.headers["X-Cache"]) == (206, DATA[5:5001], "HIT")
    r = read(mutable_url, {"Range": "bytes=5-5000"})  # past stale-if-error: must ask
    assert r.status_code == 502
    assert DATA[5:100] not in r.content


def test_only_if_cached_never_asks_upstream(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put("/m/offline", DATA)
    daemon = make_daemon(block_size=BS)
    url = proxied(daemon.url, origin, "/m/offline")
    for method in ("GET", "HEAD"):  # cold: 504 at once
        r = requests.request(method, url, headers=OFFLINE, timeout=30)
        assert r.status_code == 504
    r = read(url, {**OFFLINE, "Range": "bytes=0-99"})
    assert r.status_code == 504 and DATA[:50] not in r.content
    origin.wait_idle()
    assert origin.requests("/m/offline") == []

    assert read(url, {"Range": f"bytes=0-{2 * BS - 1}"}).content == DATA[: 2 * BS]
    origin.wait_idle()
    origin.clear_log()
    r = read(url, {**OFFLINE, "Range": f"bytes=10-{2 * BS - 1}"})
    assert (r.status_code, r.content, r.headers["X-Cache"]) == (206, DATA[10 : 2 * BS], "HIT")
    for partly_cached in (f"bytes=0-{3 * BS}", f"bytes=0-9,{4 * BS}-{4 * BS + 9}", None):
        headers = {**OFFLINE, "Range": partly_cached} if partly_cached else OFFLINE
        r = read(url, headers)
        assert r.status_code == 504, partly_cached
        assert DATA[:50] not in r.content
    origin.wait_idle()
    assert origin.requests("/m/offline") == []  # not even read-ahead


def test_a_404_is_remembered_briefly_and_401_403_never(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    daemon = make_daemon(block_size=BS, negative_ttl=0.5)
    url = proxied(daemon.url, origin, "/m/later")
    for _ in range(5):
        assert read(url).status_code == 404
    origin.wait_idle()
    assert len(origin.requests("/m/later")) == 1
    origin.put("/m/later", DATA)
    assert read(url).status_code == 404  # still remembered
    time.sleep(0.6)
    assert read(url).content == DATA

    origin.require_signature("/m/locked")
    origin.put("/m/locked", DATA)
    locked = proxied(daemon.url, origin, "/m/locked")
    for _ in range(3):
        assert read(locked).status_code == 403
    origin.wait_idle()
    assert len(origin.requests("/m/locked")) == 3


def breakers_open(daemon: DaemonThread) -> float:
    return value(scrape(daemon.url), "nwbcache_upstream_breakers_open")


def test_a_failing_host_is_left_alone_and_cached_reads_go_on(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put("/b/warm", DATA)
    origin.put("/b/cold", DATA)
    daemon = make_daemon(block_size=BS, revalidate_after=0.2, retry_attempts=3)
    warm = proxied(daemon.url, origin, "/b/warm")
    cold = proxied(daemon.url, origin, "/b/cold")
    assert read(warm).content == DATA
    origin.inject(Fault.SLOWDOWN, count=100_000)
    statuses = [read(cold).status_code for _ in range(3)]  # their failures open it
    assert statuses[0] == 502  # tried, retried, failed
    assert 503 in statuses
    assert breakers_open(daemon) == 1
    origin.wait_idle()
    asked = len(origin.log)
    time.sleep(0.3)  # the warm object is due for revalidation now
    for _ in range(5):
        started = time.monotonic()
        r = read(cold, {"Range": "bytes=0-99"})
        assert time.monotonic() - started < 0.5  # no waiting through retries
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        r = read(warm, {"Range": "bytes=0-99"})
        assert (r.status_code, r.content, r.headers["X-Cache"]) == (206, DATA[:100], "STALE")
    origin.wait_idle()
    assert len(origin.log) == asked  # nothing went upstream meanwhile
    status = requests.get(f"{daemon.url}/status.json", timeout=30).json()
    assert status["upstream_breakers_open"] == 1

    origin.clear_faults()  # upstream is back: after the cool-down one probe closes it
    wait_until(lambda: read(cold).status_code == 200, 10, interval=0.5)
    assert read(cold).content == DATA
    assert breakers_open(daemon) == 0


OFFLINE_SCRIPT = """
import sys
import fsspec
import remfile

for url in sys.argv[1:]:
    for library in ("remfile", "fsspec"):
        try:
            if library == "remfile":
                f = remfile.File(url)
                data = f.read(f.length)
            else:
                data = fsspec.filesystem("http").open(url, "rb").read()
        except FileNotFoundError as exc:
            print(library, "NOT CACHED", type(exc).__name__)
        else:
            print(library, "READ", len(data), data[:16].hex())
"""


@pytest.mark.slow
def test_transparent_mode_offline_reads_only_what_is_cached(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    """An unmodified remfile script with NWBCACHE_OFFLINE=1: cached files read,
    the rest refused at once, and upstream never asked."""
    require_hook()
    origin.put("/m/warm", DATA)
    origin.put("/m/cold", DATA)
    daemon = make_daemon(block_size=BS)
    assert read(proxied(daemon.url, origin, "/m/warm")).content == DATA
    origin.wait_idle()
    origin.clear_log()
    script = tmp_path / "offline.py"
    script.write_text(OFFLINE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), origin.url_for("/m/cold"), origin.url_for("/m/warm")],
        env=script_env(
            NWBCACHE_URL=daemon.url, NWBCACHE_HOSTS=origin_host(origin), NWBCACHE_OFFLINE="1"
        ),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "remfile NOT CACHED NotCached",
        "fsspec NOT CACHED FileNotFoundError",
        f"remfile READ {len(DATA)} {DATA[:16].hex()}",
        f"fsspec READ {len(DATA)} {DATA[:16].hex()}",
    ]
    origin.wait_idle()
    assert origin.log == []
