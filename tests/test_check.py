"""``nwbcache check``: corrupt and torn blocks are found (and with --repair,
removed), the index is reconciled, and the daemon then serves exact bytes."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.support.daemons import DaemonThread
from tests.support.helpers import proxied
from tests.support.s3emu import S3Emulator

# Slow (not in make test-fast): runs `python -m nwbcache_proxy check` in a child interpreter.
pytestmark = pytest.mark.slow

BS = 16 * 1024
DATA = os.urandom(20 * BS)


def _check(cache_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nwbcache_proxy", "check", "--cache-dir", str(cache_dir), *extra],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_check_finds_and_repairs_damage(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    origin.put("/b/obj", DATA)
    cache_dir = tmp_path / "cache"
    daemon = make_daemon(block_size=BS, cache_dir=cache_dir)
    url = proxied(daemon.url, origin, "/b/obj")
    assert requests.get(url, timeout=30).content == DATA
    daemon.stop()  # flushes the index

    clean = _check(cache_dir)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "20 blocks" in clean.stdout

    blocks = sorted((cache_dir / "v1" / "objects").rglob("*.blk"), key=lambda p: int(p.stem))
    flipped, torn = blocks[3], blocks[7]
    raw = bytearray(flipped.read_bytes())
    raw[100] ^= 0xFF  # bit rot in the data
    flipped.write_bytes(bytes(raw))
    torn.write_bytes(torn.read_bytes()[:5000])  # a torn write
    with sqlite3.connect(cache_dir / "v1" / "index.sqlite3") as conn:
        conn.execute("DELETE FROM blocks WHERE path LIKE '%/1.blk'")  # a lost index row

    found = _check(cache_dir)
    assert found.returncode == 1
    assert "corrupt blocks: 2" in found.stdout
    assert "checksum mismatch" in found.stdout
    assert "index rows missing: 1" in found.stdout

    repaired = _check(cache_dir, "--repair")
    assert repaired.returncode == 0
    assert not flipped.exists() and not torn.exists()
    again = _check(cache_dir)
    assert again.returncode == 0, again.stdout
    assert "18 blocks" in again.stdout

    origin.clear_log()
    fresh = make_daemon(block_size=BS, cache_dir=cache_dir)
    assert requests.get(proxied(fresh.url, origin, "/b/obj"), timeout=30).content == DATA
    origin.wait_idle()
    assert sum(e.bytes_sent for e in origin.requests("/b/obj")) == 2 * BS  # only the two removed
