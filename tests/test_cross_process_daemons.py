"""Single flight across real processes: --workers and a second daemon on one cache
dir, and a fetching daemon killed with SIGKILL mid-read.

Upstream bytes are counted in the origin's log; bodies compared with the
origin's bytes.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.support.daemons import Spawn
from tests.support.helpers import origin_host, scrape, value, wait_until
from tests.support.s3emu import S3Emulator

pytestmark = pytest.mark.slow  # daemon processes

MiB = 1024 * 1024
TIMEOUT = 60


def _upstream_bytes(origin: S3Emulator, prefix: str) -> int:
    origin.wait_idle()
    return sum(e.bytes_sent for e in origin.requests() if e.path.startswith(prefix))


def _awaited(url: str, kind: str) -> float:
    return value(scrape(url), "nwbcache_awaited_fetches_total", kind=kind)


def _read_in_ranges(url: str, size: int, step: int, first: int) -> bytes:
    """The whole object in ``step``-byte ranges, starting at range ``first`` and
    wrapping around (readers that do not all move in lockstep)."""
    count = -(-size // step)
    pieces: dict[int, bytes] = {}
    with requests.Session() as session:
        for n in [(first + i) % count for i in range(count)]:
            last = min(size, (n + 1) * step) - 1
            r = session.get(url, headers={"Range": f"bytes={n * step}-{last}"}, timeout=TIMEOUT)
            assert r.status_code == 206, r.status_code
            pieces[n] = r.content
    return b"".join(pieces[n] for n in range(count))


def test_workers_and_a_second_daemon_fetch_every_block_once(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """The issue's stampede, scaled to the suite: two workers and one more daemon
    on one cache dir; 16 cold readers of one 64 MiB object and 8 readers of 64
    small objects, spread over both daemons. Upstream bytes at most 1.05x the
    objects' sizes (every block once, and one discovery per object)."""
    rng = random.Random(15)
    big = os.urandom(64 * MiB + 4321)
    origin.put("/dandiarchive/big/one", big)
    small = {
        f"/dandiarchive/small/{i:02d}": os.urandom(rng.randrange(20_000, 900_000))
        for i in range(64)
    }
    for key, data in small.items():
        origin.put(key, data)
    origin.latency = 0.01
    origin.bandwidth = 100e6  # per response: many runs in flight at once, as from S3
    cache = tmp_path / "cache"
    workers = spawn(cache, "--workers", "2")
    other = spawn(cache)
    bases = [f"{d.url}/http/{origin_host(origin)}" for d in (workers, other)]
    start = threading.Barrier(24)

    def big_reader(n: int) -> None:
        start.wait()
        body = _read_in_ranges(bases[n % 2] + "/dandiarchive/big/one", len(big), 4 * MiB, n % 3)
        assert body == big, f"reader {n}: bytes differ"

    def small_reader(n: int) -> None:
        order = sorted(small)
        random.Random(n).shuffle(order)
        start.wait()
        with requests.Session() as session:
            for key in order:
                r = session.get(bases[n % 2] + key, timeout=TIMEOUT)
                assert r.status_code == 200
                assert r.content == small[key], f"reader {n}: {key} differs"

    jobs = [lambda n=n: big_reader(n) for n in range(16)]
    jobs += [lambda n=n: small_reader(n) for n in range(8)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()

    big_fetched = _upstream_bytes(origin, "/dandiarchive/big/")
    small_fetched = _upstream_bytes(origin, "/dandiarchive/small/")
    small_size = sum(len(d) for d in small.values())
    assert big_fetched <= 1.05 * len(big), (big_fetched, len(big))
    assert small_fetched <= 1.05 * small_size, (small_fetched, small_size)
    waits = sum(_awaited(d.url, "block") + _awaited(d.url, "discovery") for d in (workers, other))
    assert waits > 0, "no process ever waited for another: the test did not test sharing"
    assert workers.terminate() == 0
    assert other.terminate() == 0


def test_a_fetching_daemon_killed_mid_read_is_taken_over(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """A fetches an object slowly; B's reader catches up with A's fill and waits
    on A's claims; A is killed with SIGKILL. B's reader finishes, byte-exact,
    within seconds, and upstream sends little more than the object once."""
    data = os.urandom(24 * MiB + 99)
    key = "/dandiarchive/killed/one"
    origin.put(key, data)
    origin.bandwidth = 8e6  # A's fill takes ~3 s
    cache = tmp_path / "cache"
    # Runs of 1 MiB (readahead): what A loses to the kill is at most what it had in flight.
    a = spawn(cache, "--readahead", "1M", "--block-size", "256K")
    b = spawn(cache, "--readahead", "1M", "--block-size", "256K")
    path = f"/http/{origin_host(origin)}{key}"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a_reader = pool.submit(requests.get, a.url + path, timeout=TIMEOUT)
        wait_until(lambda: origin.requests(key), 10, "A's first fetch done")
        b_reader = pool.submit(requests.get, b.url + path, timeout=TIMEOUT)
        wait_until(lambda: _awaited(b.url, "block") > 0, 20, "B waiting on A's claims")
        a.kill9()
        killed = time.monotonic()
        with pytest.raises(requests.RequestException):
            a_reader.result()  # A's own client sees the cut
        r = b_reader.result()
        took = time.monotonic() - killed
    assert r.status_code == 200
    assert r.content == data
    # What was left at 8 MB/s is at most the whole object: 3 s, plus the takeover.
    assert took < len(data) / 8e6 + 5, took
    fetched = _upstream_bytes(origin, key)
    assert fetched <= len(data) + 4 * MiB, (fetched, len(data))
    assert b.terminate() == 0


def _worker_pid(session: requests.Session, url: str) -> int:
    """The pid of the worker that serves this session's keep-alive connection."""
    r = session.get(url + "/healthz", timeout=TIMEOUT)
    assert r.status_code == 200
    return int(r.json()["pid"])


def test_a_fetching_worker_killed_mid_read_is_taken_over(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """--workers 2: one worker fetches, a reader on the other waits on its
    claims; the fetching worker is killed with SIGKILL (the runner starts a new
    one). The waiting reader finishes byte-exact within seconds."""
    data = os.urandom(24 * MiB + 7)
    key = "/dandiarchive/killed/worker"
    origin.put(key, data)
    origin.bandwidth = 8e6  # the fill takes ~3 s
    daemon = spawn(tmp_path / "cache", "--workers", "2", "--readahead", "1M")
    path = daemon.url + f"/http/{origin_host(origin)}{key}"
    fetching = requests.Session()
    waiting = requests.Session()
    try:
        fetcher_pid = _worker_pid(fetching, daemon.url)
        for _ in range(50):  # new connections until one lands on the other worker
            waiting.close()
            waiting = requests.Session()
            if _worker_pid(waiting, daemon.url) != fetcher_pid:
                break
        else:
            raise AssertionError("every connection went to one worker")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(fetching.get, path, timeout=TIMEOUT)
            wait_until(lambda: origin.requests(key), 10, "the first fetch done")
            second = pool.submit(waiting.get, path, timeout=TIMEOUT)
            wait_until(
                lambda: _awaited(daemon.url, "block") > 0, 20, "a worker waiting on the other"
            )
            os.kill(fetcher_pid, signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(requests.RequestException):
                first.result()
            r = second.result()
            took = time.monotonic() - killed
    finally:
        fetching.close()
        waiting.close()
    assert r.status_code == 200
    assert r.content == data
    assert took < len(data) / 8e6 + 5, took
    assert _upstream_bytes(origin, key) <= len(data) + 4 * MiB
    assert daemon.terminate() == 0


def test_the_workers_of_a_daemon_share_one_node_id(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """A request whose Via names the daemon is a loop whichever worker gets it."""
    origin.put("/dandiarchive/loop/one", b"x" * 1000)
    daemon = spawn(tmp_path / "cache", "--workers", "2")
    path = daemon.url + f"/http/{origin_host(origin)}/dandiarchive/loop/one"
    seen: dict[int, str] = {}
    for _ in range(40):  # new connections: the kernel spreads them over both workers
        with requests.Session() as session:
            health = session.get(daemon.url + "/healthz", timeout=TIMEOUT).json()
            seen[health["pid"]] = health["node"]
            looped = session.get(
                path, headers={"Via": f"1.1 {health['node']} (nwbcache)"}, timeout=TIMEOUT
            )
            assert looped.status_code == 508
    assert len(seen) == 2, "every connection went to one worker"
    assert len(set(seen.values())) == 1
    assert origin.requests("/dandiarchive/loop/one") == []
    assert daemon.terminate() == 0
