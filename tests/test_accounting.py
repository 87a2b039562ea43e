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
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nwbcache_proxy import publish, store
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
    """Seconds that opening and publishing a block file take (in the daemon's
    disk threads, as on a slow or busy disk): a lookup that finds no file then
    returns after a publish that started later has finished."""
    delays = {"open": 0.0, "publish": 0.0}
    real_open, real_publish = store.open_block, publish.publish_block

    def open_block(*args: Any, **kwargs: Any) -> Any:
        found = real_open(*args, **kwargs)
        time.sleep(delays["open"])
        return found

    def publish_block(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delays["publish"])
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(store, "open_block", open_block)
    monkeypatch.setattr(publish, "publish_block", publish_block)
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
