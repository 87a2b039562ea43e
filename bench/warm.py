"""Warm-up against cold opens: issue 13's three targets, side by side in one run.

    make bench-warm                                  # 20 quick-scale files, ~10 min
    .venv/bin/python -m bench.warm --scale smoke --files 4 --runs 1

A "dandiset" of ``--files`` NWB files (bench/nwbfiles.py's ecephys, imaging
and icephys, in turn, each name its own object) on an S3-like origin (the
emulator as a process: ``--latency`` 30 ms to first byte, ``--bandwidth``
100 MB/s per response), one daemon per phase with a fresh cache:

1. **cold opens**: each file's PyNWB ``io.read()`` (remfile on its proxied
   URL, bench/clientrun.py's ``read`` workload), a process each, one after
   another: the wall time of the 20, and the origin's bytes per file;
2. **warm-up**: ``nwbcache warm --jobs 4`` of the same files (metadata), on a
   fresh cache: its wall time and the origin's bytes;
3. **after the warm-up**, same daemon: each file's ``io.read()`` in a fresh
   process, the origin's requests counted (target: none), its time against
   the same read once more (fully warm), and ``io.read()`` + 1 s slice for
   the record (the slice is data: fetched then).

Targets: warm-up time <= 0.35x the cold opens'; after it, no origin request
for any ``io.read()`` and its time within 1.2x of fully warm (the median
file's ratio); warm-up bytes <= 1.5x the cold ``io.read()``s' bytes.
Medians over ``--runs`` repetitions of phases 1-3. Prints a table and saves
bench/results-warm.json and .md.
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

from bench.harness import Emulator, Nwbcache, git_commit, machine
from bench.nwbfiles import KINDS, SCALES, BenchFile, ensure_files
from tests.support.helpers import REPO

BENCH = Path(__file__).resolve().parent
TARGETS = {"time_ratio": 0.35, "read_ratio": 1.2, "bytes_ratio": 1.5}


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NWBCACHE_")}


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, files: list[BenchFile]) -> None:
        self.args = args
        self.work = work
        self.root = work / "origin"
        self.root.mkdir(parents=True)
        # name -> its bench file; each name is an object of its own upstream.
        self.names: dict[str, BenchFile] = {}
        for n in range(args.files):
            f = files[n % len(files)]
            name = f"sub-{n:02d}_{f.kind}.nwb"
            os.link(f.path, self.root / name)
            self.names[name] = f
        self.problems: list[str] = []

    @contextlib.contextmanager
    def servers(self) -> Iterator[tuple[Emulator, Nwbcache]]:
        stamp = time.monotonic_ns()
        emu = Emulator(
            self.root,
            latency=self.args.latency,
            bandwidth=self.args.bandwidth,
            log_path=self.work / f"emulator-{stamp}.log",
        ).start()
        daemon = Nwbcache(
            self.work / f"cache-{stamp}", emu.host, log_path=self.work / f"nwbcache-{stamp}.log"
        )
        try:
            daemon.start()
            yield emu, daemon
        finally:
            daemon.stop()
            emu.stop()

    def read(
        self, emu: Emulator, daemon: Nwbcache, name: str, workload: str
    ) -> tuple[float, float]:
        """(seconds of the workload in its process, wall seconds of the process)."""
        f = self.names[name]
        spec = {
            "workload": workload,
            "method": "nwbcache-remfile",
            "url": daemon.url_for(emu.url_for(name)),
            "dataset": f.slice_dataset,
            "rate": f.rate,
        }
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "bench.clientrun", json.dumps(spec)],
            capture_output=True, text=True, cwd=REPO, env=_env(), timeout=900,
        )  # fmt: skip
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            self.problems.append(f"{workload} of {name}: {proc.stderr.strip()[-300:]}")
            return float("nan"), wall
        return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]), wall

    def cold_opens(self) -> dict[str, Any]:
        """Each file's io.read() in a process of its own, one after another: the
        processes' wall times added up (interpreter start and imports
        included, as the warm-up's workers pay them), and the origin's bytes."""
        per_file: dict[str, int] = {}
        wall = inside = 0.0
        with self.servers() as (emu, daemon):
            for name in self.names:
                before = emu.wait_idle()["bytes"]
                seconds, process = self.read(emu, daemon, name, "read")
                wall, inside = wall + process, inside + seconds
                per_file[name] = emu.wait_idle()["bytes"] - before
        return {
            "seconds": wall,
            "read_seconds": inside,  # as one process opening them in turn would
            "upstream_bytes": sum(per_file.values()),
            "per_file": per_file,
        }

    def warm_then_read(self) -> dict[str, Any]:
        with self.servers() as (emu, daemon):
            urls = [emu.url_for(name) for name in self.names]
            before = emu.wait_idle()["bytes"]
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "nwbcache.cli", "warm", *urls, "--jobs",
                 str(self.args.jobs), "--proxy", daemon.url, "--json"],
                capture_output=True, text=True, cwd=REPO, env=_env(), timeout=3600,
            )  # fmt: skip
            seconds = time.perf_counter() - started
            if proc.returncode != 0:
                self.problems.append(f"nwbcache warm: {proc.stderr.strip()[-400:]}")
            job = json.loads(proc.stdout) if proc.stdout.strip() else {"files": []}
            failed = [f["label"] for f in job["files"] if f["state"] != "done"]
            if failed:
                self.problems.append(f"warm-up failed for {failed}")
            fetched = emu.wait_idle()["bytes"] - before
            after: dict[str, dict[str, float]] = {}
            for name in self.names:
                start = emu.wait_idle()
                first = self.read(emu, daemon, name, "read")[0]
                end = emu.wait_idle()
                again = self.read(emu, daemon, name, "read")[0]
                with_slice = self.read(emu, daemon, name, "read+slice")[0]
                after[name] = {
                    "read_seconds": first,
                    "read_warm_seconds": again,
                    "read_ratio": first / again,
                    "read_upstream_requests": end["requests"] - start["requests"],
                    "read_slice_seconds": with_slice,
                }
        files = {
            f["label"].rpartition("/")[2]: {"seconds": f["seconds"], "fetched": f["fetched_bytes"]}
            for f in job["files"]
        }
        return {"seconds": seconds, "upstream_bytes": fetched, "after": after, "files": files}


def summarise(runs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    cold_s = statistics.median(c["seconds"] for c, _ in runs)
    cold_inside = statistics.median(c["read_seconds"] for c, _ in runs)
    warm_s = statistics.median(w["seconds"] for _, w in runs)
    cold_b = statistics.median(c["upstream_bytes"] for c, _ in runs)
    warm_b = statistics.median(w["upstream_bytes"] for _, w in runs)
    ratios = [r["read_ratio"] for _, w in runs for r in w["after"].values()]
    requests = sum(r["read_upstream_requests"] for _, w in runs for r in w["after"].values())
    by_kind: dict[str, dict[str, float]] = {}
    for _, w in runs:
        for name, r in w["after"].items():
            kind = name.split("_", 1)[1].removesuffix(".nwb")
            by_kind.setdefault(kind, {"n": 0, "read": 0.0, "warm": 0.0, "slice": 0.0})
            k = by_kind[kind]
            k["n"] += 1
            k["read"] += r["read_seconds"]
            k["warm"] += r["read_warm_seconds"]
            k["slice"] += r["read_slice_seconds"]
    return {
        "cold_opens_seconds": cold_s,
        "warm_seconds": warm_s,
        "time_ratio": warm_s / cold_s,
        "cold_reads_seconds": cold_inside,
        "time_ratio_one_process": warm_s / cold_inside,
        "cold_read_bytes": cold_b,
        "warm_bytes": warm_b,
        "bytes_ratio": warm_b / cold_b if cold_b else float("nan"),
        "read_ratio": statistics.median(ratios),
        "read_ratio_max": max(ratios),
        "read_upstream_requests": requests,
        "by_kind": {
            kind: {
                "read_seconds": k["read"] / k["n"],
                "read_warm_seconds": k["warm"] / k["n"],
                "read_slice_seconds": k["slice"] / k["n"],
            }
            for kind, k in by_kind.items()
        },
    }


def markdown(report: dict[str, Any]) -> str:
    s, r = report["settings"], report["summary"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = [
        "# Warm-up against cold opens",
        "",
        f"`make bench-warm` at {report['commit']}: {s['files']} {s['scale']}-scale files "
        f"(ecephys, imaging, icephys in turn), origin {s['latency'] * 1000:.0f} ms + "
        f"{s['bandwidth'] / 1e6:.0f} MB/s per response, `nwbcache warm --jobs {s['jobs']}`, "
        f"medians of {s['runs']} runs. {report['machine'].get('cpu', '')}",
        "",
        "| figure | measured | target | |",
        "|---|---:|---:|---|",
        f"| {s['files']} cold PyNWB opens, one after another, a process each | "
        f"{r['cold_opens_seconds']:.1f} s | | |",
        f"| the same io.read()s alone (as one process would, imports once) | "
        f"{r['cold_reads_seconds']:.1f} s | | |",
        f"| metadata warm-up of the same files | {r['warm_seconds']:.1f} s | | |",
        f"| warm-up time / cold opens' time | {r['time_ratio']:.2f} | <= "
        f"{TARGETS['time_ratio']} | {verdict(r['time_ratio'] <= TARGETS['time_ratio'])} |",
        f"| warm-up time / the io.read()s' time alone | {r['time_ratio_one_process']:.2f} | "
        f"<= {TARGETS['time_ratio']} | "
        f"{verdict(r['time_ratio_one_process'] <= TARGETS['time_ratio'])} |",
        f"| origin requests of io.read() after the warm-up (all files, all runs) | "
        f"{r['read_upstream_requests']} | 0 | {verdict(r['read_upstream_requests'] == 0)} |",
        f"| io.read() after the warm-up / fully warm, median file (max) | "
        f"{r['read_ratio']:.2f} ({r['read_ratio_max']:.2f}) | <= {TARGETS['read_ratio']} | "
        f"{verdict(r['read_ratio'] <= TARGETS['read_ratio'])} |",
        f"| warm-up origin bytes / cold io.read()s' bytes | {r['warm_bytes'] / 1e6:.1f} MB / "
        f"{r['cold_read_bytes'] / 1e6:.1f} MB = {r['bytes_ratio']:.2f} | <= "
        f"{TARGETS['bytes_ratio']} | {verdict(r['bytes_ratio'] <= TARGETS['bytes_ratio'])} |",
        "",
        "After the warm-up, mean seconds per file (a fresh process each):",
        "",
        "| file | io.read() after warm-up | io.read() fully warm | io.read() + 1 s slice |",
        "|---|---:|---:|---:|",
    ]
    for kind, k in r["by_kind"].items():
        lines.append(
            f"| {kind} | {k['read_seconds']:.3f} | {k['read_warm_seconds']:.3f} | "
            f"{k['read_slice_seconds']:.3f} |"
        )
    if report["problems"]:
        lines += ["", "Problems: " + "; ".join(report["problems"])]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.warm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--scale", choices=sorted(SCALES), default="quick")
    ap.add_argument("--files", type=int, default=20, help="files in the dandiset (20)")
    ap.add_argument("--jobs", type=int, default=4, help="nwbcache warm --jobs (4)")
    ap.add_argument("--runs", type=int, default=3, help="repetitions of the phases (3)")
    ap.add_argument("--latency", type=float, default=0.03, help="origin first byte, s (0.03)")
    ap.add_argument("--bandwidth", type=float, default=100e6, help="origin B/s per response")
    ap.add_argument("--out", type=Path, default=BENCH / "results-warm.json")
    args = ap.parse_args(argv)
    data = REPO / ".bench-data"
    files = ensure_files(data, args.scale, list(KINDS))
    runs = []
    with tempfile.TemporaryDirectory(prefix="warm-", dir=data) as tmp:
        bench = Bench(args, Path(tmp), files)
        for n in range(args.runs):
            sys.stderr.write(f"run {n + 1}/{args.runs}: cold opens\n")
            cold = bench.cold_opens()
            sys.stderr.write(f"run {n + 1}/{args.runs}: warm-up, then reads\n")
            runs.append((cold, bench.warm_then_read()))
    report = {
        "commit": git_commit(),
        "machine": machine(),
        "settings": {
            "scale": args.scale,
            "files": args.files,
            "jobs": args.jobs,
            "runs": args.runs,
            "latency": args.latency,
            "bandwidth": args.bandwidth,
        },
        "runs": [{"cold": c, "warm": w} for c, w in runs],
        "summary": summarise(runs),
        "problems": bench.problems,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
