"""Issue 12's scan test, end to end: 24 users' metadata survives one user's scan through a
file four times the cache, under S3-FIFO; LRU loses all of it. Real daemons, real origin."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from nwbcache_proxy.layout import Layout
from tests.support.daemons import DaemonProcess
from tests.support.helpers import get_range, origin_host, proxied, wait_until
from tests.support.s3emu import S3Emulator

pytestmark = pytest.mark.slow  # starts daemon processes

MiB = 1024 * 1024
HEADS = 24
HEAD = 64 * 1024  # what opening an NWB file reads first
CAPACITY = 64 * MiB
SCAN = 256 * MiB


def _data(name: str, size: int) -> bytes:
    """Deterministic, incompressible bytes (cheaper than os.urandom at 256 MiB)."""
    seed = hashlib.sha256(name.encode()).digest()
    block = hashlib.shake_256(seed).digest(MiB)
    return (block * (size // MiB + 1))[:size]


CONTENT = {f"/lab/file{n:02d}.nwb": _data(f"f{n}", 2 * MiB) for n in range(HEADS)}
CONTENT["/lab/raw-ephys.nwb"] = _data("scan", SCAN)


@pytest.fixture(scope="module")
def lab_origin() -> Iterator[S3Emulator]:
    origin = S3Emulator()
    for key, data in CONTENT.items():
        origin.put(key, data)
    origin.start_in_thread()
    try:
        yield origin
    finally:
        origin.stop_thread()


def _daemon(origin: S3Emulator, cache_dir: Path, eviction: str) -> DaemonProcess:
    return DaemonProcess(
        [
            "--cache-dir", str(cache_dir),
            "--cache-size", str(CAPACITY),
            "--eviction", eviction,
            "--allow-upstream", origin_host(origin),
        ]
    ).start()  # fmt: skip


def _cache_bytes(cache_dir: Path) -> int:
    uri = f"file:{Layout(cache_dir).index_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
        return int(conn.execute("SELECT bytes FROM totals").fetchone()[0])


def _refetched_after_scan(origin: S3Emulator, cache_dir: Path, eviction: str) -> int:
    """How many of the 24 heads a fresh daemon fetches again after the scan."""
    heads = [f"/lab/file{n:02d}.nwb" for n in range(HEADS)]
    first = _daemon(origin, cache_dir, eviction)
    try:
        for _ in range(3):  # 24 users open 24 files: their metadata, read again and again
            for key in heads:
                r = get_range(proxied(first.url, origin, key), 0, HEAD - 1)
                assert r.content == CONTENT[key][:HEAD]
        scan = proxied(first.url, origin, "/lab/raw-ephys.nwb")
        with requests.get(scan, stream=True, timeout=120) as r:
            digest = hashlib.sha256()
            for chunk in r.iter_content(MiB):
                digest.update(chunk)
        assert digest.digest() == hashlib.sha256(CONTENT["/lab/raw-ephys.nwb"]).digest()
        wait_until(lambda: _cache_bytes(cache_dir) <= CAPACITY, 20, "the cache back in bounds")
    finally:
        assert first.terminate() == 0
    origin.wait_idle()
    origin.clear_log()
    second = _daemon(origin, cache_dir, eviction)
    try:
        for key in heads:
            r = get_range(proxied(second.url, origin, key), 0, HEAD - 1)
            assert r.content == CONTENT[key][:HEAD]
        origin.wait_idle()
        return sum(1 for key in heads if origin.requests(key, method="GET"))
    finally:
        assert second.terminate() == 0


def test_a_scan_does_not_flush_the_working_set(lab_origin: S3Emulator, tmp_path: Path) -> None:
    refetched = {
        eviction: _refetched_after_scan(lab_origin, tmp_path / eviction, eviction)
        for eviction in ("s3fifo", "lru")
    }
    # The bar: at most 10 % of the heads fetched again (LRU: all of them).
    assert refetched["s3fifo"] <= HEADS // 10, refetched
    assert refetched["lru"] == HEADS, refetched
