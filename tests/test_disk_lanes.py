"""Disk jobs in one lane run one at a time, in order; a fill writes a file from one job at a time.

Linux takes a file's lock for each buffered write, and a thread waiting for
it spins while the holder runs: a cold fill whose concurrent runs wrote one
object's file from several disk threads at once spent up to 0.6 s of system
time per 256 MiB spinning (aio.Disk.start). A lane's jobs run back to back
in one thread; other lanes and jobs without one run beside them.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from nwbcache_proxy import blockio
from nwbcache_proxy.aio import Disk
from nwbcache_proxy.buffers import WRITE_BEHIND_BYTES
from nwbcache_proxy.version import Version
from tests.support.daemons import DaemonThread
from tests.support.helpers import proxied
from tests.support.s3emu import S3Emulator

MiB = 1024 * 1024


class Overlap:
    """Counts jobs running at once, per key and in all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now: collections.Counter[str] = collections.Counter()
        self.most: collections.Counter[str] = collections.Counter()
        self._all = 0
        self.most_all = 0
        self.order: list[tuple[str, int]] = []

    def job(
        self, key: str, n: int, pause: float = 0.02, meet: Callable[[], object] | None = None
    ) -> Callable[[], int]:
        def run() -> int:
            with self._lock:
                self._now[key] += 1
                self._all += 1
                self.most[key] = max(self.most[key], self._now[key])
                self.most_all = max(self.most_all, self._all)
                self.order.append((key, n))
            time.sleep(pause)
            if meet is not None:
                meet()
            with self._lock:
                self._now[key] -= 1
                self._all -= 1
            return n

        return run


async def test_a_lanes_jobs_run_one_at_a_time_in_the_order_started() -> None:
    disk, seen = Disk(threads=8), Overlap()
    try:
        jobs = [disk.start(seen.job("a", n), lane="a") for n in range(6)]
        assert await asyncio.gather(*jobs) == list(range(6))
    finally:
        disk.shutdown()
    assert seen.most["a"] == 1
    assert [n for _, n in seen.order] == list(range(6))


async def test_lanes_run_beside_each_other_and_beside_jobs_without_one() -> None:
    disk, seen = Disk(threads=8), Overlap()
    try:
        jobs = [disk.start(seen.job(k, n, 0.1), lane=k) for n in range(2) for k in ("a", "b")]
        jobs.append(disk.start(seen.job("free", 0, 0.1)))
        await asyncio.gather(*jobs)
    finally:
        disk.shutdown()
    assert seen.most["a"] == seen.most["b"] == 1
    assert seen.most_all == 3  # a, b and the free one at once


async def test_a_failed_job_fails_its_own_future_and_the_lane_goes_on() -> None:
    disk = Disk(threads=2)

    def boom() -> int:
        raise OSError(28, "No space left on device")

    try:
        first = disk.start(lambda: 1, lane="x")
        failed = disk.start(boom, lane="x")
        after = disk.start(lambda: 3, lane="x")
        assert await first == 1
        with pytest.raises(OSError, match="No space left"):
            await failed
        assert await after == 3
    finally:
        disk.shutdown()


async def test_a_job_cancelled_while_queued_never_runs() -> None:
    disk, ran = Disk(threads=2), threading.Event()
    gate = threading.Event()
    try:
        holding = disk.start(lambda: gate.wait(10), lane="x")
        queued = disk.start(ran.set, lane="x")
        queued.cancel()
        gate.set()
        assert await holding is True
        assert await disk.start(lambda: "next", lane="x") == "next"  # the lane goes on
    finally:
        disk.shutdown()
    assert not ran.is_set()


def test_a_lane_whose_loop_closed_under_it_goes_on_for_the_next_loop() -> None:
    """A job's outcome cannot reach a loop closed meanwhile: the lane's
    thread must not die of it and leave the lane taken, or every later job
    of that lane would wait forever."""
    disk, gate = Disk(threads=2), threading.Event()
    first = asyncio.new_event_loop()

    async def queue_two() -> None:
        disk.start(lambda: gate.wait(10), lane="x")
        disk.start(lambda: "late", lane="x")

    first.run_until_complete(queue_two())
    first.close()  # both jobs' outcomes are for a closed loop now
    gate.set()
    second = asyncio.new_event_loop()

    async def next_job() -> int:
        return await asyncio.wait_for(disk.start(lambda: 3, lane="x"), 5)

    try:
        assert second.run_until_complete(next_job()) == 3
    finally:
        second.close()
        disk.shutdown()


async def test_a_lane_started_after_shutdown_fails_not_hangs() -> None:
    disk = Disk(threads=1)
    disk.shutdown()
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(disk.start(lambda: 1, lane="x"), 5)


def test_a_fill_writes_one_versions_file_from_one_job_at_a_time(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two objects filled at once, each in four runs of its own (16 MiB in 4
    MiB runs): writes into one object's file never overlap, writes into the
    two files do; every byte read back is the origin's."""
    seen = Overlap()
    write = blockio.write
    # Each version's first write waits for the other's: both run at once, or
    # (all writes in one lane) the barrier breaks and the fill fails.
    both = threading.Barrier(2, timeout=10)
    first: set[str] = set()
    lock = threading.Lock()

    def counted(v: Version, *args: Any, **kwargs: Any) -> Any:
        with lock:
            new = v.name not in first
            first.add(v.name)
        seen.job(v.name, 0, 0.02, both.wait if new else None)()
        return write(v, *args, **kwargs)

    monkeypatch.setattr(blockio, "write", counted)
    daemon = make_daemon(block_size=256 * 1024)
    data = {name: os.urandom(16 * MiB) for name in ("one", "two")}
    for name, body in data.items():
        origin.put(f"/lanes/{name}", body)

    answers: dict[str, requests.Response] = {}

    def get(name: str) -> None:
        url = proxied(daemon.url, origin, f"/lanes/{name}")
        rng = {"Range": f"bytes=0-{16 * MiB - 1}"}
        answers[name] = requests.get(url, headers=rng, timeout=60)

    threads = [threading.Thread(target=get, args=(name,)) for name in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    for name, body in data.items():
        assert answers[name].status_code == 206 and answers[name].content == body
    assert daemon.call(daemon.cache.index.flush())
    assert len(seen.most) == 2  # both versions were written
    assert max(seen.most.values()) == 1
    assert seen.most_all == 2
    for name, body in data.items():  # and read back from the cache
        url = proxied(daemon.url, origin, f"/lanes/{name}")
        again = requests.get(url, timeout=60)
        assert again.content == body and again.headers["X-Cache"] == "HIT"


def test_a_fill_faster_than_its_disk_holds_at_most_the_write_behind_budget(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes of 50 ms per 4 MiB group (80 MB/s), an origin many times
    faster: the fill takes upstream's bytes only as fast as they are
    written, so the blocks in memory stay near WRITE_BEHIND_BYTES. Nothing
    held them back before: the blocks in flight grew with what the fill was
    ahead of its disk, here up to the whole object."""
    write = blockio.write

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)
        return write(*args, **kwargs)

    monkeypatch.setattr(blockio, "write", slow)
    bs = 256 * 1024
    daemon = make_daemon(block_size=bs)
    data = os.urandom(96 * MiB)
    origin.put("/lanes/big", data)
    most, done = [0], threading.Event()

    async def held() -> int:
        """Bytes received into blocks still in flight (a run's blocks waiting
        for upstream have none)."""
        return sum(b.filled for b in daemon.cache.fetcher._inflight.values())

    def watch() -> None:
        while not done.is_set():
            most[0] = max(most[0], daemon.call(held()))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        got = requests.get(proxied(daemon.url, origin, "/lanes/big"), timeout=120)
    finally:
        done.set()
        watcher.join()
    assert got.content == data
    # The budget and the groups filling beside it (a run's, 4 MiB each):
    # well under the object.
    assert most[0] <= WRITE_BEHIND_BYTES + 24 * MiB, f"{most[0] / MiB:.0f} MiB"
