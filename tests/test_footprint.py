"""What the cache takes on disk beyond its blocks' bytes (footprint.py): the figures,
and --cache-size holding for the disk with many small objects."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from nwbcache_proxy import footprint
from nwbcache_proxy.footprint import BLOCK_BYTES, VERSION_BYTES
from nwbcache_proxy.index import FLUSH_SHARE, Totals
from tests.support.daemons import DaemonThread
from tests.support.helpers import proxied, scrape, value
from tests.support.s3emu import S3Emulator


@pytest.mark.parametrize(
    ("versions", "blocks", "want"),
    [
        (0, 0, 0),
        (1, 1, VERSION_BYTES + BLOCK_BYTES),
        (3, 10, 3 * VERSION_BYTES + 10 * BLOCK_BYTES),
    ],
)
def test_overhead_is_per_version_and_per_block(versions: int, blocks: int, want: int) -> None:
    assert footprint.overhead(versions, blocks) == want


@pytest.mark.parametrize(
    ("limit", "versions", "blocks", "want"),
    [
        (1 << 20, 0, 0, 1 << 20),
        (1 << 20, 2, 4, (1 << 20) - 2 * VERSION_BYTES - 4 * BLOCK_BYTES),
        (VERSION_BYTES, 2, 0, 0),  # never below nothing
    ],
)
def test_block_room_leaves_the_files_their_space(
    limit: int, versions: int, blocks: int, want: int
) -> None:
    assert footprint.block_room(limit, versions, blocks) == want


def test_totals_on_disk_counts_the_files() -> None:
    totals = Totals(bytes=1000, blocks=2, versions=1)
    assert totals.on_disk == 1000 + VERSION_BYTES + 2 * BLOCK_BYTES


def _allocated(root: Path) -> int:
    """Bytes the file system allocated to the object dirs under ``root``'s
    shards and everything in them (``du``; the shard dirs themselves, at most
    256 pages, are left out: footprint.py)."""
    total = 0
    for shard in (root / "v3" / "objects").iterdir():
        for dirpath, _, files in os.walk(shard):
            if Path(dirpath) != shard:
                total += os.stat(dirpath).st_blocks * 512
            total += sum(os.stat(Path(dirpath) / f).st_blocks * 512 for f in files)
    return total


def test_many_small_objects_stay_within_the_cache_size_on_disk(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    """Objects of one to four 4 KiB blocks, four times more than --cache-size
    holds: what their files take on disk (dirs, meta.json, maps, data files'
    last pages) stays within it. Counting blocks' bytes alone, the files of
    such a cache stood a third over it."""
    bs, capacity = 4096, 1 << 20
    rng = random.Random(7)
    objects = {f"/small/{k:04d}": os.urandom(rng.randint(1, 4 * bs)) for k in range(400)}
    for key, data in objects.items():
        origin.put(key, data)
    daemon = make_daemon(block_size=bs, cache_size=capacity, cache_dir=tmp_path / "cache")
    for n, (key, data) in enumerate(objects.items()):
        assert requests.get(proxied(daemon.url, origin, key), timeout=30).content == data
        if n % 50 == 49:
            daemon.call(daemon.cache.upkeep.run_pass())
    daemon.call(daemon.cache.upkeep.run_pass())
    daemon.call(daemon.cache.upkeep.run_pass())
    on_disk = _allocated(tmp_path / "cache")
    assert on_disk <= capacity, on_disk
    samples = scrape(daemon.url)
    content = value(samples, "nwbcache_cache_size_bytes")
    overhead = value(samples, "nwbcache_cache_overhead_bytes")
    assert content > 0 and overhead > 0
    assert content + overhead <= capacity
    # The estimate is not far off what the files take.
    assert on_disk <= content + overhead <= 1.5 * on_disk


def test_new_small_versions_count_their_files_in_the_pressure_check(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eight new objects of one 4 KiB block each, unflushed: their bytes alone
    (32 KiB) are under the share of a 4 MiB cache that wakes eviction
    (index.FLUSH_SHARE), their files with them (~160 KiB) are not, and the
    check wakes it. Counting the bytes alone, a fill of small objects ran a
    cache up to a third over --cache-size between two flushes."""
    capacity = 4 * 1024 * 1024
    daemon = make_daemon(block_size=4096, cache_size=capacity)
    index, blocks = daemon.cache.index, daemon.cache.blocks
    objects = {f"/press/{i}": os.urandom(4096) for i in range(8)}
    for key, data in objects.items():
        origin.put(key, data)

    async def held() -> bool:  # no flush meanwhile: the pending figures stay
        return True

    woken: list[int] = []
    monkeypatch.setattr(index, "flush", held)
    monkeypatch.setattr(blocks, "_on_pressure", lambda: woken.append(index.pending_on_disk))
    for key, data in objects.items():
        assert requests.get(proxied(daemon.url, origin, key), timeout=30).content == data
    assert index.pending_bytes == 8 * 4096 <= FLUSH_SHARE * capacity
    assert index.pending_on_disk > FLUSH_SHARE * capacity
    assert woken, "the pressure check did not wake eviction"
