"""How many bytes each write call puts into the page cache, and what that costs.

    make bench-writesize                             # 1 GiB, 4 threads, 3 runs (~2.5 min)
    .venv/bin/python -m bench.writesize --quick      # 256 MiB, 2 runs

A buffered write gets page-cache folios sized to the call (ext4 on Linux 6.x),
so the size of the daemon's write calls decides which free memory its cache
pages come from. A cold fill through the daemon (bench/coldfill.py) spent a
third of the machine's CPU copying into the page cache when it ran right
after nginx's cache had been deleted, and little when it did not. This
measures that without a daemon, an origin or a client: one version's data
file, ``--size`` bytes, written by four threads (the daemon's disk threads)
in interleaved 16 MiB ranges (four streams' reads), 1 MiB at a time (one
disk job per group of four 256 KiB blocks), from buffers already in memory,
in calls of each size (every byte read back and compared afterwards):

- ``1 MiB``: a group in one ``pwritev`` (the daemon's, until issue 11's write calls);
- ``256 KiB``, ``128 KiB``, ``16 KiB``: other cuts, for the curve;
- ``WRITE_PIECE``, call by call: a ``pwritev`` per piece (the daemon's
  until its writes went into one ``io_submit``);
- ``WRITE_PIECE``, ``io_submit``: ``sparse.pwritev_all``, the daemon's code
  (aiowrite.py: a group's pieces in one system call).

Each write comes after one of two states of memory, both freed just before
(``sync``, a pause of ``--settle`` s):

- ``after small files``: a cache of 256 KiB files written in 16 KiB calls
  (nginx's slice cache; its proxy buffers are that size) was deleted;
- ``after the same``: a file written the same way was deleted (a daemon
  whose own evictions free what it writes next).

Figures per call size and state: GB/s of wall time (10**9 bytes) and system
CPU seconds per GiB (this process, all threads, from ``getrusage``); medians
of ``--runs`` runs, the call sizes rotating run by run. Prints a table and
saves bench/results-writesize.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nwbcache_proxy.sizes import parse_size
from nwbcache_proxy.sparse import WRITE_PIECE, pwritev_all

BENCH = Path(__file__).resolve().parent
GROUP = 1024 * 1024  # a disk job's bytes when this was first measured (4 MiB since)
RANGE = 16 * 1024 * 1024  # a client's range
SMALL_FILE = 256 * 1024
SMALL_CALL = 16 * 1024
THREADS = 4
KiB = 1024

Writer = Callable[[int, memoryview, int], None]


def calls_of(size: int) -> Writer:
    def write(fd: int, group: memoryview, offset: int) -> None:
        for at in range(0, len(group), size):
            os.pwritev(fd, [group[at : at + size]], offset + at)

    return write


def daemon_writer(fd: int, group: memoryview, offset: int) -> None:
    pwritev_all(fd, [group[: GROUP // 2], group[GROUP // 2 :]], offset)


WRITERS: dict[str, Writer] = {
    "1 MiB": calls_of(GROUP),
    "256 KiB": calls_of(256 * KiB),
    "128 KiB": calls_of(128 * KiB),
    f"WRITE_PIECE ({WRITE_PIECE // KiB} KiB), call by call": calls_of(WRITE_PIECE),
    f"WRITE_PIECE ({WRITE_PIECE // KiB} KiB), io_submit": daemon_writer,
    "16 KiB": calls_of(16 * KiB),
}
STATES = ("after small files", "after the same")


def write_version(path: Path, size: int, writer: Writer, data: memoryview) -> tuple[float, float]:
    """Write ``size`` bytes into a new file as four streams' disk jobs would:
    (seconds, system CPU seconds)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    errors: list[BaseException] = []

    def stream(k: int) -> None:
        try:
            for first in range(k * RANGE, size, THREADS * RANGE):
                for offset in range(first, min(size, first + RANGE), GROUP):
                    writer(fd, data, offset)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    started = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - started
    system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
    os.close(fd)
    if errors:
        raise errors[0]
    if os.stat(path).st_size != size:
        raise RuntimeError(f"{path} is {os.stat(path).st_size} bytes, not {size}")
    return took, system


def verify_version(path: Path, size: int, data: memoryview) -> str | None:
    """Whether every group of the file is ``data``: what is wrong, or None."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(0, size, GROUP):
            if os.pread(fd, GROUP, offset) != data:
                return f"{path.name}: the group at {offset} is not what was written"
    finally:
        os.close(fd)
    return None


def small_files(root: Path, size: int, data: memoryview) -> None:
    root.mkdir()
    for n in range(size // SMALL_FILE):
        fd = os.open(root / str(n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        for at in range(0, SMALL_FILE, SMALL_CALL):
            os.write(fd, data[at : at + SMALL_CALL])
        os.close(fd)


def free(path: Path, settle: float) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()
    time.sleep(settle)


def run_all(args: argparse.Namespace, work: Path, problems: list[str]) -> list[dict[str, Any]]:
    # Writable, as a fill's buffers are: io_submit takes no read-only buffer.
    data = memoryview(bytearray(os.urandom(GROUP)))
    names = list(WRITERS)
    runs: list[dict[str, Any]] = []
    for run in range(args.runs):
        order = names[run % len(names) :] + names[: run % len(names)]
        for n, state in enumerate(STATES):
            for name in order:
                before = work / f"before-{run}-{n}-{len(runs)}"
                if state == "after small files":
                    small_files(before, args.size, data)
                else:
                    write_version(before, args.size, WRITERS[name], data)
                free(before, args.settle)
                target = work / f"version-{len(runs)}"
                took, system = write_version(target, args.size, WRITERS[name], data)
                wrong = verify_version(target, args.size, data)
                if wrong is not None:
                    problems.append(f"{name} {state}: {wrong}")
                gib = args.size / 2**30
                runs.append(
                    {
                        "run": run,
                        "state": state,
                        "calls": name,
                        "gb_per_s": args.size / took / 1e9,
                        "sys_s_per_gib": system / gib,
                    }
                )
                print(
                    f"  run {run + 1} {state:17} {name:22} {args.size / took / 1e9:5.2f} GB/s, "
                    f"system CPU {system / gib:.2f} s/GiB",
                    flush=True,
                )
                free(target, 0)
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for state in STATES:
        anchor = None
        for name in WRITERS:
            mine = [r for r in runs if r["state"] == state and r["calls"] == name]
            row = {
                "state": state,
                "calls": name,
                "runs": len(mine),
                "gb_per_s": statistics.median(r["gb_per_s"] for r in mine),
                "sys_s_per_gib": statistics.median(r["sys_s_per_gib"] for r in mine),
            }
            anchor = anchor or row
            row["x_1mib_gb_per_s"] = row["gb_per_s"] / anchor["gb_per_s"]
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| memory freed just before | calls of | GB/s | × 1 MiB calls | system CPU s/GiB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['state']} | {r['calls']} | {r['gb_per_s']:.2f} | {r['x_1mib_gb_per_s']:.2f} "
            f"| {r['sys_s_per_gib']:.2f} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=parse_size, help="bytes per version file (default 1G)")
    ap.add_argument("--runs", type=int, help="runs (default 3; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="256 MiB, 2 runs")
    ap.add_argument("--settle", type=float, default=2.0, help="s after sync (default 2)")
    ap.add_argument("--work", type=Path, help="scratch dir (default a temp dir in .bench-data)")
    ap.add_argument("--out", type=Path, help="JSON results (default bench/results-writesize.json)")
    args = ap.parse_args(argv)
    args.size = args.size or (256 * 2**20 if args.quick else 2**30)
    args.runs = args.runs or (2 if args.quick else 3)
    if args.size % RANGE:
        ap.error("--size must be a multiple of 16 MiB")
    base = BENCH.parent / ".bench-data"
    base.mkdir(exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="writesize-", dir=base))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    problems: list[str] = []
    try:
        runs = run_all(args, work, problems)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = summarize(runs)
    command = "python -m bench.writesize" + (" " + " ".join(argv) if argv else "")
    report = {
        "command": command,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Linux {platform.release()}",
        "settings": {"size": args.size, "runs": args.runs, "threads": THREADS, "group": GROUP},
        "elapsed_seconds": round(time.monotonic() - started, 1),
        "summary": rows,
        "problems": problems,
        "runs": runs,
    }
    out = args.out or BENCH / "results-writesize.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    head = [
        "# Write calls into the page cache: their size and their cost",
        "",
        f"`{command}` — {report['machine']}.",
        "",
        f"{args.size // 2**20} MiB written by {THREADS} threads in 1 MiB groups (interleaved "
        f"16 MiB ranges), after the memory named was freed; medians of {args.runs} runs.",
        "",
    ]
    text = "\n".join([*head, *table(rows), ""])
    out.with_suffix(".md").write_text(text)
    print(text)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(f"results: {out} ({report['elapsed_seconds']:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
