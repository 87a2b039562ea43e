"""How far over --cache-size a cache filling many small objects goes, and where it ends.

Clients (``--clients``, 8) read whole objects of 1 to ``--max-blocks`` blocks
(4 KiB by default), each once, through one daemon with a ``--cache-size``
far below the data; the cache dir's disk use (``du``: the blocks, their
versions' files, the index and its WAL) is sampled every ``--interval`` s
during the fill and once more after it. Each run starts a fresh daemon on a
fresh cache, over the same origin; the report gives every run and the
medians. Every body is compared with the origin's bytes.

This is what `footprint.py` and the pressure check (``blocks.Blocks._published``)
answer for: counting the blocks' bytes alone, a version's files beside them
(16 KiB beside 4-32 KiB) went uncounted between flushes, and 8 clients ran
a 50 MB cache to 1.33x.

    python -m bench.overshoot                     # 8,000 objects, 50M, 3 runs
    python -m bench.overshoot --objects 300 --cache-size 2M --runs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import Emulator, Nwbcache, allocated_bytes, git_commit, machine
from nwbcache_proxy.sizes import format_size, parse_size
from tests.support.helpers import REPO

BENCH = REPO / "bench"


@dataclasses.dataclass(frozen=True)
class Settings:
    objects: int
    clients: int
    cache_size: int
    block_size: int
    max_blocks: int
    interval: float
    runs: int


def write_objects(origin: Path, s: Settings) -> dict[str, bytes]:
    """``s.objects`` random objects of 1 to ``s.max_blocks`` blocks."""
    rng = random.Random(1)
    objects = {}
    for i in range(s.objects):
        name = f"o{i:07d}.bin"
        data = os.urandom(s.block_size * rng.randint(1, s.max_blocks))
        (origin / name).write_bytes(data)
        objects[name] = data
    return objects


def one_run(emu: Emulator, objects: dict[str, bytes], s: Settings, work: Path) -> dict[str, Any]:
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    srv = Nwbcache(
        cache,
        emu.host,
        log_path=work / "daemon.log",
        block_size=str(s.block_size),
        extra=["--cache-size", str(s.cache_size)],
    ).start()
    names = iter(sorted(objects))
    lock, done = threading.Lock(), threading.Event()
    wrong: list[str] = []
    samples: list[int] = []

    def client() -> None:
        base = urllib.parse.urlsplit(srv.url_for(emu.url_for("x")))
        conn = http.client.HTTPConnection(base.hostname or "127.0.0.1", base.port, timeout=60)
        prefix = base.path[:-1]
        try:
            while True:
                with lock:
                    name = next(names, None)
                if name is None:
                    return
                conn.request("GET", prefix + name)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 or body != objects[name]:
                    with lock:
                        wrong.append(name)
        finally:
            conn.close()

    def sampler() -> None:
        while not done.is_set():
            samples.append(allocated_bytes(cache, dirs=True))
            done.wait(s.interval)

    watcher = threading.Thread(target=sampler)
    t0 = time.perf_counter()
    watcher.start()
    try:
        threads = [threading.Thread(target=client) for _ in range(s.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        time.sleep(3)  # an upkeep pass or two after the last write
    finally:
        done.set()
        watcher.join()
        final = allocated_bytes(cache, dirs=True)
        srv.stop()
    peak = max(samples, default=0)
    return {
        "seconds": seconds,
        "objects_per_s": len(objects) / seconds,
        "samples": len(samples),
        "samples_over": sum(1 for x in samples if x > s.cache_size),
        "peak_bytes": peak,
        "peak_ratio": peak / s.cache_size,
        "final_bytes": final,
        "final_ratio": final / s.cache_size,
        "wrong_objects": wrong,
    }


def markdown(report: dict[str, Any]) -> str:
    s, runs = report["settings"], report["runs"]
    lines = [
        "# Overshoot: a cache filling small objects against its --cache-size",
        "",
        f"`{report['command']}` at {report['machine'].get('commit', '?')}: "
        f"{s['objects']:,} objects of 1-{s['max_blocks']} blocks of "
        f"{format_size(s['block_size'])}, {s['clients']} clients, --cache-size "
        f"{format_size(s['cache_size'])}; disk use (du) every {s['interval']} s.",
        "",
        "| run | objects/s | peak / limit | samples over | final / limit | wrong |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n, r in enumerate(runs, 1):
        lines.append(
            f"| {n} | {r['objects_per_s']:.0f} | {r['peak_ratio']:.2f} | "
            f"{r['samples_over']} of {r['samples']} | {r['final_ratio']:.2f} | "
            f"{len(r['wrong_objects'])} |"
        )
    m = report["medians"]
    lines += ["", f"Medians: peak {m['peak_ratio']:.2f}x, final {m['final_ratio']:.2f}x.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.overshoot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--objects", type=int, default=8000, help="objects (default 8000)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--cache-size", default="50M", help="the daemon's --cache-size (50M)")
    ap.add_argument("--block-size", default="4K", help="the daemon's --block-size (4K)")
    ap.add_argument("--max-blocks", type=int, default=8, help="blocks of the largest object (8)")
    ap.add_argument("--interval", type=float, default=0.2, help="s between samples (0.2)")
    ap.add_argument("--runs", type=int, default=3, help="runs, each a fresh cache (3)")
    ap.add_argument("--work", type=Path, help="scratch dir (default a temp dir in .bench-data)")
    ap.add_argument("--out", type=Path, help="JSON results (default bench/results-overshoot.json)")
    args = ap.parse_args(argv)
    s = Settings(
        objects=args.objects,
        clients=args.clients,
        cache_size=parse_size(args.cache_size),
        block_size=parse_size(args.block_size),
        max_blocks=args.max_blocks,
        interval=args.interval,
        runs=args.runs,
    )
    if s.objects < 1 or s.runs < 1 or s.max_blocks < 1 or s.clients < 1:
        raise SystemExit("--objects, --runs, --max-blocks and --clients: at least 1")
    base = REPO / ".bench-data"
    base.mkdir(exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="overshoot-", dir=base))
    (work / "origin").mkdir(parents=True, exist_ok=True)
    emu: Emulator | None = None
    try:
        objects = write_objects(work / "origin", s)
        emu = Emulator(work / "origin", latency=0.0, bandwidth=1e12, log_path=work / "s3emu.log")
        emu.start()
        runs = [one_run(emu, objects, s, work) for _ in range(s.runs)]
    finally:
        if emu is not None:
            emu.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = {
        "command": " ".join(
            ["python", "-m", "bench.overshoot", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine() | {"commit": git_commit()},
        "settings": dataclasses.asdict(s),
        "runs": runs,
        "medians": {
            key: statistics.median(r[key] for r in runs)
            for key in ("peak_ratio", "final_ratio", "objects_per_s")
        },
    }
    out: Path = args.out or BENCH / "results-overshoot.json"
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 1 if any(r["wrong_objects"] for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
