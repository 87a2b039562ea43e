"""Issue 11's check through HTTP alone: fill a cache through the daemon, kill -9 it mid-fill,
restart, finish, read everything back byte-exact.

    make bench-httpfill                                   # 1M blocks of 4 KiB in 64 objects
    .venv/bin/python -m bench.httpfill --blocks 100k --objects 16
    .venv/bin/python -m bench.httpfill --cache-size 2G    # eviction during the fill

Unlike bench/scale.py, which writes its caches with the store's own
functions, this fills only through ``nwbcache serve``'s HTTP interface, as
a harness that knows nothing of the format would. The origin is the S3
emulator (a real HTTP server on 127.0.0.1) holding ``--objects`` objects of
random bytes, ``--blocks`` blocks of ``--block-size`` in all. ``--streams``
readers GET every object through the daemon in ``--range`` ranges; once half
of the objects are read the daemon is killed with SIGKILL and started again
(time to /healthz), the readers finish the rest, and then every object is
read back through the daemon and its SHA-256 compared with the origin
file's. Figures: fill MB/s and blocks/s before and after the kill, the
restart, read-back MB/s, objects read back wrong (must be none), origin
requests during the read-back (none when the cache holds it all), the index's
total against ``--cache-size`` at the end, and the daemon's peak RSS.
Saved as bench/results-httpfill.json and .md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.harness import Emulator, git_commit, machine
from bench.scale import count_label, parse_count, proc_status
from nwbcache_proxy import schema
from nwbcache_proxy.layout import Layout
from nwbcache_proxy.sizes import format_size, parse_size
from tests.support.daemons import DaemonProcess
from tests.support.helpers import REPO

BENCH = Path(__file__).resolve().parent
MB = 1e6
# Between the objects counted as read before the kill and the kill itself:
# a daemon sends a run's bytes as they come and writes them to disk after
# its last byte (a group is a whole 4 MiB run, filling.py), so an object
# read a moment before a kill -9 may not be cached, and the read-back would
# fetch it again. The other readers go on meanwhile: the kill is mid-fill.
PUBLISH_SETTLE = 0.25


@dataclasses.dataclass(frozen=True)
class Settings:
    blocks: int
    block_size: int
    objects: int
    streams: int
    range_size: int
    cache_size: int

    @property
    def object_size(self) -> int:
        return self.blocks // self.objects * self.block_size

    @property
    def data_bytes(self) -> int:
        return self.object_size * self.objects


def make_origin(root: Path, s: Settings) -> dict[str, str]:
    """The objects, random bytes; name -> SHA-256. Files already there of the
    right size are kept (a second run need not write gigabytes again)."""
    root.mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    for n in range(s.objects):
        path = root / f"obj-{n:04d}"
        if not path.exists() or path.stat().st_size != s.object_size:
            with path.open("wb") as f:
                left = s.object_size
                while left:
                    chunk = os.urandom(min(left, 16 << 20))
                    f.write(chunk)
                    left -= len(chunk)
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
        digests[path.name] = h.hexdigest()
    return digests


class Fill:
    def __init__(self, s: Settings, work: Path, emulator: Emulator) -> None:
        self.s = s
        self.work = work
        self.emulator = emulator
        self.cache = work / "cache"
        self._logs = 0
        self.daemon: DaemonProcess | None = None

    def start(self) -> float:
        """A daemon on the cache; seconds from spawn to /healthz."""
        self._logs += 1
        host = urllib.parse.urlsplit(self.emulator.url).netloc
        args = [
            "--cache-dir",
            str(self.cache),
            "--cache-size",
            str(self.s.cache_size),
            "--block-size",
            str(self.s.block_size),
            "--allow-upstream",
            host,
            "--log-level",
            "info",
        ]
        started = time.perf_counter()
        self.daemon = DaemonProcess(args, stderr_path=self.work / f"daemon-{self._logs}.log")
        self.daemon.start(timeout=300)
        return time.perf_counter() - started

    def read(self, name: str) -> str:
        """GET a whole object through the daemon in ranges; its SHA-256."""
        assert self.daemon is not None
        u = urllib.parse.urlsplit(self.daemon.url)
        path = "/" + self.emulator.url_for(name).replace("://", "/", 1)
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=300)
        h = hashlib.sha256()
        try:
            for start in range(0, self.s.object_size, self.s.range_size):
                last = min(start + self.s.range_size, self.s.object_size) - 1
                conn.request("GET", path, headers={"Range": f"bytes={start}-{last}"})
                r = conn.getresponse()
                body = r.read()
                if r.status != 206 or len(body) != last + 1 - start:
                    raise RuntimeError(f"{name} at {start}: {r.status}, {len(body)} bytes")
                h.update(body)
        finally:
            conn.close()
        return h.hexdigest()

    def peak_rss_mb(self) -> float | None:
        assert self.daemon is not None and self.daemon.proc is not None
        peak = proc_status(self.daemon.proc.pid, "VmHWM")  # bytes
        return None if peak is None else peak / MB


def read_all(
    names: list[str], read: Callable[[str], str], streams: int, stop_after: int | None = None
) -> dict[str, str]:
    """Read objects with ``streams`` readers; with ``stop_after``, return once
    that many are done (the others' readers then fail: the daemon is killed)."""
    done: dict[str, str] = {}
    lock = threading.Lock()
    enough = threading.Event()

    def one(name: str) -> None:
        if enough.is_set():
            return
        digest = read(name)
        with lock:
            done[name] = digest
            if stop_after is not None and len(done) >= stop_after:
                enough.set()

    pool = concurrent.futures.ThreadPoolExecutor(streams)
    futures = [pool.submit(one, n) for n in names]
    if stop_after is None:
        for f in futures:
            f.result()
        pool.shutdown()
        return done
    while not enough.wait(0.5):  # a reader that failed before the kill fails the run
        for f in futures:
            if f.done() and f.exception() is not None:
                pool.shutdown(wait=False, cancel_futures=True)
                raise RuntimeError(f"a reader failed before the kill: {f.exception()!r}")
    with lock:
        first = dict(done)
    pool.shutdown(wait=False, cancel_futures=True)
    return first


def index_bytes(cache: Path) -> int:
    conn = sqlite3.connect(Layout(cache).index_path)
    try:
        return int(conn.execute(schema.TOTALS).fetchone()[0])
    finally:
        conn.close()


def run(s: Settings, work: Path) -> dict[str, Any]:
    digests = make_origin(work / "origin", s)
    names = sorted(digests)
    emulator = Emulator(
        work / "origin", latency=0.0, bandwidth=1e12, log_path=work / "s3emu.log"
    ).start()
    fill = Fill(s, work, emulator)
    out: dict[str, Any] = {"commit": git_commit(), "problems": []}
    try:
        out["start_s"] = fill.start()
        started = time.perf_counter()
        half = read_all(names, fill.read, s.streams, stop_after=len(names) // 2)
        seconds = time.perf_counter() - started
        out["first_mb_per_s"] = len(half) * s.object_size / seconds / MB
        out["first_blocks_per_s"] = len(half) * s.object_size / s.block_size / seconds
        out["first_peak_rss_mb"] = fill.peak_rss_mb()
        assert fill.daemon is not None
        time.sleep(PUBLISH_SETTLE)
        fill.daemon.kill9()
        out["killed_after_objects"] = len(half)
        emulator.wait_idle()
        out["restart_s"] = fill.start()
        rest = [n for n in names if n not in half]
        started = time.perf_counter()
        read_all(rest, fill.read, s.streams)
        seconds = time.perf_counter() - started
        out["second_mb_per_s"] = len(rest) * s.object_size / seconds / MB
        out["second_blocks_per_s"] = len(rest) * s.object_size / s.block_size / seconds
        before = emulator.wait_idle()
        started = time.perf_counter()
        got = read_all(names, fill.read, s.streams)
        seconds = time.perf_counter() - started
        after = emulator.wait_idle()
        out["readback_mb_per_s"] = s.data_bytes / seconds / MB
        out["readback_origin_requests"] = after["requests"] - before["requests"]
        out["wrong_objects"] = [n for n in names if got.get(n) != digests[n]]
        out["peak_rss_mb"] = fill.peak_rss_mb()
        assert fill.daemon is not None
        if fill.daemon.terminate() != 0:
            out["problems"].append("the daemon did not exit 0")
        out["index_bytes_at_end"] = index_bytes(fill.cache)
    finally:
        proc = fill.daemon.proc if fill.daemon is not None else None
        if proc is not None and proc.poll() is None and fill.daemon is not None:
            fill.daemon.kill9()
        emulator.stop()
    if out["wrong_objects"]:
        out["problems"].append(f"objects read back wrong: {out['wrong_objects']}")
    if out["index_bytes_at_end"] > s.cache_size:
        out["problems"].append("the index totals more than --cache-size at the end")
    return out


def markdown(report: dict[str, Any]) -> str:
    s, r = report["settings"], report["result"]
    rows = [
        (
            "fill before the kill, MB/s (blocks/s)",
            f"{r['first_mb_per_s']:.1f} ({r['first_blocks_per_s']:,.0f})",
        ),
        (
            "fill after the restart, MB/s (blocks/s)",
            f"{r['second_mb_per_s']:.1f} ({r['second_blocks_per_s']:,.0f})",
        ),
        ("killed -9 after, objects", f"{r['killed_after_objects']} of {s['objects']}"),
        ("start-up after the kill, s", f"{r['restart_s']:.2f}"),
        ("read-back of everything, MB/s", f"{r['readback_mb_per_s']:.1f}"),
        ("objects read back wrong", str(len(r["wrong_objects"]))),
        ("origin requests during the read-back", str(r["readback_origin_requests"])),
        (
            "index total at the end / --cache-size",
            f"{format_size(r['index_bytes_at_end'])} / {format_size(s['cache_size'])}",
        ),
        ("daemon peak RSS, MB", f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "?"),
    ]
    lines = [
        "# A fill through HTTP, kill -9, read-back",
        "",
        f"`{report['command']}` at {r['commit']}: {count_label(s['blocks'])} blocks of "
        f"{format_size(s['block_size'])} in {s['objects']} objects of "
        f"{format_size(s['object_size'])}, {s['streams']} streams of "
        f"{format_size(s['range_size'])} ranges, --cache-size {format_size(s['cache_size'])}.",
        "",
        "| figure | measured |",
        "|---|---:|",
        *(f"| {a} | {b} |" for a, b in rows),
    ]
    if r["problems"]:
        lines += ["", "Problems:", *(f"- {p}" for p in r["problems"])]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.httpfill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--blocks", default="1M", help="blocks in all (default 1M)")
    ap.add_argument("--block-size", default="4K", help="the daemon's --block-size (default 4K)")
    ap.add_argument("--objects", type=int, default=64, help="objects (default 64)")
    ap.add_argument("--streams", type=int, default=4, help="concurrent readers (default 4)")
    ap.add_argument("--range", default="8M", help="bytes per GET (default 8M)")
    ap.add_argument("--cache-size", help="the daemon's --cache-size (default: twice the data)")
    ap.add_argument("--work", type=Path, help="scratch dir (default a temp dir in .bench-data)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    ap.add_argument("--out", type=Path, help="JSON results (default bench/results-httpfill.json)")
    args = ap.parse_args(argv)
    block_size = parse_size(args.block_size)
    blocks = parse_count(args.blocks)
    if args.objects < 2 or blocks // args.objects < 1:
        raise SystemExit("--objects: at least 2, and at most --blocks")
    data = blocks // args.objects * block_size * args.objects
    s = Settings(
        blocks=blocks // args.objects * args.objects,
        block_size=block_size,
        objects=args.objects,
        streams=args.streams,
        range_size=parse_size(args.range),
        cache_size=parse_size(args.cache_size) if args.cache_size else 2 * data,
    )
    base = REPO / ".bench-data"
    base.mkdir(exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="httpfill-", dir=base))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    try:
        result = run(s, work)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    settings = dataclasses.asdict(s) | {"object_size": s.object_size}
    report = {
        "command": " ".join(
            ["python", "-m", "bench.httpfill", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "settings": settings,
        "result": result,
    }
    out: Path = args.out or BENCH / "results-httpfill.json"
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
