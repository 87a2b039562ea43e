"""How the daemon's processes are run (runner.py): memory freed goes back to the kernel."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.coldfill import read_ranges
from bench.harness import process_tree, rss_bytes
from tests.support.daemons import Spawn
from tests.support.helpers import proxied
from tests.support.s3emu import S3Emulator

# Frees 400 block-sized buffers, each followed by a small allocation that
# stays (what a busy worker makes between its buffers), as a pool lets go of
# buffers beyond its share; prints its RSS in MiB before, with them, and after.
PROBE = """
import gc, sys
from nwbcache_proxy.runner import return_freed_buffers
assert return_freed_buffers()
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
for _ in range(3):
    b = bytearray(256 * 1024 + 1); del b  # a mapped buffer freed: glibc raises its threshold
before = rss()
bufs, kept = [], []
for _ in range(400):
    bufs.append(bytearray(256 * 1024 + 1))
    kept.append(bytearray(16 * 1024))
during = rss()
del bufs
gc.collect()
print(before, during, rss())
"""


def _probe() -> tuple[int, int, int]:
    # Without the variables that set glibc's threshold from outside.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    before, during, after = map(int, done.stdout.split())
    return before, during, after


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the daemon sets glibc's malloc")
def test_buffers_freed_go_back_to_the_kernel() -> None:
    """100 MiB of buffers freed behind what lives after them: with the
    daemon's threshold they are returned. (With glibc's own they stayed, 131
    MiB of RSS against 31, in a plain run; not in every environment the suite
    runs in, so that half is the burst test's below, on a real daemon.)"""
    before, during, after = _probe()
    assert during - before >= 100  # the buffers, touched
    assert after - before <= during - before - 90  # the 100 MiB freed are gone


@pytest.mark.slow
def test_a_daemon_keeps_about_its_buffer_memory_after_a_burst(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """A daemon given 16M reads 128 MiB cold for 8 clients at once (read-ahead
    holds far more than 16 MiB of buffers meanwhile): once done it keeps
    about its share. With glibc's own threshold it kept ~42 MiB more than at
    rest here, against ~14 with the daemon's (the bytes freed stayed in the
    heap), so this fails if the daemon's processes do not set it."""
    data = os.urandom(128 * 1024 * 1024)
    origin.put("/b/burst", data)
    daemon = spawn(tmp_path / "cache", "--buffer-memory", "16M")
    assert daemon.proc is not None
    pids = process_tree(daemon.proc.pid)
    time.sleep(0.5)
    rest = rss_bytes(pids)
    got = memoryview(bytearray(len(data)))
    read_ranges(proxied(daemon.url, origin, "/b/burst"), got, 16 * 1024 * 1024, 8)
    assert got == data
    time.sleep(2)  # what the fill still holds (a write, a kept block) is let go
    grown = rss_bytes(pids) - rest
    assert grown <= 28 * 1024 * 1024, f"{grown / 2**20:.0f} MiB over its RSS at rest"
    assert daemon.terminate() == 0


@pytest.mark.slow
def test_a_daemon_makes_its_buffer_pool_once_started(spawn: Spawn, tmp_path: Path) -> None:
    """A started daemon makes the first START_BYTES of its pool
    (inflight.make_pool) before any request: its first fill pays for no new
    memory. With --buffer-memory 160M (a pool of 96 MiB, 64 made at start)
    it holds ~54 MiB more at rest than with 16M (a pool of 9.6 MiB, all of it
    made); before, the two were within a few MiB of each other until their
    first fills."""
    small = spawn(tmp_path / "small", "--buffer-memory", "16M")
    large = spawn(tmp_path / "large", "--buffer-memory", "160M")
    assert small.proc is not None and large.proc is not None
    pids = process_tree(small.proc.pid), process_tree(large.proc.pid)
    deadline, gap = time.monotonic() + 10, 0
    while time.monotonic() < deadline:
        gap = rss_bytes(pids[1]) - rss_bytes(pids[0])
        if gap >= 48 * 1024 * 1024:
            break
        time.sleep(0.1)
    assert gap >= 48 * 1024 * 1024, f"{gap / 2**20:.0f} MiB apart"
    # START_BYTES of the pool, not all of it (96 - 9.6 = 86 MiB apart)
    assert gap <= 76 * 1024 * 1024, f"{gap / 2**20:.0f} MiB apart"
    assert small.terminate() == 0 and large.terminate() == 0
