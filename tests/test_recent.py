"""Blocks fetched ahead of their reader, kept in memory a moment once written (recent.py).

Unit tests of the store (taken once, bounded by bytes, oldest out first,
forgotten by version); integration tests through a real daemon and a real
origin: read-ahead's blocks reach the sequential reader from memory, exact,
with no read of the cache's files; blocks a client had while in flight are
not kept; a version dropped, or unlinked by another process, is never
served from memory (fetched again, exact).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nwbcache_proxy import blockio, wholeversions
from nwbcache_proxy.recent import RecentBlocks
from nwbcache_proxy.version import Version
from tests.support.daemons import DaemonThread
from tests.support.helpers import get_range, proxied, wait_until
from tests.support.s3emu import S3Emulator

BS = 16 * 1024
BLOCKS = 160
# Read-ahead doubles per sequential read (1, 2, 4... blocks): after this many
# single-block reads from the start it has fetched 128 blocks past the last.
SINGLE_READS = 9
MakeDaemon = Callable[..., DaemonThread]


# -- the store -----------------------------------------------------------------
OWNER = object()  # the files a block was kept under (blocks.py: the table's SharedVersion)


def _view(n: int, fill: int = 1) -> memoryview:
    return memoryview(bytearray([fill]) * n)


def test_a_block_kept_under_other_files_is_not_given_and_is_dropped() -> None:
    recent = RecentBlocks(100)
    recent.keep("v", 3, _view(10), OWNER)
    assert recent.take("v", 3, object()) is None
    assert not recent.has("v", 3) and recent.nbytes == 0


def test_memory_is_counted_by_the_buffer_a_view_keeps_alive() -> None:
    """A short last block holds a whole pooled buffer (inflight.py)."""
    recent = RecentBlocks(100)
    recent.keep("v", 0, memoryview(bytearray(64))[:5], OWNER)
    assert recent.nbytes == 64
    recent.keep("v", 1, memoryview(bytearray(64))[:5], OWNER)  # 128 > 100: the oldest goes
    assert not recent.has("v", 0) and recent.has("v", 1) and recent.nbytes == 64


def test_a_block_is_taken_once() -> None:
    recent = RecentBlocks(100)
    recent.keep("v", 3, _view(10, 7), OWNER)
    assert recent.has("v", 3) and not recent.has("v", 4) and not recent.has("w", 3)
    taken = recent.take("v", 3, OWNER)
    assert taken is not None and bytes(taken) == bytes([7]) * 10
    assert recent.take("v", 3, OWNER) is None and recent.nbytes == 0


@pytest.mark.parametrize(
    ("kept", "limit", "left"),
    [
        ([("v", 0, 10), ("v", 1, 10), ("v", 2, 10)], 25, [("v", 1), ("v", 2)]),  # oldest out
        ([("v", 0, 10), ("v", 0, 12)], 25, [("v", 0)]),  # kept again: counted once
        ([("v", 0, 10), ("v", 1, 30)], 25, [("v", 0)]),  # larger than the bound: not kept
        ([("v", 0, 25), ("w", 0, 1)], 25, [("w", 0)]),  # exactly at the bound, then over
    ],
)
def test_the_store_is_bounded_by_bytes_oldest_out_first(
    kept: list[tuple[str, int, int]], limit: int, left: list[tuple[str, int]]
) -> None:
    recent = RecentBlocks(limit)
    for name, index, n in kept:
        recent.keep(name, index, _view(n), OWNER)
    everything = {(name, index) for name, index, _ in kept}
    assert {key for key in everything if recent.has(*key)} == set(left)
    assert recent.nbytes <= limit
    assert recent.nbytes == sum(len(recent.take(*key, OWNER) or b"") for key in left)


def test_a_block_a_client_had_is_dropped_alone() -> None:
    recent = RecentBlocks(1000)
    recent.keep("v", 1, _view(10), OWNER)
    recent.keep("v", 2, _view(10), OWNER)
    recent.drop("v", 1)
    recent.drop("v", 9)  # not kept: nothing happens
    assert not recent.has("v", 1) and recent.has("v", 2) and recent.nbytes == 10


def test_forgetting_a_version_forgets_only_its_blocks() -> None:
    recent = RecentBlocks(1000)
    for index in range(3):
        recent.keep("v", index, _view(10), OWNER)
        recent.keep("w", index, _view(10), OWNER)
    recent.forget("v")
    assert not any(recent.has("v", i) for i in range(3))
    assert all(recent.has("w", i) for i in range(3)) and recent.nbytes == 30


# -- through a daemon ----------------------------------------------------------
@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every read of a version's files by the daemon's Blocks (blockio)."""
    seen: list[str] = []
    for name in ("read", "read_span"):
        real = getattr(blockio, name)

        def recording(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            seen.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(blockio, name, recording)
    yield seen


def _kept(daemon: DaemonThread, v: Version) -> list[int]:
    async def look() -> list[int]:
        return [i for i in range(BLOCKS) if daemon.cache.blocks.recent.has(v.name, i)]

    kept: list[int] = daemon.call(look())
    return kept


def _gets(origin: S3Emulator) -> int:
    origin.wait_idle()
    return sum(1 for r in origin.log if r.method == "GET")


def _read(url: str, data: bytes, first: int, stop: int) -> None:
    r = get_range(url, first * BS, stop * BS - 1)
    assert r.content == data[first * BS : stop * BS]


def _read_ahead(
    origin: S3Emulator, daemon: DaemonThread, key: str
) -> tuple[str, bytes, Version, list[int]]:
    """An object read a block at a time from its start until read-ahead has
    fetched blocks the reader has not asked for yet; returns those (kept)."""
    data = os.urandom(BLOCKS * BS)
    origin.put(key, data)
    url = proxied(daemon.url, origin, key)
    for i in range(SINGLE_READS):
        _read(url, data, i, i + 1)
    v = daemon.version_of(url)
    wait_until(lambda: len(_kept(daemon, v)) >= 100, 5, "read-ahead's blocks written and kept")
    kept = _kept(daemon, v)
    assert min(kept) >= SINGLE_READS, "a block the client had is not kept"
    assert kept == list(range(kept[0], kept[-1] + 1))
    return url, data, v, kept


def test_read_ahead_blocks_reach_their_reader_from_memory_exact(
    origin: S3Emulator, make_daemon: MakeDaemon, reads: list[str]
) -> None:
    daemon = make_daemon(block_size=BS)
    url, data, v, kept = _read_ahead(origin, daemon, "/b/ahead")
    fetched = _gets(origin)
    reads.clear()
    for i in kept[:10]:  # one block a read: each from its kept buffer
        _read(url, data, i, i + 1)
    assert reads == [], "a kept block was read from the cache's files"
    assert not set(kept[:10]) & set(_kept(daemon, v)), "a block is taken once"
    _read(url, data, kept[0], kept[0] + 1)  # and from disk after, exact
    assert reads
    # Read-ahead went on past the kept blocks; none of them was fetched again.
    origin.wait_idle()
    later = [r.range for r in origin.log if r.method == "GET"][fetched:]
    assert all(int(str(r).split("=")[1].split("-")[0]) > kept[-1] * BS for r in later), later


def test_a_long_range_of_kept_blocks_streams_them_from_memory(
    origin: S3Emulator, make_daemon: MakeDaemon, reads: list[str]
) -> None:
    daemon = make_daemon(block_size=BS)
    url, data, v, kept = _read_ahead(origin, daemon, "/b/long")
    span = kept[:100]  # over reader.BODY_MAX (64 blocks): streamed a block at a time
    reads.clear()
    _read(url, data, span[0], span[-1] + 1)
    assert reads == [], "a kept block was read from the cache's files"
    assert not set(span) & set(_kept(daemon, v))


def test_a_short_range_is_read_at_once_from_disk_and_its_blocks_no_longer_kept(
    origin: S3Emulator, make_daemon: MakeDaemon, reads: list[str]
) -> None:
    """A span of several blocks up to BODY_MAX is one read (Blocks.read_held):
    kept buffers would have to be joined, a copy all the same."""
    daemon = make_daemon(block_size=BS)
    url, data, v, kept = _read_ahead(origin, daemon, "/b/short")
    reads.clear()
    _read(url, data, kept[0], kept[0] + 4)
    assert reads == ["read_span"]
    assert not set(kept[:4]) & set(_kept(daemon, v))
    assert set(kept[4:]) <= set(_kept(daemon, v))


def test_blocks_a_client_had_in_flight_are_not_kept(
    origin: S3Emulator, make_daemon: MakeDaemon
) -> None:
    daemon = make_daemon(block_size=BS)
    data = os.urandom(BLOCKS * BS)
    origin.put("/b/whole", data)
    url = proxied(daemon.url, origin, "/b/whole")
    _read(url, data, 0, BLOCKS)  # every block fetched for this read, and sent from its fetch
    v = daemon.version_of(url)

    async def fetching() -> int:
        return daemon.cache.fetcher.fetching

    wait_until(lambda: daemon.call(fetching()) == 0, 5, "the fill's blocks written")
    assert _kept(daemon, v) == []


@pytest.mark.parametrize("how", ["dropped", "unlinked by another process"])
def test_a_version_gone_is_never_served_from_memory(
    origin: S3Emulator, make_daemon: MakeDaemon, how: str
) -> None:
    daemon = make_daemon(block_size=BS)
    url, data, v, kept = _read_ahead(origin, daemon, "/b/gone")
    if how == "dropped":
        daemon.call(daemon.cache.drop_version(v))
        assert _kept(daemon, v) == []
    else:
        wholeversions.drop(v.data_path, v.map_path)

        async def held() -> bool:
            return daemon.cache.open_versions.current(v.name) is not None

        wait_until(lambda: not daemon.call(held()), 5, "the sweep closing the version")
    # The version's files made again (block 0 fetched and written into new
    # ones): the blocks kept under the old files are not served from memory.
    fetched = _gets(origin)
    _read(url, data, 0, 1)
    assert _gets(origin) == fetched + 1
    for i in (kept[0], kept[len(kept) // 2]):
        fetched = _gets(origin)
        _read(url, data, i, i + 1)
        assert _gets(origin) > fetched, f"block {i} of a version gone came from memory"
