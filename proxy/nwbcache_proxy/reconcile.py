"""Making the index agree with the block files: a resumable walk in bounded steps.

Needed only after an unclean stop (a process killed between publishing a
block and flushing its row, or between an eviction's commit and its
unlinks), after an index schema migration, or when the index was lost: the
index is accounting, so until then the size is imprecise but no byte is
wrong. nginx's cache loader is the model: the walk is split into steps of
a bounded number of files (``loader_files``), the caller sleeps between
them (``loader_sleep``), and memory holds one directory listing at a time,
never the cache's list of files.

The walk goes in sorted order over ``objects/<p>/<kh>/<version>/<shard>/``;
each shard dir (at most layout.BLOCKS_PER_DIR files) is one unit, compared
with the index rows of the same blocks in one transaction that also saves
the cursor, so a walk interrupted by another crash resumes where it was.
Blocks still in format 1's flat version dirs are moved into their shard
dirs on the way. A second phase drops the rows of version dirs that no
longer exist. Blocking: runs on the index's thread (or in ``nwbcache check``).
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from . import schema
from .layout import Layout, block_relpath, shard_range

# The phase-2 cursor sorts after every object path (hex digits < "~").
_VERSIONS_PHASE = "~"
_END = object()
# The unit after a version's shards (sorts after their zero-padded numbers).
_GAPS = "~gaps"
# Past any block index (SQLite's INTEGER is 64-bit).
_NO_INDEX = 2**62
VERSION_BATCH = 256


@dataclasses.dataclass(slots=True)
class Progress:
    files: int = 0  # block files looked at
    added: int = 0  # rows added for files that had none
    removed: int = 0  # rows dropped for files that were gone
    moved: int = 0  # format-1 blocks moved into shard dirs
    versions: int = 0  # version rows checked for a directory
    done: bool = False

    @property
    def work(self) -> int:
        """What a step's budget counts: files and version rows looked at."""
        return self.files + self.versions


def mark_needed(conn: sqlite3.Connection) -> None:
    """Start a reconcile from the beginning (after a crash anywhere, all is suspect)."""
    conn.execute(schema.SET_STATE, (schema.RECONCILE, ""))


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
        """Reconcile at least one unit and about ``max_files`` files; returns the totals so far."""
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
        """Yields after each unit of work (a shard dir, a batch of moves or of versions)."""
        objects = self._layout.objects
        for prefix in self._subdirs(objects):
            for kh in self._subdirs(objects / prefix, prefix):
                for vdir in self._subdirs(objects / prefix / kh, prefix, kh):
                    if Layout.block_size_of(vdir) is not None:
                        yield from self._version(objects / prefix / kh / vdir, [prefix, kh, vdir])
        yield from self._versions_phase()

    def _subdirs(self, path: Path, *above: str) -> list[str]:
        """Sorted subdirectory names of ``path``, less those the cursor is past."""
        names = sorted(_names(path, dirs=True))
        depth = len(above)
        if len(self._cursor) > depth and list(above) == self._cursor[:depth]:
            return [n for n in names if n >= self._cursor[depth]]
        return names  # no cursor, or this dir comes after it

    def _version(self, path: Path, key: list[str]) -> Iterator[None]:
        yield from self._move_flat(path)
        listed_at = time.time()
        shards = sorted(
            s for s in (Layout.shard_of_dir(d) for d in _names(path, dirs=True)) if s is not None
        )
        name = self._layout.relative(path)
        for shard in shards:
            unit = [*key, f"{shard:012d}"]
            if unit <= self._cursor:
                continue
            self._shard(name, shard, path / str(shard), "/".join(unit))
            yield
        unit = [*key, _GAPS]
        if unit > self._cursor:
            self._gaps(name, shards, listed_at, "/".join(unit))
            yield

    def _gaps(self, name: str, shards: list[int], listed_at: float, cursor: str) -> None:
        """Drop the rows of blocks in shards with no dir (rows no shard visit sees)."""
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self.progress.removed += sync_outside(self._conn, name, shards, listed_at, write=True)
            self._conn.execute(schema.SET_STATE, (schema.RECONCILE, cursor))

    def _move_flat(self, path: Path) -> Iterator[None]:
        """Format 1 kept a version's blocks in its dir: move them into shard dirs."""
        batch = 0
        made: set[str] = set()
        for entry in scan_dir(path):
            index = Layout.block_index_of(entry.name)
            if index is None or not entry.is_file(follow_symlinks=False):
                continue
            target = path / block_relpath(index)
            if target.parent.name not in made:
                target.parent.mkdir(exist_ok=True)
                made.add(target.parent.name)
            try:
                os.replace(entry.path, target)  # a same-version block there already is identical
            except FileNotFoundError:
                continue  # evicted meanwhile
            self.progress.moved += 1
            self.progress.files += 1
            batch += 1
            if batch >= 1024:
                batch = 0
                yield

    def _shard(self, name: str, shard: int, path: Path, cursor: str) -> None:
        listed_at = time.time()
        found = list_shard(path, shard)
        self.progress.files += len(found)
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            added, removed = sync_shard(self._conn, name, shard, found, listed_at, write=True)
            self._conn.execute(schema.SET_STATE, (schema.RECONCILE, cursor))
        self.progress.added += added
        self.progress.removed += removed

    def _versions_phase(self) -> Iterator[None]:
        """Drop the rows of versions whose directory is gone (a crash mid-drop)."""
        after = int(self._cursor[1]) if self._cursor[:1] == [_VERSIONS_PHASE] else 0
        while True:
            batch = self._conn.execute(schema.VERSION_NAMES, (after, VERSION_BATCH)).fetchall()
            if not batch:
                return
            gone = [vid for vid, name in batch if not self._layout.version_path(name).is_dir()]
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


def list_shard(path: Path, shard: int) -> dict[int, tuple[int, float]]:
    """Block index -> (size, mtime) of the block files in shard dir ``path``."""
    found: dict[int, tuple[int, float]] = {}
    for entry in scan_dir(path):
        index = Layout.block_index_of(entry.name)
        if index is None or index not in shard_range(shard):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # evicted meanwhile
        found[index] = (st.st_size, st.st_mtime)
    return found


def sync_shard(
    conn: sqlite3.Connection,
    name: str,
    shard: int,
    found: dict[int, tuple[int, float]],
    listed_at: float,
    *,
    write: bool,
) -> tuple[int, int]:
    """Compare a shard's files (``found``, listed at ``listed_at``) with the index
    rows of the same blocks of version dir ``name``: (files without a row, rows
    without a file). With ``write``, add the missing rows (their access time the
    file's mtime) and drop the rows older than the listing whose file is gone;
    inside the caller's transaction."""
    vid = schema.version_id(conn, name, create=write and bool(found))
    if vid is None:
        return len(found), 0
    rows = schema.rows_in(conn, vid, shard_range(shard))
    missing = [(i, size, mtime) for i, (size, mtime) in found.items() if i not in rows]
    gone = [i for i, atime in rows.items() if i not in found and atime < listed_at]
    if write:
        schema.add_found(conn, vid, missing)
        schema.delete_older(conn, vid, gone, listed_at)
    return len(missing), len(gone)


def sync_outside(
    conn: sqlite3.Connection, name: str, shards: list[int], listed_at: float, *, write: bool
) -> int:
    """Rows of version dir ``name`` in no shard of ``shards`` (the sorted shard
    dirs that exist), older than ``listed_at``: rows no shard visit sees. Their
    count; with ``write``, they are dropped (inside the caller's transaction)."""
    vid = schema.version_id(conn, name, create=False)
    if vid is None:
        return 0
    gone: list[int] = []
    for gap in _between(shards):
        gone += [i for i, atime in schema.rows_in(conn, vid, gap).items() if atime < listed_at]
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
