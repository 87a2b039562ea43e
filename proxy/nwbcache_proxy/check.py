"""``nwbcache check``: verify the cached blocks and the index, streaming and resumable.

A sorted walk over ``objects/<p>/<kh>/``, one object dir at a time: meta.json,
each version's map header (against meta.json for the current version), every
block its map has read under a read lock and verified against its entry
(length, CRC-32C), each chunk of the map compared with the index
(reconcile.py); other versions' blocks are ``stale``, blocks of formats 1
and 2 still in their files ``unmoved``; then rows of versions without a map.
After each object a cursor is saved, so an interrupted check resumes. Safe
while daemons run: only blocks failing verification are removed (under the
write lock of their span), the index is repaired in transactions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm  # type: ignore[import-untyped]

from nwbcache.urls import InvalidURL, key_of

from . import mapfile, reconcile, schema, store, wholeversions
from .blockfile import CorruptBlock
from .checkreport import MAX_CORRUPT, CheckReport
from .layout import DATA_SUFFIX, MAP_SUFFIX, Layout, key_hash
from .mapfile import MapHeader
from .objectmeta import ObjectMeta
from .reconcile import chunk_count, chunk_span, scan_dir
from .sparse import data_extents
from .versionfile import Busy, VersionFiles

VERSION_BATCH = 256  # versions rows per step of the last phase
CURSOR_FORMAT = 1
_VERSIONS_PHASE = "~"  # the last phase's position sorts after every object's


class CheckError(Exception):
    """A check that cannot run as asked: bad options, nothing to resume (exit status 2)."""


@dataclasses.dataclass(frozen=True, slots=True)
class CheckOptions:
    """What shapes a run: a resumed run must be given the same."""

    repair: bool = False
    sample: float = 1.0  # the fraction of blocks read and verified
    seed: int | None = None  # of the sample; None: a random one (reported)
    prefix: str | None = None  # only objects whose cache key starts with this
    key: str | None = None  # only the object of this cache key


def url_key(url: str, *, prefix: bool = False) -> str:
    """The cache key of an object's URL (``--object``), or of a URL prefix (``--prefix``):
    scheme and host lowercased, default port dropped, s3:// as https://, signature
    parameters removed. A prefix ending with the host means the whole host."""
    try:
        return key_of(url, prefix=prefix)
    except InvalidURL as exc:
        raise CheckError(f"{'--prefix' if prefix else '--object'}: {exc}") from None


def check_cache(
    cache_dir: Path, options: CheckOptions | None = None, *, resume: bool = False,
    progress: bool = False, on_object: Callable[[str, CheckReport], None] | None = None,
) -> CheckReport:  # fmt: skip
    """Check (with ``options.repair``, repair) the cache. ``resume``: go on from the
    cursor (CheckError if none, or its options differ). ``on_object(<p>/<kh>,
    report)`` runs after each object's cursor is saved. KeyboardInterrupt
    returns the report as of the cursor, ``interrupted``."""
    layout = Layout(cache_dir)
    options = options or CheckOptions()
    if not 0 < options.sample <= 1:
        raise CheckError(f"--sample must be a fraction in (0, 1], not {options.sample:g}")
    if options.prefix is not None and options.key is not None:
        raise CheckError("give --prefix or --object, not both")
    legacy = [r for r in layout.legacy_roots if r.is_dir()]
    if not layout.root.is_dir() and legacy:
        raise CheckError(f"{legacy[0]} is an older format: a daemon converts it at start")
    if resume:
        options, position, report = _load_cursor(layout, options)
    else:
        seed = options.seed if options.sample < 1 else None
        seed = secrets.randbelow(2**31) if seed is None and options.sample < 1 else seed
        options, position = dataclasses.replace(options, seed=seed), []
        report = CheckReport(sample=options.sample, seed=seed, repaired=options.repair)
        if options.key is not None:
            report.scope, report.index_phase = f"the object {options.key}", "its versions"
        elif options.prefix is not None:
            report.scope = f"cache keys starting with {options.prefix}"
            report.index_phase = "versions of objects whose meta.json has the prefix"
    if not layout.root.is_dir():
        return report  # no cache yet: nothing to check
    exists = layout.index_path.exists() or options.repair
    conn = schema.connect(layout.index_path) if exists else None
    try:
        whole = options.prefix is None and options.key is None
        total = schema.totals(conn)[1] if conn is not None and whole else None
        with tqdm(
            total=total, initial=report.blocks, unit="blk", unit_scale=True,
            disable=not progress, desc="nwbcache check", dynamic_ncols=True,
        ) as bar:  # fmt: skip
            run = _Run(layout, options, conn, report, bar, on_object)
            try:
                run.walk(position)
            except KeyboardInterrupt:
                return CheckReport(**{**run.saved, "interrupted": True})
    finally:
        if conn is not None:
            conn.close()
    store.unlink_quietly(layout.check_cursor)
    return report


def _load_cursor(layout: Layout, opts: CheckOptions) -> tuple[CheckOptions, list[str], CheckReport]:
    path = layout.check_cursor
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CURSOR_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        saved = CheckOptions(**data["options"])
        position = [part for part in str(data["position"]).split("/") if part]
        report = CheckReport(**{**data["report"], "resumed": True})
    except FileNotFoundError:
        raise CheckError(f"no interrupted check to resume ({path} does not exist)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckError(f"unreadable cursor {path} ({exc}): run without --resume") from None
    if opts.seed is None:
        opts = dataclasses.replace(opts, seed=saved.seed)
    if opts != saved:
        raise CheckError(
            f"the interrupted check ran with other options ({saved}, not {opts}): resume "
            "with the same options, or start over without --resume"
        )
    return saved, position, report


class _Run:
    """One walk, from a position (``[]``, ``[p, kh]`` or ``["~", version id]``)."""

    def __init__(
        self, layout: Layout, options: CheckOptions, conn: sqlite3.Connection | None,
        report: CheckReport, bar: Any, on_object: Callable[[str, CheckReport], None] | None,
    ) -> None:  # fmt: skip
        self.layout, self.opts, self.conn, self.report = layout, options, conn, report
        self.bar, self.on_object = bar, on_object
        self.threshold = int(options.sample * 2**64)
        self.saved: dict[str, Any] = dataclasses.asdict(report)
        self.started, self.read_bytes = time.monotonic(), 0  # for the rate shown
        self.begin = "BEGIN IMMEDIATE" if options.repair else "BEGIN"
        kh = key_hash(options.key) if options.key is not None else None
        self.only = None if kh is None else self.layout.relative(self.layout.object_dir(kh))

    def walk(self, position: list[str]) -> None:
        self.save(position)
        for p, kh in self._objects(position):
            self.report.objects += self._object(p, kh)
            self.save([p, kh])
            if self.on_object is not None:
                self.on_object(f"{p}/{kh}", self.report)
        if self.conn is None:
            self.report.index_phase = "skipped: there is no index"
        else:
            self._versions_phase(self.conn, position)

    def save(self, position: list[str]) -> None:
        """The cursor: where the walk is, its options and the counts so far."""
        snapshot = dataclasses.asdict(self.report)
        data = {"format": CURSOR_FORMAT, "options": dataclasses.asdict(self.opts)}
        data.update(position="/".join(position), report=snapshot)
        tmp = self.layout.check_cursor.with_name(f"check.cursor.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.layout.check_cursor)
        self.saved = snapshot  # once on disk: an interrupt returns what a resume starts from

    def _objects(self, position: list[str]) -> Iterator[tuple[str, str]]:
        """(p, kh) of the objects after ``position``, in order."""
        if self.only is not None:
            p, kh = self.only.split("/")[1:3]
            yield from [(p, kh)] if not position or [p, kh] > position else []
            return
        for p in _subdirs(self.layout.objects):
            if not position or p >= position[0]:
                yield from (
                    (p, kh) for kh in _subdirs(self.layout.objects / p) if [p, kh] > position
                )

    def _object(self, p: str, kh: str) -> bool:
        """Check one object dir; False if it is not there or not selected."""
        path = self.layout.objects / p / kh
        raw = store.read_meta(path / "meta.json") or {}
        key = raw["cache_key"] if isinstance(raw.get("cache_key"), str) else None
        if self.opts.prefix is not None and not (key or "\0").startswith(self.opts.prefix):
            return False  # a missing or unreadable meta.json: not known to match
        meta = ObjectMeta.from_json(raw, key) if key is not None else None
        if meta is not None and key_hash(meta.cache_key) != kh:
            meta = None  # misplaced: trusted for no block here
        stems = reconcile.stems_in(path)
        for stem in stems:
            legacy = _legacy_indices(path / stem)
            self.report.unmoved += len(legacy)
            mine = meta is not None and path / stem == self.layout.version_stem(
                kh, meta.digest, Layout.block_size_of(stem) or 0
            )
            self._version(path, stem, meta if mine else None, legacy)
        return bool(stems or raw)

    def _version(self, odir: Path, stem: str, meta: ObjectMeta | None, legacy: set[int]) -> None:
        """``legacy``: its blocks still in format-1 or -2 files (their rows are kept)."""
        name = self.layout.relative(odir / stem)
        data, map_ = odir / (stem + DATA_SUFFIX), odir / (stem + MAP_SUFFIX)
        files = VersionFiles.open_existing(data, map_)
        if files is None:
            if map_.exists():
                self.report.incomplete += 1
                self._problem(self.layout.relative(map_), "no data file beside it, or not a map")
            elif data.exists():
                self.report.incomplete += 1
                self._problem(self.layout.relative(data), "no map beside it")
            if (data.exists() or map_.exists()) and self.opts.repair:
                wholeversions.drop_incomplete(data, map_)
            return
        try:
            if meta is not None and files.header != MapHeader(
                files.header.block_size, meta.version.size, meta.digest
            ):
                self._problem(self.layout.relative(map_), "the map is not meta.json's version's")
                if self.opts.repair:
                    files.close()
                    wholeversions.drop(data, map_)
                return
            chunks = chunk_count(files.header.blocks)
            for chunk in range(chunks):
                self._chunk(files, name, chunk, stale=meta is None, legacy=legacy)
            if self.opts.repair:
                self.report.reclaimed_bytes += files.reclaim(0, files.header.blocks)[0]
        finally:
            files.close()
        if self.conn is not None:  # rows past the version's last block
            with self.conn:
                self.conn.execute(self.begin)
                self.report.index_without_file += reconcile.sync_outside(
                    self.conn, name, list(range(chunks)), time.time(), write=self.opts.repair
                )

    def _chunk(
        self, files: VersionFiles, name: str, chunk: int, *, stale: bool, legacy: set[int]
    ) -> None:
        report, h, listed_at = self.report, files.header, time.time()
        first, count = chunk_span(h.blocks, chunk)
        entries = files.entries(first, count)
        there = mapfile.mapped(h, first, entries)
        if not self.opts.repair and not all(there):  # --repair punches them out (reclaim)
            report.unmapped_bytes += _held_outside(files, first, count, there)
        for n in (n for n in range(count) if not there[n] and entries[n][1]):
            index = first + n  # an entry no block has: torn, or another version's
            self._problem(
                f"{name} block {index}",
                f"the map says {entries[n][1]} bytes, the block has {h.length_of(index)}",
            )
            if self.opts.repair and not files.remove(index, 1):
                report.busy += 1
        found: dict[int, tuple[int, float]] = {}
        for n in (n for n in range(count) if there[n]):
            index, size = first + n, entries[n][1]
            report.blocks, report.bytes = report.blocks + 1, report.bytes + size
            self.bar.update(1)
            found[index] = (size, listed_at)
            if not self._sampled(name, index):
                continue
            problem = _verify(files, index)
            if problem is _BUSY:
                report.busy += 1
                continue
            if problem is _GONE:
                del found[index]
                continue
            report.verified, report.verified_bytes = (
                report.verified + 1,
                report.verified_bytes + size,
            )
            self.read_bytes += size
            report.stale += problem is None and stale
            if problem is not None:
                self._problem(f"{name} block {index}", str(problem))
                if self.opts.repair and files.remove(index, 1):
                    del found[index]
        rate = self.read_bytes / max(time.monotonic() - self.started, 1e-6)
        self.bar.set_postfix_str(f"{tqdm.format_sizeof(rate)}B/s read", refresh=False)
        if self.conn is None:
            report.missing_from_index += len(found)
            return
        with self.conn:
            self.conn.execute(self.begin)
            synced = reconcile.sync_shard(
                self.conn, name, chunk, found, listed_at, write=self.opts.repair, keep=legacy
            )
        report.missing_from_index += synced.missing
        report.index_without_file += synced.gone
        report.rows_wrong_size += synced.resized

    def _problem(self, where: str, problem: str) -> None:
        self.report.corrupt_count += 1
        if len(self.report.corrupt) < MAX_CORRUPT:
            self.report.corrupt.append(f"{where}: {problem}")

    def _sampled(self, name: str, index: int) -> bool:
        """Whether this block is read: the same answer for a seed, however the run goes."""
        if self.opts.sample >= 1:
            return True
        h = hashlib.blake2b(f"{self.opts.seed}/{name}/{index}".encode(), digest_size=8)
        return int.from_bytes(h.digest(), "big") < self.threshold

    def _versions_phase(self, conn: sqlite3.Connection, position: list[str]) -> None:
        """Rows of versions whose directory is gone (a crash mid-drop, or a lost dir)."""
        after = int(position[1]) if position[:1] == [_VERSIONS_PHASE] else 0
        while batch := conn.execute(schema.VERSION_NAMES, (after, VERSION_BATCH)).fetchall():
            after = int(batch[-1][0])
            gone = [int(vid) for vid, name in batch if self._gone(str(name))]
            self.report.versions_without_dir += len(gone)
            if gone and self.opts.repair:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    for vid in gone:
                        cur = conn.execute(schema.DELETE_VERSION_ID, (vid,))
                        self.report.rows_dropped += max(cur.rowcount, 0)
            self.save([_VERSIONS_PHASE, str(after)])

    def _gone(self, version: str) -> bool:
        """Whether a version in the run's scope has no map (nor format-2 files)."""
        if self.layout.map_path(version).exists() or self.layout.version_path(version).is_dir():
            return False
        if self.only is not None or self.opts.prefix is None:
            return self.only is None or version.startswith(self.only + "/")
        raw = store.read_meta(self.layout.meta_path_of_version(version)) or {}
        return str(raw.get("cache_key")).startswith(self.opts.prefix)


_BUSY = "busy"
_GONE = "gone"


def _held_outside(files: VersionFiles, first: int, count: int, there: list[bool]) -> int:
    """Bytes on disk in blocks [first, first + count) that the map does not have
    (``there``): a crash between a group's bytes and its entries left them, or
    a writer is between the two as the check comes by."""
    h = files.header
    held = 0
    end = min(h.size, h.offset_of(first + count))
    for a, b in data_extents(files.data_fd, h.offset_of(first), end):
        for i in range(a // h.block_size, -(-b // h.block_size)):
            if not there[i - first]:
                held += min(b, h.offset_of(i + 1)) - max(a, h.offset_of(i))
    return held


def _verify(files: VersionFiles, index: int) -> str | None:
    """None if the block is sound; else what is wrong with it (``_BUSY``: being
    written or removed, not read; ``_GONE``: evicted since it was listed)."""
    try:
        data = files.read(index, verify=True)
    except Busy:
        return _BUSY
    except CorruptBlock as exc:
        return str(exc)
    return _GONE if data is None else None


def _legacy_indices(vdir: Path) -> set[int]:
    """Indices of a version's blocks still in files of formats 1 and 2 (flat, and
    in shard dirs); none when it has no such dir."""
    found: set[int] = set()
    for entry in scan_dir(vdir):
        names = [entry.name]
        if entry.is_dir(follow_symlinks=False):
            names = [e.name for e in scan_dir(Path(entry.path))]
        found.update(i for i in map(Layout.block_index_of, names) if i is not None)
    return found


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in scan_dir(path) if e.is_dir(follow_symlinks=False))
