"""The cache's accounting in SQLite, shared by every daemon process: sizes, last use, eviction.

The index answers "how big is the cache (and each version)" and "which
blocks were used least recently"; it never answers "is this block cached"
(the file does). It may lag the files by a flush interval, and after a
crash it may miss blocks or list gone ones: the reconciler (reconcile.py)
repairs both, and a row without a file or a file without a row never causes
a wrong byte, only an imprecise size.

All SQLite work runs on one dedicated thread with its own connection, so the
event loop never blocks on the database and no connection crosses threads.
Every job on that thread is bounded (an eviction slice, a reconcile step, a
flush), so none waits long behind another.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from . import reconcile, schema, store
from .layout import Layout
from .reconcile import Progress, Reconciler

log = logging.getLogger(__name__)
T = TypeVar("T")

# Rows one eviction slice removes (rows in one transaction, then their files):
# bounded work per step, so flushes, reconcile steps and other processes'
# writes never wait long (diskcache's cull_limit, nginx's manager_files).
EVICT_BATCH = 1024
# Threads that unlink an eviction slice's files. An unlink that must read its
# inode from disk waits on I/O; in parallel they overlap (1,024 files took
# 80 µs each on one thread, 26 µs on eight, on this project's test VM).
UNLINK_THREADS = 8
# An evicted block used more recently than this means the cache is too small
# for the working set (the "thrashing" alert counts these).
RECENT_USE = 600.0
# Pending index writes are flushed at this interval or at this many entries.
FLUSH_INTERVAL = 1.0
FLUSH_MAX_PENDING = 2000


@dataclasses.dataclass(frozen=True, slots=True)
class Totals:
    bytes: int
    blocks: int


@dataclasses.dataclass(frozen=True, slots=True)
class Evicted:
    """What one eviction slice did."""

    blocks: int = 0
    bytes: int = 0
    recent: int = 0  # of them, used within RECENT_USE seconds
    more: bool = False  # still above the target: run another slice
    victims: tuple[tuple[str, int], ...] = ()  # (version dir, block index) of each


class CacheIndex:
    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="nwbcache-index"
        )
        self._unlinker = concurrent.futures.ThreadPoolExecutor(
            UNLINK_THREADS, thread_name_prefix="nwbcache-evict"
        )
        self._conn: sqlite3.Connection | None = None
        # (version dir, block index) -> (bytes, last use), until the next flush.
        self._pending: dict[tuple[str, int], tuple[int, float]] = {}
        self._pending_bytes = 0
        self._reconciler: Reconciler | None = None
        self._reconcile_fd = -1
        self.last_totals = Totals(0, 0)

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        await self._run(self._open_sync)
        self.last_totals = await self._run(self._totals_sync)

    async def close(self) -> None:
        try:
            await self.flush()
            await self._run(self._close_sync)
        finally:
            self._executor.shutdown(wait=True)
            self._unlinker.shutdown(wait=True)

    def _open_sync(self) -> None:
        if store.adopt_legacy_root(self._layout):
            log.warning(
                "cache format 1 found at %s: renamed to %s; its blocks are moved into "
                "shard directories in the background",
                self._layout.legacy_root,
                self._layout.root,
            )
        self._layout.root.mkdir(parents=True, exist_ok=True)
        self._conn = schema.connect(self._layout.index_path)

    def _close_sync(self) -> None:
        self._release_reconcile()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "index not open"
        return self._conn

    # -- recording use ---------------------------------------------------
    def record(self, version: str, index: int, nbytes: int) -> None:
        """Note block ``index`` of version dir ``version`` (relative to the layout
        root), ``nbytes`` on disk, written or read now; stored on the next flush."""
        old = self._pending.get((version, index))
        if old is not None:
            self._pending_bytes -= old[0]
        self._pending[(version, index)] = (nbytes, time.time())
        self._pending_bytes += nbytes

    @property
    def pending_bytes(self) -> int:
        """Bytes of the blocks recorded since the last flush (an upper bound of
        what the flush will add to the totals)."""
        return self._pending_bytes

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        self._pending_bytes = 0
        self.last_totals = await self._run(lambda: self._flush_sync(batch))

    def _flush_sync(self, batch: dict[tuple[str, int], tuple[int, float]]) -> Totals:
        by_version: dict[str, list[tuple[int, int, float]]] = {}
        for (version, index), (nbytes, atime) in batch.items():
            by_version.setdefault(version, []).append((index, nbytes, atime))
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            for version, rows in by_version.items():
                vid = schema.version_id(self.conn, version, create=True)
                self.conn.executemany(schema.UPSERT, [(vid, i, b, a) for i, b, a in rows])
        return self._totals_sync()

    async def forget_version(self, version: str) -> None:
        """Drop the rows of the blocks of one version dir."""
        for key in [k for k in self._pending if k[0] == version]:
            self._pending_bytes -= self._pending.pop(key)[0]

        def delete() -> None:
            with self.conn:
                self.conn.execute(schema.DELETE_VERSION, (version,))

        await self._run(delete)

    # -- size and eviction -------------------------------------------------
    def _totals_sync(self) -> Totals:
        return Totals(*schema.totals(self.conn))

    async def totals(self) -> Totals:
        self.last_totals = await self._run(self._totals_sync)
        return self.last_totals

    async def evict_slice(self, target_bytes: int, batch: int = EVICT_BATCH) -> Evicted:
        """Remove up to ``batch`` least-recently-used blocks, as many as it takes
        for the index to total at most ``target_bytes``: their rows in one
        transaction on the index's thread, then their files, in parallel."""
        chosen, freed = await self._run(lambda: self._evict_rows(target_bytes, batch))
        if not chosen:
            return Evicted()
        paths = [self._layout.block_path(name, idx) for name, idx, _ in chosen]
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(
                loop.run_in_executor(self._unlinker, _unlink_all, paths[i::UNLINK_THREADS])
                for i in range(min(UNLINK_THREADS, len(paths)))
            )
        )
        recent_after = time.time() - RECENT_USE
        recent = sum(atime >= recent_after for _, _, atime in chosen)
        more = self.last_totals.bytes > target_bytes
        victims = tuple((name, idx) for name, idx, _ in chosen)
        return Evicted(len(chosen), freed, recent, more, victims)

    def _evict_rows(
        self, target_bytes: int, batch: int
    ) -> tuple[list[tuple[str, int, float]], int]:
        """Delete the rows of the blocks to evict; returns them (version dir,
        index, last use) and the bytes they held."""
        conn = self.conn
        chosen: list[tuple[str, int, float]] = []
        keys: list[tuple[int, int]] = []
        freed = 0
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            total = schema.totals(conn)[0]
            if total > target_bytes:
                for vid, name, idx, nbytes, atime in conn.execute(schema.OLDEST, (batch,)):
                    chosen.append((name, idx, atime))
                    keys.append((vid, idx))
                    freed += nbytes
                    if total - freed <= target_bytes:
                        break  # a batch is a bound on work, not an amount to evict
                # Rows first, files after commit: two evicting processes never
                # count one block twice, and a crash in between leaves orphan
                # files that the reconciler re-adds. (A reconcile step listing
                # a file between the two re-adds its row: a phantom row, which
                # only overstates the size until eviction picks it, soon, by
                # its old access time, and finds no file.)
                conn.executemany(schema.DELETE_BLOCK, keys)
        self.last_totals = self._totals_sync()
        return chosen, freed

    async def evict_to(self, target_bytes: int) -> Evicted:
        """Evict slice after slice down to ``target_bytes`` (tests and tools; the
        daemon's upkeep runs slices itself, between other work)."""
        await self.flush()
        blocks = freed = recent = 0
        while True:
            done = await self.evict_slice(target_bytes)
            blocks, freed, recent = blocks + done.blocks, freed + done.bytes, recent + done.recent
            if not done.more:
                return Evicted(blocks, freed, recent)

    async def top_versions(self, limit: int) -> list[tuple[str, int, int]]:
        """(version dir, bytes, blocks) of the versions taking most of the cache."""
        await self.flush()

        def query() -> list[tuple[str, int, int]]:
            rows = self.conn.execute(schema.TOP_VERSIONS, (limit,)).fetchall()
            return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]

        return await self._run(query)

    # -- repair ----------------------------------------------------------
    async def mark_reconcile(self) -> None:
        """Ask for a reconcile (an unclean stop was found), from the beginning."""

        def mark() -> None:
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                reconcile.mark_needed(self.conn)

        await self._run(mark)

    async def reconcile_step(self, max_files: int) -> Progress | None:
        """A bounded step of a reconcile that is due. None when none is due or
        another process is doing it; else the progress, ``done`` at the end."""
        await self.flush()  # rows for what this process published are no orphans
        return await self._run(lambda: self._reconcile_sync(max_files))

    def _reconcile_sync(self, max_files: int) -> Progress | None:
        if self._reconciler is None:
            if not reconcile.is_needed(self.conn) or not self._take_reconcile():
                return None
            self._reconciler = Reconciler(self._layout, self.conn)
        try:
            progress = self._reconciler.step(max_files)
        except BaseException:
            self._reconciler = None
            self._release_reconcile()
            raise
        if progress.done:
            self._reconciler = None
            self._release_reconcile()
        self.last_totals = self._totals_sync()
        return progress

    def _take_reconcile(self) -> bool:
        fd = os.open(self._layout.reconcile_lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._reconcile_fd = fd
        return True

    def _release_reconcile(self) -> None:
        if self._reconcile_fd >= 0:
            fd, self._reconcile_fd = self._reconcile_fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        store.unlink_quietly(path)
