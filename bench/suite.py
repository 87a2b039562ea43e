"""nwbcache against the ways a lab reads NWB files from S3 today, side by side.

    make bench          # full: >= 1 GB ecephys file, 3 repetitions (~45 min)
    make bench-quick    # same suite on smaller files, 2 repetitions (~10 min)
    .venv/bin/python -m bench.suite --help      # from the repository root

Everything runs on 127.0.0.1: the S3 emulator (tests/support/s3emu.py) with WAN-like
first-byte latency and a per-connection bandwidth cap plays S3; nginx-light
(proxy_cache + slice 1m + proxy_cache_lock) is the generic range cache;
nwbcache is started from this checkout. Each client run is a fresh process
(``python -m bench.clientrun``). Methods are interleaved within each repetition, so
drift on the machine hits all of them alike; figures are medians.

Sections (``--only``): workloads, concurrent, raw, rss, sweep. The table is
printed and saved as JSON with the machine, versions and settings.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.clientrun import METHODS as ALL_METHODS
from bench.harness import Emulator, Nginx, Nwbcache, machine, peak_rss_during, rss_bytes
from bench.nwbfiles import BenchFile, ensure_files
from bench.wrkrun import run_wrk
from tests.support.helpers import REPO, SHARED_NWB, get_range

BENCH = Path(__file__).resolve().parent
# Real files current PyNWB reads (the MatNWB ones are NWB 2.0b: h5py only).
REAL_READABLE = "pynwb-backcompat-*.nwb"
# Each client run is a fresh interpreter, started in the repository root.
CLIENTRUN = [sys.executable, "-m", "bench.clientrun"]

# Which methods keep a cache, and so are measured cold and then warm.
CACHED = {
    "fsspec-blockcache",
    "remfile-diskcache",
    "nginx-remfile",
    "nwbcache-remfile",
    "nwbcache-fsspec",
}
# A full scan through every per-user cache adds minutes and nothing new:
# the scan compares the shared caches with streaming.
SCAN_METHODS = (
    "local",
    "remfile",
    "fsspec",
    "nginx-remfile",
    "nwbcache-remfile",
    "nwbcache-fsspec",
)
CONCURRENT_METHODS = ("remfile", "fsspec", "nginx-remfile", "nwbcache-remfile", "nwbcache-fsspec")
RAW_LENGTHS = (4096, 64 * 1024, 1024 * 1024, 8 * 1024 * 1024)


@dataclass(frozen=True)
class Scale:
    files: str  # nwbfiles scale
    repeat: int
    wrk_seconds: float
    concurrent: int
    sweep_block_sizes: tuple[str, ...]
    sweep_readaheads: tuple[str, ...]
    kinds: tuple[str, ...] = ("ecephys", "imaging", "icephys")
    workloads: tuple[str, ...] = ("open", "read", "read+slice")
    raw_workers: tuple[int, ...] = (1, 2)
    real_files: bool = True


SCALES = {
    "full": Scale("full", 3, 10, 8, ("64K", "128K", "256K", "1M"), ("4M", "16M", "32M")),
    "quick": Scale("quick", 2, 4, 8, ("64K", "256K", "1M"), ("4M", "16M")),
    # End to end in about a minute, for tests/test_bench_smoke.py: every
    # section and method once, on one tiny file.
    "smoke": Scale(
        "smoke",
        1,
        1,
        2,
        ("256K",),
        ("4M",),
        kinds=("ecephys",),
        workloads=("read+slice",),
        raw_workers=(1,),
        real_files=False,
    ),
}


@dataclass
class Run:
    seconds: float
    upstream_bytes: int
    upstream_requests: int
    digest: str


@dataclass
class Cell:
    """Every run of one (file, workload, method, temperature)."""

    runs: list[Run] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def upstream_bytes(self) -> float:
        return statistics.median(r.upstream_bytes for r in self.runs)

    @property
    def upstream_requests(self) -> float:
        return statistics.median(r.upstream_requests for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "median_seconds": self.seconds,
            "median_upstream_bytes": self.upstream_bytes,
            "median_upstream_requests": self.upstream_requests,
            "runs": [r.__dict__ for r in self.runs],
        }


class Bench:
    def __init__(self, args: argparse.Namespace, scale: Scale, work: Path) -> None:
        self.args = args
        self.scale = scale
        self.work = work
        self.emu: Emulator | None = None
        self.cells: dict[tuple[str, str, str, str], Cell] = {}
        self.problems: list[str] = []
        self._counter = 0

    # -- plumbing ----------------------------------------------------------
    def fresh_dir(self, what: str) -> Path:
        self._counter += 1
        path = self.work / f"{what}-{self._counter}"
        path.mkdir(parents=True)
        return path

    @property
    def emulator(self) -> Emulator:
        assert self.emu is not None
        return self.emu

    @contextlib.contextmanager
    def nwbcache(self, **kwargs: Any) -> Iterator[Nwbcache]:
        d = self.fresh_dir("nwbcache")
        server = Nwbcache(d / "cache", self.emulator.host, log_path=d / "daemon.log", **kwargs)
        server.start()
        try:
            yield server
        finally:
            server.stop()
            if not self.args.keep:
                shutil.rmtree(d, ignore_errors=True)

    @contextlib.contextmanager
    def nginx(self, workers: int = 1) -> Iterator[Nginx]:
        d = self.fresh_dir("nginx")
        server = Nginx(d, d / "cache", self.emulator.host, workers=workers)
        server.start()
        try:
            yield server
        finally:
            server.stop()
            if not self.args.keep:
                shutil.rmtree(d, ignore_errors=True)

    def client(self, spec: dict[str, Any]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*CLIENTRUN, json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "NWBCACHE_URL": "", "HDF5_USE_FILE_LOCKING": "FALSE"},
        )

    def finish(self, proc: subprocess.Popen[str], spec: dict[str, Any]) -> dict[str, Any]:
        out, err = proc.communicate(timeout=self.args.run_timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{spec['method']} {spec['workload']} failed ({proc.returncode}): {err[-2000:]}"
            )
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def measure(self, spec: dict[str, Any]) -> Run:
        before = self.emulator.wait_idle()
        proc = self.client(spec)
        result = self.finish(proc, spec)
        after = self.emulator.wait_idle()
        return Run(
            seconds=result["seconds"],
            upstream_bytes=after["bytes"] - before["bytes"],
            upstream_requests=after["requests"] - before["requests"],
            digest=result["digest"],
        )

    def record(self, key: tuple[str, str, str, str], run: Run) -> None:
        self.cells.setdefault(key, Cell()).runs.append(run)
        sys.stderr.write(
            f"  {key[0]:<22} {key[1]:<10} {key[2]:<18} {key[3]:<5} {run.seconds:8.3f} s "
            f"{run.upstream_bytes / 1e6:9.2f} MB up {run.upstream_requests:5d} req\n"
        )

    # -- workloads ---------------------------------------------------------
    def spec(
        self, f: BenchFile, workload: str, method: str, url: str, **extra: Any
    ) -> dict[str, Any]:
        return {
            "method": method,
            "workload": workload,
            "url": url,
            "path": str(f.path),
            "dataset": f.slice_dataset,
            "rate": f.rate,
            **extra,
        }

    def run_method(self, f: BenchFile, workload: str, method: str) -> None:
        name = f.path.name
        direct = self.emulator.url_for(name)
        key = (name, workload, method)
        if method in ("local", "remfile", "fsspec"):
            url = "" if method == "local" else direct
            self.record((*key, "-"), self.measure(self.spec(f, workload, method, url)))
            return
        if method in ("remfile-diskcache", "fsspec-blockcache"):
            cache_dir = str(self.fresh_dir("client-cache"))
            for temp in ("cold", "warm"):
                spec = self.spec(f, workload, method, direct, cache_dir=cache_dir)
                self.record((*key, temp), self.measure(spec))
            shutil.rmtree(cache_dir, ignore_errors=True)
            return
        server_cm = self.nginx() if method == "nginx-remfile" else self.nwbcache()
        with server_cm as server:
            url = server.url_for(direct)
            for temp in ("cold", "warm"):
                self.record((*key, temp), self.measure(self.spec(f, workload, method, url)))

    def workloads(self, files: list[BenchFile]) -> None:
        plan: list[tuple[BenchFile, str, Sequence[str]]] = []
        for f in files:
            if f.kind == "real":
                plan.append((f, "read", ("local", "remfile", "nwbcache-remfile")))
                continue
            for w in self.scale.workloads:
                if f.kind == "icephys" and w == "read+slice":
                    # One sweep's second after io.read() adds nothing to the
                    # read, which takes seconds (fsspec direct: minutes).
                    continue
                plan.append((f, w, ALL_METHODS))
            if f.kind == "ecephys" and self.scale.files != "smoke":
                plan.append((f, "scan", SCAN_METHODS))
        for rep in range(self.scale.repeat):
            sys.stderr.write(f"workloads: repetition {rep + 1} of {self.scale.repeat}\n")
            for f, workload, methods in plan:
                order = list(methods)
                random.Random(rep).shuffle(order)  # no method always first after a pause
                for method in order:
                    self.run_method(f, workload, method)
        self.check_digests()

    def check_digests(self) -> None:
        """Every method must have read exactly what h5py reads from the local file."""
        by_task: dict[tuple[str, str], set[str]] = {}
        for (name, workload, _m, _t), cell in self.cells.items():
            by_task.setdefault((name, workload), set()).update(r.digest for r in cell.runs)
        for task, digests in by_task.items():
            if len(digests) != 1:
                self.problems.append(f"different bytes read for {task}: {sorted(digests)}")

    # -- eight readers at once ---------------------------------------------
    def concurrent(self, f: BenchFile) -> dict[str, Any]:
        n = self.scale.concurrent
        out: dict[str, Any] = {}
        direct = self.emulator.url_for(f.path.name)
        for method in CONCURRENT_METHODS:
            with contextlib.ExitStack() as stack:
                url = direct
                if method == "nginx-remfile":
                    url = stack.enter_context(self.nginx()).url_for(direct)
                elif method.startswith("nwbcache"):
                    url = stack.enter_context(self.nwbcache()).url_for(direct)
                before = self.emulator.wait_idle()
                start_at = time.time() + 3.0  # every process imported and waiting
                specs = [
                    self.spec(f, "read+slice", method, url, start_at=start_at) for _ in range(n)
                ]
                procs = [self.client(s) for s in specs]
                results = [self.finish(p, s) for p, s in zip(procs, specs, strict=True)]
                after = self.emulator.wait_idle()
            wall = max(r["finished_at"] for r in results) - start_at
            single = self.cells.get(
                (f.path.name, "read+slice", method, "cold" if method in CACHED else "-")
            )
            out[method] = {
                "readers": n,
                "wall_seconds": wall,
                "median_reader_seconds": statistics.median(r["seconds"] for r in results),
                "upstream_bytes": after["bytes"] - before["bytes"],
                "upstream_requests": after["requests"] - before["requests"],
                "single_reader_upstream_bytes": single.upstream_bytes if single else None,
            }
            if len({r["digest"] for r in results}) != 1:
                self.problems.append(f"concurrent {method}: readers got different bytes")
            sys.stderr.write(f"  concurrent {method:<18} {json.dumps(out[method])}\n")
        return out

    # -- raw serving and memory --------------------------------------------
    def verify_ranges(self, url: str, f: BenchFile, count: int = 20) -> None:
        rng = random.Random(7)
        data = f.path.read_bytes() if f.size < 64 * 1024 * 1024 else None
        with f.path.open("rb") as local:
            for _ in range(count):
                length = rng.choice(RAW_LENGTHS)
                start = rng.randrange(0, max(1, f.size - length))
                got = get_range(url, start, start + length - 1, check=False).content
                if data is not None:
                    want = data[start : start + length]
                else:
                    local.seek(start)
                    want = local.read(length)
                if got != want:
                    self.problems.append(f"wrong bytes from {url} at {start}+{length}")
                    return

    def warm_whole(self, url: str) -> float:
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=600) as r:
            while r.read(1 << 20):
                pass
        return time.perf_counter() - started

    def raw(self, f: BenchFile, workers: int) -> dict[str, Any]:
        direct = self.emulator.url_for(f.path.name)
        out: dict[str, Any] = {"workers": workers}
        with self.nginx(workers) as ngx, self.nwbcache(workers=workers) as nwb:
            urls = {"nginx": ngx.url_for(direct), "nwbcache": nwb.url_for(direct)}
            for name, url in urls.items():
                out[f"{name}_fill_seconds"] = self.warm_whole(url)
                self.verify_ranges(url, f)
            for length in (n for n in RAW_LENGTHS if n < f.size):
                row: dict[str, Any] = {}
                for name, url in urls.items():
                    res = run_wrk(url, size=f.size, length=length, seconds=self.scale.wrk_seconds)
                    if res.errors:
                        self.problems.append(f"wrk {name} {length}: {res.errors} errors")
                    row[name] = res.to_json()
                out[str(length)] = row
                sys.stderr.write(f"  raw x{workers} {length:>8}: {json.dumps(row)}\n")
        return out

    def rss(self, f: BenchFile) -> dict[str, Any]:
        """Peak RSS of the daemon (all processes) with 256 concurrent streams,
        warm (8 MiB ranges from cache) and cold (every stream reading through)."""
        direct = self.emulator.url_for(f.path.name)
        out: dict[str, Any] = {}
        for temp in ("cold", "warm"):
            with self.nwbcache() as nwb:
                url = nwb.url_for(direct)
                if temp == "warm":
                    self.warm_whole(url)
                idle = rss_bytes(nwb.pids())
                peak, _ = peak_rss_during(
                    nwb.pids,
                    functools.partial(
                        run_wrk,
                        url,
                        size=f.size,
                        length=min(8 * 1024 * 1024, f.size // 2),
                        seconds=max(3.0, self.scale.wrk_seconds),
                        connections=256,
                        threads=2,
                    ),
                )
                out[temp] = {"idle_rss_bytes": idle, "peak_rss_bytes": peak}
                sys.stderr.write(f"  rss {temp}: {json.dumps(out[temp])}\n")
        return out

    # -- block size and read-ahead -----------------------------------------
    def sweep(self, files: list[BenchFile]) -> dict[str, Any]:
        out: dict[str, Any] = {"block_size": {}, "readahead": {}}
        for f in files:
            direct = self.emulator.url_for(f.path.name)
            for bs in self.scale.sweep_block_sizes:
                for workload in ("open", "read+slice"):
                    with self.nwbcache(block_size=bs) as nwb:
                        url = nwb.url_for(direct)
                        cold = self.measure(self.spec(f, workload, "nwbcache-remfile", url))
                        warm = self.measure(self.spec(f, workload, "nwbcache-remfile", url))
                    entry = {"cold": cold.__dict__, "warm": warm.__dict__}
                    out["block_size"].setdefault(f.path.name, {}).setdefault(workload, {})[bs] = (
                        entry
                    )
                    sys.stderr.write(
                        f"  sweep bs={bs} {f.path.name} {workload}: {json.dumps(entry)}\n"
                    )
            if f.kind == "ecephys":
                for ra in self.scale.sweep_readaheads:
                    with self.nwbcache(readahead=ra) as nwb:
                        url = nwb.url_for(direct)
                        cold = self.measure(self.spec(f, "scan", "nwbcache-remfile", url))
                    out["readahead"][ra] = cold.__dict__
                    sys.stderr.write(f"  sweep readahead={ra} scan: {json.dumps(cold.__dict__)}\n")
        return out


# --------------------------------------------------------------------------- report


def _versions() -> dict[str, str]:
    import aiohttp
    import fsspec
    import h5py
    import hdmf  # type: ignore[import-untyped]
    import pynwb
    import remfile

    import nwbcache

    def tool(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "not found"
        first = (done.stdout + done.stderr).strip().splitlines()[0]
        return first.split("/", 1)[-1].split()[0]  # "nginx version: nginx/1.22.1" -> 1.22.1

    return {
        "nwbcache": nwbcache.__version__,
        "python": platform.python_version(),
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "pynwb": pynwb.__version__,
        "hdmf": hdmf.__version__,
        "remfile": getattr(remfile, "__version__", _dist_version("remfile")),
        "fsspec": fsspec.__version__,
        "aiohttp": aiohttp.__version__,
        "nginx": tool([Nginx.binary(), "-v"]),
        "wrk": tool(["wrk", "-v"]),
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def table(bench: Bench) -> list[str]:
    lines = []
    rows: dict[tuple[str, str], dict[str, Cell]] = {}
    for (name, workload, method, temp), cell in bench.cells.items():
        col = method if temp == "-" else f"{method} {temp}"
        rows.setdefault((name, workload), {})[col] = cell
    for (name, workload), cols in rows.items():
        lines.append(f"\n{name} — {workload}")
        lines.append(f"  {'method':<26} {'median s':>9} {'x local':>8} {'up MB':>9} {'up req':>7}")
        local = cols.get("local")
        for col, cell in cols.items():
            r = _ratio(cell.seconds, local.seconds if local else None)
            lines.append(
                f"  {col:<26} {_fmt_s(cell.seconds):>9} {('-' if r is None else f'{r:.2f}'):>8} "
                f"{cell.upstream_bytes / 1e6:9.2f} {cell.upstream_requests:7.0f}"
            )
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The README's Performance tables, from a saved report (``--markdown FILE``)."""
    out: list[str] = []
    m, v, up = report["machine"], report["versions"], report["upstream"]
    out.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['platform']}. "
        f"Upstream: S3 emulator, {up['latency_s'] * 1000:.0f} ms first-byte latency, "
        f"{up['bandwidth_bytes_per_s'] / 1e6:.0f} MB/s per connection. "
        f"Medians of {report['repeat']} runs (`{report['command']}`, "
        f"{report['elapsed_seconds'] / 60:.0f} min). Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + "."
    )
    cols = [
        ("local", "-"),
        ("remfile", "-"),
        ("fsspec", "-"),
        ("remfile-diskcache", "cold"),
        ("remfile-diskcache", "warm"),
        ("fsspec-blockcache", "cold"),
        ("fsspec-blockcache", "warm"),
        ("nginx-remfile", "cold"),
        ("nginx-remfile", "warm"),
        ("nwbcache-remfile", "cold"),
        ("nwbcache-remfile", "warm"),
        ("nwbcache-fsspec", "cold"),
        ("nwbcache-fsspec", "warm"),
    ]
    cells = report["workloads"]
    tasks = list(dict.fromkeys(tuple(k.split("|")[:2]) for k in cells))
    names = list(dict.fromkeys(n for n, _ in tasks if not n.startswith("pynwb-backcompat")))
    for name in names:
        workloads = [w for n, w in tasks if n == name]
        out.append("")
        out.append(f"| {name}: seconds (upstream MB) | " + " | ".join(workloads) + " |")
        out.append("|---" * (len(workloads) + 1) + "|")
        for meth, t in cols:
            row = []
            for w in workloads:
                c = cells.get(f"{name}|{w}|{meth}|{t}")
                row.append(
                    ""
                    if c is None
                    else f"{_fmt_s(c['median_seconds'])} ({c['median_upstream_bytes'] / 1e6:.1f})"
                )
            if any(row):
                out.append(f"| {meth}{'' if t == '-' else ' ' + t} | " + " | ".join(row) + " |")
    real = [(n, w) for n, w in tasks if n.startswith("pynwb-backcompat")]
    if real:
        out.append("")
        out.append(
            "Real files (`../shared/data/nwb`, PyNWB `io.read()`, seconds): "
            + "; ".join(
                f"{n}: local {_fmt_s(cells[f'{n}|{w}|local|-']['median_seconds'])}, "
                f"remfile {_fmt_s(cells[f'{n}|{w}|remfile|-']['median_seconds'])}, "
                f"nwbcache cold {_fmt_s(cells[f'{n}|{w}|nwbcache-remfile|cold']['median_seconds'])}"
                f" / warm {_fmt_s(cells[f'{n}|{w}|nwbcache-remfile|warm']['median_seconds'])}"
                for n, w in real
            )
        )
    conc = report.get("concurrent")
    if conc:
        out.append("")
        out.append(
            "| concurrent cold readers (read+slice) | wall s | upstream MB | x one reader's bytes |"
        )
        out.append("|---|---|---|---|")
        for meth, r in conc.items():
            single = r.get("single_reader_upstream_bytes")
            ratio = "" if not single else f"{r['upstream_bytes'] / single:.2f}"
            out.append(
                f"| {r['readers']} x {meth} | {r['wall_seconds']:.2f} | "
                f"{r['upstream_bytes'] / 1e6:.1f} | {ratio} |"
            )
    for workers, raw in report.get("raw", {}).items():
        out.append("")
        out.append(
            f"| warm raw serving, wrk 16 connections, {workers} worker(s) each | "
            "nginx req/s | nwbcache req/s | nginx GB/s | nwbcache GB/s | "
            "nginx p50/p99 ms | nwbcache p50/p99 ms |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for length, row in raw.items():
            if not length.isdigit():
                continue
            a, b = row["nginx"], row["nwbcache"]
            out.append(
                f"| {int(length) // 1024} KiB | {a['req_per_s']:.0f} | {b['req_per_s']:.0f} | "
                f"{a['gb_per_s']:.2f} | {b['gb_per_s']:.2f} | "
                f"{a['p50_ms']:.1f}/{a['p99_ms']:.1f} | {b['p50_ms']:.1f}/{b['p99_ms']:.1f} |"
            )
    rss = report.get("rss")
    if rss:
        out.append("")
        out.append(
            "Daemon RSS with 256 concurrent 8 MiB streams: "
            + ", ".join(
                f"{t} {r['idle_rss_bytes'] / 1e6:.0f} MB idle, "
                f"{r['peak_rss_bytes'] / 1e6:.0f} MB peak"
                for t, r in rss.items()
            )
            + "."
        )
    sweep = report.get("sweep")
    if sweep:
        out.append("")
        out.append("| block size sweep (nwbcache-remfile) | cold s | cold upstream MB | warm s |")
        out.append("|---|---|---|---|")
        for name, by_w in sweep["block_size"].items():
            for workload, by_bs in by_w.items():
                for bs, e in by_bs.items():
                    out.append(
                        f"| {name} {workload} {bs} | {e['cold']['seconds']:.3f} | "
                        f"{e['cold']['upstream_bytes'] / 1e6:.2f} | {e['warm']['seconds']:.3f} |"
                    )
        for ra, e in sweep["readahead"].items():
            out.append(
                f"| scan, read-ahead {ra} | {e['seconds']:.2f} | "
                f"{e['upstream_bytes'] / 1e6:.0f} | |"
            )
    out.append("")
    out.append("| target | measured | limit | |")
    out.append("|---|---|---|---|")
    for t in report["targets"]:
        if t["met"] is None:
            continue
        out.append(
            f"| {t['target']} | {t['value']:.2f} | {'<=' if t['at_most'] else '>='} {t['limit']} | "
            f"{'met' if t['met'] else 'missed'} |"
        )
    return "\n".join(out) + "\n"


def targets(bench: Bench, main: BenchFile | None, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured ratio and whether it is met."""
    found: list[dict[str, Any]] = []

    def cell(workload: str, method: str, temp: str = "-") -> Cell | None:
        return bench.cells.get((main.path.name, workload, method, temp)) if main else None

    def add(name: str, value: float | None, limit: float, at_most: bool = True) -> None:
        met = None if value is None else (value <= limit if at_most else value >= limit)
        found.append(
            {"target": name, "value": value, "limit": limit, "at_most": at_most, "met": met}
        )

    def secs(c: Cell | None) -> float | None:
        return c.seconds if c else None

    nwb_warm = cell("read+slice", "nwbcache-remfile", "warm")
    add(
        "warm read+slice: nwbcache / nginx (remfile)",
        _ratio(secs(nwb_warm), secs(cell("read+slice", "nginx-remfile", "warm"))),
        1.25,
    )
    add(
        "warm read+slice: nwbcache / local file",
        _ratio(secs(nwb_warm), secs(cell("read+slice", "local"))),
        1.5,
    )
    add(
        "warm read+slice: speedup over remfile direct",
        _ratio(secs(cell("read+slice", "remfile")), secs(nwb_warm)),
        1.0,
        at_most=False,
    )
    for workload in ("open", "read", "read+slice", "scan"):
        nwb_cold = cell(workload, "nwbcache-remfile", "cold")
        rem = cell(workload, "remfile")
        add(
            f"cold {workload}: nwbcache / remfile direct (time)",
            _ratio(secs(nwb_cold), secs(rem)),
            1.0,
        )
        add(
            f"cold {workload}: nwbcache / remfile direct (upstream bytes)",
            _ratio(
                nwb_cold.upstream_bytes if nwb_cold else None, rem.upstream_bytes if rem else None
            ),
            2.0,
        )
        add(
            f"cold {workload}: fsspec direct / nwbcache (speedup)",
            _ratio(secs(cell(workload, "fsspec")), secs(nwb_cold)),
            3.0,
            at_most=False,
        )
    conc = results.get("concurrent", {}).get("nwbcache-remfile")
    if conc and conc.get("single_reader_upstream_bytes"):
        add(
            f"{conc['readers']} concurrent cold readers: upstream bytes / one reader's",
            conc["upstream_bytes"] / conc["single_reader_upstream_bytes"],
            1.05,
        )
    raw = results.get("raw", {}).get("1", {})
    for length, metric, limit in (
        ("4096", "req_per_s", 0.5),
        ("1048576", "gb_per_s", 0.9),
        ("8388608", "gb_per_s", 0.9),
    ):
        row = raw.get(length)
        if row:
            add(
                f"warm raw {int(length) // 1024} KiB ranges: nwbcache / nginx {metric}",
                _ratio(row["nwbcache"][metric], row["nginx"][metric]),
                limit,
                at_most=False,
            )
    rss = results.get("rss")
    if rss:
        add("daemon peak RSS with 256 streams, MB (cold)", rss["cold"]["peak_rss_bytes"] / 1e6, 200)
        add("daemon peak RSS with 256 streams, MB (warm)", rss["warm"]["peak_rss_bytes"] / 1e6, 200)
    return found


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--repeat", type=int, help="repetitions (default: by scale)")
    ap.add_argument(
        "--latency", type=float, default=0.03, help="upstream first-byte latency, s (default 0.03)"
    )
    ap.add_argument(
        "--bandwidth",
        type=float,
        default=80e6,
        help="upstream bytes/s per connection (default 80e6)",
    )
    ap.add_argument("--only", nargs="+", choices=["workloads", "concurrent", "raw", "rss", "sweep"])
    ap.add_argument("--data-dir", type=Path, default=REPO / ".bench-data")
    ap.add_argument("--out", type=Path, help="JSON results (default bench/results-<scale>.json)")
    ap.add_argument("--run-timeout", type=float, default=900, help="seconds per client run")
    ap.add_argument("--keep", action="store_true", help="keep caches and server logs")
    ap.add_argument("--markdown", type=Path, help="print the tables of a saved report and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())), end="")
        return 0
    scale = SCALES[args.scale]
    if args.repeat:
        scale = Scale(**{**scale.__dict__, "repeat": args.repeat})
    sections = set(args.only or ["workloads", "concurrent", "raw", "rss", "sweep"])
    out_path = args.out or BENCH / f"results-{args.scale}.json"

    files = ensure_files(args.data_dir, scale.files, scale.kinds)
    main_file = next(f for f in files if f.kind == "ecephys")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="nwbcache-bench-") as tmp:
        work = Path(tmp)
        root = work / "origin"
        root.mkdir()
        for f in files:
            (root / f.path.name).symlink_to(f.path)
        real: list[BenchFile] = []
        if scale.real_files and SHARED_NWB.is_dir():
            for p in sorted(SHARED_NWB.glob(REAL_READABLE)):
                (root / p.name).symlink_to(p)
                real.append(BenchFile("real", p, p.stat().st_size, "", 0.0))
        bench = Bench(args, scale, work)
        bench.emu = Emulator(
            root, latency=args.latency, bandwidth=args.bandwidth, log_path=work / "s3emu.log"
        ).start()
        results: dict[str, Any] = {}
        try:
            if "workloads" in sections:
                bench.workloads(files + real)
            if "concurrent" in sections:
                results["concurrent"] = bench.concurrent(main_file)
            if "raw" in sections:
                results["raw"] = {str(w): bench.raw(main_file, w) for w in scale.raw_workers}
            if "rss" in sections:
                results["rss"] = bench.rss(main_file)
            if "sweep" in sections:
                results["sweep"] = bench.sweep(
                    [main_file, *(f for f in files if f.kind == "icephys")]
                )
        finally:
            bench.emulator.stop()

    report = {
        "command": " ".join(
            [Path(sys.executable).name, "-m", "bench.suite", *(argv or sys.argv[1:])]
        ),
        "scale": args.scale,
        "repeat": scale.repeat,
        "upstream": {"latency_s": args.latency, "bandwidth_bytes_per_s": args.bandwidth},
        "machine": machine(),
        "versions": _versions(),
        "files": [{"name": f.path.name, "kind": f.kind, "bytes": f.size} for f in files + real],
        "elapsed_seconds": time.time() - started,
        "workloads": {"|".join(k): c.to_json() for k, c in bench.cells.items()},
        **results,
        "targets": targets(bench, main_file, results),
        "problems": bench.problems,
    }
    out_path.write_text(json.dumps(report, indent=2))
    out_path.with_suffix(".md").write_text(markdown(report))
    print("\n".join(table(bench)))
    print("\ntargets:")
    for t in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(
            f"  {verdict:<6} {t['target']}: {value} ({'<=' if t['at_most'] else '>='} {t['limit']})"
        )
    for problem in bench.problems:
        print(f"PROBLEM: {problem}")
    print(f"\nresults: {out_path} ({report['elapsed_seconds']:.0f} s)")
    return 1 if bench.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
