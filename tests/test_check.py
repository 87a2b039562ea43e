"""``nwbcache check`` end to end: on a cache a real daemon filled, corrupt and torn
blocks are found (and with --repair, removed), the index is reconciled, and the
daemon then serves exact bytes. tests/test_check_stream.py checks the rest in-process."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from nwbcache_proxy.layout import Layout
from tests.support.daemons import DaemonThread
from tests.support.helpers import proxied, wait_until
from tests.support.s3emu import S3Emulator
from tests.test_check_stream import Cache

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

    layout = Layout(cache_dir)
    blocks = sorted(layout.objects.rglob("*.blk"), key=lambda p: int(p.stem))
    assert len(blocks) == 20
    flipped, torn = blocks[3], blocks[7]
    raw = bytearray(flipped.read_bytes())
    raw[100] ^= 0xFF  # bit rot in the data
    flipped.write_bytes(bytes(raw))
    torn.write_bytes(torn.read_bytes()[:5000])  # a torn write
    with sqlite3.connect(layout.index_path) as conn:
        conn.execute("DELETE FROM blocks WHERE idx = 1")  # a lost index row

    found = _check(cache_dir)
    assert found.returncode == 1
    assert "corrupt blocks: 2" in found.stdout
    assert "checksum mismatch" in found.stdout
    assert "index rows missing: 1" in found.stdout
    one = _check(cache_dir, "--object", origin.url_for("/b/obj"), "--json")
    assert one.returncode == 1, one.stderr
    report = json.loads(one.stdout)
    assert (report["objects"], report["blocks"], report["corrupt_count"]) == (1, 20, 2)

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


def test_ctrl_c_saves_a_cursor_and_resume_finishes(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    try:
        for i in range(300):
            cache.add(f"https://h.example/{i}", 100, bs=4096)
    finally:
        cache.close()
    cmd = [sys.executable, "-m", "nwbcache_proxy", "check", "--cache-dir", str(cache.dir)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _objects_done(cache.layout.check_cursor) >= 5, 60, "a cursor")
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, out + err
    assert "--resume" in err
    assert cache.layout.check_cursor.exists()
    done = subprocess.run([*cmd, "--resume", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["objects"], report["blocks"], report["resumed"]) == (300, 30_000, True)
    assert not cache.layout.check_cursor.exists()


def _objects_done(cursor: Path) -> int:
    try:
        return int(json.loads(cursor.read_text())["report"]["objects"])
    except (FileNotFoundError, ValueError):
        return 0  # not written yet, or caught between write and rename
