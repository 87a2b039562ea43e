"""Single flight across processes on one cache dir (claims.py, fetcher.py, versions.py).

Two daemons in threads of this process, each with its own claims file
description, stand for two processes: their claims exclude each other as two
processes' do. A ``Claims`` of the test's own is a third "process" that
claims work and never does it (then dies: ``close``). The processes proper
(workers, kill -9) are in test_cross_process_daemons.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from nwbcache.urls import cache_key, upstream_from_proxy_path
from nwbcache_proxy import fetcher
from nwbcache_proxy.claims import Claims, discovery_offset
from nwbcache_proxy.layout import Layout, key_hash
from tests.support.daemons import DaemonThread
from tests.support.helpers import get_range, proxied, scrape, value, wait_until
from tests.support.s3emu import S3Emulator

KEY = "/bucket/blobs/shared"
BS = 64 * 1024


@pytest.fixture
def other_process(tmp_path: Path) -> Iterator[Claims]:
    """Claims of a process that is not a daemon: it takes work and never does it."""
    claims = Claims(Layout(tmp_path / "cache").claims_path)
    yield claims
    claims.close()


def _gets(origin: S3Emulator) -> list[tuple[int, int]]:
    """The byte ranges upstream served for KEY, as (first, last)."""
    origin.wait_idle()
    spans = []
    for e in origin.requests(KEY, method="GET"):
        assert e.range is not None and e.range.startswith("bytes=")
        first = int(e.range.removeprefix("bytes=").split("-")[0])
        spans.append((first, first + e.bytes_sent - 1))
    return spans


def _awaited(daemon: DaemonThread, kind: str) -> float:
    return value(scrape(daemon.url), "nwbcache_awaited_fetches_total", kind=kind)


def test_two_daemons_on_one_dir_fetch_each_block_once(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """Eight cold readers of one object, half through each daemon: every byte
    comes from upstream once, and every reader gets the origin's bytes."""
    data = os.urandom(4 * 1024 * 1024 + 12_345)
    origin.put(KEY, data)
    origin.latency = 0.02
    origin.bandwidth = 40e6  # the fill takes ~0.1 s: the readers overlap it
    a = make_daemon(block_size=BS, readahead=16 * BS)
    b = make_daemon(block_size=BS, readahead=16 * BS)
    urls = [proxied(d.url, origin, KEY) for d in (a, b)] * 4
    start = threading.Barrier(len(urls))

    def read(url: str) -> bytes:
        start.wait()
        r = requests.get(url, timeout=60)
        assert r.status_code == 200
        return r.content

    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        bodies = list(pool.map(read, urls))
    assert all(body == data for body in bodies)
    spans = _gets(origin)
    fetched = sum(last - first + 1 for first, last in spans)
    assert fetched <= 1.05 * len(data), (fetched, len(data), spans)
    # ... and no byte twice
    covered = sorted(spans)
    assert all(prev[1] < nxt[0] for prev, nxt in itertools.pairwise(covered))
    assert [first for first, _ in spans].count(0) == 1, "one discovery for both daemons"
    assert _awaited(a, "block") + _awaited(b, "block") > 0


def test_a_waiting_reader_gets_the_block_its_claimant_published(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """B fetches slowly; A asks for the same bytes meanwhile, waits, and reads
    B's file: one upstream GET, and A's answer says it waited (a MISS)."""
    data = os.urandom(8 * BS)
    origin.put(KEY, data)
    a = make_daemon(block_size=BS, readahead=BS)
    b = make_daemon(block_size=BS, readahead=BS)
    url_a, url_b = proxied(a.url, origin, KEY), proxied(b.url, origin, KEY)
    get_range(url_a, 0, 0)  # discovered (meta.json and block 0 on disk for both)
    origin.clear_log()
    origin.latency = 0.4
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(get_range, url_b, 3 * BS, 4 * BS - 1)
        assert wait_until(lambda: _awaited(a, "block") == 0 and origin.requests() == [], 0.2)
        time.sleep(0.1)  # B's fetch is under way (its GET waits for the latency)
        waiting = pool.submit(get_range, url_a, 3 * BS + 100, 3 * BS + 199)
        assert waiting.result().content == data[3 * BS + 100 : 3 * BS + 200]
        assert slow.result().content == data[3 * BS : 4 * BS]
        assert waiting.result().headers["X-Cache"] == "MISS"
    assert _gets(origin) == [(3 * BS, 4 * BS - 1)]
    assert _awaited(a, "block") == 1
    assert _awaited(b, "block") == 0


def test_a_claim_freed_without_its_block_is_taken_over(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], other_process: Claims
) -> None:
    """A process that claimed blocks and died (its claims gone, no files):
    a waiting reader fetches them itself within a poll, bytes exact."""
    data = os.urandom(8 * BS + 7)
    origin.put(KEY, data)
    daemon = make_daemon(block_size=BS, readahead=BS)
    url = proxied(daemon.url, origin, KEY)
    get_range(url, 0, 0)
    v = daemon.version_of(url)
    assert other_process.take_blocks(v.name, 2, 4) == [True] * 4
    origin.clear_log()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reader = pool.submit(get_range, url, 2 * BS, 6 * BS - 1)
        time.sleep(0.5)
        assert not reader.done(), "the reader fetched blocks another process had claimed"
        assert origin.requests(KEY) == []
        freed = time.monotonic()
        other_process.close()  # what the kernel does to a process killed mid-fetch
        body = reader.result(timeout=30).content
        took = time.monotonic() - freed
    assert body == data[2 * BS : 6 * BS]
    assert took < 2.0
    assert sum(last - first + 1 for first, last in _gets(origin)) == 4 * BS


def test_blocks_claimed_elsewhere_do_not_hold_up_the_others(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], other_process: Claims
) -> None:
    """A run with one block claimed elsewhere fetches the rest at once."""
    data = os.urandom(8 * BS)
    origin.put(KEY, data)
    daemon = make_daemon(block_size=BS, readahead=8 * BS)
    url = proxied(daemon.url, origin, KEY)
    get_range(url, 0, 0)
    v = daemon.version_of(url)
    assert other_process.take_block(v.name, 4)
    origin.clear_log()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reader = pool.submit(get_range, url, 2 * BS, 7 * BS - 1)
        wait_until(lambda: len(origin.requests(KEY)) == 2, 10, "the unclaimed blocks fetched")
        assert sorted(_gets(origin)) == [(2 * BS, 4 * BS - 1), (5 * BS, 7 * BS - 1)]
        time.sleep(0.2)
        assert not reader.done()
        other_process.release_block(v.name, 4)
        assert reader.result(timeout=30).content == data[2 * BS : 7 * BS]
    assert sorted(_gets(origin))[1] == (4 * BS, 5 * BS - 1)
    assert len(_gets(origin)) == 3


def test_a_discovery_under_way_elsewhere_is_awaited(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """Two daemons asked for a new object at once: one discovery upstream."""
    data = os.urandom(3 * BS)
    origin.put(KEY, data)
    origin.latency = 0.3
    a = make_daemon(block_size=BS)
    b = make_daemon(block_size=BS)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(get_range, proxied(b.url, origin, KEY), 10, 20)
        time.sleep(0.1)
        second = pool.submit(get_range, proxied(a.url, origin, KEY), 30, 40)
        assert first.result().content == data[10:21]
        assert second.result().content == data[30:41]
    assert [s for s in _gets(origin) if s[0] == 0] == [(0, BS - 1)]
    assert len(origin.requests(KEY)) == 1
    assert _awaited(a, "discovery") == 1


def test_a_discovery_claim_freed_without_a_discovery_is_taken_over(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], other_process: Claims
) -> None:
    data = os.urandom(3 * BS)
    origin.put(KEY, data)
    daemon = make_daemon(block_size=BS)
    url = proxied(daemon.url, origin, KEY)
    upstream = upstream_from_proxy_path("/" + url.split("/", 3)[3], "")
    assert other_process.take(discovery_offset(key_hash(cache_key(upstream))))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reader = pool.submit(get_range, url, 5, 9)
        time.sleep(0.4)
        assert not reader.done()
        assert origin.requests(KEY) == []
        other_process.close()
        assert reader.result(timeout=30).content == data[5:10]
    assert len(origin.requests(KEY)) == 1


def test_a_claim_held_without_progress_is_outwaited(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    other_process: Claims,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A claimant that stays alive but does nothing (SIGSTOP, a dead network
    mount) holds its locks: after CLAIM_PATIENCE the waiter fetches itself."""
    monkeypatch.setattr(fetcher, "CLAIM_PATIENCE", 0.5)
    data = os.urandom(4 * BS)
    origin.put(KEY, data)
    daemon = make_daemon(block_size=BS, readahead=BS)
    url = proxied(daemon.url, origin, KEY)
    get_range(url, 0, 0)
    v = daemon.version_of(url)
    assert other_process.take_blocks(v.name, 1, 2) == [True, True]
    began = time.monotonic()
    r = get_range(url, BS, 3 * BS - 1)
    assert r.content == data[BS : 3 * BS]
    assert 0.5 <= time.monotonic() - began < 5
    assert not Claims(other_process.path).take_block(v.name, 1)  # still held: outwaited


def test_a_discovery_finished_elsewhere_just_before_the_claim_is_not_repeated(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Daemon B looks for the object's meta.json (none yet); daemon A then
    discovers the object and frees its claim; B takes the free claim. B must
    use what A wrote, not ask upstream again (about 1 cold object in 100 was
    discovered twice by two workers before)."""
    data = os.urandom(3 * BS)
    origin.put(KEY, data)
    a = make_daemon(block_size=BS)
    b = make_daemon(block_size=BS)
    a_done = threading.Event()
    looked = threading.Event()
    original = b.cache.versions.meta.read
    calls = 0

    async def read_then_let_a_discover(key: str) -> object:
        nonlocal calls
        calls += 1
        found = await original(key)
        if calls == 1:  # B's first look: nothing; A discovers before B goes on
            looked.set()
            await asyncio.get_running_loop().run_in_executor(None, a_done.wait, 10)
        return found

    monkeypatch.setattr(b.cache.versions.meta, "read", read_then_let_a_discover)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(get_range, proxied(b.url, origin, KEY), 10, 20)
        assert looked.wait(10)
        assert get_range(proxied(a.url, origin, KEY), 30, 40).content == data[30:41]
        a_done.set()
        assert slow.result(timeout=30).content == data[10:21]
    assert [s for s in _gets(origin) if s[0] == 0] == [(0, BS - 1)]
    assert calls >= 2  # B looked again once it held the claim
