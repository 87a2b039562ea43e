"""How the daemon behaves as the cache grows: figures at several cache sizes, with their growth.

    make bench-scale                                 # 100k, 500k, 1M, 2M blocks of 4 KiB
    make bench-scale ARGS="--quick"                  # 20k, 100k: a smoke run
    .venv/bin/python -m bench.scale --sizes 100k,1M --block-size 4K --keep /data/scale

At each size N the cache is filled to N blocks with bench/scalefill.py
(format 3: each version's data file and map written in large runs through
versionfile.VersionFiles, metadata and index rows written directly, in
seconds rather than hours of proxying) plus a few "probe" objects read
through the daemon from the S3 emulator; then, with ``nwbcache serve`` as a
child process:

1. start-up: spawn to ``/healthz`` 200 on a clean cache, median of 3;
2. after ``kill -9`` (an unclean stop: the dead process's staging dir is
   left), restart: time until the index's reconcile is done, the daemon's
   peak RSS, and warm 4 KiB hits on a probe object issued back to back during
   the reconcile, against the same client on an idle daemon;
3. eviction: restart with ``--cache-size`` 10 % below the filled size; time
   until the index totals at most 95 % of it, blocks/s, hits meanwhile;
4. ``/status.json`` (median of 5) and ``nwbcache status``;
5. ``nwbcache check``: wall time and peak RSS;
6. index bytes per block row, disk bytes per block (the versions' data
   files and maps, as allocated), and the most entries in any one directory.

Sizes that do not fit on the disk are skipped, saying so. Each filled cache
is deleted after its size unless ``--keep DIR``. The table is printed with
the growth of each figure from the size before, and saved as
bench/results-scale.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.harness import Emulator, git_commit, machine
from bench.scalefill import BULK_PREFIX, block_data, bulk_url, fill
from nwbcache_proxy import schema
from nwbcache_proxy.layout import DATA_SUFFIX, MAP_SUFFIX, Layout
from nwbcache_proxy.mapfile import ENTRY_SIZE
from nwbcache_proxy.objectmeta import ObjectMeta
from nwbcache_proxy.sizes import format_size, parse_size
from tests.support.daemons import DaemonProcess
from tests.support.helpers import REPO

BENCH = Path(__file__).resolve().parent
DEFAULT_SIZES = "100k,500k,1M,2M"
QUICK_SIZES = "20k,100k"
# Probe objects: real objects on the emulator, read through the daemon.
PROBES = 2
PROBE_BLOCKS = 64
# Bulk blocks served and compared byte for byte with what the filler wrote.
VERIFY_BLOCKS = 24
STARTS = 3
STATUS_TRIES = 5
# The eviction run's --cache-size, as a fraction of the filled size, and the
# fraction of it the index must reach (upkeep.LOW_WATER).
EVICT_CUT = 0.90
EVICT_DOWN_TO = 0.95
POLL = 0.02
SLOW_MS = 50.0
# "Flat" memory: the largest size's peak within this factor of the smallest's.
FLAT = 1.5
RECONCILED = re.compile(r"index reconciled with disk: (\d+) files")
SWEPT = re.compile(r"swept the leftovers of earlier runs: (\d+) dead")


# --------------------------------------------------------------------------- sizes


def parse_count(text: str) -> int:
    """``100k`` -> 100000, ``2M`` -> 2000000 (decimal: these are block counts)."""
    t = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(t[-1:], 1)
    number = t[:-1] if mult > 1 else t
    value = float(number) * mult
    if not number or value < 1 or not math.isfinite(value):
        raise ValueError(f"invalid block count {text!r}: e.g. 100k, 1M, 3000")
    return int(value)


def count_label(n: int) -> str:
    for div, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{suffix}"
    return str(n)


# Index bytes per block row, with its indexes and the WAL: a margin over the
# ~70 measured (bench/results-scale.md).
INDEX_ROW_BYTES = 150


def disk_need(blocks: int, block_size: int, frsize: int) -> int:
    """Bytes on disk a cache of ``blocks`` blocks takes: each block's bytes in
    whole filesystem blocks (in its version's data file; no header), its map
    entry and index row, plus a margin for metadata and directories."""
    per_block = -(-block_size // frsize) * frsize + ENTRY_SIZE + INDEX_ROW_BYTES
    return int(blocks * per_block * 1.1) + (1 << 30)


# --------------------------------------------------------------------------- process figures


def proc_status(pid: int, field: str) -> int | None:
    """A kB figure of /proc/<pid>/status (VmHWM, VmRSS) in bytes."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def mb(n: int | None) -> float | None:
    return None if n is None else n / 1e6


def http_get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def proxied(daemon_url: str, upstream_url: str) -> str:
    scheme, _, rest = upstream_url.partition("://")
    return f"{daemon_url}/{scheme}/{rest}"


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# --------------------------------------------------------------------------- hit client


@dataclasses.dataclass(frozen=True)
class Target:
    path: str  # request path on the daemon
    length: int  # bytes in the object


class HitClient(threading.Thread):
    """Warm 4 KiB (one block) range GETs on the probe objects, back to back on
    one keep-alive connection, each one's latency recorded but the first on
    each object (the connection, and the process reading the object's
    meta.json: not what is measured). A block's first hit in a process also
    checks its CRC; that is counted, as it is part of serving after a start."""

    def __init__(self, daemon_url: str, targets: list[Target], block_size: int) -> None:
        super().__init__(daemon=True, name="hit-client")
        host, _, port = daemon_url.removeprefix("http://").partition(":")
        self._host, self._port = host, int(port)
        self._targets = targets
        self._block_size = block_size
        self._stop_event = threading.Event()
        self.latencies_ms: list[float] = []
        self.errors: list[str] = []
        self.not_hits = 0
        self._warmup = len(targets)

    def run(self) -> None:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=30)
        n = 0
        try:
            while not self._stop_event.is_set():
                target = self._targets[n % len(self._targets)]
                blocks = max(1, target.length // self._block_size)
                first = ((n // len(self._targets)) % blocks) * self._block_size
                last = min(first + self._block_size, target.length) - 1
                n += 1
                started = time.perf_counter()
                try:
                    conn.request("GET", target.path, headers={"Range": f"bytes={first}-{last}"})
                    r = conn.getresponse()
                    body = r.read()
                except (OSError, http.client.HTTPException) as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = http.client.HTTPConnection(self._host, self._port, timeout=30)
                    time.sleep(0.05)
                    continue
                if n > self._warmup:  # n counts this request
                    self.latencies_ms.append((time.perf_counter() - started) * 1000)
                if r.status != 206 or len(body) != last - first + 1:
                    self.errors.append(f"status {r.status}, {len(body)} bytes")
                if not (r.getheader("X-Cache") or "").upper().startswith("HIT"):
                    self.not_hits += 1
        finally:
            conn.close()

    def stop(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join(60)
        lat = self.latencies_ms
        return {
            "requests": len(lat),
            "median_ms": statistics.median(lat) if lat else None,
            "p99_ms": percentile(lat, 0.99),
            "max_ms": max(lat) if lat else None,
            "over_50ms": sum(x > SLOW_MS for x in lat),
            "not_hits": self.not_hits,
            "errors": self.errors[:5],
            "error_count": len(self.errors),
        }


@contextlib.contextmanager
def hits(daemon_url: str, targets: list[Target], block_size: int) -> Iterator[HitClient]:
    client = HitClient(daemon_url, targets, block_size)
    client.start()
    try:
        yield client
    finally:
        if client.is_alive():
            client.stop()


# --------------------------------------------------------------------------- the index, read only


class IndexWatch:
    """Reads the index as the daemon writes it (WAL: readers never block it)."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=30
        )

    def reconcile_due(self) -> bool:
        return schema.get_state(self._conn, schema.RECONCILE) is not None

    def totals(self) -> tuple[int, int]:
        return schema.totals(self._conn)

    def close(self) -> None:
        self._conn.close()


@contextlib.contextmanager
def watching(path: Path) -> Iterator[IndexWatch]:
    watch = IndexWatch(path)
    try:
        yield watch
    finally:
        watch.close()


def index_totals(path: Path) -> tuple[int, int]:
    with watching(path) as w:
        return w.totals()


def index_file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def version_files_bytes(objects: Path) -> int:
    """Bytes allocated on disk to the versions' data files and maps under
    ``objects`` (``<kh[:2]>/<kh>/<vd>.<bs>.data``, ``.map``): holes take none."""
    total = 0
    for prefix in os.scandir(objects):
        if not prefix.is_dir(follow_symlinks=False):
            continue
        for odir in os.scandir(prefix.path):
            if not odir.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(odir.path):
                if entry.name.endswith((DATA_SUFFIX, MAP_SUFFIX)) and entry.is_file(
                    follow_symlinks=False
                ):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def largest_dir(root: Path) -> tuple[int, str, int]:
    """(entries, path, files in all) of the directory with the most entries under ``root``."""
    most, where, files = 0, str(root), 0
    stack = [str(root)]
    while stack:
        path = stack.pop()
        entries = 0
        with os.scandir(path) as it:
            for entry in it:
                entries += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    files += 1
        if entries > most:
            most, where = entries, path
    return most, str(Path(where).relative_to(root)), files


# --------------------------------------------------------------------------- one size


@dataclasses.dataclass
class Run:
    """Settings common to every size."""

    block_size: int
    emulator: Emulator
    probes: list[tuple[str, bytes]]  # (upstream URL, bytes)
    idle_seconds: float
    check_timeout: float
    per_object: int
    workers: int
    serve_args: list[str]


class SizeBench:
    def __init__(self, run: Run, blocks: int, work: Path) -> None:
        self.run = run
        self.blocks = blocks
        self.work = work
        self.cache = work / "cache"
        self.layout = Layout(self.cache)
        self.figures: dict[str, Any] = {"blocks": blocks}
        self.problems: list[str] = []  # the bench or the daemon went wrong: exit 1
        self.notes: list[str] = []  # worth reading, not fatal
        self._logs = 0
        self._log: Path | None = None
        self._daemons: list[DaemonProcess] = []
        self._bulk: list[ObjectMeta] = []

    # -- daemons ------------------------------------------------------------
    def daemon_args(self, capacity: int) -> list[str]:
        host = self.run.emulator.host
        return [
            "--cache-dir",
            str(self.cache),
            "--cache-size",
            str(capacity),
            "--block-size",
            str(self.run.block_size),
            "--allow-upstream",
            host,
            "--immutable",
            host + BULK_PREFIX,
            "--log-level",
            "info",
            *self.run.serve_args,
        ]

    def start(self, what: str, capacity: int | None = None) -> tuple[DaemonProcess, float, Path]:
        """A daemon; returns it, seconds from spawn to /healthz 200, and its log."""
        self._logs += 1
        log = self.work / f"daemon-{self._logs:02d}-{what}.log"
        self._log = log
        cap = capacity if capacity is not None else 1 << 50
        started = time.perf_counter()
        d = DaemonProcess(self.daemon_args(cap), stderr_path=log)
        self._daemons.append(d)
        d.start(timeout=300)
        while http_get(d.url + "/healthz")[0] != 200:
            time.sleep(0.005)
        return d, time.perf_counter() - started, log

    @staticmethod
    def stop(d: DaemonProcess) -> None:
        if d.proc is None or d.proc.poll() is not None:
            return
        try:
            d.terminate()
        except subprocess.TimeoutExpired:
            d.kill9()

    def stop_all(self) -> None:
        for d in self._daemons:
            self.stop(d)

    def last_log(self) -> str:
        """The end of the last daemon's log, for a problem report."""
        if self._log is None or not self._log.exists():
            return ""
        tail = self._log.read_text(errors="replace").strip().splitlines()[-8:]
        return "; daemon log: " + " | ".join(tail)

    @property
    def targets(self) -> list[Target]:
        return [
            Target("/" + url.replace("://", "/", 1), len(data)) for url, data in self.run.probes
        ]

    # -- the phases -----------------------------------------------------------
    def measure(self) -> dict[str, Any]:
        self.fill()
        self.at_rest()
        self.starts_then_kill()
        self.reconcile()
        self.check()
        self.evict()
        return self.figures

    def fill(self) -> None:
        self.figures["commit"] = git_commit()
        bulk = self.blocks - PROBES * PROBE_BLOCKS
        if bulk < 1:
            raise SystemExit(f"{self.blocks} blocks: fewer than the probe objects' own")
        print(f"  filling {bulk:,} bulk blocks ...", flush=True)
        filled, self._bulk = fill(
            self.cache,
            self.run.emulator.url,
            bulk,
            self.run.block_size,
            per_object=self.run.per_object,
            workers=self.run.workers,
        )
        self.figures.update(
            fill_s=filled.seconds,
            fill_blocks_per_s=filled.blocks_per_second,
            fill_index_s=filled.index_seconds,
            fill_files_s=filled.files_seconds,
            bulk_objects=filled.objects,
        )
        print(
            f"  filled in {filled.seconds:.1f} s ({filled.blocks_per_second:,.0f} blocks/s); "
            "warming the probe objects",
            flush=True,
        )
        d, _, _ = self.start("warm")
        try:
            for url, data in self.run.probes:
                status, body = http_get(proxied(d.url, url), timeout=60)
                if status != 200 or body != data:
                    self.problems.append(f"probe {url}: status {status}, {len(body)} bytes")
        finally:
            self.stop(d)
        started_line = re.search(r"nwbcache \S+: .*", self._log.read_text() if self._log else "")
        self.figures["daemon"] = started_line[0] if started_line else None
        _, rows = index_totals(self.layout.index_path)
        if rows != self.blocks:
            self.problems.append(f"index has {rows} rows after the fill, not {self.blocks}")

    def at_rest(self) -> None:
        """Index bytes per row, disk bytes per block and directory sizes, with
        no daemon running."""
        bytes_, rows = index_totals(self.layout.index_path)
        self.figures["filled_bytes"] = bytes_
        self.figures["index_rows"] = rows
        self.figures["index_bytes"] = index_file_bytes(self.layout.index_path)
        self.figures["index_bytes_per_row"] = self.figures["index_bytes"] / max(rows, 1)
        self.figures["disk_bytes"] = version_files_bytes(self.layout.objects)
        self.figures["disk_bytes_per_block"] = self.figures["disk_bytes"] / max(rows, 1)
        started = time.perf_counter()
        most, where, files = largest_dir(self.cache)
        self.figures.update(
            max_dir_entries=most,
            max_dir=where,
            files=files,
            walk_s=time.perf_counter() - started,
        )

    def starts_then_kill(self) -> None:
        """Clean starts; on the last daemon: the fill verified through it, idle
        hits, /status.json, ``nwbcache status``; then kill -9."""
        times = []
        for i in range(STARTS):
            d, seconds, _ = self.start("start")
            times.append(seconds)
            if i < STARTS - 1:
                self.stop(d)
        self.figures["startup_runs_s"] = times
        self.figures["startup_s"] = statistics.median(times)
        try:
            self.verify_fill(d)
            with hits(d.url, self.targets, self.run.block_size) as client:
                time.sleep(self.run.idle_seconds)
                self.figures["idle_hits"] = client.stop()
            status_ms = []
            for _ in range(STATUS_TRIES):
                t = time.perf_counter()
                code, body = http_get(d.url + "/status.json")
                status_ms.append((time.perf_counter() - t) * 1000)
                if code != 200:
                    self.problems.append(f"/status.json: {code} {body[:200]!r}")
            self.figures["status_json_ms"] = statistics.median(status_ms)
            t = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "nwbcache_proxy", "status", "--url", d.url],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=REPO,
            )
            self.figures["status_cli_s"] = time.perf_counter() - t
            if done.returncode != 0:
                self.problems.append(f"nwbcache status: exit {done.returncode}: {done.stderr}")
            assert d.proc is not None
            self.figures["idle_rss_mb"] = mb(proc_status(d.proc.pid, "VmRSS"))
            self.figures["idle_hwm_mb"] = mb(proc_status(d.proc.pid, "VmHWM"))
        finally:
            d.kill9()
        if not any(self.layout.staging.iterdir()):
            self.problems.append("kill -9 left no staging dir: the restart sees a clean stop")

    def verify_fill(self, d: DaemonProcess) -> None:
        """Random bulk blocks served byte-exact, as hits."""
        rng = random.Random(self.blocks)
        bs = self.run.block_size
        good = 0
        for _ in range(VERIFY_BLOCKS):
            n = rng.randrange(len(self._bulk))
            meta = self._bulk[n]
            index = rng.randrange(meta.version.size // bs)
            url = proxied(d.url, bulk_url(self.run.emulator.url, n + 1))
            request = urllib.request.Request(
                url, headers={"Range": f"bytes={index * bs}-{(index + 1) * bs - 1}"}
            )
            with urllib.request.urlopen(request, timeout=30) as r:
                body = r.read()
                x_cache = r.headers.get("X-Cache", "")
            if body == block_data(n + 1, index, bs) and x_cache.upper().startswith("HIT"):
                good += 1
            else:
                self.problems.append(
                    f"bulk object {n + 1} block {index}: {len(body)} bytes, X-Cache {x_cache!r}, "
                    "not the bytes written"
                )
        self.figures["fill_verified"] = {"blocks": VERIFY_BLOCKS, "exact_hits": good}

    def reconcile(self) -> None:
        """Restart after kill -9: until the reconcile is done, hits back to back."""
        started = time.perf_counter()
        d, ready_s, log = self.start("reconcile")
        assert d.proc is not None
        seen_due = False
        files: int | None = None
        swept = False
        done_s: float | None = None
        with (
            hits(d.url, self.targets, self.run.block_size) as client,
            watching(self.layout.index_path) as index,
        ):
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                text = log.read_text(errors="replace")
                swept = swept or SWEPT.search(text) is not None
                found = RECONCILED.search(text)
                due = index.reconcile_due()
                seen_due = seen_due or due
                if found is not None or (seen_due and not due):
                    done_s = time.perf_counter() - started
                    files = int(found[1]) if found else None
                    break
                if not seen_due and time.perf_counter() - started > 30:
                    break  # never became due: no unclean stop seen
                time.sleep(POLL)
            during = client.stop()
        self.figures.update(
            reconcile_s=done_s,
            reconcile_ready_s=ready_s,
            reconcile_files=files,
            reconcile_hits=during,
            reconcile_hwm_mb=mb(proc_status(d.proc.pid, "VmHWM")),
            reconcile_swept=swept,
        )
        if done_s is None:
            self.problems.append("no reconcile after kill -9 (or it did not finish)")
        # The log line comes just after the state row goes: wait for the count.
        if files is None:
            time.sleep(0.5)
            found = RECONCILED.search(log.read_text(errors="replace"))
            self.figures["reconcile_files"] = int(found[1]) if found else None
        self.stop(d)

    def check(self) -> None:
        out = self.work / "check.out"
        started = time.perf_counter()
        with out.open("w") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nwbcache_proxy", "check", "--cache-dir", str(self.cache)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        status = None
        # VmHWM of the running check, polled: wait4's ru_maxrss would do, but
        # Linux carries it across exec, so it starts at this (large) process's
        # RSS at the fork and the figure grew with the bench's own memory.
        maxrss = 0
        deadline = time.monotonic() + self.run.check_timeout
        while status is None:
            maxrss = max(maxrss, proc_status(proc.pid, "VmHWM") or 0)
            pid, st, _usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(st)
                proc.returncode = status
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                _, st, _usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(st)
                self.notes.append(f"nwbcache check: killed after {self.run.check_timeout} s")
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        tail = out.read_text(errors="replace").strip().splitlines()[-6:]
        self.figures.update(
            check_s=seconds if status is not None else None,
            check_rss_mb=mb(maxrss) if status is not None else None,
            check_exit=status,
            check_output=tail,
        )
        if status != 0:
            # Recorded, not fatal: check's own correctness is its tests' business.
            self.notes.append(f"nwbcache check: exit {status}: {' | '.join(tail[-3:])}")

    def evict(self) -> None:
        """Restart 10 % below the filled size; until the index is down to 95 % of
        it, with hits back to back. Then the same cut again with no requests:
        how much of the eviction's pace the serving takes."""
        self.figures.update(self._cut("evict", client=True))
        quiet = self._cut("evict-quiet", client=False)
        self.figures.update(
            evict_quiet_blocks=quiet["evict-quiet_blocks"],
            evict_quiet_s=quiet["evict-quiet_s"],
            evict_quiet_blocks_per_s=quiet["evict-quiet_blocks_per_s"],
        )
        peaks = [self.figures.get(k) for k in ("idle_hwm_mb", "reconcile_hwm_mb", "evict_hwm_mb")]
        self.figures["daemon_peak_rss_mb"] = max((p for p in peaks if p is not None), default=None)

    def _cut(self, what: str, *, client: bool) -> dict[str, Any]:
        bytes_before, blocks_before = index_totals(self.layout.index_path)
        capacity = int(bytes_before * EVICT_CUT)
        target = int(capacity * EVICT_DOWN_TO)
        started = time.perf_counter()
        d, ready_s, _ = self.start(what, capacity)
        assert d.proc is not None
        first_drop: float | None = None
        done_s: float | None = None
        blocks_after = blocks_before
        during = None
        with contextlib.ExitStack() as stack:
            index = stack.enter_context(watching(self.layout.index_path))
            hitter = (
                stack.enter_context(hits(d.url, self.targets, self.run.block_size))
                if client
                else None
            )
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                now_bytes, blocks_after = index.totals()
                now = time.perf_counter() - started
                if first_drop is None and now_bytes < bytes_before:
                    first_drop = now
                if now_bytes <= target:
                    done_s = now
                    break
                time.sleep(POLL)
            if hitter is not None:
                during = hitter.stop()
        evicted = blocks_before - blocks_after
        busy = None if done_s is None or first_drop is None else done_s - first_drop
        out: dict[str, Any] = {
            f"{what}_capacity": capacity,
            f"{what}_blocks": evicted,
            f"{what}_ready_s": ready_s,
            f"{what}_s": None if done_s is None else done_s - ready_s,
            f"{what}_busy_s": busy,
            # One poll's time at least: a small cut may go in one slice between polls.
            f"{what}_blocks_per_s": None if busy is None else evicted / max(busy, POLL),
            f"{what}_hwm_mb": mb(proc_status(d.proc.pid, "VmHWM")),
        }
        if during is not None:
            out[f"{what}_hits"] = during
        if done_s is None:
            self.problems.append(f"{what}: did not reach {format_size(target)} in time")
        self.stop(d)
        return out


# --------------------------------------------------------------------------- the report


@dataclasses.dataclass(frozen=True)
class Figure:
    label: str
    get: Callable[[dict[str, Any]], float | None]
    fmt: str = "{:.3g}"
    target: str = ""
    # Whether a value meets the target (None: no target at this size).
    meets: Callable[[dict[str, Any], float], bool | None] | None = None


def _at(key: str, sub: str | None = None) -> Callable[[dict[str, Any]], float | None]:
    def get(f: dict[str, Any]) -> float | None:
        v = f.get(key)
        if sub is not None:
            v = v.get(sub) if isinstance(v, dict) else None
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    return get


def _le(limit: float) -> Callable[[dict[str, Any], float], bool | None]:
    return lambda _f, v: v <= limit


def _ge(limit: float) -> Callable[[dict[str, Any], float], bool | None]:
    return lambda _f, v: v >= limit


def _memory_target(f: dict[str, Any], v: float) -> bool | None:
    return v <= 250 if f["blocks"] <= 2_000_000 else None


def _cut_target(f: dict[str, Any], v: float) -> bool | None:
    """A 10 % cut of 1M blocks in <= 10 s, pro rata above (below, the second
    before the first maintenance pass is most of the time)."""
    return v <= 10 * f["blocks"] / 1_000_000 if f["blocks"] >= 1_000_000 else None


FIGURES = [
    Figure("fill rate, blocks/s", _at("fill_blocks_per_s"), "{:,.0f}"),
    Figure("start-up to /healthz, s (median of 3)", _at("startup_s"), "{:.2f}", "≤ 1", _le(1.0)),
    Figure("daemon RSS idle, MB", _at("idle_rss_mb"), "{:.0f}", "≤ 250, flat", _memory_target),
    Figure("hit p99 idle, ms", _at("idle_hits", "p99_ms"), "{:.2f}"),
    Figure("hit worst idle, ms", _at("idle_hits", "max_ms"), "{:.1f}"),
    Figure("reconcile after kill -9, s", _at("reconcile_s"), "{:.1f}"),
    Figure(
        "daemon peak RSS in reconcile, MB",
        _at("reconcile_hwm_mb"),
        "{:.0f}",
        "≤ 250, flat",
        _memory_target,
    ),
    Figure("hit p99 in reconcile, ms", _at("reconcile_hits", "p99_ms"), "{:.2f}", "≤ 50", _le(50)),
    Figure(
        "hit worst in reconcile, ms", _at("reconcile_hits", "max_ms"), "{:.1f}", "≤ 50", _le(50)
    ),
    Figure("blocks evicted (10 % cut)", _at("evict_blocks"), "{:,.0f}"),
    Figure(
        "eviction, s from ready to done",
        _at("evict_s"),
        "{:.1f}",
        "≤ 10 per 1M (≥ 1M)",
        _cut_target,
    ),
    Figure(
        "eviction rate under hits, blocks/s",
        _at("evict_blocks_per_s"),
        "{:,.0f}",
        "≥ 20,000",
        _ge(20e3),
    ),
    Figure(
        "eviction rate, no requests, blocks/s",
        _at("evict_quiet_blocks_per_s"),
        "{:,.0f}",
        "≥ 20,000",
        _ge(20e3),
    ),
    Figure("hit p99 in eviction, ms", _at("evict_hits", "p99_ms"), "{:.2f}", "≤ 50", _le(50)),
    Figure("hit worst in eviction, ms", _at("evict_hits", "max_ms"), "{:.1f}", "≤ 50", _le(50)),
    Figure(
        "daemon peak RSS in eviction, MB",
        _at("evict_hwm_mb"),
        "{:.0f}",
        "≤ 250, flat",
        _memory_target,
    ),
    Figure("/status.json, ms (median of 5)", _at("status_json_ms"), "{:.1f}", "≤ 50", _le(50)),
    Figure("nwbcache status, s", _at("status_cli_s"), "{:.2f}"),
    Figure("nwbcache check, s", _at("check_s"), "{:.1f}"),
    Figure("nwbcache check peak RSS, MB", _at("check_rss_mb"), "{:.0f}", "≤ 200", _le(200)),
    Figure("index bytes per block row", _at("index_bytes_per_row"), "{:.0f}"),
    Figure("disk bytes per block (data + map)", _at("disk_bytes_per_block"), "{:,.0f}"),
    Figure("most entries in one dir", _at("max_dir_entries"), "{:,.0f}", "≤ 10,000", _le(10_000)),
]


def _cell(fig: Figure, f: dict[str, Any], prev: dict[str, Any] | None) -> str:
    v = fig.get(f)
    if v is None:
        return "-"
    text = fig.fmt.format(v)
    if fig.meets is not None and fig.meets(f, v) is False:
        text += " ✗"
    p = fig.get(prev) if prev is not None else None
    if p:
        text += f" (×{v / p:.2f})"
    return text


def table(sizes: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: a figure per row, a size per column, growth from the column before."""
    head = ["figure", "target"]
    for i, f in enumerate(sizes):
        label = count_label(f["blocks"])
        if i:
            label += f" (×{f['blocks'] / sizes[i - 1]['blocks']:.2g})"
        head.append(label)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fig in FIGURES:
        cells = [_cell(fig, f, sizes[i - 1] if i else None) for i, f in enumerate(sizes)]
        lines.append("| " + " | ".join([fig.label, fig.target, *cells]) + " |")
    return lines


def misses(sizes: list[dict[str, Any]]) -> list[str]:
    out = []
    for f in sizes:
        for fig in FIGURES:
            v = fig.get(f)
            if v is not None and fig.meets is not None and fig.meets(f, v) is False:
                out.append(
                    f"{count_label(f['blocks'])}: {fig.label} = {fig.fmt.format(v)} "
                    f"(target {fig.target})"
                )
    if len(sizes) > 1:
        first, last = sizes[0].get("daemon_peak_rss_mb"), sizes[-1].get("daemon_peak_rss_mb")
        if first and last and last > first * FLAT:
            out.append(
                f"daemon peak RSS not flat: {first:.0f} MB at {count_label(sizes[0]['blocks'])}, "
                f"{last:.0f} MB at {count_label(sizes[-1]['blocks'])}"
            )
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# nwbcache at scale",
        "",
        f"`{report['command']}` — {report['machine']['cores']} cores, "
        f"{report['machine']['memory_gib']} GiB, block size {report['block_size']} B; "
        "growth from the size before in parentheses, ✗ a missed target.",
        "",
        *table(report["sizes"]),
        "",
    ]
    commits = [f"{count_label(f['blocks'])} at {f.get('commit') or '?'}" for f in report["sizes"]]
    if commits:
        lines += ["Daemon from commit: " + ", ".join(commits) + ".", ""]
    if report["skipped"]:
        lines += ["Skipped:", *(f"- {s}" for s in report["skipped"]), ""]
    if report["misses"]:
        lines += ["Missed targets:", *(f"- {m}" for m in report["misses"]), ""]
    if report["notes"]:
        lines += ["Notes:", *(f"- {n}" for n in report["notes"]), ""]
    if report["problems"]:
        lines += ["Problems:", *(f"- {p}" for p in report["problems"]), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--sizes", help=f"block counts (default {DEFAULT_SIZES})")
    ap.add_argument("--block-size", default="4K", help="the daemon's --block-size (default 4K)")
    ap.add_argument("--quick", action="store_true", help=f"a smoke run: sizes {QUICK_SIZES}")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="fill and keep the caches in DIR")
    ap.add_argument("--work", type=Path, help="scratch dir (default a temp dir in .bench-data)")
    ap.add_argument("--out", type=Path, help="JSON results (default bench/results-scale.json)")
    ap.add_argument("--idle-seconds", type=float, help="idle hit run, s (default 3; quick 1)")
    ap.add_argument("--check-timeout", type=float, default=3600, help="s (default 3600)")
    ap.add_argument("--per-object", type=int, default=10_000, help="blocks per bulk object")
    ap.add_argument("--workers", type=int, default=2, help="filling processes (default 2)")
    ap.add_argument(
        "--serve-args", default="", help="more flags for nwbcache serve, e.g. '--eviction lru'"
    )
    args = ap.parse_args(argv)
    sizes = sorted(
        {
            parse_count(s)
            for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)).split(",")
        }
    )
    block_size = parse_size(args.block_size)
    out_path: Path = args.out or BENCH / "results-scale.json"
    idle = args.idle_seconds if args.idle_seconds is not None else (1.0 if args.quick else 3.0)

    base = args.keep or args.work or REPO / ".bench-data"
    base.mkdir(parents=True, exist_ok=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="scale-", dir=base))
    started = time.time()
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    problems: list[str] = []
    notes: list[str] = []
    origin = work / "origin"
    origin.mkdir(exist_ok=True)
    rng = random.Random(0)
    probes = []
    for i in range(PROBES):
        data = rng.randbytes(PROBE_BLOCKS * block_size)
        (origin / f"probe-{i}").write_bytes(data)
        probes.append((f"probe-{i}", data))
    emulator = Emulator(origin, latency=0.0, bandwidth=1e12, log_path=work / "s3emu.log").start()
    run = Run(
        block_size,
        emulator,
        [(emulator.url_for(name), data) for name, data in probes],
        idle,
        args.check_timeout,
        args.per_object,
        args.workers,
        shlex.split(args.serve_args),
    )
    try:
        for n in sizes:
            label = count_label(n)
            vfs = os.statvfs(work)
            need = disk_need(n, block_size, vfs.f_frsize)
            free = vfs.f_bavail * vfs.f_frsize
            if need > free:
                msg = (
                    f"{label} blocks: skipped, needs about {format_size(need)} on disk, "
                    f"{format_size(free)} free at {work}"
                )
                print(msg, flush=True)
                skipped.append(msg)
                continue
            print(f"{label} blocks of {format_size(block_size)}:", flush=True)
            size_work = work / f"n{label}"
            if size_work.exists():
                shutil.rmtree(size_work)
            size_work.mkdir()
            bench = SizeBench(run, n, size_work)
            try:
                figures = bench.measure()
            except Exception as exc:  # the daemon may be changing under the bench
                figures = bench.figures
                bench.problems.append(f"stopped: {type(exc).__name__}: {exc}{bench.last_log()}")
                traceback.print_exc()
            finally:
                bench.stop_all()
                if not args.keep:
                    shutil.rmtree(size_work, ignore_errors=True)
            problems += [f"{label}: {p}" for p in bench.problems]
            notes += [f"{label}: {p}" for p in bench.notes]
            results.append(figures)
            print("\n".join(table(results[-1:])), flush=True)
    finally:
        emulator.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    report: dict[str, Any] = {
        "command": " ".join(
            ["python", "-m", "bench.scale", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "block_size": block_size,
        "serve_args": args.serve_args,
        "elapsed_seconds": time.time() - started,
        "sizes": results,
        "skipped": skipped,
        "misses": misses(results),
        "problems": problems,
        "notes": notes,
    }
    out_path.write_text(json.dumps(report, indent=2))
    out_path.with_suffix(".md").write_text(markdown(report))
    print()
    print("\n".join(table(results)))
    for line in report["misses"]:
        print(f"MISSED: {line}")
    for line in notes:
        print(f"NOTE: {line}")
    for line in problems:
        print(f"PROBLEM: {line}")
    print(f"\nresults: {out_path} ({report['elapsed_seconds']:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
