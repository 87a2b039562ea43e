"""What a daemon of N workers keeps in memory under load, by ``--buffer-memory``.

    make bench-buffermemory                       # 8 workers: 1280M (the old 160M each), auto, 256M
    .venv/bin/python -m bench.buffermemory --workers 4 --buffer-memory auto,64M

One random object (``--size``, 256 MiB) on the S3 emulator (a real HTTP
server on 127.0.0.1, unthrottled). For each ``--buffer-memory`` value, twice
(``cold``: a fresh cache, every stream reading through; ``warm``: the object
read whole first), a daemon of ``--workers`` processes is started and wrk
reads random 8 MiB ranges of the object over 256 connections for
``--seconds``. Figures, RSS summed over the daemon's processes: at rest
before the load, the peak during it (harness.peak_rss_during), and what is kept
2 s after it ended: a pool keeps its buffers, and what the C library does
not hand back stays too (runner.return_freed_buffers). Saved as
bench/results-buffermemory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import Emulator, Nwbcache, git_commit, machine, peak_rss_during, rss_bytes
from bench.wrkrun import run_wrk
from nwbcache_proxy.sizes import parse_size

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OBJECT = "object.bin"
RANGE = 8 * 1024 * 1024
CONNECTIONS = 256
SETTLE = 2.0  # s after the load before "kept" is read


def _settings(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    for v in values:
        if v != "auto":
            parse_size(v)  # a bad value fails here, not in the daemon
    if not values:
        raise argparse.ArgumentTypeError("at least one --buffer-memory value")
    return values


def measure(
    emu: Emulator, work: Path, setting: str, temp: str, args: argparse.Namespace
) -> dict[str, Any]:
    cache = work / f"cache-{setting}-{temp}"
    srv = Nwbcache(
        cache,
        emu.host,
        log_path=work / "daemon.log",
        workers=args.workers,
        extra=["--buffer-memory", setting],
    ).start()
    try:
        url = srv.url_for(emu.url_for(OBJECT))
        if temp == "warm":
            with urllib.request.urlopen(url, timeout=300) as r:
                while r.read(1 << 20):
                    pass
        time.sleep(1.0)  # every worker up and idle
        rest = rss_bytes(srv.pids())
        peak, load = peak_rss_during(
            srv.pids,
            lambda: run_wrk(
                url,
                size=args.size,
                length=min(RANGE, args.size),
                seconds=args.seconds,
                connections=CONNECTIONS,
                threads=2,
            ),
        )
        peak = max(rest, peak)
        time.sleep(SETTLE)
        kept = rss_bytes(srv.pids())
    finally:
        srv.stop()
        shutil.rmtree(cache, ignore_errors=True)
    row = {
        "buffer_memory": setting,
        "temp": temp,
        "rest_bytes": rest,
        "peak_bytes": peak,
        "kept_bytes": kept,
        "requests_per_s": load.req_per_s,
        "errors": load.errors,
    }
    print(json.dumps(row), flush=True)
    return row


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Buffer memory: what a daemon keeps under load",
        "",
        f"`{report['command']}` — {report['machine']['cpu']}, {report['machine']['cores']} "
        f"cores; nwbcache at {report['commit'] or '?'}.",
        "",
        f"{s['workers']} workers; one {s['size'] // 2**20} MiB object, random 8 MiB ranges over "
        f"{CONNECTIONS} connections for {s['seconds']:.0f} s (wrk). RSS summed over the "
        f"daemon's processes, MB = 10**6 bytes: at rest, the peak, and what it keeps "
        f"{SETTLE:.0f} s after the load.",
        "",
        "| --buffer-memory | reads | at rest MB | peak MB | kept MB "
        "| kept - at rest, per worker MB | requests/s | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        per_worker = (r["kept_bytes"] - r["rest_bytes"]) / s["workers"] / 1e6
        lines.append(
            f"| {r['buffer_memory']} | {r['temp']} | {r['rest_bytes'] / 1e6:.0f} "
            f"| {r['peak_bytes'] / 1e6:.0f} | {r['kept_bytes'] / 1e6:.0f} | {per_worker:.0f} "
            f"| {r['requests_per_s']:.1f} | {r['errors']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.buffermemory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--workers", type=int, default=8, help="daemon processes (default 8)")
    ap.add_argument(
        "--buffer-memory",
        type=_settings,
        default="1280M,auto,256M",
        help="values to compare, comma-separated (default 1280M,auto,256M)",
    )
    ap.add_argument("--size", type=parse_size, default="256M", help="object size (256M)")
    ap.add_argument("--seconds", type=float, default=6.0, help="load per run (6 s)")
    ap.add_argument("--out", type=Path, default=BENCH / "results-buffermemory.json")
    args = ap.parse_args(argv)
    base = REPO / ".bench-data"
    base.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="buffermemory-", dir=base))
    rows = []
    try:
        (work / "origin").mkdir()
        with (work / "origin" / OBJECT).open("wb") as fh:
            for _ in range(args.size >> 20):
                fh.write(os.urandom(1 << 20))
            fh.write(os.urandom(args.size % (1 << 20)))
        emu = Emulator(
            work / "origin", latency=0.0, bandwidth=1e12, log_path=work / "s3emu.log"
        ).start()
        try:
            for setting in args.buffer_memory:
                for temp in ("cold", "warm"):
                    rows.append(measure(emu, work, setting, temp, args))
        finally:
            emu.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "command": " ".join(
            ["python", "-m", "bench.buffermemory", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "commit": git_commit(),
        "settings": {"workers": args.workers, "size": args.size, "seconds": args.seconds},
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
