"""Small helpers shared by the tests and the benchmark: ports, polling, ranged GETs, URLs.

Imported like any module (``from tests.support.helpers import wait_until``);
nothing here is a fixture.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from nwbcache_proxy.reconcile import Progress, Reconciler
from nwbcache_proxy.versionfile import VersionFiles

if TYPE_CHECKING:
    from nwbcache_proxy.layout import Layout
    from tests.support.s3emu import S3Emulator

REPO = Path(__file__).resolve().parents[2]
# Real NWB files (PyNWB's and MatNWB's own test files), beside the checkout.
SHARED_NWB = REPO.parent / "shared" / "data" / "nwb"

# How often the polling helpers look again.
POLL_INTERVAL = 0.05


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], object],
    seconds: float,
    what: str | None = None,
    *,
    interval: float = POLL_INTERVAL,
) -> bool:
    """Call ``check`` until it answers truthy or ``seconds`` pass.

    Returns whether it held. With ``what``, running out of time fails the
    test instead, naming what was awaited; without, the caller asserts (or
    not) itself.
    """
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() >= deadline:
            return _gave_up(seconds, what)
        time.sleep(interval)
    return True


def status_with_top(daemon_url: str) -> dict[str, Any]:
    """/status.json once it names the objects that take most of the cache
    (found in the background when the index is slow: status.TOP_WAIT)."""
    reports: list[dict[str, Any]] = []

    def named() -> bool:
        reports.append(requests.get(f"{daemon_url}/status.json", timeout=30).json())
        return bool(reports[-1]["top_objects"])

    wait_until(named, 5, "top objects in /status.json", interval=0.05)
    return reports[-1]


async def wait_until_async(
    check: Callable[[], object],
    seconds: float,
    what: str | None = None,
    *,
    interval: float = POLL_INTERVAL,
) -> bool:
    """``wait_until`` for a test whose servers run on its own loop: sleeps without blocking it."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() >= deadline:
            return _gave_up(seconds, what)
        await asyncio.sleep(interval)
    return True


def _gave_up(seconds: float, what: str | None) -> bool:
    if what is not None:
        raise AssertionError(f"not within {seconds} s: {what}")
    return False


def get_range(
    url: str,
    first: int,
    last: int,
    *,
    check: bool = True,
    timeout: float = 60,
) -> requests.Response:
    """GET bytes ``first``..``last`` (inclusive, as the Range header writes them).

    With ``check`` (the default) the answer must be a 206 whose Content-Range
    names those bytes; without, it is returned as it came (fault tests look at
    the status themselves).
    """
    r = requests.get(url, headers={"Range": f"bytes={first}-{last}"}, timeout=timeout)
    if check:
        assert r.status_code == 206, (r.status_code, r.text[:200])
        assert r.headers["Content-Range"].startswith(f"bytes {first}-{last}/"), r.headers
    return r


def origin_host(emu: S3Emulator) -> str:
    """The emulator's host:port, as the daemon's allow-list and URLs name it."""
    return emu.url.partition("://")[2]


def proxied(daemon_url: str, emu: S3Emulator, key: str, query: str = "") -> str:
    """The daemon URL for object ``key`` of the emulator."""
    scheme = emu.url.partition("://")[0]
    url = f"{daemon_url}/{scheme}/{origin_host(emu)}{key}"
    return f"{url}?{query}" if query else url


def find_tool(name: str) -> str | None:
    """Path of a system program: PATH, then /usr/bin and /usr/sbin (nginx, when PATH lacks sbin)."""
    path = shutil.which(name)
    for folder in ("/usr/bin", "/usr/sbin"):
        if path is None and os.access(f"{folder}/{name}", os.X_OK):
            path = f"{folder}/{name}"
    return path


def system_tool(name: str) -> str:
    """Path of a system tool a test drives (curl, promtool, chromium...); the
    test fails, never skips, without it: scripts/install-test-deps.sh installs
    them (make test runs it)."""
    path = find_tool(name)
    if path is None:
        pytest.fail(f"{name} not found: run scripts/install-test-deps.sh", pytrace=False)
    return path


# -- the daemon's /metrics -------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of a daemon's /metrics, by (name, sorted labels)."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample of ``scrape``'s result; 0 when absent."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def run_bench(module: str, *args: str, out: Path, timeout: float) -> dict[str, Any]:
    """``python -m <module> <args> --out <out>`` from the checkout (a benchmark as
    its users run it): it must exit 0; its JSON report."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def blocks_holding(fd: int, size: int, block_size: int) -> list[int]:
    """The blocks of a data file that hold bytes on disk (are not holes), by
    SEEK_DATA and SEEK_HOLE: the tests' own look, not the daemon's."""
    found: set[int] = set()
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but holes past pos
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        found.update(range(start // block_size, -(-end // block_size)))
        pos = end
    return sorted(found)


def mapped_exactly(files: VersionFiles, want: Callable[[int], bytes], block_size: int) -> list[int]:
    """The blocks a version's map has, each read back and compared with
    ``want(index)``; the data file must hold bytes at exactly those blocks
    (every other one a hole)."""
    h = files.header
    mapped = [i for i, there in enumerate(files.mapped(0, h.blocks)) if there]
    for i in mapped:
        assert files.read_block(i) == want(i), f"block {i}"
    assert blocks_holding(files.data_fd, h.size, block_size) == mapped
    return mapped


def allocated(path: Path) -> int:
    """Bytes the filesystem has allocated to ``path``."""
    return os.stat(path).st_blocks * 512


def reconcile_all(layout: Layout, conn: sqlite3.Connection, max_files: int = 100_000) -> Progress:
    """A whole reconcile of the cache at ``layout``, step after step."""
    r = Reconciler(layout, conn)
    while not (p := r.step(max_files)).done:
        pass
    return p
