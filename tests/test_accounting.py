"""Served-bytes accounting and X-Cache outcomes are exact in every read order and publish timing.

A byte counts as served from upstream the first time a client receives its
block after the block came from upstream (fetched for that client, ahead of
it by read-ahead, or by a discovery); every other byte counts as served from
the cache. So a client reading each block of an object once, in any order,
is served exactly the object's size from upstream, every response a MISS;
reading it all again is served exactly the size from the cache, every
response a HIT, and the origin sees nothing new. Read-ahead publishing a
block while a client looks for it used to leave the block marked "not yet
served" in some interleavings: the next read of it said MISS and counted its
bytes from upstream a second time.

The index counts what the cache holds the same way: the blocks' own bytes
(format 3 has no per-block header), each block once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nwbcache_proxy import blockio
from nwbcache_proxy.blockfile import Parts
from nwbcache_proxy.index import Totals
from nwbcache_proxy.openversions import SharedVersion
from nwbcache_proxy.version import Version
from nwbcache_proxy.versionfile import VersionFiles
from tests.support.daemons import DaemonThread
from tests.support.helpers import proxied, scrape, value
from tests.support.s3emu import Fault, S3Emulator

MiB = 1024 * 1024


def served(daemon_url: str) -> dict[str, float]:
    """nwbcache_served_bytes_total by source, from /metrics."""
    samples = scrape(daemon_url)
    return {
        s: value(samples, "nwbcache_served_bytes_total", source=s) for s in ("cache", "upstream")
    }


def indexed(daemon: DaemonThread) -> Totals:
    """The index's totals once this daemon's records are in it."""
    index = daemon.cache.index
    assert daemon.call(index.flush())
    totals: Totals = daemon.call(index.totals())
    return totals


def read(url: str, start: int, end: int) -> tuple[bytes, str]:
    """Bytes [start, end) through the daemon, and the response's X-Cache."""
    r = requests.get(url, headers={"Range": f"bytes={start}-{end - 1}"}, timeout=30)
    assert r.status_code == 206, r.text
    return r.content, r.headers["X-Cache"]


def test_sequential_reads_with_readahead_and_503s_count_each_byte_once(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """The reported case: 1 MiB blocks, 5 ms upstream latency, some 503s; eight
    sequential 1 MiB ranges of an 8 MiB object, then the same eight again."""
    origin.latency = 0.005
    data = os.urandom(8 * MiB)
    origin.put("/acct/seq", data)
    origin.inject(Fault.SLOWDOWN, count=2, with_range=True)
    daemon = make_daemon(block_size=MiB)
    url = proxied(daemon.url, origin, "/acct/seq")
    before = served(daemon.url)
    held = indexed(daemon)
    outcomes: list[list[str]] = []
    for _pass in range(2):
        seen = []
        for k in range(8):
            body, x_cache = read(url, k * MiB, (k + 1) * MiB)
            assert body == data[k * MiB : (k + 1) * MiB]
            seen.append(x_cache)
        outcomes.append(seen)
    origin.wait_idle()
    after = served(daemon.url)

    assert outcomes[0] == ["MISS"] * 8
    assert outcomes[1] == ["HIT"] * 8
    assert after["upstream"] - before["upstream"] == len(data)
    assert after["cache"] - before["cache"] == len(data)
    ok = [r for r in origin.requests("/acct/seq") if r.status == 206]
    assert sum(r.bytes_sent for r in ok) == len(data)  # every block fetched once
    now = indexed(daemon)
    assert (now.bytes - held.bytes, now.blocks - held.blocks) == (len(data), 8)


BS = 16 * 1024
BLOCKS = 12


@st.composite
def read_orders(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Every block of the object read exactly once: the blocks cut into runs of
    1-4 consecutive blocks, the runs read in any order."""
    runs = []
    first = 0
    while first < BLOCKS:
        n = draw(st.integers(1, min(4, BLOCKS - first)))
        runs.append((first, first + n))
        first += n
    return list(draw(st.permutations(runs)))


@pytest.fixture
def daemon(make_daemon: Callable[..., DaemonThread]) -> DaemonThread:
    """One daemon for every example of a test (each example reads a new object)."""
    return make_daemon(block_size=BS, readahead=4 * BS)


@pytest.fixture
def slow_disk(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Seconds that looking a block up and publishing one take (in the daemon's
    disk threads, as on a slow or busy disk): a lookup that finds no block then
    returns after a publish that started later has finished.

    "open": after each lookup of a version's files and of a block in them
    (blockio.open_version, blockio.read); with a delay, a read on the event loop
    finds nothing in the page cache and goes to a disk thread (as on a busy
    disk), so the loop is never stalled. "publish": before each block of a
    group is written (blockio.write)."""
    delays = {"open": 0.0, "publish": 0.0}
    real_open, real_read, real_write = blockio.open_version, blockio.read, blockio.write

    def open_(v: Version, *, create: bool, fsync: bool = False) -> VersionFiles | None:
        found = real_open(v, create=create, fsync=fsync)
        if not create:
            time.sleep(delays["open"])
        return found

    def read_(
        files: VersionFiles, index: int, lo: int, hi: int, verify: bool, *, on_loop: bool = False
    ) -> bytes | bytearray | memoryview | None:
        if on_loop and delays["open"]:
            raise blockio.Miss
        found = real_read(files, index, lo, hi, verify, on_loop=on_loop)
        if not on_loop:
            time.sleep(delays["open"])
        return found

    def write_(
        v: Version, held: SharedVersion | None, items: Sequence[tuple[int, Parts]], fsync: bool
    ) -> tuple[VersionFiles | None, list[OSError | None]]:
        time.sleep(delays["publish"] * len(items))
        return real_write(v, held, items, fsync)

    monkeypatch.setattr(blockio, "open_version", open_)
    monkeypatch.setattr(blockio, "read", read_)
    monkeypatch.setattr(blockio, "write", write_)
    return delays


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    order=read_orders(),
    latency=st.sampled_from([0.0, 0.001, 0.004]),
    chunk=st.sampled_from([1024, 7 * 1024, 64 * 1024]),
    open_delay=st.sampled_from([0.0, 0.003, 0.02]),
    publish_delay=st.sampled_from([0.0, 0.003]),
)
def test_any_read_order_counts_each_byte_once(
    origin: S3Emulator,
    daemon: DaemonThread,
    slow_disk: dict[str, float],
    order: list[tuple[int, int]],
    latency: float,
    chunk: int,
    open_delay: float,
    publish_delay: float,
) -> None:
    slow_disk["open"], slow_disk["publish"] = open_delay, publish_delay
    origin.latency = latency
    origin.chunk_size = chunk  # how the origin's bytes arrive: publish timing
    key = f"/acct/order-{os.urandom(6).hex()}"
    data = os.urandom(BLOCKS * BS - 5)  # a short last block
    origin.put(key, data)
    url = proxied(daemon.url, origin, key)
    before = served(daemon.url)
    held = indexed(daemon)
    for _pass in ("cold", "warm"):
        outcomes = []
        for a, b in order:
            start, end = a * BS, min(b * BS, len(data))
            body, x_cache = read(url, start, end)
            assert body == data[start:end]
            outcomes.append(x_cache)
        origin.wait_idle()
        now = served(daemon.url)
        if _pass == "cold":
            assert outcomes == ["MISS"] * len(order)
            assert now["upstream"] - before["upstream"] == len(data)
            assert now["cache"] - before["cache"] == 0
            fetched = [r for r in origin.requests(key) if r.status == 206]
            assert sum(r.bytes_sent for r in fetched) == len(data)
        else:
            assert outcomes == ["HIT"] * len(order)
            assert now["upstream"] - before["upstream"] == len(data)
            assert now["cache"] - before["cache"] == len(data)
    after = indexed(daemon)  # every block held once, its own bytes only
    assert (after.bytes - held.bytes, after.blocks - held.blocks) == (len(data), BLOCKS)


def test_a_block_a_client_had_whole_is_a_hit_while_it_is_written(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks whose bytes a client has had whole but whose write to disk is
    still under way are read as from their files: a second reader's answer is
    a HIT, its bytes from the cache. It was PARTIAL or MISS, bytes from
    upstream (a plain GET of a small object and a read right after it)."""
    bs = 4096
    data = os.urandom(6 * bs)
    origin.put("/acct/pending", data)
    daemon = make_daemon(block_size=bs)
    url = proxied(daemon.url, origin, "/acct/pending")
    assert requests.get(url, headers={"Range": "bytes=0-0"}, timeout=30).content == data[:1]
    release = threading.Event()
    write = blockio.write

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        return write(*args, **kwargs)

    monkeypatch.setattr(blockio, "write", slow_write)
    before = served(daemon.url)
    try:
        rng = {"Range": f"bytes={bs}-{6 * bs - 1}"}
        first = requests.get(url, headers=rng, timeout=30)
        assert first.content == data[bs:] and first.headers["X-Cache"] == "MISS"
        second = requests.get(url, headers=rng, timeout=30)
        assert second.content == data[bs:]
        assert daemon.cache.fetcher.fetching > 0  # still being written
        assert second.headers["X-Cache"] == "HIT"
        after = served(daemon.url)
        assert after["upstream"] - before["upstream"] == 5 * bs
        assert after["cache"] - before["cache"] == 5 * bs
    finally:
        release.set()
