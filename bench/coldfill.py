"""The write path: a cold fill through nwbcache against nginx's slice cache, side by side.

    make bench-coldfill                              # 256 MiB, 4 streams, 5 runs (~2 min)
    make bench-coldfill ARGS="--streams 1,4"
    .venv/bin/python -m bench.coldfill --quick       # 64 MiB, 2 runs

One origin for everything: the S3 emulator (tests/support/s3emu.py) as its own
process, unthrottled (no latency, no bandwidth cap), serving one random object
of ``--size`` from a file on disk, written once up front. Each run reads the
whole object in ``--range`` byte ranges (16 MiB) over ``--streams`` concurrent
keep-alive connections (ranges handed out in order), into one buffer allocated
and touched once, and checks its sha256 against the origin's:

- ``origin``: the emulator directly, no cache (the ceiling);
- ``nginx``: Debian's nginx-light with ``slice 256k`` + ``proxy_cache``
  (bench/harness.py's configuration, slice size aside), a fresh cache per run;
- ``nwbcache``: ``nwbcache serve --block-size 256K``, a fresh cache dir per run;
- ``baseline`` (with ``--baseline REV``): the same daemon at git revision REV
  (a worktree in the scratch dir, on PYTHONPATH), so that a change to the
  write path is measured against what it changes in the same sitting: the
  report adds this checkout's MB/s and CPU over the baseline's, medians of
  the per-run ratios (this VM's speed moves by a third from hour to hour).

Figures per system and stream count, medians of ``--runs`` runs: wall-clock
MB/s (10**6 bytes) of the read; the server's CPU seconds per GiB read
(utime + stime from /proc/<pid>/stat, summed over the server's processes: the
nginx master and workers, the daemon and its workers), counted until the
origin has been idle for 0.2 s, so a fill finishing after the client is done
is counted too; the origin's CPU; bytes fetched from the origin; bytes the
cache holds on disk afterwards. Each run takes the next ordering of the
caches (``orderings``: every ordering of three in turn), so that over the
default 6 runs each goes first, and follows each other, equally often: a
run pays for the deletion of the cache before it (below), and with the
order only rotated, the same system always came right after nginx (an
A/A run, one commit against itself: slow in 3 of 4 runs in that place, 1
of 4 in the other). One untimed warm-up round comes first.

Hygiene on a VM: before each run, ``sync`` and a pause (``--settle``) so
writeback of the run before does not land in this one; and the caches of
earlier runs are deleted just before each timed read: writing into page-cache
memory the host has not backed yet (never touched, or freed and handed back
by the balloon driver seconds later) costs about ten times more than reusing
pages just freed, and keeping old caches makes each run dearer than the last.
On ext4 without a journal, deleting costs something else: a new file skips
every inode freed in the last 30 s (``recently_deleted``), so each file both
caches create walks over the inodes of the cache just deleted; ``--free
truncate`` empties the old caches' files instead (the pages are freed all
the same) and deletes them at the end.

The table is printed and saved as bench/results-coldfill.json and .md
(with ``--primed``, results-coldfill-primed.*).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from bench.harness import (
    Emulator,
    Nginx,
    Nwbcache,
    allocated_bytes,
    git_commit,
    machine,
    process_tree,
)
from nwbcache_proxy.sizes import format_size, parse_size
from tests.support.helpers import REPO

BENCH = Path(__file__).resolve().parent
SYSTEMS = ("origin", "nginx", "nwbcache")
CACHING = ("nginx", "nwbcache")
BASELINE = "baseline"  # nwbcache at --baseline REV
LABELS = {
    "origin": "origin (direct, no cache)",
    "nginx": "nginx slice cache",
    "nwbcache": "nwbcache",
}
OBJECT = "coldfill.bin"
# With --slow-readers: a second object, warmed in each cache before its fill,
# that slow clients read while the fill is timed (a cold fill beside a warm
# load: the daemon's buffers are then shared with reads held by slow clients).
WARM_OBJECT = "warm.bin"
WARM_SIZE = 64 * 1024 * 1024
# Each slow client asks random ranges of this many bytes and takes SLOW_READ
# bytes every SLOW_PAUSE s (~1 MB/s).
SLOW_RANGE = 8 * 1024 * 1024
SLOW_READ = 16 * 1024
SLOW_PAUSE = 0.015
GIB = 1024**3
TICK = os.sysconf("SC_CLK_TCK")
# Targets of issue 11 for the write path.
TARGET_SPEED_RATIO = 1.0  # nwbcache MB/s / nginx MB/s, same run, at least
TARGET_CPU_PER_GIB = 3.0  # daemon CPU s per GiB filled, at most
# The emulator counts as idle (the fill done) after this many quiet seconds.
QUIET = 0.2


class Server(Protocol):
    def url_for(self, upstream_url: str) -> str: ...
    def pids(self) -> list[int]: ...
    def stop(self) -> None: ...


# --------------------------------------------------------------------------- measuring


def cpu_times(pids: Sequence[int]) -> tuple[float, float]:
    """utime, stime in seconds, summed over processes (each one's threads included)."""
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
    return user / TICK, system / TICK


def _read_slowly(url: str, stop: threading.Event) -> None:
    """Random SLOW_RANGE ranges of the warm object, SLOW_READ bytes every
    SLOW_PAUSE s, one connection each, until ``stop``."""
    parts = urlsplit(url)
    rng = random.Random()
    while not stop.is_set():
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
        try:
            lo = rng.randrange(0, WARM_SIZE - SLOW_RANGE)
            conn.request("GET", parts.path, headers={"Range": f"bytes={lo}-{lo + SLOW_RANGE - 1}"})
            resp = conn.getresponse()
            while not stop.is_set() and resp.read(SLOW_READ):
                time.sleep(SLOW_PAUSE)
        finally:
            conn.close()


def _write_random(path: Path, size: int) -> str:
    """``size`` random bytes into ``path``; their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            digest.update(chunk)
            fh.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def read_ranges(url: str, buf: memoryview, range_size: int, streams: int) -> None:
    """GET the object at url into buf, ``range_size`` bytes per request, ranges
    handed out in order to ``streams`` threads, each on its own keep-alive
    connection. Raises on any status but 206, a wrong Content-Range or a short body."""
    size = len(buf)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    ranges = iter([(lo, min(lo + range_size, size)) for lo in range(0, size, range_size)])
    lock = threading.Lock()

    def stream() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            while True:
                with lock:
                    span = next(ranges, None)
                if span is None:
                    return
                lo, hi = span
                conn.request("GET", path, headers={"Range": f"bytes={lo}-{hi - 1}"})
                resp = conn.getresponse()
                want = f"bytes {lo}-{hi - 1}/{size}"
                if resp.status != 206 or resp.getheader("Content-Range") != want:
                    body = resp.read(300)
                    raise RuntimeError(
                        f"{url} {want}: {resp.status} {resp.getheader('Content-Range')} {body!r}"
                    )
                view = buf[lo:hi]
                got = 0
                while got < hi - lo:
                    n = resp.readinto(view[got:])
                    if not n:
                        raise RuntimeError(f"{url} {want}: body ended after {got} bytes")
                    got += n
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        for future in [pool.submit(stream) for _ in range(streams)]:
            future.result()


def zero(buf: memoryview) -> None:
    chunk = bytes(1 << 20)
    for lo in range(0, len(buf), len(chunk)):
        n = min(len(chunk), len(buf) - lo)
        buf[lo : lo + n] = chunk[:n]


@dataclass
class Run:
    system: str
    streams: int
    run: int  # -1: the warm-up round
    order: int  # position in its round
    seconds: float
    mb_per_s: float
    server_cpu_s: float | None
    server_user_s: float | None
    server_sys_s: float | None
    server_cpu_s_per_gib: float | None
    origin_cpu_s_per_gib: float
    client_cpu_s_per_gib: float
    upstream_bytes: int
    upstream_requests: int
    cached_bytes: int | None
    sha256: str
    sha_ok: bool


class ColdFill:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.size: int = args.size_bytes
        self.caches = work / "caches"
        self.logs = work / "logs"
        self.caches.mkdir(parents=True)
        self.logs.mkdir()
        self.origin_dir = work / "origin"
        self.origin_dir.mkdir()
        self.want = ""
        self.emu: Emulator | None = None
        self.buf = memoryview(bytearray(self.size))
        self.runs: list[Run] = []
        self.problems: list[str] = []
        self._serial = 0
        self.baseline_source: Path | None = None

    # -- set-up --------------------------------------------------------------
    def check_out_baseline(self, rev: str) -> str:
        """A worktree of ``rev`` in the scratch dir, for the baseline daemon; its
        short commit hash."""
        source = self.work / "baseline-src"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(source), rev],
            check=True,
        )
        self.baseline_source = source
        done = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    def drop_baseline(self) -> None:
        if self.baseline_source is not None:
            source = str(self.baseline_source)
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", source])

    def write_objects(self) -> None:
        """The random object, written once, and its sha256; the second one too
        when the servers are primed."""
        self.want = _write_random(self.origin_dir / OBJECT, self.size)
        if self.args.prime:
            _write_random(self.origin_dir / WARM_OBJECT, WARM_SIZE)

    def start_origin(self) -> None:
        # bandwidth=1e12: unthrottled (the emulator's cap never holds a chunk back).
        self.emu = Emulator(
            self.origin_dir, latency=0.0, bandwidth=1e12, log_path=self.logs / "s3emu.log"
        ).start()

    @property
    def emulator(self) -> Emulator:
        assert self.emu is not None
        return self.emu

    @contextlib.contextmanager
    def server(self, system: str) -> Iterator[tuple[Server | None, Path | None]]:
        if system == "origin":
            yield None, None
            return
        self._serial += 1
        name = f"{system}-{self._serial}"
        cache = self.caches / name
        srv: Nginx | Nwbcache
        if system == "nginx":
            prefix = self.logs / name
            prefix.mkdir()
            srv = Nginx(
                prefix,
                cache,
                self.emulator.host,
                slice_size=self.args.block_size.lower(),
                workers=self.args.workers,
            )
        else:
            source = self.baseline_source if system == BASELINE else None
            srv = Nwbcache(
                cache,
                self.emulator.host,
                log_path=self.logs / f"{name}.log",
                block_size=self.args.block_size,
                workers=self.args.workers,
                env=None if source is None else {"PYTHONPATH": f"{source}/proxy:{source}/client"},
            )
        try:
            srv.start()
            yield srv, cache
        finally:
            srv.stop()

    def drop_old_caches(self, keep: Path | None, *, how: str = "delete") -> None:
        """Free the page cache of earlier runs' caches: delete them, or with
        ``how="truncate"`` empty their files and keep the inodes until the end."""
        for old in self.caches.iterdir():
            if old == keep:
                continue
            if how == "delete":
                shutil.rmtree(old, ignore_errors=True)
                continue
            for dirpath, _dirs, files in os.walk(old):
                for name in files:
                    with contextlib.suppress(OSError):
                        os.truncate(os.path.join(dirpath, name), 0)

    def prime(self, srv: Server | None, streams: int) -> None:
        """With --primed or --slow-readers: the second object read whole through
        ``srv`` before the timed fill, untimed, as the timed one is (a cold fill
        too). A server that has filled before, the way a running one has: its
        buffers made, its memory faulted in."""
        if srv is None or not self.args.prime:
            return
        url = srv.url_for(self.emulator.url_for(WARM_OBJECT))
        read_ranges(url, memoryview(bytearray(WARM_SIZE)), self.args.range_bytes, streams)

    @contextlib.contextmanager
    def slow_readers(self, srv: Server | None) -> Iterator[None]:
        """--slow-readers clients of the warm object through ``srv`` (primed
        first), reading until the block ends."""
        if srv is None or not self.args.slow_readers:
            yield
            return
        url = srv.url_for(self.emulator.url_for(WARM_OBJECT))
        stop = threading.Event()
        threads = [
            threading.Thread(target=_read_slowly, args=(url, stop), daemon=True)
            for _ in range(self.args.slow_readers)
        ]
        for t in threads:
            t.start()
        time.sleep(1.0)  # all of them under way
        try:
            yield
        finally:
            stop.set()
            for t in threads:
                t.join(10)

    # -- one run ---------------------------------------------------------------
    def measure(self, system: str, streams: int, run: int, order: int) -> Run:
        os.sync()
        time.sleep(self.args.settle)
        direct = self.emulator.url_for(OBJECT)
        with self.server(system) as (srv, cache):
            url = direct if srv is None else srv.url_for(direct)
            pids = [] if srv is None else srv.pids()
            emu_pids = self.emulator_pids()
            zero(self.buf)
            self.prime(srv, streams)
            with self.slow_readers(srv):
                before = self.emulator.wait_idle(QUIET)
                if srv is not None:
                    # Just before the read: pages just freed are cheap to write into again.
                    self.drop_old_caches(cache, how=self.args.free)
                spy = self.profiler(pids, system, streams, run)
                s0 = cpu_times(pids)
                o0 = sum(cpu_times(emu_pids))
                c0 = time.process_time()
                t0 = time.perf_counter()
                read_ranges(url, self.buf, self.args.range_bytes, streams)
                seconds = time.perf_counter() - t0
                c1 = time.process_time()
            after = self.emulator.wait_idle(QUIET)
            s1 = cpu_times(pids)
            o1 = sum(cpu_times(emu_pids))
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
        cached = None if cache is None else allocated_bytes(cache)
        got = hashlib.sha256(self.buf).hexdigest()
        gib = self.size / GIB
        user, sys_ = (s1[0] - s0[0], s1[1] - s0[1]) if srv is not None else (None, None)
        cpu = None if user is None or sys_ is None else user + sys_
        result = Run(
            system=system,
            streams=streams,
            run=run,
            order=order,
            seconds=seconds,
            mb_per_s=self.size / seconds / 1e6,
            server_cpu_s=cpu,
            server_user_s=user,
            server_sys_s=sys_,
            server_cpu_s_per_gib=None if cpu is None else cpu / gib,
            origin_cpu_s_per_gib=(o1 - o0) / gib,
            client_cpu_s_per_gib=(c1 - c0) / gib,
            upstream_bytes=after["bytes"] - before["bytes"],
            upstream_requests=after["requests"] - before["requests"],
            cached_bytes=cached,
            sha256=got,
            sha_ok=got == self.want,
        )
        if not result.sha_ok:
            self.problems.append(f"{system} x{streams} run {run}: sha256 {got} != {self.want}")
        cpu_text = "" if cpu is None else f", server CPU {cpu:.2f} s ({cpu / gib:.2f} s/GiB)"
        print(
            f"  {'warm-up' if run < 0 else f'run {run + 1}':<7} x{streams} {system:<8} "
            f"{result.mb_per_s:7.0f} MB/s{cpu_text}, origin {result.origin_cpu_s_per_gib:.2f} "
            f"s/GiB, up {result.upstream_bytes / 1e6:.0f} MB, "
            f"sha256 {'ok' if result.sha_ok else 'MISMATCH'}",
            flush=True,
        )
        return result

    def emulator_pids(self) -> list[int]:
        proc = self.emulator.proc
        return [] if proc is None else process_tree(proc.pid)

    def profiler(
        self, pids: list[int], system: str, streams: int, run: int
    ) -> subprocess.Popen[bytes] | None:
        if not self.args.profile or system != "nwbcache" or not pids or run < 0:
            return None
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = Path(self.args.profile) / f"nwbcache-x{streams}-run{run + 1}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [
                *(spy, "record", "--pid", str(pids[0]), "--subprocesses", "--rate", "250"),
                *("--format", "raw", "--threads", "-o", str(out)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        return proc

    def attempt(self, system: str, streams: int, run: int, order: int) -> None:
        try:
            result = self.measure(system, streams, run, order)
        except Exception as exc:  # a failed run is reported, the others still run
            traceback.print_exc()
            self.problems.append(f"{system} x{streams} run {run}: {type(exc).__name__}: {exc}")
            return
        if run >= 0:
            self.runs.append(result)

    def all_runs(self) -> None:
        streams_list: list[int] = self.args.streams_list
        caching = [*CACHING, BASELINE] if self.baseline_source else list(CACHING)
        if self.args.warmup:
            print("warm-up (not counted):", flush=True)
            for order, system in enumerate(caching):
                self.attempt(system, max(streams_list), -1, order)
        turns = orderings(caching)
        for run in range(self.args.runs):
            print(f"run {run + 1} of {self.args.runs}:", flush=True)
            for streams in streams_list:
                # Every ordering of the caches in turn (see the docstring); the
                # origin alone goes first, as it writes no cache.
                ordering = turns[run % len(turns)]
                for order, system in enumerate(["origin", *ordering]):
                    self.attempt(system, streams, run, order)
        self.drop_old_caches(None)


def orderings(systems: Sequence[str]) -> list[tuple[str, ...]]:
    """The orders the systems take run by run: their rotations, then those of
    the reverse order. Over any len(systems) runs in a row from the first
    each goes first once; over all of them (every ordering of three) each
    comes right after each other as often as any other pair does."""
    n = len(systems)
    turns = [tuple(systems[i:]) + tuple(systems[:i]) for i in range(n)]
    back = list(reversed(systems))
    return turns + [tuple(back[i:]) + tuple(back[:i]) for i in range(n)]


# --------------------------------------------------------------------------- report


def _median(values: Sequence[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(
    runs: list[Run], streams_list: Sequence[int], systems: Sequence[str] = SYSTEMS
) -> dict[str, dict[str, Any]]:
    """Medians per (streams, system), keyed "<streams>" -> system -> figures."""
    out: dict[str, dict[str, Any]] = {}
    for streams in streams_list:
        row: dict[str, Any] = {}
        for system in systems:
            mine = [r for r in runs if r.system == system and r.streams == streams]
            row[system] = {
                "runs": len(mine),
                "sha_ok": sum(r.sha_ok for r in mine),
                "mb_per_s": _median([r.mb_per_s for r in mine]),
                "server_cpu_s_per_gib": _median([r.server_cpu_s_per_gib for r in mine]),
                "server_user_s": _median([r.server_user_s for r in mine]),
                "server_sys_s": _median([r.server_sys_s for r in mine]),
                "origin_cpu_s_per_gib": _median([r.origin_cpu_s_per_gib for r in mine]),
                "client_cpu_s_per_gib": _median([r.client_cpu_s_per_gib for r in mine]),
                "upstream_bytes": _median([r.upstream_bytes for r in mine]),
                "cached_bytes": _median([r.cached_bytes for r in mine]),
            }
        paired = _pairs(runs, streams, "nwbcache", "nginx")
        row["nwbcache_faster_runs"] = sum(a.mb_per_s >= b.mb_per_s for a, b in paired)
        row["paired_runs"] = len(paired)
        row["ratio_mb_per_s"] = _ratio(row["nwbcache"]["mb_per_s"], row["nginx"]["mb_per_s"])
        row["ratio_cpu_per_gib"] = _ratio(
            row["nwbcache"]["server_cpu_s_per_gib"], row["nginx"]["server_cpu_s_per_gib"]
        )
        if BASELINE in systems:
            row["vs_baseline"] = _paired(runs, streams, "nwbcache", BASELINE)
        out[str(streams)] = row
    return out


def _pairs(runs: list[Run], streams: int, system: str, other: str) -> list[tuple[Run, Run]]:
    """(``system``'s run, ``other``'s run) of each run both measured."""
    mine = {r.run: r for r in runs if r.system == system and r.streams == streams}
    theirs = {r.run: r for r in runs if r.system == other and r.streams == streams}
    return [(mine[k], theirs[k]) for k in sorted(set(mine) & set(theirs))]


def _paired(runs: list[Run], streams: int, system: str, other: str) -> dict[str, Any]:
    """``system`` over ``other``, run by run (each run is one sitting): medians
    of the ratios of MB/s and of server CPU per GiB."""
    pairs = _pairs(runs, streams, system, other)
    return {
        "pairs": len(pairs),
        "mb_per_s": _median([_ratio(a.mb_per_s, b.mb_per_s) for a, b in pairs]),
        "cpu_per_gib": _median(
            [_ratio(a.server_cpu_s_per_gib, b.server_cpu_s_per_gib) for a, b in pairs]
        ),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, at_most: bool) -> None:
        met = None if value is None else (value <= limit if at_most else value >= limit)
        found.append(
            {"target": name, "value": value, "limit": limit, "at_most": at_most, "met": met}
        )

    for streams, row in summary.items():
        add(
            f"{streams} stream(s): nwbcache MB/s / nginx MB/s",
            row["ratio_mb_per_s"],
            TARGET_SPEED_RATIO,
            at_most=False,
        )
        add(
            f"{streams} stream(s): nwbcache daemon CPU s/GiB",
            row["nwbcache"]["server_cpu_s_per_gib"],
            TARGET_CPU_PER_GIB,
            at_most=True,
        )
    return found


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| streams | system | MB/s | × nginx | server CPU s/GiB (user + sys s per run) | × nginx "
        "| origin CPU s/GiB | upstream MB | cached MB | sha256 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for streams, row in report["summary"].items():
        nginx = row["nginx"]
        for system in (s for s in (*SYSTEMS, BASELINE) if s in row):
            f = row[system]
            speed = _ratio(f["mb_per_s"], nginx["mb_per_s"]) if system != "nginx" else None
            cpu = (
                _ratio(f["server_cpu_s_per_gib"], nginx["server_cpu_s_per_gib"])
                if system in ("nwbcache", BASELINE)
                else None
            )
            split = (
                ""
                if f["server_user_s"] is None
                else f" ({f['server_user_s']:.2f} + {f['server_sys_s']:.2f})"
            )
            cached = None if f["cached_bytes"] is None else f["cached_bytes"] / 1e6
            label = (
                f"nwbcache at {report['settings'].get('baseline')}"
                if system == BASELINE
                else LABELS[system]
            )
            lines.append(
                f"| {streams} | {label} | {_num(f['mb_per_s'], '{:.0f}')} "
                f"| {_num(speed, '{:.2f}')} "
                f"| {_num(f['server_cpu_s_per_gib'], '{:.2f}')}{split} | {_num(cpu, '{:.2f}')} "
                f"| {_num(f['origin_cpu_s_per_gib'], '{:.2f}')} "
                f"| {_num(f['upstream_bytes'] / 1e6 if f['runs'] else None, '{:.0f}')} "
                f"| {_num(cached, '{:.0f}')} | {f['sha_ok']}/{f['runs']} ok |"
            )
    return lines


def baseline_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for streams, row in report["summary"].items():
        if "vs_baseline" in row:
            b = row["vs_baseline"]
            lines.append(
                f"This checkout against nwbcache at {report['settings'].get('baseline')} "
                f"({streams} stream(s), medians of {b['pairs']} per-run ratios): "
                f"MB/s × {_num(b['mb_per_s'], '{:.2f}')}, "
                f"server CPU per GiB × {_num(b['cpu_per_gib'], '{:.2f}')}."
            )
    return lines


def target_lines(report: dict[str, Any]) -> list[str]:
    lines = ["| target | measured | limit | |", "|---|---|---|---|"]
    for t in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(
            f"| {t['target']} | {_num(t['value'], '{:.2f}')} "
            f"| {'≤' if t['at_most'] else '≥'} {t['limit']:g} | {verdict} |"
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    m = report["machine"]
    lines = [
        "# Cold fill: nwbcache against nginx's slice cache",
        "",
        f"`{report['command']}` — {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
        f"nginx {report['versions']['nginx']}, Python {report['versions']['python']}, "
        f"nwbcache at {report['versions']['nwbcache_commit'] or '?'}.",
        "",
        f"One {format_size(s['size'])} random object on an unthrottled local origin "
        f"(the S3 emulator, own process), read whole in {format_size(s['range'])} ranges; "
        f"block and slice size {s['block_size']}, {s['workers']} server worker(s), "
        f"a fresh cache per run (earlier ones {s.get('free', 'delete')}d just before "
        f"each read); medians of {s['runs']} interleaved runs. "
        + (
            f"During each timed fill, {s['slow_readers']} slow clients (~1 MB/s each) read "
            f"random {format_size(SLOW_RANGE)} ranges of a second, warm "
            f"{format_size(WARM_SIZE)} object through the same server. "
            if s.get("slow_readers")
            else ""
        )
        + (
            f"Before it, each server filled a second {format_size(WARM_SIZE)} object the "
            "same way, untimed (--primed: a running server, not a just-started one). "
            if s.get("primed")
            else "Each server just started. "
        )
        + "MB = 10**6 bytes; CPU: utime + stime of the server's processes until the "
        "fill is done, per GiB read.",
        "",
        *table(report),
        "",
        *(
            f"nwbcache at least as fast as nginx in {row['nwbcache_faster_runs']} of "
            f"{row['paired_runs']} paired runs ({streams} stream(s))."
            for streams, row in report["summary"].items()
        ),
        *baseline_lines(report),
        "",
        *target_lines(report),
        "",
    ]
    if report["problems"]:
        lines += ["Problems:", *(f"- {p}" for p in report["problems"]), ""]
    return "\n".join(lines)


def _versions() -> dict[str, str | None]:
    nginx = None
    with contextlib.suppress(OSError, RuntimeError, subprocess.SubprocessError):
        done = subprocess.run([Nginx.binary(), "-v"], capture_output=True, text=True, timeout=10)
        nginx = (done.stdout + done.stderr).strip().split("/", 1)[-1].split()[0]
    return {"nginx": nginx, "python": platform.python_version(), "nwbcache_commit": git_commit()}


# --------------------------------------------------------------------------- main


def _streams(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"stream counts, e.g. 4 or 1,4: {text!r}")
    return values


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.coldfill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--size", type=_size, help="object size (default 256M; --quick 64M)")
    ap.add_argument("--range", type=_size, default="16M", help="bytes per request (16M)")
    ap.add_argument("--streams", type=_streams, default=[4], help="concurrent readers, e.g. 1,4")
    ap.add_argument("--runs", type=int, help="interleaved runs per system (default 6; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="64 MiB, 2 runs")
    ap.add_argument("--block-size", default="256K", help="nwbcache block = nginx slice (256K)")
    ap.add_argument("--workers", type=int, default=1, help="server processes, each (default 1)")
    ap.add_argument(
        "--settle", type=float, default=2.0, help="s after sync before each run (default 2)"
    )
    ap.add_argument(
        "--free",
        choices=("delete", "truncate"),
        default="delete",
        help="how earlier runs' caches are dropped just before each read: deleted "
        "(default), or their files emptied, the inodes kept until the end (on ext4 "
        "without a journal, new files skip inodes freed in the last 30 s)",
    )
    ap.add_argument(
        "--slow-readers",
        type=int,
        default=0,
        help="clients reading a second, warm object at ~1 MB/s each through the same "
        "server while each fill is timed (default 0); the client CPU then includes theirs",
    )
    ap.add_argument(
        "--primed",
        action="store_true",
        help="each server first fills a second object (64 MiB, untimed): a running "
        "server's cold fill, not a just-started one's",
    )
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="no warm-up round")
    ap.add_argument("--work", type=Path, help="scratch dir (default a temp dir in .bench-data)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (logs)")
    ap.add_argument(
        "--out",
        type=Path,
        help="JSON results (default bench/results-coldfill.json; -primed.json with --primed)",
    )
    ap.add_argument("--profile", type=Path, help="py-spy the daemon into DIR (skews its figures)")
    ap.add_argument(
        "--baseline",
        metavar="REV",
        help="also run nwbcache at git revision REV, interleaved, and compare run by run",
    )
    args = ap.parse_args(argv)
    args.size_bytes = args.size or parse_size("64M" if args.quick else "256M")
    # Slow readers read the second object, filled in each server first: those
    # servers are primed too (the output file follows --primed alone).
    args.prime = args.primed or args.slow_readers > 0
    args.range_bytes = args.range
    args.streams_list = args.streams
    # By default each cache goes first, and follows each other, equally often
    # (orderings: 6 runs balance two systems and three).
    args.runs = args.runs if args.runs is not None else (2 if args.quick else 6)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    parse_size(args.block_size)  # the daemon would refuse it later
    out_path: Path = args.out or BENCH / (
        "results-coldfill-primed.json" if args.primed else "results-coldfill.json"
    )

    base = args.work or REPO / ".bench-data"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="coldfill-", dir=base))
    started = time.time()
    bench = ColdFill(args, work)
    try:
        if args.baseline:
            args.baseline_commit = bench.check_out_baseline(args.baseline)
        bench.write_objects()
        bench.start_origin()
        print(
            f"cold fill of {format_size(bench.size)} in {format_size(args.range_bytes)} ranges, "
            f"streams {','.join(map(str, args.streams_list))}, {args.runs} runs; "
            f"scratch {work}",
            flush=True,
        )
        bench.all_runs()
    finally:
        if bench.emu is not None:
            bench.emu.stop()
        bench.drop_baseline()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    systems = (*SYSTEMS, BASELINE) if args.baseline else SYSTEMS
    summary = summarize(bench.runs, args.streams_list, systems)
    for streams, row in summary.items():
        for system in systems:
            if row[system]["runs"] < args.runs:
                bench.problems.append(
                    f"{system} x{streams}: {row[system]['runs']} of {args.runs} runs measured"
                )
    report: dict[str, Any] = {
        "command": " ".join(
            ["python", "-m", "bench.coldfill", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "versions": _versions(),
        "settings": {
            "size": bench.size,
            "range": args.range_bytes,
            "streams": args.streams_list,
            "runs": args.runs,
            "block_size": args.block_size,
            "workers": args.workers,
            "settle_s": args.settle,
            "free": args.free,
            "slow_readers": args.slow_readers,
            "primed": args.prime,
            "warmup": args.warmup,
            "profiled": bool(args.profile),
            "baseline": getattr(args, "baseline_commit", None),
        },
        "origin_sha256": bench.want,
        "elapsed_seconds": time.time() - started,
        "summary": summary,
        "runs": [asdict(r) for r in bench.runs],
        "problems": bench.problems,
    }
    report["targets"] = targets(summary)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    out_path.with_suffix(".md").write_text(markdown(report))
    print()
    print("\n".join(table(report)))
    print()
    print("\n".join(target_lines(report)))
    for problem in bench.problems:
        print(f"PROBLEM: {problem}")
    print(f"\nresults: {out_path} ({report['elapsed_seconds']:.0f} s)")
    return 1 if bench.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
