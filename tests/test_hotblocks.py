"""The in-memory tier of small, recently read blocks: bounded, version-safe."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import requests

from conftest import proxied
from daemons import DaemonThread
from nwbcache_proxy.hotblocks import HotBlocks
from s3emu import S3Emulator

BS = 16 * 1024


def test_tier_is_bounded_in_bytes_and_lru() -> None:
    hot = HotBlocks(capacity_bytes=8 * 100)
    for i in range(20):
        hot.put("v", i, bytes(100))
    assert hot.size <= 800
    assert hot.get("v", 19) is not None
    assert hot.get("v", 0) is None  # least recently used went first
    hot.get("v", 12)
    hot.put("v", 99, bytes(100))
    assert hot.get("v", 12) is not None  # a recent read keeps a block
    assert hot.get("v", 13) is None


def test_tier_refuses_a_block_that_would_flush_it() -> None:
    hot = HotBlocks(capacity_bytes=800)
    hot.put("v", 0, bytes(101))  # more than an eighth of the tier
    assert hot.get("v", 0) is None and hot.size == 0


def test_drop_version_purges_only_that_version() -> None:
    hot = HotBlocks(capacity_bytes=10_000)
    hot.put("old", 0, b"a" * 10)
    hot.put("new", 0, b"b" * 10)
    hot.drop_version("old")
    assert hot.get("old", 0) is None
    assert hot.get("new", 0) == b"b" * 10
    assert hot.size == 10


def test_small_hits_come_from_memory_and_versions_never_mix(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    data = os.urandom(8 * BS)
    origin.put("/b/hot", data)
    daemon = make_daemon(block_size=BS, cache_dir=tmp_path / "cache", memory_cache=1024 * 1024)
    url = proxied(daemon.url, origin, "/b/hot")
    ranges = [(i * BS + 100, i * BS + 4195) for i in range(8)]
    for _round in ("cold: fetched", "warm: read from disk, kept in memory"):
        for a, b in ranges:
            r = requests.get(url, headers={"Range": f"bytes={a}-{b}"}, timeout=30)
            assert r.content == data[a : b + 1]
    for blk in (tmp_path / "cache").rglob("*.blk"):  # take the disk tier away
        blk.unlink()
    origin.wait_idle()
    origin.clear_log()
    for a, b in ranges:  # still exact, still hits, and nothing fetched: the memory tier
        r = requests.get(url, headers={"Range": f"bytes={a}-{b}"}, timeout=30)
        assert r.content == data[a : b + 1]
        assert r.headers["X-Cache"] == "HIT"
    origin.wait_idle()
    assert origin.log == []

    new = os.urandom(len(data))
    origin.put("/b/hot", new)  # a new version upstream
    first = requests.get(url, headers={"Range": f"bytes={2 * BS}-{2 * BS + 99}"}, timeout=30)
    assert first.content in (data[2 * BS : 2 * BS + 100], new[2 * BS : 2 * BS + 100])
    daemon.call(daemon.cache.drop_version(daemon.call(daemon.cache.resolve(_upstream(url)))))
    again = requests.get(url, headers={"Range": f"bytes={2 * BS}-{2 * BS + 99}"}, timeout=30)
    assert again.content == new[2 * BS : 2 * BS + 100]  # the old copy was purged with its version


def _upstream(url: str) -> object:
    from nwbcache.urls import upstream_from_proxy_path

    path = "/" + url.split("/", 3)[3]
    return upstream_from_proxy_path(path, "")
