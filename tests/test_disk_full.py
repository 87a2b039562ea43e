"""A disk that refuses writes loses nothing: clients still get exact bytes, no
block is mapped that was not written whole, no byte is left allocated that no
entry maps, the daemon keeps serving, and it caches again once the space is back.

"Disk full" is RLIMIT_FSIZE on the daemon process: a write past the limit
fails with EFBIG after writing what fits (as a disk filling midway fails it),
for every file the daemon writes, without a small mount. In format 3 a block
lives at its offset in the version's data file (block n at n x block size), so
the limit cuts an object at an offset: blocks below it can be written, a block
across it is written in part and must be punched out again, blocks past it
fail at once.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest
import requests

from nwbcache_proxy.layout import DATA_SUFFIX, Layout
from nwbcache_proxy.objectmeta import block_count
from tests.support.daemons import DaemonProcess
from tests.support.helpers import origin_host, proxied, wait_until
from tests.support.s3emu import S3Emulator
from tests.test_durability import (
    FS_BLOCK,
    K64,
    VersionOnDisk,
    assert_index_matches,
    by_cache_key,
    inspect_cache,
    mapped_blocks,
    requests_since,
)

# Slow (not in make test-fast): a daemon process (RLIMIT_FSIZE).
pytestmark = pytest.mark.slow

# Not a multiple of the block size: block 3 (196,608-262,143) straddles it.
LIMIT = 200_000


class SoftLimitedDaemon(DaemonProcess):
    """A daemon whose file-size limit is a soft one (its hard limit left as it
    was), so that this process can give the space back with ``prlimit``
    without privileges."""

    def _limit_files(self) -> None:
        assert self.file_size_limit is not None
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_size_limit, hard))

    def lift_file_size_limit(self) -> None:
        assert self.proc is not None
        unlimited = resource.RLIM_INFINITY
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (unlimited, unlimited))


def _version(cache_dir: Path, originals: dict[str, bytes], cache_key: str) -> VersionOnDisk | None:
    """The version of ``cache_key`` on disk, every mapped block checked against the origin."""
    return inspect_cache(cache_dir, originals).of(cache_key)


def test_write_failures_serve_exact_bytes_and_leave_nothing_wrong_on_disk(
    origin: S3Emulator, tmp_path: Path
) -> None:
    big = os.urandom(1024 * 1024 + 17)  # 17 blocks of 64 KiB, the last of 17 bytes
    small = os.urandom(99_844)  # 2 blocks, both below LIMIT
    origin.put("/b/big", big)
    origin.put("/b/small", small)
    originals = by_cache_key(origin, {"/b/big": big, "/b/small": small})
    big_key, small_key = origin.url + "/b/big", origin.url + "/b/small"
    nblocks = block_count(len(big), K64)
    cache_dir = tmp_path / "cache"
    log = tmp_path / "daemon.log"
    daemon = SoftLimitedDaemon(
        [
            "--cache-dir",
            str(cache_dir),
            "--block-size",
            "64K",
            "--allow-upstream",
            origin_host(origin),
            "--retry-base-delay",
            "0.01",
        ],
        file_size_limit=LIMIT,
        stderr_path=log,
    )
    daemon.start()
    try:
        url = proxied(daemon.url, origin, "/b/big")
        for _ in range(2):
            r = requests.get(url, timeout=60)
            assert r.status_code == 200
            assert r.content == big
        ranged = requests.get(url, headers={"Range": "bytes=300000-700000"}, timeout=60)
        assert ranged.status_code == 206
        assert ranged.content == big[300000:700001]
        assert requests.get(f"{daemon.url}/healthz", timeout=10).status_code == 200

        # An object below the limit is cached as usual, and then served from disk.
        small_url = proxied(daemon.url, origin, "/b/small")
        assert requests.get(small_url, timeout=60).content == small
        wait_until(lambda: len(_mapped(cache_dir, originals, small_key)) == 2, 10, "small cached")
        since = time.monotonic()
        r = requests.get(small_url, timeout=60)
        assert (r.content, r.headers["X-Cache"]) == (small, "HIT")
        assert requests_since(origin, since, "/b/small") == []

        # Read-ahead may still be writing (and failing to write) a group in the
        # background: wait for the origin to go quiet, and for the daemon's
        # temp files (meta.json's) to go.
        origin.wait_idle()
        staging = Layout(cache_dir).root / "staging"
        wait_until(lambda: not list(staging.rglob("*.tmp")), 10)
        assert list(staging.rglob("*.tmp")) == []
        # Every mapped block (inspect_cache checks each against its entry and
        # the origin) lies below the limit, nothing above it was written, and
        # the bytes of a write that failed midway were punched out again.
        big_version = _version(cache_dir, originals, big_key)
        assert big_version is not None, "no data file or map: no write was even attempted"
        bs = big_version.header.block_size
        assert all((n + 1) * bs <= LIMIT for n in big_version.mapped), big_version.mapped
        assert len(big_version.mapped) < nblocks
        # Block 3 straddles the limit: its group was written up to it, then failed.
        data_file = Layout(cache_dir).root / (big_version.name + DATA_SUFFIX)
        assert data_file.stat().st_size == LIMIT
        assert big_version.unmapped_allocated == 0, "bytes of a failed write left behind"
        assert big_version.allocated <= -(-LIMIT // FS_BLOCK) * FS_BLOCK
        assert inspect_cache(cache_dir, originals).unmapped_allocated == 0

        # The space comes back: the next read caches the rest, then all is a hit.
        daemon.lift_file_size_limit()
        r = requests.get(url, timeout=60)
        assert (r.status_code, r.content) == (200, big)
        wait_until(lambda: mapped_blocks(cache_dir) == nblocks + 2, 10, "every block mapped")
        since = time.monotonic()
        r = requests.get(url, timeout=60)
        assert (r.content, r.headers["X-Cache"]) == (big, "HIT")
        assert requests_since(origin, since, "/b/big") == []
        check = inspect_cache(cache_dir, originals)
        assert check.verified == nblocks + 2
        assert check.unmapped_allocated == 0
    finally:
        status = daemon.terminate()
        assert status == 0, log.read_text()[-3000:]
    # No row for a block whose write failed, one for each block written.
    assert_index_matches(cache_dir, inspect_cache(cache_dir, originals))


def _mapped(cache_dir: Path, originals: dict[str, bytes], cache_key: str) -> dict[int, int]:
    version = _version(cache_dir, originals, cache_key)
    return {} if version is None else version.mapped
