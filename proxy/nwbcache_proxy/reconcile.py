"""Making the index agree with the versions' maps: a resumable walk in bounded steps.

Needed only after an unclean stop (a process killed between writing a group
and flushing its rows, or between an eviction's commit and its punches),
after an index schema migration, or when the index was lost: the index is
accounting, so until then the size is imprecise but no byte is wrong.
nginx's cache loader is the model: the walk is split into steps of a
bounded number of blocks (``loader_files``), the caller sleeps between them
(``loader_sleep``), and memory holds one object dir's listing and one chunk
of a map at a time, never the cache's list of blocks.

The walk goes in sorted order over ``objects/<p>/<kh>/``; in each object
dir, each version (``<vd>.<bs>``) in turn:

1. a format-1 or format-2 dir of the version has its block files moved into
   the data file (migrate.py), a shard dir per unit;
2. its map, a chunk of CHUNK_BLOCKS entries per unit, is compared with the
   index rows of the same blocks, and bytes of the data file that no entry
   maps (a crash between a group's bytes and its entries) are punched out;
3. rows past the version's last block are dropped.

Each unit's rows change in one transaction that also saves the cursor, so a
walk interrupted by another crash resumes where it was. Version files
without their partner (a map without data, data without a map) are
removed. A last phase drops the rows of versions that have no map. Blocking:
runs on the index's thread (or in ``nwbcache check``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import sqlite3
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from . import migrate, schema, store, wholeversions
from .layout import BLOCKS_PER_DIR, DATA_SUFFIX, MAP_SUFFIX, Layout, shard_range
from .versionfile import VersionFiles

# The phase-2 cursor sorts after every object path (hex digits < "~").
_VERSIONS_PHASE = "~"
_END = object()
# Units of a version, in the order done (the cursor's last part).
_MOVE, _CHUNK, _GAPS = "a", "b", "c"
# Past any block index (SQLite's INTEGER is 64-bit).
_NO_INDEX = 2**62
VERSION_BATCH = 256
# Map entries compared per unit: the index's shard_range (32 KiB of a map).
CHUNK_BLOCKS = BLOCKS_PER_DIR


def chunk_count(blocks: int) -> int:
    """How many chunks a version of ``blocks`` blocks has (the last one short)."""
    return -(-blocks // CHUNK_BLOCKS)


def chunk_span(blocks: int, chunk: int) -> tuple[int, int]:
    """The first block of chunk ``chunk`` of a version of ``blocks`` blocks, and how many."""
    first = chunk * CHUNK_BLOCKS
    return first, min(CHUNK_BLOCKS, blocks - first)


@dataclasses.dataclass(slots=True)
class Progress:
    files: int = 0  # blocks looked at: map entries, and legacy block files
    added: int = 0  # rows added for blocks that had none
    removed: int = 0  # rows dropped for blocks that were gone
    moved: int = 0  # format-1 and -2 block files moved into data files
    resized: int = 0  # rows whose bytes were not their block's (format 2's headers)
    reclaimed: int = 0  # bytes no map entry had, punched out
    versions: int = 0  # version rows checked for a map
    done: bool = False

    @property
    def work(self) -> int:
        """What a step's budget counts: blocks and version rows looked at."""
        return self.files + self.versions


def mark_needed(conn: sqlite3.Connection) -> None:
    """Start a reconcile from the beginning (after a crash anywhere, all is suspect)."""
    conn.execute(schema.SET_STATE, (schema.RECONCILE, ""))


def take_turn(layout: Layout) -> int:
    """The reconcile lock (one process reconciles at a time): its fd, or -1 while
    another process holds it."""
    fd = os.open(layout.reconcile_lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


def end_turn(fd: int) -> int:
    """Give the reconcile lock back (``fd`` from take_turn, or -1); returns -1."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    return -1


def is_needed(conn: sqlite3.Connection) -> bool:
    return schema.get_state(conn, schema.RECONCILE) is not None


class Reconciler:
    """One reconcile, resumed from the cursor in the index. ``step`` does a bounded part."""

    def __init__(self, layout: Layout, conn: sqlite3.Connection) -> None:
        self._layout = layout
        self._conn = conn
        cursor = schema.get_state(conn, schema.RECONCILE)
        self._cursor = cursor.split("/") if cursor else []
        self.progress = Progress(done=cursor is None)
        self._work = self._walk()

    def step(self, max_files: int) -> Progress:
        """Reconcile at least one unit and about ``max_files`` blocks; returns the totals so far."""
        if self.progress.done:
            return self.progress
        goal = self.progress.work + max_files
        while self.progress.work < goal:
            if next(self._work, _END) is _END:
                with self._conn:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._conn.execute(schema.CLEAR_STATE, (schema.RECONCILE,))
                self.progress.done = True
                break
        return self.progress

    # -- the walk ------------------------------------------------------------------
    def _walk(self) -> Iterator[None]:
        """Yields after each unit of work (a chunk of a map, a shard dir moved, a
        batch of versions)."""
        objects = self._layout.objects
        for prefix in self._subdirs(objects):
            for kh in self._subdirs(objects / prefix, prefix):
                odir = objects / prefix / kh
                for stem in self._stems(odir, prefix, kh):
                    yield from self._version(odir, stem, [prefix, kh, stem])
        yield from self._versions_phase()

    def _subdirs(self, path: Path, *above: str) -> list[str]:
        """Sorted subdirectory names of ``path``, less those the cursor is past."""
        return self._after(sorted(_names(path, dirs=True)), above)

    def _stems(self, odir: Path, *above: str) -> list[str]:
        return self._after(stems_in(odir), above)

    def _after(self, names: list[str], above: tuple[str, ...]) -> list[str]:
        depth = len(above)
        if len(self._cursor) > depth and list(above) == self._cursor[:depth]:
            return [n for n in names if n >= self._cursor[depth]]
        return names  # no cursor, or this dir comes after it

    def _version(self, odir: Path, stem: str, key: list[str]) -> Iterator[None]:
        name = self._layout.relative(odir / stem)
        legacy = odir / stem
        if legacy.is_dir():
            yield from self._move(legacy, name, key)
        files = _open_or_clear(odir / (stem + DATA_SUFFIX), odir / (stem + MAP_SUFFIX))
        if files is None:
            return  # rows of a version without a map go in the last phase
        try:
            mtime = os.fstat(files.data_fd).st_mtime
            chunks = chunk_count(files.header.blocks)
            for chunk in range(chunks):
                unit = [*key, f"{_CHUNK}{chunk:012d}"]
                if unit <= self._cursor:
                    continue
                self._chunk(files, name, chunk, mtime, "/".join(unit))
                yield
            unit = [*key, _GAPS]
            if unit > self._cursor:
                self._gaps(name, chunks, "/".join(unit))
                yield
        finally:
            files.close()

    def _move(self, legacy: Path, name: str, key: list[str]) -> Iterator[None]:
        """Format 1's and 2's block files into the version's data file."""
        header = migrate.header_of(self._layout, legacy)
        if header is None:  # no longer the object's version: not checkable, not kept
            store.drop_dir(self._layout, legacy)
            yield
            return
        data, map_ = self._layout.data_path(name), self._layout.map_path(name)
        files = wholeversions.open_or_replace(data, map_, header, create=True)
        assert files is not None
        try:
            for unit_name, paths in migrate.units(legacy):
                unit = [*key, f"{_MOVE}{unit_name}"]
                if unit <= self._cursor:
                    continue
                moved, _ = migrate.move(files, paths)
                with self._conn:
                    self._conn.execute("BEGIN IMMEDIATE")
                    schema.resize_rows(self._conn, name, moved)
                    self._conn.execute(schema.SET_STATE, (schema.RECONCILE, "/".join(unit)))
                self.progress.moved += len(moved)
                self.progress.files += len(paths)
                yield
        finally:
            files.close()
        migrate.remove_empty(legacy)

    def _chunk(self, files: VersionFiles, name: str, chunk: int, mtime: float, cursor: str) -> None:
        h = files.header
        first, count = chunk_span(h.blocks, chunk)
        listed_at = time.time()
        there = files.mapped(first, count)
        found = {first + n: (h.length_of(first + n), mtime) for n in range(count) if there[n]}
        self.progress.reclaimed += files.reclaim(first, count)[0]
        self.progress.files += count
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            synced = sync_shard(self._conn, name, chunk, found, listed_at, write=True)
            self._conn.execute(schema.SET_STATE, (schema.RECONCILE, cursor))
        self.progress.added += synced.missing
        self.progress.removed += synced.gone
        self.progress.resized += synced.resized

    def _gaps(self, name: str, chunks: int, cursor: str) -> None:
        """Drop the rows of blocks past the version's last (rows no chunk sees)."""
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self.progress.removed += sync_outside(
                self._conn, name, list(range(chunks)), time.time(), write=True
            )
            self._conn.execute(schema.SET_STATE, (schema.RECONCILE, cursor))

    def _versions_phase(self) -> Iterator[None]:
        """Drop the rows of versions whose map is gone (a crash mid-drop)."""
        after = int(self._cursor[1]) if self._cursor[:1] == [_VERSIONS_PHASE] else 0
        while True:
            batch = self._conn.execute(schema.VERSION_NAMES, (after, VERSION_BATCH)).fetchall()
            if not batch:
                return
            gone = [vid for vid, name in batch if not self._layout.map_path(name).exists()]
            after = int(batch[-1][0])
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                for vid in gone:
                    cur = self._conn.execute(schema.DELETE_VERSION_ID, (vid,))
                    self.progress.removed += max(cur.rowcount, 0)
                self._conn.execute(
                    schema.SET_STATE, (schema.RECONCILE, f"{_VERSIONS_PHASE}/{after}")
                )
            self.progress.versions += len(batch)
            yield


def stems_in(odir: Path) -> list[str]:
    """The versions in an object dir (format-3 files, and dirs of formats 1 and
    2), by their stem ``<vd>.<bs>``, sorted."""
    stems: set[str] = set()
    for entry in scan_dir(odir):
        if entry.is_dir(follow_symlinks=False):
            stem: str | None = entry.name
        else:
            found = Layout.stem_of(entry.name)
            stem = found[0] if found is not None else None
        if stem is not None and Layout.block_size_of(stem) is not None:
            stems.add(stem)
    return sorted(stems)


def _open_or_clear(data: Path, map_: Path) -> VersionFiles | None:
    """The version's files; None, with a lone data file or map removed, when
    they are not both there (a crash between creating or removing the two)."""
    files = VersionFiles.open_existing(data, map_)
    if files is None and (data.exists() or map_.exists()):
        wholeversions.drop_incomplete(data, map_)
    return files


@dataclasses.dataclass(frozen=True, slots=True)
class Synced:
    """What comparing a chunk with its rows found (and, writing, repaired)."""

    missing: int  # blocks without a row
    gone: int  # rows without a block
    resized: int  # rows whose bytes were not their block's


def sync_shard(
    conn: sqlite3.Connection,
    name: str,
    shard: int,
    found: dict[int, tuple[int, float]],
    listed_at: float,
    *,
    write: bool,
    keep: Collection[int] = (),
) -> Synced:
    """Compare a chunk's blocks (``found``: index -> (bytes, mtime), listed at
    ``listed_at``) with the index rows of the same blocks of version ``name``.
    With ``write``, add the missing rows (their access time the data file's
    mtime), give rows the bytes of their block (a format-2 row counted its
    file's header, and a flush never changes a row's bytes), and drop the rows
    older than the listing whose block is gone, less those in ``keep``
    (blocks still in format-2 files); inside the caller's transaction."""
    vid = schema.version_id(conn, name, create=write and bool(found))
    if vid is None:
        return Synced(len(found), 0, 0)
    rows = schema.rows_in(conn, vid, shard_range(shard))
    missing = [(i, size, mtime) for i, (size, mtime) in found.items() if i not in rows]
    resized = [(i, found[i][0]) for i, (_, n) in rows.items() if i in found and n != found[i][0]]
    gone = [
        i
        for i, (atime, _) in rows.items()
        if i not in found and atime < listed_at and i not in keep
    ]
    if write:
        schema.add_found(conn, vid, missing)
        schema.resize_rows(conn, name, resized)
        schema.delete_older(conn, vid, gone, listed_at)
    return Synced(len(missing), len(gone), len(resized))


def sync_outside(
    conn: sqlite3.Connection, name: str, shards: list[int], listed_at: float, *, write: bool
) -> int:
    """Rows of version ``name`` in no chunk of ``shards`` (sorted), older than
    ``listed_at``: rows no chunk visit sees. Their count; with ``write``, they
    are dropped (inside the caller's transaction)."""
    vid = schema.version_id(conn, name, create=False)
    if vid is None:
        return 0
    gone: list[int] = []
    for gap in _between(shards):
        gone += [i for i, (atime, _) in schema.rows_in(conn, vid, gap).items() if atime < listed_at]
    if write:
        schema.delete_older(conn, vid, gone, listed_at)
    return len(gone)


def _between(shards: list[int]) -> list[range]:
    """The block indices of no shard in ``shards`` (sorted), as ranges."""
    gaps: list[range] = []
    start = 0
    for shard in shards:
        lo = shard_range(shard)
        if lo.start > start:
            gaps.append(range(start, lo.start))
        start = lo.stop
    gaps.append(range(start, _NO_INDEX))
    return gaps


def scan_dir(path: Path) -> Iterator[os.DirEntry[str]]:
    """The entries of ``path``; none when it is gone (evicted or dropped meanwhile)."""
    try:
        with os.scandir(path) as it:
            yield from it
    except (FileNotFoundError, NotADirectoryError):
        return


def _names(path: Path, *, dirs: bool) -> list[str]:
    return [e.name for e in scan_dir(path) if e.is_dir(follow_symlinks=False) == dirs]
