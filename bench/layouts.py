"""The two on-disk layouts the field uses, measured on this machine's filesystem.

    make bench-layouts                               # 256 MiB of 256 KiB + 32 MiB of 4 KiB, 5 runs
    .venv/bin/python -m bench.layouts --quick        # 64 MiB + 8 MiB, 2 runs

Issue 11 asks to choose the cache's layout by measurement: one file per block
(nginx; nwbcache's format 2) or one sparse data file per object version with
a block map and per-block checksums beside it (XCache's ``.cinfo``, rclone's
VFS cache). This measures the storage half of that choice — the syscalls each
layout makes for the same work — without a daemon, an origin or a client, so
the figures are the layouts' and nothing else's:

- ``write``: a version's blocks written by four threads (the daemon's disk
  threads) in groups of 1 MiB (one disk job per group, as a fill hands them
  over), from buffers already in memory, each block's CRC-32C computed.
  ``file per block`` is format 2's daemon code (``bench/fileperblock.py``,
  its ``publish.py``: an unnamed file per block, written with one ``writev``
  and linked into its shard dir). ``file per version`` is format 3's storage
  layer (``versionfile.VersionFiles``, the daemon's since format 3): the
  group's blocks with one ``pwritev`` at their offset in the version's data
  file, then their map entries (checksum and length, 8 bytes a block) with
  one ``pwrite`` into the version's map file, data first so that a crash
  leaves a block unmapped, never mapped and unwritten.
- ``evict``: the first half of the small-block version's blocks removed one
  at a time, in index order: ``unlink`` of its file, against
  a write lock on its span, a cleared map entry and ``fallocate(PUNCH_HOLE)``
  of its bytes. ``evict
  runs``: the second half, 1 MiB of blocks at a time (S3-FIFO's tail of a
  cold object is a run of its blocks): still an ``unlink`` per block file,
  against one punch and one map write per run.
- ``read``: the version sent into a socket in 4 MiB ranges (a reader's
  request): ``sendfile`` per block file (open, header read, ``sendfile``,
  close: a process's first read of each block; the daemon keeps fds open,
  so this is its cold-fd case), against a read lock on the range, one read
  of its map entries, one ``pread`` of the range and one ``send``: format 3
  copies, because of the next item.
- ``hazards``: whether bytes ``sendfile`` queued in a loopback TCP socket
  are still the file's after the file is unlinked (format 2's eviction
  relies on it: tests/test_kernel_assumptions.py), and after the range is
  punched (Linux 6.18 here: they are not; the punch changes them in place).
- disk use: bytes allocated on disk per byte cached.

Figures per layout and block size: MB/s (10**6 bytes) of wall time and CPU
seconds per GiB (user + system of this process, all threads, from
``getrusage``); medians of ``--runs`` runs, the layouts alternating run by
run. Each run writes into a directory of its own, on the cache's filesystem
(``--work``, default in .bench-data), all kept until the end: deleting a
run's files before the next made ext4 walk the freed inodes on every create
(see bench/coldfill.py). ``sync`` and a pause before each run.

Prints a table and saves bench/results-layouts.json and .md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import fileperblock
from bench.harness import allocated_bytes, git_commit, machine
from nwbcache_proxy import blockfile
from nwbcache_proxy.blockfile import HEADER_SIZE
from nwbcache_proxy.layout import DATA_SUFFIX, MAP_SUFFIX, Layout, block_relpath
from nwbcache_proxy.mapfile import MapHeader
from nwbcache_proxy.sizes import format_size, parse_size
from nwbcache_proxy.sparse import punch_hole
from nwbcache_proxy.staging import Staging
from nwbcache_proxy.versionfile import VersionFiles
from tests.support.helpers import REPO

BENCH = Path(__file__).resolve().parent
MiB = 1024 * 1024
GROUP = MiB  # a fill's publish group when formats were compared (4 MiB since: filling.py)
THREADS = 4  # writing threads, by default (the daemon has several disk threads)
RANGE = 4 * MiB  # a reader's request, for ``read``
LAYOUTS = ("file per block", "file per version")
DIGEST = bytes(32)  # the version digest in block headers: any 32 bytes


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the two layouts ------------------------------------------------------------


class FilePerBlock:
    """nwbcache's format 2: its daemon's publish and paths."""

    def __init__(self, root: Path, block_size: int) -> None:
        self.layout = Layout(root)
        self.staging = Staging(self.layout)
        self.version = f"objects/00/{'0' * 64}/{'1' * 32}.{block_size}"
        self.block_size = block_size

    def path(self, index: int) -> str:
        return f"{self.layout.root}/{self.version}/{block_relpath(index)}"

    def write_group(self, first: int, blocks: Sequence[memoryview]) -> None:
        items = [(self.path(first + n), first + n, [b]) for n, b in enumerate(blocks)]
        for done in fileperblock.publish_blocks(self.staging, items, DIGEST, fsync=False):
            if isinstance(done, OSError):
                raise done
            os.close(done[1])  # the daemon keeps it for the block's first reader

    def evict(self, first: int, count: int = 1) -> None:
        for index in range(first, first + count):
            os.unlink(self.path(index))

    def read_block(self, index: int) -> bytes:
        """Block ``index``'s bytes, its header and checksum checked as the daemon does."""
        with open(self.path(index), "rb") as fh:
            raw = fh.read()
        header = blockfile.decode_header(raw)
        blockfile.check_header(
            header, index=index, length=self.block_size, digest=DIGEST, file_size=len(raw)
        )
        data = raw[HEADER_SIZE:]
        blockfile.check_data(header, data)
        return data

    def send_range(self, sock: socket.socket, first: int, count: int) -> None:
        for index in range(first, first + count):
            fd = os.open(self.path(index), os.O_RDONLY)
            try:
                header = os.pread(fd, HEADER_SIZE, 0)
                assert len(header) == HEADER_SIZE
                _sendfile_all(sock, fd, HEADER_SIZE, self.block_size)
            finally:
                os.close(fd)

    def close(self) -> None:
        self.staging.close()

    def data_root(self) -> Path:
        return self.layout.objects


class FilePerVersion:
    """Format 3's storage layer (versionfile.py):
    one sparse data file per version, and beside it a map of a checksum and a
    length per block. Removal and reads take the span's locks, as they will
    in the daemon (another process may be serving what eviction removes)."""

    def __init__(self, root: Path, block_size: int, blocks: int) -> None:
        self.dir = root / "objects" / "00" / ("0" * 64)
        self.dir.mkdir(parents=True)
        header = MapHeader(block_size, blocks * block_size, DIGEST)
        stem = self.dir / f"{'1' * 32}.{block_size}"
        files = VersionFiles.open(
            stem.with_name(stem.name + DATA_SUFFIX),
            stem.with_name(stem.name + MAP_SUFFIX),
            header,
            create=True,
        )
        assert files is not None
        self.files = files
        self.block_size = block_size

    def write_group(self, first: int, blocks: Sequence[memoryview]) -> None:
        self.files.write_group(first, [[b] for b in blocks])

    def evict(self, first: int, count: int = 1) -> None:
        if not self.files.remove(first, count):  # its write lock, unmap, punch
            raise RuntimeError(f"blocks {first}+{count} locked")

    def read_block(self, index: int) -> bytes:
        return self.files.read_block(index)

    def send_range(self, sock: socket.socket, first: int, count: int) -> None:
        # Copied out under the span's read lock, then sent: never sendfile from
        # a data file (see hazards()).
        data = self.files.read_span(first, count)
        assert data is not None, "a block of the range is not mapped"
        sock.sendall(data)

    def close(self) -> None:
        self.files.close()

    def data_root(self) -> Path:
        return self.dir


Store = FilePerBlock | FilePerVersion


def _sendfile_all(sock: socket.socket, fd: int, offset: int, count: int) -> None:
    while count:
        sent = os.sendfile(sock.fileno(), fd, offset, count)
        if sent == 0:
            raise OSError("sendfile sent nothing")
        offset, count = offset + sent, count - sent


# -- the measurements ------------------------------------------------------------


def measure(work: Callable[..., None], *args: Any) -> dict[str, float]:
    cpu, wall = cpu_seconds(), time.perf_counter()
    work(*args)
    return {"seconds": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu}


def write_all(store: Store, source: memoryview, block_size: int, blocks: int, threads: int) -> None:
    """All ``blocks`` blocks, in 1 MiB groups shared out to ``threads`` threads."""
    per_group = max(1, GROUP // block_size)
    views = [source[i * block_size : (i + 1) * block_size] for i in range(per_group)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        jobs = [
            pool.submit(store.write_group, first, views[: min(per_group, blocks - first)])
            for first in range(0, blocks, per_group)
        ]
        for job in jobs:
            job.result()


def read_all(store: Store, block_size: int, blocks: int) -> None:
    """The version in RANGE-byte ranges into a socket a thread drains."""
    sender, receiver = socket.socketpair()
    drained = threading.Thread(target=_drain, args=(receiver,), daemon=True)
    drained.start()
    per_range = max(1, RANGE // block_size)
    try:
        for first in range(0, blocks, per_range):
            store.send_range(sender, first, min(per_range, blocks - first))
    finally:
        sender.close()
        drained.join(60)
        receiver.close()


def evict_range(store: Store, first: int, end: int, per_step: int) -> None:
    for index in range(first, end, per_step):
        store.evict(index, min(per_step, end - index))


def _drain(sock: socket.socket) -> None:
    buf = bytearray(1 << 20)
    while sock.recv_into(buf):
        pass


def make_store(layout: str, root: Path, block_size: int, blocks: int) -> Store:
    if layout == LAYOUTS[0]:
        return FilePerBlock(root, block_size)
    return FilePerVersion(root, block_size, blocks)


def verify(store: Store, source: memoryview, block_size: int, blocks: int) -> list[str]:
    """Every block read back (not timed) and compared with what was written."""
    per_group = max(1, GROUP // block_size)
    for index in range(blocks):
        want = source[(index % per_group) * block_size :][:block_size]
        try:
            if store.read_block(index) != want:
                return [f"{type(store).__name__}, {block_size} B blocks: block {index} differs"]
        except (OSError, blockfile.CorruptBlock) as exc:
            return [f"{type(store).__name__}, {block_size} B blocks: block {index}: {exc}"]
    return []


def hazards(work: Path) -> dict[str, bool]:
    """Whether bytes queued by ``sendfile`` survive what eviction does to the file."""
    out = {}
    for what in ("unlink", "punch"):
        path = work / f"hazard-{what}"
        data = os.urandom(2 * MiB)
        path.write_bytes(data)
        fd = os.open(path, os.O_RDWR)
        os.pread(fd, len(data), 0)
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            sender = socket.create_connection(server.getsockname())
            receiver, _ = server.accept()
        with sender, receiver:
            sender.setblocking(False)
            sent = 0
            with contextlib.suppress(BlockingIOError):
                while sent < len(data):
                    sent += os.sendfile(sender.fileno(), fd, sent, len(data) - sent)
            if sent < 256 * 1024:  # too little queued to tell anything
                raise RuntimeError(f"the socket took {sent} bytes of sendfile")
            if what == "unlink":
                os.unlink(path)
            else:  # a block inside the file, as eviction punches one (not the whole file)
                punch_hole(fd, len(data) // 4, len(data) // 2)
            os.close(fd)
            got = bytearray()
            while len(got) < sent and (chunk := receiver.recv(MiB)):
                got += chunk
        out[f"bytes queued by sendfile kept after {what}"] = bytes(got) == data[:sent]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return out


def one_run(
    args: argparse.Namespace, run_dir: Path, layout: str, problems: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    source = memoryview(os.urandom(max(GROUP, *args.block_sizes)))
    for bs, total in zip(args.block_sizes, args.totals, strict=True):
        blocks = total // bs
        root = run_dir / f"{layout.replace(' ', '-')}-{bs}"
        root.mkdir(parents=True)
        store = make_store(layout, root, bs, blocks)
        try:
            settle(args.settle)
            w = measure(write_all, store, source, bs, blocks, args.threads)
            out[f"write {bs}"] = rates(w, total, blocks)
            problems += verify(store, source, bs, blocks)
            out[f"disk use {bs}"] = allocated_bytes(store.data_root()) / total
            settle(args.settle)
            r = measure(read_all, store, bs, blocks)
            out[f"read {bs}"] = rates(r, total, blocks)
            if bs == min(args.block_sizes):
                settle(args.settle)
                half = blocks // 2
                e = measure(evict_range, store, 0, half, 1)
                out[f"evict {bs}"] = rates(e, half * bs, half)
                settle(args.settle)
                e = measure(evict_range, store, half, blocks, max(1, GROUP // bs))
                out[f"evict-runs {bs}"] = rates(e, (blocks - half) * bs, blocks - half)
        finally:
            store.close()
    return out


def rates(m: dict[str, float], nbytes: int, blocks: int) -> dict[str, float]:
    return {
        **m,
        "mb_per_s": nbytes / 1e6 / max(m["seconds"], 1e-9),
        "cpu_s_per_gib": m["cpu_s"] / (nbytes / 1024**3),
        "blocks_per_s": blocks / max(m["seconds"], 1e-9),
        "cpu_us_per_block": m["cpu_s"] / blocks * 1e6,
    }


def settle(seconds: float) -> None:
    subprocess.run(["sync"], check=False)
    time.sleep(seconds)


# -- the report ------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for layout in LAYOUTS:
        mine = [r["figures"] for r in runs if r["layout"] == layout]
        fig: dict[str, Any] = {}
        for key in mine[0]:
            if isinstance(mine[0][key], dict):
                fig[key] = {k: statistics.median(r[key][k] for r in mine) for k in mine[0][key]}
            else:
                fig[key] = statistics.median(r[key] for r in mine)
        summary[layout] = fig
    return summary


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    a, b = (s[layout] for layout in LAYOUTS)
    lines = [
        "# The two layouts' storage costs",
        "",
        f"`{report['command']}` — commit {report['versions']['nwbcache_commit']}, "
        f"{report['machine']['cores']} cores, filesystem `{report['filesystem']}`; medians of "
        f"{report['settings']['runs']} runs, the layouts alternating.",
        "",
        "| work | block | file per block | file per version | × |",
        "|---|---|---|---|---|",
    ]
    for key in a:
        what, _, bs = key.partition(" ")
        what = {"evict": "evict, a block at a time", "evict-runs": "evict, 1 MiB at a time"}.get(
            what, what
        )
        if key.startswith("disk use"):
            label = f"{format_size(int(key.split()[-1]))}"
            lines.append(
                f"| disk bytes per cached byte | {label} | {a[key]:.3f} | {b[key]:.3f} | "
                f"{b[key] / a[key]:.2f} |"
            )
            continue
        label = format_size(int(bs))
        for metric, unit, fmt in (
            ("mb_per_s", "MB/s", "{:,.0f}"),
            ("cpu_s_per_gib", "CPU s/GiB", "{:.2f}"),
            ("cpu_us_per_block", "CPU µs/block", "{:.1f}"),
        ):
            x, y = a[key][metric], b[key][metric]
            lines.append(
                f"| {what}, {unit} | {label} | {fmt.format(x)} | {fmt.format(y)} | "
                f"{y / x if x else float('nan'):.2f} |"
            )
    lines += ["", "× is file per version over file per block.", ""]
    lines += ["| on this kernel | |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in report["hazards"].items()]
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bytes", default=None, help="bytes of large blocks (256M; --quick 64M)")
    ap.add_argument("--small-bytes", default=None, help="bytes of small blocks (32M; --quick 8M)")
    ap.add_argument("--block-size", default="256K", help="the large block (256K, the default)")
    ap.add_argument("--small-block-size", default="4K", help="the small block (4K, bench-scale's)")
    ap.add_argument("--threads", type=int, default=THREADS, help=f"writers ({THREADS})")
    ap.add_argument("--runs", type=int, help="runs per layout (default 5; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="64 MiB + 8 MiB, 2 runs")
    ap.add_argument("--settle", type=float, default=1.0, help="s after sync before each step")
    ap.add_argument("--work", type=Path, help="scratch dir (default a temp dir in .bench-data)")
    ap.add_argument("--out", type=Path, help="JSON results (default bench/results-layouts.json)")
    args = ap.parse_args(argv)
    args.runs = args.runs or (2 if args.quick else 5)
    big = parse_size(args.bytes or ("64M" if args.quick else "256M"))
    small = parse_size(args.small_bytes or ("8M" if args.quick else "32M"))
    args.block_sizes = [parse_size(args.block_size), parse_size(args.small_block_size)]
    args.totals = [big, small]
    if args.work is None:
        (REPO / ".bench-data").mkdir(exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="layouts-", dir=REPO / ".bench-data"))
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    fs = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", str(work)], capture_output=True, text=True
    ).stdout.strip()
    began = time.perf_counter()
    runs: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        kernel = hazards(work)
        for run in range(args.runs):
            order = LAYOUTS if run % 2 == 0 else LAYOUTS[::-1]
            for layout in order:
                figures = one_run(args, work / f"run{run}", layout, problems)
                runs.append({"run": run, "layout": layout, "figures": figures})
                brief = {k: round(v["mb_per_s"]) for k, v in figures.items() if isinstance(v, dict)}
                sys.stderr.write(f"  run {run + 1} {layout}: MB/s {brief}\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = {
        "command": "python -m bench.layouts " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "versions": {"python": sys.version.split()[0], "nwbcache_commit": git_commit()},
        "filesystem": fs or "unknown",
        "settings": {
            "block_sizes": args.block_sizes,
            "bytes": args.totals,
            "runs": args.runs,
            "threads": args.threads,
            "group": GROUP,
            "range": RANGE,
        },
        "elapsed_seconds": time.perf_counter() - began,
        "problems": problems,
        "hazards": kernel,
        "runs": runs,
        "summary": summarize(runs, args),
    }
    out = args.out or BENCH / "results-layouts.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"results: {out} ({report['elapsed_seconds']:.0f} s)")
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
