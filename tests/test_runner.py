"""How the daemon's processes are run (runner.py): memory freed goes back to the kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Frees 400 block-sized buffers after a smaller allocation each that stays,
# as a busy worker's pool lets go of buffers beyond its share; prints its RSS
# in MiB before, with them, and after.
PROBE = """
import gc, sys
from nwbcache_proxy.runner import return_freed_buffers
if sys.argv[1] == "fixed":
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
    kept.append(bytearray(200 * 1024))
during = rss()
del bufs
gc.collect()
print(before, during, rss())
"""


def _probe(mode: str) -> tuple[int, int, int]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True
    )
    before, during, after = map(int, done.stdout.split())
    return before, during, after


@pytest.mark.slow
def test_buffers_freed_go_back_to_the_kernel() -> None:
    """100 MiB of buffers freed: with glibc's own threshold they stay in the
    heap behind what lives after them; with the daemon's, they are returned."""
    before, during, after = _probe("dynamic")
    assert during - before >= 150  # both kinds of buffer, touched
    assert after - before >= during - before - 10, "glibc returned them on its own"
    before, during, after = _probe("fixed")
    assert during - before >= 150
    assert after - before <= during - before - 90  # the 100 MiB freed are gone
