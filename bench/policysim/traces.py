"""Block-access traces: the record, JSON-lines files, and synthetic lab mixes.

A trace is what the daemon's cache sees: one record per block a request
touches, in time order. ``bytes`` is the block's size (what it occupies on disk
and what a miss fetches upstream; smaller than the block size only for an
object's last block), so the byte miss ratio is the share of bytes fetched
upstream.

JSON-lines traces (``load_jsonl``) have one object per line, either a block::

    {"object": "blobs/ab/cd/abcd-...", "block": 0, "bytes": 262144, "time": 12.5}

or a byte range, cut into blocks of the trace's block size (``size``, the
object's length, shortens its last block when given)::

    {"object": "...", "offset": 1000, "length": 5000, "size": 90000000, "time": 12.5}

``time`` (seconds) is optional and informational: records are replayed in
file order. ``kind`` is optional: ``"meta"`` marks a metadata read (the
simulator reports their miss ratio apart; without kinds, block 0 counts as
metadata). Blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
DEFAULT_BLOCK_SIZE = 256 * KiB  # the daemon's --block-size default


@dataclass(frozen=True, slots=True)
class Access:
    """One block of one object read at ``time`` seconds; ``bytes`` is the block's size;
    ``kind`` says why, when the trace knows ("meta", "slice", "scan")."""

    object: str
    block: int
    bytes: int
    time: float = 0.0
    kind: str = ""

    @property
    def is_metadata(self) -> bool:
        return self.kind == "meta" or (not self.kind and self.block == 0)

    @property
    def key(self) -> tuple[str, int]:
        return (self.object, self.block)


@dataclass
class Trace:
    """A named sequence of accesses with the block size they were cut with."""

    name: str
    accesses: list[Access]
    block_size: int = DEFAULT_BLOCK_SIZE
    description: str = ""
    # Named positions in the trace (e.g. where a phase starts), for reports.
    marks: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.accesses)

    def footprint(self) -> int:
        """Bytes of the distinct blocks accessed: a cache this big never evicts."""
        sizes = {a.key: a.bytes for a in self.accesses}
        return sum(sizes.values())

    def reused_footprint(self) -> int:
        """Bytes of the distinct blocks accessed more than once: what a cache can help with."""
        counts: dict[tuple[str, int], int] = {}
        sizes: dict[tuple[str, int], int] = {}
        for a in self.accesses:
            counts[a.key] = counts.get(a.key, 0) + 1
            sizes[a.key] = a.bytes
        return sum(sizes[k] for k, n in counts.items() if n > 1)


def blocks_of_range(
    offset: int, length: int, block_size: int, size: int | None = None
) -> list[tuple[int, int]]:
    """(block index, block bytes) of the blocks that bytes [offset, offset+length) touch;
    with the object's ``size``, the range stops at its end and its last block is shorter."""
    if size is not None:
        length = min(length, size - offset)
    if length <= 0:
        return []
    first, last = offset // block_size, (offset + length - 1) // block_size
    out = []
    for block in range(first, last + 1):
        nbytes = block_size if size is None else min(block_size, size - block * block_size)
        out.append((block, nbytes))
    return out


def load_jsonl(path: Path, block_size: int = DEFAULT_BLOCK_SIZE, name: str | None = None) -> Trace:
    """A trace from a JSON-lines file of block or range records (see the module doc)."""
    accesses: list[Access] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                rec = json.loads(text)
                obj = str(rec["object"])
                t = float(rec.get("time", lineno))
                kind = str(rec.get("kind", ""))
                if "block" in rec:
                    nbytes = int(rec.get("bytes", block_size))
                    accesses.append(Access(obj, int(rec["block"]), nbytes, t, kind))
                else:
                    size = int(rec["size"]) if "size" in rec else None
                    for block, nbytes in blocks_of_range(
                        int(rec["offset"]), int(rec["length"]), block_size, size
                    ):
                        accesses.append(Access(obj, block, nbytes, t, kind))
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a trace record ({exc!r})") from exc
    return Trace(name or path.stem, accesses, block_size, f"recorded: {path.name}")


def dump_jsonl(trace: Trace, path: Path) -> None:
    """Write ``trace`` as block records, one per line, readable by ``load_jsonl``."""
    with path.open("w") as f:
        for a in trace.accesses:
            rec: dict[str, object] = {
                "object": a.object,
                "block": a.block,
                "bytes": a.bytes,
                "time": a.time,
            }
            if a.kind:
                rec["kind"] = a.kind
            f.write(json.dumps(rec) + "\n")


def scan_scenario(
    files: int = 24,
    head: int = 64 * KiB,
    rounds: int = 3,
    scan_bytes: int = 256 * MiB,
    block_size: int = DEFAULT_BLOCK_SIZE,
    prefill: int = 0,
) -> Trace:
    """Issue 12's test: the first ``head`` bytes of ``files`` files read ``rounds`` times
    (their metadata, 24 users' worth), one file of ``scan_bytes`` read straight through,
    then the files' heads once more. ``marks["after_scan"]`` is where the last phase starts.
    ``prefill`` bytes of other blocks, each read twice, come first: a cache already full
    of an earlier working set instead of an empty one."""
    accesses: list[Access] = []
    t = 0.0
    for _ in range(2):
        for block, nbytes in blocks_of_range(0, prefill, block_size, prefill):
            accesses.append(Access("earlier.nwb", block, nbytes, t, "slice"))
            t += 0.001

    def read_heads() -> None:
        nonlocal t
        for i in range(files):
            for block, nbytes in blocks_of_range(0, head, block_size):
                accesses.append(Access(f"file{i:02d}.nwb", block, nbytes, t, "meta"))
                t += 0.01

    for _ in range(rounds):
        read_heads()
    for block, nbytes in blocks_of_range(0, scan_bytes, block_size, scan_bytes):
        accesses.append(Access("scan.nwb", block, nbytes, t, "scan"))
        t += 0.001
    marks = {"after_scan": len(accesses)}
    read_heads()
    desc = (
        f"{files} files' first {head // KiB} KiB read {rounds}×, a {scan_bytes // MiB} MiB "
        f"file scanned once, the {files} heads again"
    )
    if prefill:
        desc = f"{prefill // MiB} MiB of other blocks read twice, then " + desc
    name = "scan" + ("-warm" if prefill else "") + (f"-{rounds}x" if rounds != 3 else "")
    return Trace(name, accesses, block_size, desc, marks)


@dataclass(frozen=True)
class LabMix:
    """The knobs of a synthetic lab: who opens which files, and how they read them.

    Sessions: a user opens a file (Zipf popularity over files, or one of the user's own
    files) and reads its metadata — block 0 and a few scattered small blocks, the same
    ones for every user of that file; most sessions then read a slice of one dataset,
    starting more often near the dataset's beginning, or (``revisit``) the same slice as
    the user's previous session on that file. ``scans`` sessions read one of the
    largest files from start to end. Sessions overlap in time, as users do.
    """

    files: int = 400
    users: int = 30
    sessions: int = 4000
    zipf: float = 0.9  # popularity of file rank r is proportional to r ** -zipf
    own_files: int = 4  # each user's own files, opened in half of their sessions
    median_file: int = 48 * MiB
    file_sigma: float = 1.6  # lognormal spread of file sizes
    largest_file: int = 6 * GiB
    metadata_blocks: tuple[int, int] = (2, 10)  # besides block 0, per file
    browse_fraction: float = 0.35  # sessions that read metadata only
    slice_blocks_median: float = 6.0
    revisit: float = 0.4  # a user re-reads their last slice of the file (a notebook re-run)
    scans: int = 4
    seconds: float = 8 * 3600.0


def _files(mix: LabMix, rng: np.random.Generator, block_size: int) -> list[tuple[int, list[int]]]:
    """Each file's (size in bytes, sorted metadata block indexes)."""
    sizes = rng.lognormal(math.log(mix.median_file), mix.file_sigma, mix.files)
    out = []
    for raw in sizes:
        size = int(min(max(raw, 64 * KiB), mix.largest_file))
        nblocks = -(-size // block_size)
        lo, hi = mix.metadata_blocks
        extra = min(nblocks - 1, int(rng.integers(lo, hi + 1)))
        scattered = rng.choice(np.arange(1, nblocks), size=extra, replace=False).tolist()
        out.append((size, sorted({0, *scattered})))
    return out


def lab_mix(
    mix: LabMix | None = None,
    seed: int = 12,
    block_size: int = DEFAULT_BLOCK_SIZE,
    name: str = "lab",
) -> Trace:
    """A deterministic synthetic lab trace for ``mix`` and ``seed``."""
    mix = mix or LabMix()
    rng = np.random.default_rng(seed)
    files = _files(mix, rng, block_size)
    ranks = np.arange(1, mix.files + 1, dtype=float)
    popularity = ranks**-mix.zipf
    popularity /= popularity.sum()
    own = rng.integers(0, mix.files, size=(mix.users, mix.own_files))
    timed: list[tuple[float, int, Access]] = []  # (time, sequence, access)
    last_slice: dict[tuple[int, int], range] = {}

    def emit(obj: int, blocks: Iterable[int], start: float, gap: float, kind: str) -> None:
        size = files[obj][0]
        for n, block in enumerate(blocks):
            nbytes = min(block_size, size - block * block_size)
            t = start + n * gap
            access = Access(f"file{obj:04d}.nwb", block, nbytes, t, kind)
            timed.append((t, len(timed), access))

    starts = np.sort(rng.uniform(0, mix.seconds, mix.sessions))
    for start in starts:
        user = int(rng.integers(mix.users))
        if rng.random() < 0.5:
            obj = int(own[user, rng.integers(mix.own_files)])
        else:
            obj = int(rng.choice(mix.files, p=popularity))
        size, meta = files[obj]
        emit(obj, meta, float(start), 0.05, "meta")
        if rng.random() < mix.browse_fraction:
            continue
        blocks = last_slice.get((user, obj))
        if blocks is None or rng.random() >= mix.revisit:
            nblocks = -(-size // block_size)
            # One of four datasets, each a quarter of the file; slices favour its start.
            region = int(rng.integers(4))
            lo = region * nblocks // 4
            hi = max(lo + 1, (region + 1) * nblocks // 4)
            first = lo + int((hi - lo) * rng.random() ** 3)
            length = max(1, int(rng.lognormal(math.log(mix.slice_blocks_median), 1.0)))
            blocks = range(first, min(hi, first + length))
            last_slice[(user, obj)] = blocks
        emit(obj, blocks, float(start) + 0.05 * len(meta), 0.02, "slice")
    largest = sorted(range(mix.files), key=lambda i: files[i][0])[-max(mix.scans, 1) :]
    for n in range(mix.scans):
        obj = largest[n % len(largest)]
        start = float(rng.uniform(0, mix.seconds))
        nblocks = -(-files[obj][0] // block_size)
        emit(obj, range(nblocks), start, 0.005, "scan")
    timed.sort(key=lambda item: (item[0], item[1]))
    desc = (
        f"{mix.sessions} sessions of {mix.users} users over {mix.files} files "
        f"(Zipf {mix.zipf}), {mix.browse_fraction:.0%} metadata only, {mix.scans} full scans"
    )
    return Trace(name, [a for _, _, a in timed], block_size, desc)


# The synthetic mixes the simulator replays by default.
MIXES: dict[str, LabMix] = {
    "lab": LabMix(),
    "lab-scans": LabMix(scans=12, sessions=3000),
    "lab-metadata": LabMix(files=1500, sessions=6000, browse_fraction=0.8, scans=3, zipf=0.7),
}
