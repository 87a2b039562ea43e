"""Issue 12, part 3: the bound holds for what is really on the disk. Two workers and a
mixed load over 26 files through a 32 MiB cache: the space the cache's files take,
counting evicted files a process still holds open, stays near --cache-size."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.daemons import DaemonProcess
from tests.support.helpers import get_range, origin_host, proxied
from tests.support.s3emu import S3Emulator

pytestmark = pytest.mark.slow  # starts a daemon with two workers

MiB = 1024 * 1024
CAPACITY = 32 * MiB
FILES = {f"/lab/f{n:02d}.nwb": os.urandom(4 * MiB + n * 4099) for n in range(26)}


def space_in_use(cache_dir: Path, *, index: bool = False) -> int:
    """Bytes allocated to the cache: every file and dir under it, and every file
    under it that was unlinked but is still held open by some process (what
    ``df`` would count on a file system of the cache's own), each inode once
    (a file may be unlinked between the walk and the look at open fds). The
    index's files (index.sqlite3 and its WAL) only with ``index``, else all but
    them."""
    blocks: dict[int, int] = {}
    for root, dirs, files in os.walk(cache_dir):
        for name in dirs + files:
            if name.startswith("index.sqlite3") != index:
                continue
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(root, name))
                blocks[st.st_ino] = st.st_blocks
    if not index:
        prefix = str(cache_dir)
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith(prefix) and target.endswith(" (deleted)"):
                        st = os.stat(f"/proc/{pid}/fd/{fd}")
                        blocks[st.st_ino] = st.st_blocks
                except OSError:
                    continue
    return 512 * sum(blocks.values())


@pytest.fixture
def daemon(origin: S3Emulator, tmp_path: Path) -> Iterator[DaemonProcess]:
    for key, data in FILES.items():
        origin.put(key, data)
    process = DaemonProcess(
        [
            "--cache-dir", str(tmp_path / "cache"),
            "--cache-size", str(CAPACITY),
            "--workers", "2",
            "--allow-upstream", origin_host(origin),
        ]
    ).start()  # fmt: skip
    try:
        yield process
    finally:
        assert process.terminate() == 0


def test_the_bound_holds_on_the_disk_under_load(
    origin: S3Emulator, daemon: DaemonProcess, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    keys = sorted(FILES)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, space_in_use(cache_dir))
            time.sleep(0.05)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(900 // 6):
            key = rng.choice(keys)
            data = FILES[key]
            url = proxied(daemon.url, origin, key)
            if rng.random() < 0.05:
                assert requests.get(url, timeout=60).content == data
                continue
            start = rng.randrange(len(data))
            end = min(len(data), start + rng.choice((1024, 64 * 1024, MiB)))
            assert get_range(url, start, end - 1).content == data[start:end]

    sampler = threading.Thread(target=sample)
    sampler.start()
    readers = [threading.Thread(target=reader, args=(seed,)) for seed in range(6)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    time.sleep(3)
    done.set()
    sampler.join()
    after = space_in_use(cache_dir)
    index = space_in_use(cache_dir, index=True)
    print(
        f"space in use: peak {peak / MiB:.1f} MiB, 3 s after {after / MiB:.1f} MiB, "
        f"index {index / MiB:.1f} MiB"
    )
    # The stated overshoot (README, "Bounded, at any size"): a file system's
    # rounding and dirs (a few %) after the load, and during it the blocks
    # written between two maintenance passes (one second) and fds not yet
    # closed; the index beside it: its rows and a WAL of at most 4 MiB.
    assert after <= CAPACITY * 1.03, f"{after / MiB:.1f} MiB in use after the load"
    assert peak <= CAPACITY * 1.3, f"{peak / MiB:.1f} MiB at peak"
    assert index <= 5 * MiB
