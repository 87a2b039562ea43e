"""Sharing a cache: workers and daemons on one dir, a child and its parents, side by side.

    make bench-sharing                           # 256 MiB + 64 small objects, wrk (~3 min)
    .venv/bin/python -m bench.sharing --quick    # 64 MiB, shorter wrk runs

Three sections, one run, every server a process of its own:

- ``stampede``: the S3 emulator as a process, S3-like (``--latency`` 30 ms to
  first byte, ``--bandwidth`` 100 MB/s per response), holding one object of
  ``--size`` and 64 small ones (64 KiB to 2 MiB: ``--small-max``). ``nwbcache serve --workers
  2`` and a second daemon share one cache dir; 32 readers of the big object
  (4 MiB ranges, starting at staggered offsets and wrapping around) and 8
  readers of all 64 small objects (shuffled), spread over both daemons,
  start together. Figures: bytes fetched from the origin over the objects'
  bytes (the issue's target: at most 1.05), the waits that sharing made
  (``nwbcache_awaited_fetches_total``), wall time. Every body is compared
  with the origin's sha256.
- ``parents``: one reader scans the big object in 4 MiB ranges through a
  child daemon with two parents (``--parent``), every cache cold, then
  through a second child whose parents are warm; for each ``--groups`` size
  (``--parent-group``). Figures: seconds against a daemon reading the origin
  itself, origin bytes over the object's (each byte once: 1.0, plus a block
  per parent for its discovery), how the parents split the object.
- ``warm``: random 4 KiB ranges of the warm big object, wrk with 16
  keep-alive connections for ``--seconds``: nginx (``slice`` +
  ``proxy_cache``, bench/harness.py) and nwbcache, both with one worker and
  both with ``auto`` (one per CPU: nginx's ``worker_processes auto``,
  nwbcache's ``--workers auto``); requests/s and the ratio to nginx. The
  systems alternate, ``--runs`` times each; medians.

Prints a table and saves bench/results-sharing.json and .md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import requests

from bench.harness import Emulator, Nginx, Nwbcache, git_commit, machine
from bench.wrkrun import run_wrk
from nwbcache.urls import cache_key, parse_upstream_url
from nwbcache_proxy.cpus import usable_cpus
from nwbcache_proxy.parents import rank
from nwbcache_proxy.sizes import format_size, parse_size
from tests.support.helpers import REPO, scrape, value

BENCH = Path(__file__).resolve().parent
MiB = 1024 * 1024
BIG_READERS = 32
SMALL_READERS = 8
SMALL_OBJECTS = 64
RANGE = 4 * MiB
WARM_LENGTH = 4096
KINDS = ("block", "discovery")  # of nwbcache_awaited_fetches_total
# Other names of the big object (hard links), for the parents section: which
# parent holds a group hangs on a hash of the parents' random ports, and at a
# small --size (8 groups) one name in 128 puts every group on one parent.
ALIASES = 16


def _write_object(path: Path, size: int, seed: int) -> str:
    """A random object of ``size`` bytes; its sha256."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left:
            chunk = rng.randbytes(min(left, MiB))
            fh.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _shared_name(emu: Emulator, parents: list[str], size: int, group: int) -> str:
    """The first name of the big object whose groups are on both parents (the
    child's own rendezvous ranking), so the section measures two parents sharing
    an object; at any real --size that is "big" itself."""
    groups = range(-(-size // group))
    urls = [p.rstrip("/") for p in parents]  # as the child's Parents keeps them
    for name in ["big"] + [f"big-{n}" for n in range(1, ALIASES)]:
        key = cache_key(parse_upstream_url(emu.url_for(name)))
        if len({rank(urls, key, g)[0] for g in groups}) == len(parents):
            return name
    raise RuntimeError(f"no name of the big object puts groups on all of {parents}")


def _awaited(url: str) -> dict[str, float]:
    """A daemon's nwbcache_awaited_fetches_total, by kind."""
    samples = scrape(url)
    return {kind: value(samples, "nwbcache_awaited_fetches_total", kind=kind) for kind in KINDS}


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.root = work / "origin"  # served at OBJECT_PREFIX/<file name>
        self.root.mkdir(parents=True)
        self.problems: list[str] = []
        self.objects: dict[str, tuple[int, str]] = {}  # name -> (size, sha256)

    def make_objects(self) -> None:
        folder = self.root
        size = self.args.size_bytes
        self.objects["big"] = (size, _write_object(folder / "big", size, 1))
        for n in range(1, ALIASES):
            os.link(folder / "big", folder / f"big-{n}")
        rng = random.Random(2)
        for i in range(SMALL_OBJECTS):
            n = rng.randrange(self.args.small_max // 32, self.args.small_max)
            self.objects[f"small-{i:02d}"] = (
                n,
                _write_object(folder / f"small-{i:02d}", n, 10 + i),
            )

    @contextlib.contextmanager
    def emulator(self, *, latency: float, bandwidth: float | None) -> Iterator[Emulator]:
        emu = Emulator(
            self.root,
            latency=latency,
            bandwidth=bandwidth or 100e9,
            log_path=self.work / f"emulator-{time.monotonic_ns()}.log",
        )
        emu.start()
        try:
            yield emu
        finally:
            emu.stop()

    @contextlib.contextmanager
    def nwbcache(self, emu: Emulator, cache: Path, workers: str, *extra: str) -> Iterator[Nwbcache]:
        server = Nwbcache(
            cache,
            emu.host,
            log_path=self.work / f"nwbcache-{time.monotonic_ns()}.log",
            workers=workers,
            extra=extra,
        )
        server.start()
        try:
            yield server
        finally:
            server.stop()

    # -- stampede ---------------------------------------------------------------
    def stampede(self) -> dict[str, Any]:
        cache = self.work / "stampede-cache"
        with (
            self.emulator(latency=self.args.latency, bandwidth=self.args.bandwidth) as emu,
            self.nwbcache(emu, cache, "2") as workers,
            self.nwbcache(emu, cache, "1") as other,
        ):
            servers = [workers, other]
            start = threading.Barrier(BIG_READERS + SMALL_READERS)
            began = time.perf_counter()
            jobs = [
                lambda n=n: self._big_reader(servers[n % 2], emu, n, start)
                for n in range(BIG_READERS)
            ]
            jobs += [
                lambda n=n: self._small_reader(servers[n % 2], emu, n, start)
                for n in range(SMALL_READERS)
            ]
            with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
                for future in [pool.submit(job) for job in jobs]:
                    future.result()
            wall = time.perf_counter() - began
            fetched = emu.wait_idle()["bytes"]
            waits = [_awaited(s.url) for s in servers]
        total = sum(size for size, _ in self.objects.values())
        out = {
            "object_bytes": total,
            "upstream_bytes": fetched,
            "ratio": fetched / total,
            "wall_seconds": wall,
            "awaited_blocks": sum(w["block"] for w in waits),
            "awaited_discoveries": sum(w["discovery"] for w in waits),
            "client_bytes": BIG_READERS * self.objects["big"][0]
            + SMALL_READERS * (total - self.objects["big"][0]),
        }
        sys.stderr.write(f"  stampede: {json.dumps(out)}\n")
        return out

    def _big_reader(
        self, server: Nwbcache, emu: Emulator, n: int, start: threading.Barrier
    ) -> None:
        size, want = self.objects["big"]
        url = server.url_for(emu.url_for("big"))
        count = -(-size // RANGE)
        order = [(n * 3 + i) % count for i in range(count)]
        pieces: dict[int, bytes] = {}
        start.wait()
        with requests.Session() as session:
            for k in order:
                last = min(size, (k + 1) * RANGE) - 1
                r = session.get(url, headers={"Range": f"bytes={k * RANGE}-{last}"}, timeout=600)
                if r.status_code != 206:
                    self.problems.append(f"big reader {n}: {r.status_code}")
                    return
                pieces[k] = r.content
        digest = hashlib.sha256()
        for k in range(count):
            digest.update(pieces[k])
        if digest.hexdigest() != want:
            self.problems.append(f"big reader {n}: sha256 differs")

    def _small_reader(
        self, server: Nwbcache, emu: Emulator, n: int, start: threading.Barrier
    ) -> None:
        names = sorted(k for k in self.objects if k != "big")
        random.Random(n).shuffle(names)
        start.wait()
        with requests.Session() as session:
            for name in names:
                r = session.get(server.url_for(emu.url_for(name)), timeout=600)
                if (
                    r.status_code != 200
                    or hashlib.sha256(r.content).hexdigest() != self.objects[name][1]
                ):
                    self.problems.append(f"small reader {n}: {name} differs ({r.status_code})")

    # -- parents ------------------------------------------------------------------
    def parents(self) -> dict[str, Any]:
        """A child reading the big object through two parents, for each group size;
        a daemon reading it from the origin directly as the anchor."""
        size, want = self.objects["big"]
        out: dict[str, Any] = {}
        with self.emulator(latency=self.args.latency, bandwidth=self.args.bandwidth) as emu:
            direct_cache = self.work / "direct-cache"
            with self.nwbcache(emu, direct_cache, "1") as direct:
                before = emu.wait_idle()["bytes"]
                out["direct_seconds"] = self._scan(direct, emu, want, "big")
                out["direct_upstream_bytes"] = emu.wait_idle()["bytes"] - before
            for group in self.args.groups:
                tag = format_size(group)
                with contextlib.ExitStack() as stack:
                    parents = [
                        stack.enter_context(
                            self.nwbcache(emu, self.work / f"parent-{tag}-{i}", "1")
                        )
                        for i in range(2)
                    ]
                    flags = [a for p in parents for a in ("--parent", p.url)]
                    flags += ["--parent-group", str(group)]
                    name = _shared_name(emu, [p.url for p in parents], size, group)
                    row: dict[str, Any] = {"group": group, "name": name}
                    before = emu.wait_idle()["bytes"]
                    for n in (1, 2):  # a cold child, then another with the parents warm
                        child = stack.enter_context(
                            self.nwbcache(emu, self.work / f"child-{tag}-{n}", "1", *flags)
                        )
                        row[f"child{n}_seconds"] = self._scan(child, emu, want, name)
                        row[f"child{n}_upstream_bytes"] = emu.wait_idle()["bytes"] - before
                    row["parent_upstream_bytes"] = [
                        value(scrape(p.url), "nwbcache_upstream_bytes_total") for p in parents
                    ]
                out[tag] = row
                sys.stderr.write(f"  parents, groups of {tag}: {json.dumps(row)}\n")
        out["size"] = size
        return out

    def _scan(self, server: Nwbcache, emu: Emulator, want: str, name: str) -> float:
        """Seconds to read the big object (as ``name``) in order, in RANGE-byte
        requests (one reader scanning a file); its sha256 checked."""
        size = self.objects["big"][0]
        url = server.url_for(emu.url_for(name))
        digest = hashlib.sha256()
        began = time.perf_counter()
        with requests.Session() as session:
            for start in range(0, size, RANGE):
                last = min(size, start + RANGE) - 1
                r = session.get(url, headers={"Range": f"bytes={start}-{last}"}, timeout=600)
                if r.status_code != 206:
                    self.problems.append(f"scan through {server.url}: {r.status_code}")
                    return float("nan")
                digest.update(r.content)
        took = time.perf_counter() - began
        if digest.hexdigest() != want:
            self.problems.append(f"scan through {server.url}: sha256 differs")
        return took

    # -- warm 4 KiB ---------------------------------------------------------------
    def warm(self) -> dict[str, Any]:
        size = self.objects["big"][0]
        out: dict[str, Any] = {"cpus": usable_cpus(), "length": WARM_LENGTH}
        with self.emulator(latency=0, bandwidth=None) as emu:
            for workers in ("1", "auto"):
                runs: dict[str, list[float]] = {"nginx": [], "nwbcache": []}
                prefix = self.work / f"nginx-{workers}"
                with (
                    _nginx(prefix, emu, workers) as ngx,
                    self.nwbcache(emu, self.work / f"warm-cache-{workers}", workers) as nwb,
                ):
                    urls = {
                        "nginx": ngx.url_for(emu.url_for("big")),
                        "nwbcache": nwb.url_for(emu.url_for("big")),
                    }
                    for url in urls.values():
                        _read_all(url)
                    for run in range(self.args.runs):
                        names = list(urls) if run % 2 == 0 else list(reversed(urls))
                        for name in names:
                            res = run_wrk(
                                urls[name], size=size, length=WARM_LENGTH, seconds=self.args.seconds
                            )
                            if res.errors:
                                self.problems.append(f"wrk {name} x{workers}: {res.errors} errors")
                            runs[name].append(res.req_per_s)
                row: dict[str, Any] = {name: statistics.median(v) for name, v in runs.items()}
                row["ratio"] = row["nwbcache"] / row["nginx"]
                row["runs"] = runs
                out[workers] = row
                sys.stderr.write(f"  warm x{workers}: {json.dumps(row)}\n")
        return out


@contextlib.contextmanager
def _nginx(prefix: Path, emu: Emulator, workers: str) -> Iterator[Nginx]:
    server = Nginx(prefix, prefix / "cache", emu.host, workers=workers, slice_size="256k")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _read_all(url: str) -> None:
    with urllib.request.urlopen(url, timeout=600) as r:
        while r.read(1 << 20):
            pass


def markdown(report: dict[str, Any]) -> str:
    s, w = report["stampede"], report["warm"]
    lines = [
        f"# Sharing a cache: workers, daemons, parents ({report['commit'] or 'uncommitted'})",
        "",
        f"Stampede: `--workers 2` + a second daemon on one cache dir; {BIG_READERS} readers "
        f"of one {format_size(report['settings']['size'])} object (4 MiB ranges) and "
        f"{SMALL_READERS} readers of {SMALL_OBJECTS} small objects, origin "
        f"{report['settings']['latency'] * 1000:.0f} ms to first byte, "
        f"{report['settings']['bandwidth'] / 1e6:.0f} MB/s per response.",
        "",
        "| objects | fetched upstream | ratio (target <= 1.05) | blocks awaited | "
        "discoveries awaited | wall |",
        "|---|---|---|---|---|---|",
        f"| {s['object_bytes'] / 1e6:.1f} MB | {s['upstream_bytes'] / 1e6:.1f} MB | "
        f"{s['ratio']:.3f} | {s['awaited_blocks']:.0f} | {s['awaited_discoveries']:.0f} | "
        f"{s['wall_seconds']:.1f} s |",
    ]
    t = report["parents"]
    lines += [
        "",
        f"Parents: one reader scans the {format_size(t['size'])} object in 4 MiB ranges "
        "through a child with two parents (every cache cold), then through a second child "
        "(its cache cold, the parents warm); anchor: a daemon reading the origin itself "
        f"({t['direct_seconds']:.1f} s, {t['direct_upstream_bytes'] / t['size']:.3f}x the "
        "object from the origin).",
        "",
        "| --parent-group | cold child | x direct | origin bytes / object | split between "
        "parents | second child | x direct |",
        "|---|---|---|---|---|---|---|",
    ]
    for group in report["settings"]["groups"]:
        row = t[format_size(group)]
        split = row["parent_upstream_bytes"]
        lines.append(
            f"| {format_size(group)} | {row['child1_seconds']:.1f} s | "
            f"{row['child1_seconds'] / t['direct_seconds']:.2f} | "
            f"{row['child2_upstream_bytes'] / t['size']:.3f} | "
            f"{split[0] / max(1.0, sum(split)):.0%} / {split[1] / max(1.0, sum(split)):.0%} | "
            f"{row['child2_seconds']:.1f} s | {row['child2_seconds'] / t['direct_seconds']:.2f} |"
        )
    lines += [
        "",
        f"Warm random {WARM_LENGTH // 1024} KiB ranges, wrk 16 connections, "
        f"{report['settings']['seconds']:.0f} s x {report['settings']['runs']} runs each, "
        f"medians (requests/s); auto = {w['cpus']} CPUs:",
        "",
        "| workers | nginx | nwbcache | ratio |",
        "|---|---|---|---|",
    ]
    for workers in ("1", "auto"):
        row = w[workers]
        lines.append(
            f"| {workers} | {row['nginx']:,.0f} | {row['nwbcache']:,.0f} | {row['ratio']:.2f} |"
        )
    if report["problems"]:
        lines += ["", "Problems: " + "; ".join(report["problems"])]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.sharing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--size", type=parse_size, help="the big object (default 256M; --quick 64M)")
    ap.add_argument("--latency", type=float, default=0.03, help="origin first byte, s (0.03)")
    ap.add_argument("--bandwidth", type=float, default=100e6, help="origin B/s per response")
    ap.add_argument("--seconds", type=float, help="per wrk run (default 10; --quick 3)")
    ap.add_argument("--runs", type=int, default=3, help="wrk runs per system (default 3)")
    ap.add_argument(
        "--groups",
        type=lambda text: [parse_size(g) for g in text.split(",")],
        default="4M,16M,64M",
        help="--parent-group sizes to compare (default 4M,16M,64M)",
    )
    ap.add_argument("--small-max", type=parse_size, default="2M", help="small objects' size bound")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=BENCH / "results-sharing.json")
    args = ap.parse_args(argv)
    args.size_bytes = args.size or parse_size("64M" if args.quick else "256M")
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    (REPO / ".bench-data").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="workers-", dir=REPO / ".bench-data") as tmp:
        bench = Bench(args, Path(tmp))
        bench.make_objects()
        sys.stderr.write("stampede:\n")
        stampede = bench.stampede()
        sys.stderr.write("parents:\n")
        tiers = bench.parents()
        sys.stderr.write("warm:\n")
        warm = bench.warm()
    report = {
        "commit": git_commit(),
        "machine": machine(),
        "settings": {
            "size": args.size_bytes,
            "latency": args.latency,
            "bandwidth": args.bandwidth,
            "seconds": args.seconds,
            "runs": args.runs,
            "groups": args.groups,
        },
        "stampede": stampede,
        "parents": tiers,
        "warm": warm,
        "problems": bench.problems,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
