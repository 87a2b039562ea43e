"""Every S3 client through the daemon: PyNWB read through the S3 endpoint against remfile.

    make bench-s3                                    # quick-scale files (270 MB), ~5 min
    .venv/bin/python -m bench.s3clients --scale smoke --runs 2

For each benchmark file (bench/nwbfiles.py: ecephys, imaging, icephys) on an
S3-like origin (the emulator as a process: ``--latency`` 30 ms to first byte,
``--bandwidth`` 100 MB/s per response) and one daemon with its S3 endpoint
(bucket ``bench`` = the origin's ``/bench``), the suite's ``read+slice``
workload (PyNWB ``io.read()``, then 1 s of the main dataset), each run a
process of its own (bench/clientrun.py), methods alternating:

- ``nwbcache-remfile``: ``remfile.File(proxied URL)``, the anchor;
- ``s3fs-transparent``: ``s3fs.S3FileSystem(anon=True)`` under ``NWBCACHE_URL``
  (transparent mode: routed to the endpoint, 4 MiB blocks in an LRU);
- ``s3fs-defaults``: ``s3fs.S3FileSystem(anon=True, endpoint_url=<S3 endpoint>)``
  without transparent mode: s3fs's own defaults (50 MiB read-ahead);
- ``nwbcache-fsspec``: fsspec's HTTP filesystem on the proxied URL;
- ``ros3-hdf5-2``: h5py on HDF5 2.x (.venv-hdf5-2), ``s3://bench/<file>`` with
  ``AWS_ENDPOINT_URL_S3`` (the endpoint) and path-style;
- ``ros3-hdf5-1.10``: Debian's h5py (HDF5 1.10, .venv-hdf5-1.10) on the proxied URL.

Cold: each method on a fresh cache (a daemon of its own), ``--runs`` times;
seconds and the origin's bytes. Warm: one daemon, filled by a first pass,
then every method ``--runs`` times. Medians, and ratios to remfile on the
same file. The issue's target: s3fs (transparent) warm at most 1.2x remfile warm. Every
run's digest of the slice must agree.

Prints a table and saves bench/results-s3clients.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.harness import OBJECT_PREFIX, Emulator, Nwbcache, git_commit, machine
from bench.nwbfiles import KINDS, SCALES, BenchFile, ensure_files
from tests.support.helpers import REPO

BENCH = Path(__file__).resolve().parent
BUCKET = OBJECT_PREFIX.strip("/")
ANCHOR = "nwbcache-remfile"
METHODS = (
    ANCHOR,
    "s3fs-transparent",
    "s3fs-defaults",
    "nwbcache-fsspec",
    "ros3-hdf5-2",
    "ros3-hdf5-1.10",
)
PYTHONS = {
    "ros3-hdf5-2": REPO / ".venv-hdf5-2" / "bin" / "python",
    "ros3-hdf5-1.10": REPO / ".venv-hdf5-1.10" / "bin" / "python",
}


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, files: list[BenchFile]) -> None:
        self.args = args
        self.work = work
        self.files = files
        self.problems: list[str] = []
        self.digests: dict[str, set[str]] = {}
        self.setup: dict[str, list[float]] = {}  # per process, before the clock
        self.not_applicable: set[tuple[str, str]] = set()
        self.root = work / "origin"
        self.root.mkdir(parents=True)
        for f in files:  # the emulator serves <root>/<name> as /bench/<name>
            os.link(f.path, self.root / f.path.name)

    @contextlib.contextmanager
    def servers(self) -> Iterator[tuple[Emulator, Nwbcache]]:
        emu = Emulator(
            self.root,
            latency=self.args.latency,
            bandwidth=self.args.bandwidth,
            log_path=self.work / f"emulator-{time.monotonic_ns()}.log",
        )
        emu.start()
        cache = self.work / f"cache-{time.monotonic_ns()}"
        daemon = Nwbcache(
            cache,
            emu.host,
            log_path=self.work / f"nwbcache-{time.monotonic_ns()}.log",
            extra=[
                "--s3-listen",
                "127.0.0.1:0",
                "--s3-bucket",
                f"{BUCKET}=http://{emu.host}{OBJECT_PREFIX}",
            ],
        )
        try:
            daemon.start()
            yield emu, daemon
        finally:
            daemon.stop()
            emu.stop()

    def run(self, method: str, f: BenchFile, emu: Emulator, daemon: Nwbcache) -> float:
        proxied = daemon.url_for(emu.url_for(f.path.name))
        s3_url = daemon.daemon.s3_url
        spec: dict[str, Any] = {
            "workload": "read+slice",
            "dataset": f.slice_dataset,
            "rate": f.rate,
            "method": method if method in ("nwbcache-remfile", "nwbcache-fsspec") else "",
            "url": proxied,
        }
        python = sys.executable
        env = {  # transparent mode only where asked for
            **{k: v for k, v in os.environ.items() if not k.startswith("NWBCACHE_")},
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        if method == "s3fs-transparent":
            spec.update(method="nwbcache-s3fs", url=f"{BUCKET}/{f.path.name}")
            env["NWBCACHE_URL"] = daemon.url
        elif method == "s3fs-defaults":
            spec.update(method="nwbcache-s3fs", url=f"{BUCKET}/{f.path.name}", endpoint=s3_url)
        elif method == "ros3-hdf5-2":
            spec.update(method="nwbcache-ros3", url=f"s3://{BUCKET}/{f.path.name}")
            env.update(
                AWS_ENDPOINT_URL_S3=s3_url,
                AWS_REGION="us-east-2",
                HDF5_ROS3_VFD_FORCE_PATH_STYLE="1",
            )
        elif method == "ros3-hdf5-1.10":
            spec.update(method="nwbcache-ros3")
        if method in PYTHONS:
            python = str(PYTHONS[method])
        proc = subprocess.run(
            [python, "-m", "bench.clientrun", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=600,
        )
        if proc.returncode != 0:
            if method == "ros3-hdf5-1.10" and "No specification for" in proc.stderr:
                # PyNWB 2.x (the last on Debian's h5py) predates this file's schema.
                self.not_applicable.add((method, f.kind))
            else:
                self.problems.append(f"{method} on {f.kind}: {proc.stderr.strip()[-400:]}")
            return float("nan")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        self.digests.setdefault(f.kind, set()).add(result["digest"])
        self.setup.setdefault(method, []).append(float(result["setup_seconds"]))
        return float(result["seconds"])

    def cold(self, f: BenchFile) -> dict[str, dict[str, float]]:
        seconds: dict[str, list[float]] = {m: [] for m in METHODS}
        fetched: dict[str, list[int]] = {m: [] for m in METHODS}
        for _ in range(self.args.runs):
            for method in METHODS:
                with self.servers() as (emu, daemon):
                    seconds[method].append(self.run(method, f, emu, daemon))
                    fetched[method].append(emu.wait_idle()["bytes"])
        return {
            m: {
                "seconds": statistics.median(seconds[m]),
                "upstream_bytes": statistics.median(fetched[m]),
            }
            for m in METHODS
        }

    def warm(self, f: BenchFile) -> dict[str, dict[str, float]]:
        seconds: dict[str, list[float]] = {m: [] for m in METHODS}
        with self.servers() as (emu, daemon):
            for method in METHODS:  # every method's bytes in the cache first
                self.run(method, f, emu, daemon)
            before = emu.wait_idle()["bytes"]
            for _ in range(self.args.runs):
                for method in METHODS:
                    seconds[method].append(self.run(method, f, emu, daemon))
            if emu.wait_idle()["bytes"] != before:
                self.problems.append(f"warm runs on {f.kind} fetched from the origin")
        return {m: {"seconds": statistics.median(seconds[m])} for m in METHODS}


def _ratios(rows: dict[str, dict[str, float]]) -> None:
    anchor = rows[ANCHOR]["seconds"]
    for row in rows.values():
        row["ratio"] = row["seconds"] / anchor


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Every S3 client through the daemon",
        "",
        f"`make bench-s3` at {report['commit']}: {s['scale']} files, origin "
        f"{s['latency'] * 1000:.0f} ms + {s['bandwidth'] / 1e6:.0f} MB/s per response, "
        f"PyNWB `io.read()` + 1 s slice, median of {s['runs']} runs, ratio to remfile.",
        "",
    ]
    for phase in ("warm", "cold"):
        lines += [f"## {phase.capitalize()}", ""]
        head = "| file | " + " | ".join(METHODS) + " |"
        lines += [head, "|---|" + "---:|" * len(METHODS)]
        for kind, rows in report[phase].items():
            cells = [
                f"{rows[m]['seconds']:.3f} s ({rows[m]['ratio']:.2f}x)"
                if rows[m]["seconds"] == rows[m]["seconds"]  # not NaN
                else "n/a"
                for m in METHODS
            ]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        if phase == "cold":
            lines += ["", "Origin bytes (MB), cold:", ""]
            lines += [head, "|---|" + "---:|" * len(METHODS)]
            for kind, rows in report[phase].items():
                cells = [f"{rows[m]['upstream_bytes'] / 1e6:.1f}" for m in METHODS]
                lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    setup = report["setup_seconds"]
    lines += [
        "Once per process, before the clock (the client and its libraries' set-up): "
        + ", ".join(f"{m} {setup[m]:.3f} s" for m in METHODS if m in setup)
        + ".",
        "",
    ]
    for method, kind in report["not_applicable"]:
        lines.append(
            f"n/a: {method} on {kind}: PyNWB 2.x, the last that runs on Debian's h5py, "
            "predates the file's NWB schema."
        )
    if report["problems"]:
        lines += ["", "Problems: " + "; ".join(report["problems"]), ""]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.s3clients",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--scale", choices=sorted(SCALES), default="quick")
    ap.add_argument("--runs", type=int, default=3, help="runs per method and phase (default 3)")
    ap.add_argument("--latency", type=float, default=0.03, help="origin first byte, s (0.03)")
    ap.add_argument("--bandwidth", type=float, default=100e6, help="origin B/s per response")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--out", type=Path, default=BENCH / "results-s3clients.json")
    args = ap.parse_args(argv)
    missing = [str(p) for p in PYTHONS.values() if not p.exists()]
    if missing:
        sys.exit(f"bench.s3clients: {', '.join(missing)} missing: run make test-deps")
    data = REPO / ".bench-data"
    files = ensure_files(data, args.scale, args.kinds)
    report: dict[str, Any] = {"warm": {}, "cold": {}}
    with tempfile.TemporaryDirectory(prefix="s3clients-", dir=data) as tmp:
        bench = Bench(args, Path(tmp), files)
        for f in files:
            sys.stderr.write(f"{f.kind}: warm\n")
            report["warm"][f.kind] = bench.warm(f)
            sys.stderr.write(f"{f.kind}: cold\n")
            report["cold"][f.kind] = bench.cold(f)
            for phase in ("warm", "cold"):
                _ratios(report[phase][f.kind])
    for kind, digests in bench.digests.items():
        if len(digests) != 1:
            bench.problems.append(f"{kind}: the methods read different bytes ({sorted(digests)})")
    report.update(
        commit=git_commit(),
        machine=machine(),
        settings={
            "scale": args.scale,
            "runs": args.runs,
            "latency": args.latency,
            "bandwidth": args.bandwidth,
        },
        problems=bench.problems,
        setup_seconds={m: statistics.median(v) for m, v in bench.setup.items()},
        not_applicable=sorted(bench.not_applicable),
    )
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
