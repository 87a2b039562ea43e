"""Durability of the shared on-disk cache (format 3): restarts, kill -9, shared directories,
damaged files, eviction.

Every daemon here is a real process (``python -m nwbcache_proxy serve``) and
every client a real HTTP client (``requests``, threads for concurrency). Every
body is compared byte for byte with the bytes put into the origin, never with
what the daemon says; the origin's request log is the source of truth for
what was fetched.

What is left on disk is read as format 3 lays it out (docs/format-3-design.md),
by this file's own code: each version's map (decoded with
``nwbcache_proxy.mapfile``) must be that of the version its name and its
object's ``meta.json`` say; every block it maps is read from the data file at
``n * block size``, checked against its entry (length, CRC-32C) and compared
with the origin's bytes; the data file's extents (``SEEK_DATA``/``SEEK_HOLE``)
must hold no byte that no entry maps; and the index's rows must be the maps'
blocks, each counted at its own length.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import requests

from nwbcache_proxy import blockfile, footprint, mapfile
from nwbcache_proxy.blockfile import CorruptBlock
from nwbcache_proxy.layout import DATA_SUFFIX, MAP_SUFFIX, Layout, block_relpath
from nwbcache_proxy.mapfile import CorruptMap, MapHeader
from nwbcache_proxy.objectmeta import ObjectMeta, block_count, block_span
from nwbcache_proxy.sparse import punch_hole
from nwbcache_proxy.staging import Staging
from tests.support.daemons import DaemonProcess, Spawn
from tests.support.helpers import (
    REPO,
    get_range,
    origin_host,
    proxied,
    scrape,
    value,
    wait_until,
)
from tests.support.s3emu import LoggedRequest, S3Emulator

# Slow (not in make test-fast): daemon processes (restarts, kill -9, workers, two
# daemons on one cache).
pytestmark = pytest.mark.slow

K64 = 64 * 1024
TIMEOUT = 30  # per HTTP request: generous, only there so a hang fails instead of blocking
# A filesystem block: what a data file's allocation is counted in.
FS_BLOCK = 4096
# What the data files of a small cache may take beyond their blocks' filesystem
# blocks: an extent tree's blocks, for files punched into many extents.
SLACK = 16 * FS_BLOCK

_STEM = re.compile(r"([0-9a-f]{32})\.(\d+)")
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


# --------------------------------------------------------------------------- helpers


def put_objects(origin: S3Emulator, prefix: str, sizes: Sequence[int]) -> dict[str, bytes]:
    """Random objects in the origin, by key."""
    objects = {f"/dandiarchive/blobs/{prefix}/{i:03d}": os.urandom(n) for i, n in enumerate(sizes)}
    for key, data in objects.items():
        origin.put(key, data)
    return objects


def by_cache_key(origin: S3Emulator, objects: dict[str, bytes]) -> dict[str, bytes]:
    """The same objects keyed as meta.json names them (the upstream URL)."""
    return {origin.url + key: data for key, data in objects.items()}


def get_all(url: str) -> tuple[bytes, str]:
    r = requests.get(url, timeout=TIMEOUT)
    assert r.status_code == 200, (r.status_code, r.text[:200])
    return r.content, r.headers["X-Cache"]


def random_ranges(rng: random.Random, size: int, count: int, block: int) -> list[tuple[int, int]]:
    """[start, end) ranges: small, block-crossing, long, the last byte, the whole object."""
    ranges = [(0, size), (size - 1, size), (block - 1, block + 1)]
    while len(ranges) < count:
        start = rng.randrange(size)
        length = rng.choice([1, rng.randrange(1, 512), rng.randrange(1, 3 * block)])
        ranges.append((start, min(size, start + length)))
    rng.shuffle(ranges)
    return ranges


def staging_dirs(cache_dir: Path, pid: int) -> list[str]:
    staging = Layout(cache_dir).root / "staging"
    if not staging.is_dir():
        return []
    return [p.name for p in staging.iterdir() if p.name.startswith(f"{pid}-")]


def object_dir(cache_dir: Path, origin: S3Emulator, key: str) -> Path:
    """Where an object's meta.json and version files live (by the hash of its cache key)."""
    kh = hashlib.sha256((origin.url + key).encode()).hexdigest()
    return Layout(cache_dir).root / "objects" / kh[:2] / kh


def version_files(cache_dir: Path, origin: S3Emulator, key: str) -> tuple[Path, Path]:
    """The data file and map of the version of ``key`` its meta.json names."""
    obj_dir = object_dir(cache_dir, origin, key)
    meta = _meta_of(obj_dir)
    assert meta is not None, f"no meta.json for {key}"
    maps = list(obj_dir.glob(f"{meta.digest.hex()[:32]}.*{MAP_SUFFIX}"))
    assert len(maps) == 1, maps
    stem = maps[0].name.removesuffix(MAP_SUFFIX)
    return obj_dir / (stem + DATA_SUFFIX), maps[0]


def _meta_of(obj_dir: Path) -> ObjectMeta | None:
    try:
        raw = json.loads((obj_dir / "meta.json").read_text())
    except FileNotFoundError:
        return None
    assert isinstance(raw, dict), obj_dir
    cache_key = raw.get("cache_key")
    assert isinstance(cache_key, str), obj_dir
    # meta.json lives under the hash of its own cache key, or it is misplaced.
    assert hashlib.sha256(cache_key.encode()).hexdigest() == obj_dir.name, obj_dir
    meta = ObjectMeta.from_json(raw, cache_key)
    assert meta is not None, f"unreadable meta.json in {obj_dir}"
    return meta


def data_extents(fd: int) -> Iterator[tuple[int, int]]:
    """The byte ranges of ``fd`` that hold data, not holes (SEEK_DATA/SEEK_HOLE)."""
    end = os.fstat(fd).st_size
    pos = 0
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data past pos
            return
        pos = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, pos


@dataclass
class VersionOnDisk:
    """One version's files as a stopped (or idle) daemon left them."""

    name: str  # objects/<kh[:2]>/<kh>/<vd>.<bs>: the index's name of it
    cache_key: str | None  # its object's, when meta.json names this version
    header: MapHeader
    mapped: dict[int, int]  # block index -> length, of the blocks its map has
    allocated: int  # bytes the data file takes on disk (st_blocks)
    unmapped_allocated: int  # bytes of the data file's extents in no mapped block

    @property
    def mapped_bytes(self) -> int:
        return sum(self.mapped.values())


@dataclass
class CacheCheck:
    versions: list[VersionOnDisk] = field(default_factory=list)
    verified: int = 0  # blocks of a version meta.json names: entry checked, bytes = origin's
    orphans: int = 0  # blocks of other versions (aged out): checked against their entries only

    @property
    def mapped_blocks(self) -> int:
        return sum(len(v.mapped) for v in self.versions)

    @property
    def mapped_bytes(self) -> int:
        return sum(v.mapped_bytes for v in self.versions)

    @property
    def allocated(self) -> int:
        return sum(v.allocated for v in self.versions)

    @property
    def unmapped_allocated(self) -> int:
        return sum(v.unmapped_allocated for v in self.versions)

    def of(self, cache_key: str) -> VersionOnDisk | None:
        """The version of the object meta.json names, if it has files."""
        found = [v for v in self.versions if v.cache_key == cache_key]
        assert len(found) <= 1, found
        return found[0] if found else None


def inspect_cache(
    cache_dir: Path, originals: dict[str, bytes], *, settled: bool = True
) -> CacheCheck:
    """Check every version's files under the cache dir; fail on the first bad block.

    ``originals`` maps cache keys (upstream URLs) to the origin's bytes.
    ``settled``: no daemon was killed since the last reconcile, so every data
    file has its map and every map its data file; else (as a kill -9 left
    them) a file without its partner, or a map without its header yet, is
    skipped. Mapped blocks are checked either way: a crash leaves blocks
    unmapped, never mapped and not written whole.
    """
    result = CacheCheck()
    root = Layout(cache_dir).root
    for obj_dir in sorted(root.glob("objects/*/*")):
        meta = _meta_of(obj_dir)
        stems: dict[str, set[str]] = {}
        for path in list(obj_dir.iterdir()) if obj_dir.is_dir() else []:
            if path.name == "meta.json":
                continue
            found = Layout.stem_of(path.name)
            assert found is not None and path.is_file(), f"not a version's file: {path}"
            assert _STEM.fullmatch(found[0]), f"not a version's name: {path}"
            stems.setdefault(found[0], set()).add(found[1])
        for stem, suffixes in sorted(stems.items()):
            if suffixes != {DATA_SUFFIX, MAP_SUFFIX}:
                assert not settled, f"{obj_dir / stem}: {suffixes} without its partner"
                continue
            try:
                checked = _check_version(obj_dir, stem, meta, originals, settled=settled)
            except FileNotFoundError:  # a daemon dropped it (its last block evicted) meanwhile
                continue
            if checked is None:
                continue
            version, known = checked
            result.versions.append(version)
            if known:
                result.verified += len(version.mapped)
            else:
                result.orphans += len(version.mapped)
    return result


def _check_version(
    obj_dir: Path,
    stem: str,
    meta: ObjectMeta | None,
    originals: dict[str, bytes],
    *,
    settled: bool,
) -> tuple[VersionOnDisk, bool] | None:
    """One version's map against its name and meta.json, its mapped blocks
    against their entries and the origin, its data file's extents against the map."""
    data_path, map_path = obj_dir / (stem + DATA_SUFFIX), obj_dir / (stem + MAP_SUFFIX)
    raw = map_path.read_bytes()
    if not raw and not settled:
        return None  # killed between creating the map and writing its header
    try:
        header = mapfile.decode_header(raw)
    except CorruptMap as exc:
        pytest.fail(f"{map_path}: {exc}")
    m = _STEM.fullmatch(stem)
    assert m is not None
    assert header.digest.hex()[:32] == m[1], f"{map_path}: the map of another version"
    assert header.block_size == int(m[2]), f"{map_path}: {header.block_size} B blocks"
    assert len(raw) <= mapfile.entry_offset(header.blocks), f"{map_path}: entries past the end"
    assert (len(raw) - mapfile.HEADER_SIZE) % mapfile.ENTRY_SIZE == 0, f"{map_path}: torn entry"
    known = meta is not None and meta.digest == header.digest
    original = b""
    if known:
        assert meta is not None
        assert meta.cache_key in originals, f"a version of an unknown object: {map_path}"
        original = originals[meta.cache_key]
        assert header.size == len(original) == meta.version.size, map_path
    entries = mapfile.decode_entries(raw[mapfile.HEADER_SIZE :])
    mapped: dict[int, int] = {}
    fd = os.open(data_path, os.O_RDONLY)
    try:
        for n, entry in enumerate(entries):
            if not mapfile.mapped(header, n, [entry])[0]:
                # Absent blocks' entries are zeros (never written, or unmapped).
                assert entry == (0, 0), f"{map_path}: block {n}'s entry {entry} is no block's"
                continue
            start = header.offset_of(n)
            data = os.pread(fd, entry[1], start)
            try:
                mapfile.check_block(entry, data, n)
            except CorruptBlock as exc:
                pytest.fail(f"{data_path}: a mapped block fails its entry: {exc}")
            if known:
                assert data == original[start : start + entry[1]], f"{data_path}: block {n}"
            mapped[n] = entry[1]
        unmapped = 0
        bs = header.block_size
        for a, b in data_extents(fd):
            for n in range(a // bs, -(-b // bs)):
                if n not in mapped:
                    unmapped += min(b, (n + 1) * bs) - max(a, n * bs)
        allocated = os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)
    name = f"{obj_dir.parent.name}/{obj_dir.name}/{stem}"
    version = VersionOnDisk(
        name=f"objects/{name}",
        cache_key=meta.cache_key if known and meta is not None else None,
        header=header,
        mapped=mapped,
        allocated=allocated,
        unmapped_allocated=unmapped,
    )
    return version, known


@dataclass(frozen=True)
class Usage:
    blocks: int  # mapped
    bytes: int  # of the mapped blocks
    allocated: int  # by the data files (st_blocks)


def disk_usage(cache_dir: Path) -> Usage:
    """What the maps under the cache dir have and the data files take, read while
    daemons write and evict (a version being made, or going, counts what is
    there of it); nothing is checked."""
    blocks = nbytes = allocated = 0
    for path in Layout(cache_dir).root.glob(f"objects/*/*/*{MAP_SUFFIX}"):
        try:
            raw = path.read_bytes()
            header = mapfile.decode_header(raw)
            data = path.with_name(path.name.removesuffix(MAP_SUFFIX) + DATA_SUFFIX)
            allocated += data.stat().st_blocks * 512
        except (FileNotFoundError, CorruptMap):
            continue
        entries = mapfile.decode_entries(raw[mapfile.HEADER_SIZE :])
        there = mapfile.mapped(header, 0, entries)
        blocks += sum(there)
        nbytes += sum(length for (_, length), m in zip(entries, there, strict=True) if m)
    return Usage(blocks, nbytes, allocated)


def mapped_blocks(cache_dir: Path) -> int:
    """Blocks the maps under the cache dir have (see disk_usage)."""
    return disk_usage(cache_dir).blocks


def cached_then_stopped(
    origin: S3Emulator, spawn: Spawn, cache_dir: Path, prefix: str
) -> tuple[str, bytes, int]:
    """An object of 1,000,003 bytes read whole through a daemon of 64 KiB blocks,
    every block mapped, the daemon stopped cleanly: (key, bytes, blocks)."""
    [(key, data)] = put_objects(origin, prefix, [1_000_003]).items()
    nblocks = block_count(len(data), K64)
    first = spawn(cache_dir, "--block-size", "64K")
    assert get_all(proxied(first.url, origin, key))[0] == data
    wait_until(lambda: mapped_blocks(cache_dir) == nblocks, 10, f"{nblocks} blocks mapped")
    assert first.terminate() == 0
    return key, data, nblocks


def _ro(cache_dir: Path) -> contextlib.closing[sqlite3.Connection]:
    uri = f"file:{Layout(cache_dir).index_path}?mode=ro"
    return contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5))


def _index_rows(cache_dir: Path) -> int | None:
    """Rows in the index, read-only; None while it is busy or absent."""
    try:
        with _ro(cache_dir) as conn:
            return int(conn.execute("SELECT count(*) FROM blocks").fetchone()[0])
    except sqlite3.Error:
        return None


def _reconcile_due(cache_dir: Path) -> bool:
    with _ro(cache_dir) as conn:
        return conn.execute("SELECT 1 FROM state WHERE key = 'reconcile'").fetchone() is not None


def index_totals(cache_dir: Path) -> tuple[int, int] | None:
    """(blocks, bytes) the index's totals say; None while it is busy or absent."""
    try:
        with _ro(cache_dir) as conn:
            row = conn.execute("SELECT blocks, bytes FROM totals WHERE id = 0").fetchone()
    except sqlite3.Error:
        return None
    return None if row is None else (int(row[0]), int(row[1]))


def assert_index_matches(cache_dir: Path, check: CacheCheck) -> None:
    """The index's rows are exactly the maps' blocks, each at its own length (no
    header), and its totals (per version, and the cache's) add them up."""
    rows = _rows(cache_dir)
    with _ro(cache_dir) as conn:
        per_version = {
            str(name): (int(nbytes), int(blocks))
            for name, nbytes, blocks in conn.execute(
                "SELECT name, bytes, blocks FROM versions WHERE blocks > 0"
            )
        }
    maps = {v.name: v.mapped for v in check.versions if v.mapped}
    differ = {
        name[-44:]: {
            "rows without a block": sorted(set(rows.get(name, {})) - set(maps.get(name, {}))),
            "blocks without a row": sorted(set(maps.get(name, {})) - set(rows.get(name, {}))),
        }
        for name in sorted(set(rows) | set(maps))
        if rows.get(name) != maps.get(name)
    }
    assert not differ, f"the index's rows are not the maps' blocks: {differ}"
    assert per_version == {n: (sum(m.values()), len(m)) for n, m in maps.items()}
    assert index_totals(cache_dir) == (check.mapped_blocks, check.mapped_bytes)


def assert_index_counts(cache_dir: Path, check: CacheCheck) -> None:
    """Every mapped block has its row, at its own length (no header); rows of
    blocks no map has may be left while eviction races with use (see
    test_evicted_blocks_keep_no_row_once_at_rest)."""
    rows = _rows(cache_dir)
    for v in check.versions:
        have = rows.get(v.name, {})
        assert {i: have.get(i) for i in v.mapped} == v.mapped, f"{v.name}: rows {have}"


def _rows(cache_dir: Path) -> dict[str, dict[int, int]]:
    """version name -> block index -> bytes, of every row of the index."""
    rows: dict[str, dict[int, int]] = {}
    query = "SELECT v.name, b.idx, b.bytes FROM blocks AS b JOIN versions AS v ON v.id = b.version"
    with _ro(cache_dir) as conn:
        for name, idx, nbytes in conn.execute(query):
            rows.setdefault(str(name), {})[int(idx)] = int(nbytes)
    return rows


def wait_reconciled(daemon: DaemonProcess, cache_dir: Path, seconds: float = 20) -> float:
    """Wait until the daemon has run a reconcile to its end; the files it walked."""

    def done() -> bool:
        samples = scrape(daemon.url)
        walked = value(samples, "nwbcache_reconciled_files_total")
        return walked > 0 and not value(samples, "nwbcache_reconciling")

    wait_until(done, seconds, "a reconcile run to its end")
    assert not _reconcile_due(cache_dir)
    return value(scrape(daemon.url), "nwbcache_reconciled_files_total")


def requests_since(origin: S3Emulator, since: float, key: str | None = None) -> list[LoggedRequest]:
    """Origin requests (of key) that started after time.monotonic() was `since`.

    By start time, not by position in the log: the log gets an entry when a
    request finishes, so a request of a killed daemon may be logged later.
    """
    return [r for r in origin.requests(key) if r.started >= since]


def fetched_blocks(asked: Sequence[LoggedRequest], block_size: int) -> dict[str, set[int]]:
    """The blocks each key's ranged GETs covered (any other request fails)."""
    out: dict[str, set[int]] = {}
    for r in asked:
        m = _RANGE.fullmatch(r.range or "")
        assert r.method == "GET" and m is not None, (r.method, r.path, r.range)
        span = range(int(m[1]) // block_size, int(m[2]) // block_size + 1)
        out.setdefault(r.path, set()).update(span)
    return out


def run_threads(jobs: Sequence[Callable[[], None]]) -> None:
    """Run each job in its own thread; re-raise the first failure."""
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def random_readers(
    urls: Sequence[str], objects: dict[str, bytes], threads: int, reads: int, seed: int
) -> list[Callable[[], None]]:
    """Jobs doing random range reads of every object, spread over the daemons in urls."""
    keys = sorted(objects)

    def reader(n: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(seed * 1000 + n)
            for i in range(reads):
                key = rng.choice(keys)
                data = objects[key]
                start = rng.randrange(len(data))
                end = min(len(data), start + rng.randrange(1, 3 * K64))
                url = urls[(n + i) % len(urls)] + key
                body = get_range(url, start, end - 1, timeout=TIMEOUT).content
                assert body == data[start:end], f"{key} [{start}, {end}) differs"

        return run

    return [reader(n) for n in range(threads)]


def _read_exact(url: str, data: bytes) -> None:
    body, _ = get_all(url)
    assert body == data


# --------------------------------------------------------------------------- restarts


@pytest.mark.parametrize("stop", ["clean", "kill9"])
def test_only_an_unclean_stop_makes_the_next_start_reconcile(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path, stop: str
) -> None:
    """A daemon killed leaves its staging dir: the next start reconciles, so rows
    lost with it come back. A clean stop leaves none, and the next start walks
    nothing (here: rows deleted behind the daemons' backs stay missing)."""
    cache_dir = tmp_path / "cache"
    objects = put_objects(origin, "unclean", [300_000])
    first = spawn(cache_dir, "--block-size", "16K")
    key, data = next(iter(objects.items()))
    _read_exact(proxied(first.url, origin, key), data)
    blocks = block_count(len(data), 16 * 1024)
    wait_until(lambda: _index_rows(cache_dir) == blocks, 10, f"{blocks} rows flushed")
    wait_until(lambda: not _reconcile_due(cache_dir), 10, "the first start's reconcile")
    if stop == "clean":
        assert first.terminate() == 0
    else:
        first.kill9()
        assert list(Layout(cache_dir).staging.iterdir()), "a killed daemon leaves its staging dir"
    with contextlib.closing(sqlite3.connect(Layout(cache_dir).index_path)) as conn:
        conn.execute("DELETE FROM blocks WHERE idx % 2 = 0")  # rows lost with the process
        conn.commit()
    lost = blocks - blocks // 2
    second = spawn(cache_dir, "--block-size", "16K")
    if stop == "kill9":
        wait_until(lambda: _index_rows(cache_dir) == blocks, 20, "the lost rows reconciled")
    else:
        time.sleep(1.5)  # a sweep and a reconcile, if one were started, are done by now
        assert _index_rows(cache_dir) == blocks - lost
        assert not _reconcile_due(cache_dir)
    r = requests.get(proxied(second.url, origin, key), timeout=TIMEOUT)
    assert r.content == data and r.headers["X-Cache"] == "HIT"
    # The reconcile compares every entry of the version's map with the index.
    walked = value(scrape(second.url), "nwbcache_reconciled_files_total")
    assert walked == (blocks if stop == "kill9" else 0)
    assert second.terminate() == 0


def test_restart_serves_warm_cache_without_upstream(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """A cache filled by one daemon is served by the next, byte-exact, with no upstream GET."""
    cache_dir = tmp_path / "cache"
    [(key, data)] = put_objects(origin, "warm", [3_000_017]).items()
    nblocks = block_count(len(data), K64)

    first = spawn(cache_dir, "--block-size", "64K")
    body, _ = get_all(proxied(first.url, origin, key))
    assert body == data
    assert origin.requests(key, method="GET"), "the first read must come from the origin"
    # The response may end before the last group's entries are written: wait for the map.
    wait_until(lambda: mapped_blocks(cache_dir) == nblocks, 10, f"{nblocks} blocks mapped")
    pid = first.proc.pid if first.proc else -1
    assert first.terminate() == 0
    assert staging_dirs(cache_dir, pid) == [], "a clean shutdown leaves no staging dir"

    since = time.monotonic()
    second = spawn(cache_dir, "--block-size", "64K")
    rng = random.Random(1)
    for start, end in random_ranges(rng, len(data), 40, K64):
        r = get_range(proxied(second.url, origin, key), start, end - 1, timeout=TIMEOUT)
        body, outcome = r.content, r.headers["X-Cache"]
        assert body == data[start:end], f"[{start}, {end}) differs"
        assert outcome == "HIT", f"[{start}, {end}) was {outcome} after a restart"
    assert requests_since(origin, since, key) == [], "a warm restart asked the origin again"
    assert second.terminate() == 0
    check = inspect_cache(cache_dir, by_cache_key(origin, {key: data}))
    assert (check.verified, check.orphans) == (nblocks, 0)
    # One sparse data file with every block: exactly the object's bytes on disk.
    [version] = check.versions
    assert version.unmapped_allocated == 0
    rounded = -(-len(data) // FS_BLOCK) * FS_BLOCK
    assert rounded <= version.allocated <= rounded + FS_BLOCK
    assert_index_matches(cache_dir, check)


def _to_format_2(cache_dir: Path, *, block_format: int) -> dict[int, Path]:
    """Rewrite a stopped daemon's format-3 cache as a format-2 daemon left it:
    the root ``v2/``, each version's blocks in ``<vd>.<bs>/<shard>/<n>.blk``
    (64-byte header, then the bytes), no data file or map, and no index (a
    format-2 index is schema 4: lost here, rebuilt from the files). Block
    format 1 is a daemon's before CRC-32C: the same header but for the version
    (1) and the checksum (zlib's CRC-32); see the pinned format-1 header in
    test_blockfile.py. Returns the block files by index (one version)."""
    layout = Layout(cache_dir)
    written: dict[int, Path] = {}
    for map_path in sorted(layout.objects.glob(f"*/*/*{MAP_SUFFIX}")):
        stem = map_path.name.removesuffix(MAP_SUFFIX)
        data_path = map_path.with_name(stem + DATA_SUFFIX)
        raw = map_path.read_bytes()
        header = mapfile.decode_header(raw)
        entries = mapfile.decode_entries(raw[mapfile.HEADER_SIZE :])
        data = data_path.read_bytes()
        for n, (_, length) in enumerate(entries):
            if not length:
                continue
            block = data[header.offset_of(n) : header.offset_of(n) + length]
            file = bytearray(blockfile.encode_header(n, block, header.digest) + block)
            if block_format == 1:
                file[8:10] = (1).to_bytes(2, "little")
                file[28:32] = zlib.crc32(block).to_bytes(4, "little")
            path = map_path.parent / stem / block_relpath(n)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(file)
            written[n] = path
        data_path.unlink()
        map_path.unlink()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{layout.index_path}{suffix}").unlink(missing_ok=True)
    os.rename(layout.root, cache_dir / "v2")
    return {n: cache_dir / "v2" / p.relative_to(layout.root) for n, p in written.items()}


def test_a_cache_of_format_2_with_block_format_1_is_moved_served_and_checked(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """A format-2 cache (a file per block) whose blocks predate CRC-32C (block
    format 1): the next start moves them into the version's data file and map,
    then serves them byte-exact without asking upstream; one of them rotted is
    caught by its own CRC-32, not moved, and fetched again; the index counts
    blocks at their own length; ``nwbcache check`` finds the cache sound."""
    cache_dir = tmp_path / "cache"
    key, data, nblocks = cached_then_stopped(origin, spawn, cache_dir, "old")
    files = _to_format_2(cache_dir, block_format=1)
    assert sorted(files) == list(range(nblocks))
    assert {blockfile.decode_header(p.read_bytes()).version for p in files.values()} == {1}
    rotted = files[3]
    raw = bytearray(rotted.read_bytes())
    raw[blockfile.HEADER_SIZE + 100] ^= 0x01
    rotted.write_bytes(raw)

    since = time.monotonic()
    second = spawn(cache_dir, "--block-size", "64K")
    assert not (cache_dir / "v2").exists(), "the format-2 root was not taken over"
    wait_reconciled(second, cache_dir)
    root = Layout(cache_dir).root
    assert list(root.rglob("*.blk")) == [], "block files left after the move"
    assert [p for p in root.glob("objects/*/*/*") if p.is_dir()] == [], "a version dir left"
    url = proxied(second.url, origin, key)
    for index in range(nblocks):
        start, end = block_span(index, len(data), K64)
        r = get_range(url, start, end - 1, timeout=TIMEOUT)
        assert r.content == data[start:end], f"block {index} differs"
        assert r.headers["X-Cache"] == ("MISS" if index == 3 else "HIT"), index
    start, end = block_span(3, len(data), K64)
    origin.wait_idle()  # a request is logged once its response is sent
    asked = requests_since(origin, since, key)
    assert [(r.method, r.range) for r in asked] == [("GET", f"bytes={start}-{end - 1}")]
    assert second.terminate() == 0
    check = inspect_cache(cache_dir, by_cache_key(origin, {key: data}))
    assert (check.verified, check.orphans) == (nblocks, 0)
    assert check.unmapped_allocated == 0
    assert_index_matches(cache_dir, check)
    done = subprocess.run(
        [sys.executable, "-m", "nwbcache_proxy", "check", "--cache-dir", str(cache_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- kill -9


def _unmap_leaving_bytes(check: CacheCheck, cache_dir: Path) -> tuple[str, int, int]:
    """What a crash between a group's bytes and its entries leaves: the last
    mapped block of the version with the most, its entry zeroed, its bytes
    left in the data file. Returns (version name, block index, its length)."""
    version = max(check.versions, key=lambda v: len(v.mapped))
    assert len(version.mapped) >= 2, "too few blocks mapped to unmap one"
    last = max(version.mapped)
    map_path = Layout(cache_dir).root / (version.name + MAP_SUFFIX)
    fd = os.open(map_path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(mapfile.ENTRY_SIZE), mapfile.entry_offset(last))
    finally:
        os.close(fd)
    return version.name, last, version.mapped[last]


@pytest.mark.parametrize("fsync", [False, True], ids=["default", "fsync"])
def test_kill9_during_fetches_leaves_only_whole_blocks(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path, fsync: bool
) -> None:
    """kill -9 with fetches in flight (with and without --fsync): every mapped
    block whole and exact, the dead staging dir is swept, the reconcile punches
    out every byte no entry maps and makes the index the maps' blocks, the next
    daemon serves everything exact and never re-fetches a surviving block."""
    cache_dir = tmp_path / "cache"
    flags = ["--block-size", "64K", "--fsync", "true" if fsync else "false"]
    objects = put_objects(origin, "kill", [1_500_000 + i * 4099 for i in range(4)])
    total_blocks = sum(block_count(len(d), K64) for d in objects.values())
    origin.bandwidth = 2_000_000  # bytes/s per response: fetches last ~0.75 s each
    daemon = spawn(cache_dir, *flags)
    stop = threading.Event()
    complete: list[str] = []

    def full_reader(key: str) -> Callable[[], None]:
        def run() -> None:
            try:
                r = requests.get(proxied(daemon.url, origin, key), timeout=TIMEOUT)
            except requests.RequestException:
                return  # cut by the kill
            if r.status_code == 200:
                assert r.content == objects[key], f"{key}: a completed body differs"
                complete.append(key)

        return run

    def range_reader(key: str, seed: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(seed)
            data = objects[key]
            url = proxied(daemon.url, origin, key)
            while not stop.is_set():
                start = rng.randrange(len(data))
                end = min(len(data), start + rng.randrange(1, 2 * K64))
                try:
                    body = get_range(url, start, end - 1, timeout=TIMEOUT).content
                except requests.RequestException:
                    return
                assert body == data[start:end], f"{key} [{start}, {end}) differs"

        return run

    jobs = [full_reader(k) for k in objects] + [range_reader(k, i) for i, k in enumerate(objects)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(job) for job in jobs]
        wait_until(lambda: mapped_blocks(cache_dir) >= 8, 15, "8 blocks mapped")
        pid = daemon.proc.pid if daemon.proc else -1
        daemon.kill9()
        stop.set()
        for future in futures:
            future.result()
    assert len(complete) < len(objects), "every full read finished before the kill"
    assert staging_dirs(cache_dir, pid), "kill -9 should leave the staging dir behind"

    originals = by_cache_key(origin, objects)
    crashed = inspect_cache(cache_dir, originals, settled=False)  # as the crash left them
    survivors = crashed.mapped_blocks
    assert survivors < total_blocks, "the kill came too late to interrupt any fetch"
    # A crash between a group's bytes and its entries (microseconds wide, so
    # made here): bytes no entry maps, which the reconcile must punch out.
    leftover, unmapped, length = _unmap_leaving_bytes(crashed, cache_dir)
    left = inspect_cache(cache_dir, originals, settled=False)
    assert left.unmapped_allocated == crashed.unmapped_allocated + length
    assert left.mapped_blocks == survivors - 1
    warm = {
        key: set(v.mapped) if (v := left.of(origin.url + key)) is not None else set()
        for key in objects
    }

    origin.bandwidth = None
    since = time.monotonic()
    again = spawn(cache_dir, *flags)
    wait_until(lambda: not staging_dirs(cache_dir, pid), 5, "the dead daemon's staging swept")
    wait_reconciled(again, cache_dir)
    # Reconciled, before any read: no byte allocated that no entry maps, a map
    # for every data file and a data file for every map, and the index counts
    # exactly the mapped blocks at their own length.
    reconciled = inspect_cache(cache_dir, originals)
    assert reconciled.unmapped_allocated == 0, [
        (v.name, v.unmapped_allocated) for v in reconciled.versions if v.unmapped_allocated
    ]
    assert reconciled.mapped_blocks == survivors - 1
    assert unmapped not in next(v.mapped for v in reconciled.versions if v.name == leftover)
    assert_index_matches(cache_dir, reconciled)

    for n, (key, data) in enumerate(objects.items()):
        url = proxied(again.url, origin, key)
        body, _ = get_all(url)
        assert body == data, f"{key} differs after the crash"
        for start, end in random_ranges(random.Random(n), len(data), 10, K64):
            body = get_range(url, start, end - 1, timeout=TIMEOUT).content
            assert body == data[start:end], f"{key} [{start}, {end}) differs after the crash"
    # Blocks that survived the crash are served from disk, never fetched again.
    origin.wait_idle()  # a request is logged once its response is sent
    for path, fetched in fetched_blocks(requests_since(origin, since), K64).items():
        assert not fetched & warm[path], f"{path}: cached blocks fetched again: {fetched}"
    assert again.terminate() == 0
    final = inspect_cache(cache_dir, originals)
    assert final.verified == total_blocks
    assert final.unmapped_allocated == 0
    assert_index_matches(cache_dir, final)


# --------------------------------------------------------------------------- damage


def test_damaged_blocks_are_dropped_and_fetched_again(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """Blocks whose bytes or entries went bad while no daemon ran (a rotted bit,
    a torn write after a power cut, a hole where a mapped block was, an entry's
    checksum or length wrong) are never served: each is a miss, fetched again
    alone, byte-exact, and mapped again; every other block is a hit."""
    cache_dir = tmp_path / "cache"
    key, data, nblocks = cached_then_stopped(origin, spawn, cache_dir, "damaged")

    data_path, map_path = version_files(cache_dir, origin, key)
    fd = os.open(data_path, os.O_RDWR)
    try:
        raw = bytearray(os.pread(fd, 1, 2 * K64 + 100))  # 2: one bit rotted
        raw[0] ^= 0x10
        os.pwrite(fd, raw, 2 * K64 + 100)
        os.pwrite(fd, bytes(K64 // 2), 4 * K64 + K64 // 2)  # 4: torn, its second half zeros
        punch_hole(fd, 6 * K64, K64)  # 6: a hole under its entry
    finally:
        os.close(fd)
    entries = bytearray(map_path.read_bytes())

    def entry(n: int) -> slice:
        return slice(mapfile.entry_offset(n), mapfile.entry_offset(n) + mapfile.ENTRY_SIZE)

    crc, length = mapfile.decode_entries(bytes(entries[entry(8)]))[0]
    entries[entry(8)] = (crc ^ 1).to_bytes(4, "little") + length.to_bytes(4, "little")  # 8
    crc, length = mapfile.decode_entries(bytes(entries[entry(10)]))[0]
    entries[entry(10)] = crc.to_bytes(4, "little") + (length - 1).to_bytes(4, "little")  # 10
    last = nblocks - 1  # short: its entry claims a whole block
    crc, length = mapfile.decode_entries(bytes(entries[entry(last)]))[0]
    assert length < K64
    entries[entry(last)] = crc.to_bytes(4, "little") + K64.to_bytes(4, "little")
    map_path.write_bytes(entries)
    damaged = {2, 4, 6, 8, 10, last}

    since = time.monotonic()
    second = spawn(cache_dir, "--block-size", "64K")
    url = proxied(second.url, origin, key)
    for index in range(nblocks):
        start, end = block_span(index, len(data), K64)
        r = get_range(url, start, end - 1, timeout=TIMEOUT)
        assert r.content == data[start:end], f"block {index} differs"
        assert r.headers["X-Cache"] == ("MISS" if index in damaged else "HIT"), index
    origin.wait_idle()  # a request is logged once its response is sent
    asked = sorted((r.method, r.range or "") for r in requests_since(origin, since, key))
    spans = [block_span(i, len(data), K64) for i in damaged]
    assert asked == sorted(("GET", f"bytes={start}-{end - 1}") for start, end in spans)
    assert second.terminate() == 0
    check = inspect_cache(cache_dir, by_cache_key(origin, {key: data}))
    assert (check.verified, check.orphans) == (nblocks, 0)
    assert check.unmapped_allocated == 0
    assert_index_matches(cache_dir, check)


def _damage_map(damage: str, a: tuple[Path, Path], b: tuple[Path, Path]) -> None:
    """Damage the files ``a`` (data, map) of one version; ``b`` is another's."""
    (a_data, a_map), (b_data, b_map) = a, b
    if damage == "magic":
        raw = bytearray(a_map.read_bytes())
        raw[0] ^= 0xFF
        a_map.write_bytes(raw)
    elif damage == "short":  # torn: shorter than its header
        a_map.write_bytes(a_map.read_bytes()[:40])
    elif damage == "other-map":  # another version's map beside this one's data
        shutil.copyfile(b_map, a_map)
    elif damage == "other-data":  # another version's bytes under this one's map
        shutil.copyfile(b_data, a_data)
    elif damage == "other-version":  # another version's files, whole, under this one's name
        shutil.copyfile(b_map, a_map)
        shutil.copyfile(b_data, a_data)
    else:
        raise AssertionError(damage)


@pytest.mark.parametrize("damage", ["magic", "short", "other-map", "other-data", "other-version"])
def test_a_map_never_pairs_with_another_versions_data(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path, damage: str
) -> None:
    """A map that is not its version's (a bad header, torn short, another
    version's copied over, with or without that version's data) or a data
    file of another version's bytes: the version's blocks are never served
    from it; the object is fetched again, byte-exact, and its files made
    anew; the other version is untouched and still a hit."""
    cache_dir = tmp_path / "cache"
    objects = put_objects(origin, "binding", [1_000_003, 1_000_003])
    (key_a, data_a), (key_b, data_b) = objects.items()
    nblocks = block_count(len(data_a), K64)
    first = spawn(cache_dir, "--block-size", "64K")
    for key, data in objects.items():
        assert get_all(proxied(first.url, origin, key))[0] == data
    wait_until(lambda: mapped_blocks(cache_dir) == 2 * nblocks, 10, "both objects mapped")
    assert first.terminate() == 0
    files_a = version_files(cache_dir, origin, key_a)
    files_b = version_files(cache_dir, origin, key_b)
    _damage_map(damage, files_a, files_b)

    since = time.monotonic()
    second = spawn(cache_dir, "--block-size", "64K")
    body, outcome = get_all(proxied(second.url, origin, key_a))
    assert body == data_a, "served bytes that are not the object's"
    assert outcome != "HIT", outcome
    origin.wait_idle()  # a request is logged once its response is sent: the last block's
    fetched = fetched_blocks(requests_since(origin, since, key_a), K64)
    assert fetched == {key_a: set(range(nblocks))}, "not every block fetched again"
    body, outcome = get_all(proxied(second.url, origin, key_b))
    assert (body, outcome) == (data_b, "HIT")
    assert requests_since(origin, since, key_b) == []
    wait_until(lambda: mapped_blocks(cache_dir) == 2 * nblocks, 10, "both objects mapped")
    assert second.terminate() == 0
    check = inspect_cache(cache_dir, by_cache_key(origin, objects))
    assert (check.verified, check.orphans) == (2 * nblocks, 0)
    assert check.unmapped_allocated == 0
    assert_index_matches(cache_dir, check)


@pytest.mark.parametrize("left", ["data", "map"])
def test_half_a_version_is_never_paired_with_new_files(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path, left: str
) -> None:
    """A version's data file without its map (a drop killed between its two
    unlinks), or a map without its data file: it opens as no version. The
    next fill makes both files anew: none of the old bytes stays in the new
    data file (they would take space no entry maps), and no old entry maps a
    block the new data file does not hold. (The daemon before was stopped
    cleanly, so no reconcile clears the lone file first: the fill meets it.)"""
    cache_dir = tmp_path / "cache"
    key, data, _ = cached_then_stopped(origin, spawn, cache_dir, "half")
    data_path, map_path = version_files(cache_dir, origin, key)
    (map_path if left == "data" else data_path).unlink()

    since = time.monotonic()
    second = spawn(cache_dir, "--block-size", "64K")
    url = proxied(second.url, origin, key)
    r = get_range(url, 0, 3 * K64 - 1, timeout=TIMEOUT)  # blocks 0 to 2
    assert (r.content, r.headers["X-Cache"]) == (data[: 3 * K64], "MISS")
    origin.wait_idle()  # logged once sent; read-ahead's fetches too
    assert {0, 1, 2} <= fetched_blocks(requests_since(origin, since, key), K64)[key]
    assert second.terminate() == 0
    # A read-ahead fetch started after the wait above and cut by the stop is
    # logged when the origin's handler ends, which may be after the stop.
    origin.wait_idle()
    check = inspect_cache(cache_dir, by_cache_key(origin, {key: data}))
    [version] = check.versions
    assert {0, 1, 2} <= set(version.mapped)
    assert set(version.mapped) <= fetched_blocks(requests_since(origin, since, key), K64)[key]
    assert version.unmapped_allocated == 0, "old bytes kept in the new data file"
    assert_index_counts(cache_dir, check)


# --------------------------------------------------------------------------- sharing


def test_two_daemons_share_one_cache_dir(origin: S3Emulator, spawn: Spawn, tmp_path: Path) -> None:
    """Two processes on one directory, read at once: every byte exact, every
    block whole, no byte written that no entry maps, one row per mapped block."""
    cache_dir = tmp_path / "cache"
    objects = put_objects(origin, "shared", [1_000_003 + i * 7919 for i in range(4)])
    a = spawn(cache_dir, "--block-size", "64K")
    b = spawn(cache_dir, "--block-size", "64K")
    urls = [f"{d.url}/http/{origin_host(origin)}" for d in (a, b)]
    run_threads(random_readers(urls, objects, threads=8, reads=25, seed=3))
    for url in urls:
        for key, data in objects.items():
            body, _ = get_all(url + key)
            assert body == data, f"{key} via {url} differs"
    assert a.terminate() == 0
    assert b.terminate() == 0
    check = inspect_cache(cache_dir, by_cache_key(origin, objects))
    assert check.verified == sum(block_count(len(d), K64) for d in objects.values())
    assert check.unmapped_allocated == 0
    assert_index_matches(cache_dir, check)


def test_two_workers_serve_exact_bytes(origin: S3Emulator, spawn: Spawn, tmp_path: Path) -> None:
    """--workers 2: concurrent random reads exact, upstream reads by the daemon, blocks whole."""
    cache_dir = tmp_path / "cache"
    objects = put_objects(origin, "workers", [900_001 + i * 6151 for i in range(4)])
    daemon = spawn(cache_dir, "--block-size", "64K", "--workers", "2")
    url = f"{daemon.url}/http/{origin_host(origin)}"
    run_threads(random_readers([url], objects, threads=8, reads=25, seed=4))
    for key, data in objects.items():
        body, _ = get_all(url + key)
        assert body == data
        seen = origin.requests(key)
        assert seen, f"{key} never reached the origin"
        assert all((r.user_agent or "").startswith("nwbcache/") for r in seen), {
            r.user_agent for r in seen
        }
    assert daemon.terminate() == 0
    check = inspect_cache(cache_dir, by_cache_key(origin, objects))
    assert check.verified == sum(block_count(len(d), K64) for d in objects.values())
    assert check.unmapped_allocated == 0
    assert_index_matches(cache_dir, check)


def test_workers_share_keep_alive_connections(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """--workers 2: many keep-alive connections are spread over both workers.

    With one listening socket shared by the workers, a burst of connections
    went to whichever worker woke first, and keep-alive clients then stayed
    there (two workers served no more than one). Request ids start with a
    per-process prefix, so they tell which worker answered.
    """
    origin.put("/b/spread", os.urandom(100_000))
    daemon = spawn(tmp_path / "cache", "--workers", "2")
    target = urllib.parse.urlsplit(proxied(daemon.url, origin, "/b/spread"))
    # A burst of 16 connections, all connected before any request (as wrk or
    # a pool of readers starting together do), then one request on each.
    conns = [http.client.HTTPConnection(target.netloc, timeout=TIMEOUT) for _ in range(16)]
    prefixes = set()
    try:
        for conn in conns:
            conn.connect()
        for conn in conns:
            conn.request("GET", target.path, headers={"Range": "bytes=0-99"})
            r = conn.getresponse()
            assert r.status == 206 and len(r.read()) == 100
            prefixes.add(r.headers["X-Request-Id"][:6])
    finally:
        for conn in conns:
            conn.close()
    # The kernel hashes each connection to one of the two sockets: all 16 on
    # one worker would happen with probability 2**-15.
    assert len(prefixes) == 2
    assert daemon.terminate() == 0


# --------------------------------------------------------------------------- the bound


def test_eviction_keeps_cache_bounded_and_lru(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """12 MB read through a 2 MiB cache: the mapped blocks and the data files'
    allocation come back under the bound (evicted blocks' holes punched), the
    oldest object is fetched again and the newest one is still a hit."""
    cache_dir = tmp_path / "cache"
    capacity = 2 * 1024 * 1024
    objects = put_objects(origin, "evict", [1_000_000 + i * 1021 for i in range(12)])
    keys = sorted(objects)
    originals = by_cache_key(origin, objects)
    daemon = spawn(cache_dir, "--block-size", "64K", "--cache-size", "2M")
    for key in keys:
        body, _ = get_all(proxied(daemon.url, origin, key))
        assert body == objects[key]

    # No overshoot is allowed once the reads have stopped. The documented one
    # (what is written between two passes, plus blocks in flight) exists only
    # while blocks are being written. The index counts each block at its own
    # length (no header; meta.json and maps are not counted, and neither are
    # they here), and a pass runs at least once a second whenever the indexed
    # total exceeds the capacity, so at rest the mapped blocks total <= capacity.
    # A response's last blocks may still be on their way to disk when it
    # ends (a client is sent them from memory), so at rest is once the
    # bound holds for the maps, the allocation and the index together.
    def bounded() -> bool:
        usage = disk_usage(cache_dir)
        return usage.bytes <= capacity and usage.allocated <= capacity + SLACK

    def at_rest() -> CacheCheck | None:
        if not bounded():
            return None
        check = inspect_cache(cache_dir, originals)
        totals = index_totals(cache_dir)
        indexed = totals is not None and totals[1] <= capacity
        return check if check.mapped_bytes <= capacity and indexed and bounded() else None

    wait_until(at_rest, 10, f"mapped blocks, allocation and index <= {capacity} B")
    check = at_rest()
    assert check is not None
    # An evicted block's bytes are punched out, not left behind unmapped.
    assert check.unmapped_allocated == 0
    for v in check.versions:
        rounded = sum(-(-n // FS_BLOCK) * FS_BLOCK for n in v.mapped.values())
        assert v.allocated <= rounded + FS_BLOCK, (v.name, v.allocated, rounded)

    newest, oldest = keys[-1], keys[0]
    since = time.monotonic()
    body, outcome = get_all(proxied(daemon.url, origin, newest))
    assert body == objects[newest]
    assert outcome == "HIT", "the most recently read object was evicted"
    assert requests_since(origin, since, newest) == []

    oldest_left = check.of(origin.url + oldest)
    left = len(oldest_left.mapped) if oldest_left is not None else 0
    assert left < block_count(len(objects[oldest]), K64), "nothing was evicted"
    since = time.monotonic()
    body, outcome = get_all(proxied(daemon.url, origin, oldest))
    assert body == objects[oldest]
    assert outcome != "HIT"
    origin.wait_idle()  # a request is logged once its response is sent
    refetched = [r for r in requests_since(origin, since, oldest) if r.method == "GET"]
    assert refetched, "evicted blocks were not fetched again"
    assert daemon.terminate() == 0
    final = inspect_cache(cache_dir, originals)
    assert final.unmapped_allocated == 0
    assert_index_counts(cache_dir, final)


def test_eviction_stops_at_the_low_water_mark(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """Just over capacity: a pass frees what is needed to reach 95 %, not everything."""
    cache_dir = tmp_path / "cache"
    capacity = 2 * 1024 * 1024
    # 3 x 12 blocks = 2 220 000 B: over capacity once all are written.
    objects = put_objects(origin, "lowwater", [740_000] * 3)
    originals = by_cache_key(origin, objects)
    daemon = spawn(cache_dir, "--block-size", "64K", "--cache-size", "2M")
    for key, data in objects.items():
        body, _ = get_all(proxied(daemon.url, origin, key))
        assert body == data

    def evicted() -> float:  # across the small and main queues
        samples = scrape(daemon.url)
        return sum(
            value(samples, "nwbcache_cache_evictions_total", queue=q) for q in ("small", "main")
        )

    # A pass that evicted (the last group's entries may land after the client
    # has its bytes: the disk alone can be under capacity before any pass).
    wait_until(lambda: evicted() > 0, 10, "an eviction pass")
    wait_until(lambda: disk_usage(cache_dir).bytes <= capacity, 10, "the pass's punches")
    # Evicting blocks until they and their files (footprint.py: 3 versions, 36
    # blocks when it began) take <= 95 % overshoots by less than one block.
    low_water = int(capacity * 0.95) - footprint.overhead(3, 36) - K64
    assert disk_usage(cache_dir).bytes >= low_water, "eviction went far below its low-water mark"
    assert daemon.terminate() == 0
    check = inspect_cache(cache_dir, originals)
    assert low_water <= check.mapped_bytes <= capacity
    assert check.unmapped_allocated == 0
    assert_index_counts(cache_dir, check)


def test_evicted_blocks_keep_no_row_once_at_rest(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """Objects read one after the other through a cache far smaller than them
    (each fill's own blocks are evicted while it runs): at rest, after a
    clean stop, the index's rows are exactly the mapped blocks. A row of a
    block that is gone makes the cache believe it holds more than it does,
    and only a reconcile (after an unclean stop) would drop it."""
    cache_dir = tmp_path / "cache"
    objects = put_objects(origin, "rows", [1_000_000 + i * 1021 for i in range(12)])
    daemon = spawn(cache_dir, "--block-size", "64K", "--cache-size", "2M")
    keys = sorted(objects)

    def reader(n: int) -> Callable[[], None]:
        def run() -> None:
            for key in [*keys[n::4], *keys[n::4]]:  # again: their ghosts come back
                assert get_all(proxied(daemon.url, origin, key))[0] == objects[key]

        return run

    run_threads([reader(n) for n in range(4)])
    originals = by_cache_key(origin, objects)
    wait_until(lambda: disk_usage(cache_dir).bytes <= 2 << 20, 10, "an eviction pass")
    assert daemon.terminate() == 0
    assert_index_matches(cache_dir, inspect_cache(cache_dir, originals))


def test_start_with_many_blocks_and_lost_index(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """~5000 blocks and no index: serves at once, exact; the index is rebuilt
    from the maps, each block at its own length."""
    cache_dir = tmp_path / "cache"
    block = 4 * 1024
    objects = put_objects(origin, "many", [10_000_000, 10_000_001])
    expected = sum(block_count(len(d), block) for d in objects.values())
    first = spawn(cache_dir, "--block-size", "4K")
    run_threads([partial(_read_exact, proxied(first.url, origin, k), objects[k]) for k in objects])
    wait_until(lambda: mapped_blocks(cache_dir) == expected, 20, f"{expected} blocks mapped")
    assert first.terminate() == 0

    index = Layout(cache_dir).index_path
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    originals = by_cache_key(origin, objects)
    on_disk = inspect_cache(cache_dir, originals)
    assert on_disk.verified == expected
    assert on_disk.mapped_bytes == sum(len(d) for d in objects.values())

    since = time.monotonic()
    daemon = spawn(cache_dir, "--block-size", "4K")
    health = requests.get(f"{daemon.url}/healthz", timeout=5)
    assert health.status_code == 200
    key = sorted(objects)[0]
    data = objects[key]
    r = get_range(proxied(daemon.url, origin, key), 5000, 19999, timeout=TIMEOUT)
    body, outcome = r.content, r.headers["X-Cache"]
    assert body == data[5000:20000]
    assert outcome == "HIT"

    want = (expected, on_disk.mapped_bytes)
    wait_until(lambda: index_totals(cache_dir) == want, 30, f"index totals {want}")
    for key, data in objects.items():
        body, outcome = get_all(proxied(daemon.url, origin, key))
        assert body == data
        assert outcome == "HIT"
    assert requests_since(origin, since) == [], "blocks on disk were fetched again without an index"
    assert daemon.terminate() == 0
    assert_index_matches(cache_dir, inspect_cache(cache_dir, originals))


# --------------------------------------------------------------------------- regressions


def test_staging_dir_survives_a_daemon_starting_while_it_is_created(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deterministic replay of the race between two daemons starting on one cache dir."""
    cache_dir = tmp_path / "cache"
    real_flock = fcntl.flock
    raced: list[int] = []

    def flock_after_another_daemon_started(fd: int, operation: int) -> None:
        if not raced:  # the first lock taken: this process's own staging dir
            raced.append(fd)
            spawn(cache_dir).terminate()  # another daemon starts (and sweeps) right now
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_another_daemon_started)
    staging = Staging(Layout(cache_dir))
    monkeypatch.undo()
    try:
        assert raced, "Staging took no lock"
        assert staging.path.is_dir(), "the staging dir of a live process was swept"
        staging.temp_path().write_bytes(b"meta")  # what write_meta does next
    finally:
        staging.close()


def test_sigterm_while_a_worker_is_being_restarted_stops_the_daemon(tmp_path: Path) -> None:
    """The first workers die at start-up (staging is a file); SIGTERM lands in the restart pause."""
    cache_dir = tmp_path / "cache"
    staging = Layout(cache_dir).root / "staging"
    staging.parent.mkdir(parents=True)
    staging.write_text("")  # not a directory: Staging() fails, so the worker exits
    cmd = [sys.executable, "-m", "nwbcache_proxy", "serve", "--port", "0", "--s3-listen", "off"]
    cmd += ["--cache-dir", str(cache_dir), "--allow-upstream", "127.0.0.1:9", "--workers", "2"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    restarting = threading.Event()

    def watch() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "restarting" in line:
                restarting.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert restarting.wait(20), "no worker died at start-up"
        staging.unlink()  # the re-spawned worker will start fine
        os.killpg(proc.pid, signal.SIGTERM)  # the parent logs, then sleeps 0.5 s: we are in it
        try:
            code: int | None = proc.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, "the daemon did not exit within 10 s of SIGTERM"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        watcher.join(5)
