"""The cache's accounting in SQLite, shared by every daemon process: sizes, last use, eviction.

The index answers "how big is the cache (and each version)" and "which
blocks go next" (by the eviction policy: accounting.py, policy.py); it never
answers "is this block cached" (the map does). It may lag by a flush, and after a
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
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

from . import accounting, footprint, reconcile, schema, store, wholeversions
from .accounting import Stats
from .layout import Layout
from .policy import Eviction
from .reconcile import Progress, Reconciler
from .unlinker import Unlinker, groups_of
from .usage import Usage

log = logging.getLogger(__name__)
T = TypeVar("T")

# Rows one eviction slice looks at (rows in one transaction, then the files):
# bounded work per step, so flushes, reconcile steps and other processes'
# writes never wait long (diskcache's cull_limit, nginx's manager_files).
EVICT_BATCH = 1024
# An evicted block used more recently than this means the cache is too small
# for the working set (the "thrashing" alert counts these).
RECENT_USE = 600.0
# Pending index writes are flushed at this interval, or sooner once a process
# has written this share of the capacity since its last flush: other processes
# evict by what the index knows, so what one process has not flushed yet is
# what the cache can overshoot by (measured: 2 workers filling a 32 MiB cache
# from a local origin reached 51 MiB with only the interval).
FLUSH_INTERVAL = 1.0
FLUSH_SHARE = 0.02


@dataclasses.dataclass(frozen=True, slots=True)
class Totals:
    bytes: int
    blocks: int
    small_bytes: int = 0  # in S3-FIFO's small queue
    ghosts: int = 0  # blocks S3-FIFO's ghost list remembers
    pinned_bytes: int = 0  # in the pinned queue; the rest is in main
    versions: int = 0  # each with files on disk (footprint.py)

    @property
    def on_disk(self) -> int:
        """What the cache takes on disk: its blocks' bytes and their files'
        overhead (footprint.py). What --cache-size bounds."""
        return self.bytes + footprint.overhead(self.versions, self.blocks)


@dataclasses.dataclass(frozen=True, slots=True)
class Evicted:
    """What one eviction slice did."""

    blocks: int = 0
    bytes: int = 0
    recent: int = 0  # of them, used within RECENT_USE seconds
    more: bool = False  # still above the target: run another slice
    victims: tuple[tuple[str, int], ...] = ()  # (version dir, block index) of each


class CacheIndex:
    def __init__(self, layout: Layout, eviction: Eviction = Eviction.S3FIFO) -> None:
        self._layout = layout
        self.eviction = eviction
        # What the policy did in this process since take_stats (admissions,
        # evictions by queue, promotions).
        self.stats = Stats()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="nwbcache-index"
        )
        self._unlinker = Unlinker()
        # Versions the slice being unlinked emptied: their dirs go after its files.
        self._emptied: list[str] = []
        self._conn: sqlite3.Connection | None = None
        self._use = Usage()  # until the next flush
        self._flushed_at = time.monotonic()
        self._flushing: asyncio.Task[bool] | None = None  # the last flush's write
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
            self._unlinker.close()

    def _open_sync(self) -> None:
        adopted = store.adopt_legacy_root(self._layout)
        if adopted is not None:
            log.warning(
                "an older cache format found at %s: renamed to %s; its blocks are moved "
                "into data files in the background (until then they are misses)",
                adopted,
                self._layout.root,
            )
        self._layout.root.mkdir(parents=True, exist_ok=True)
        self._conn = schema.connect(self._layout.index_path)

    def _close_sync(self) -> None:
        self._unlinker.settle()
        self._prune_emptied()
        self._reconcile_fd = reconcile.end_turn(self._reconcile_fd)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` on the index's thread, after a flush (what this
        process used is in the index): one bounded job, as every job here."""
        await self.flush()
        return await self._run(lambda: fn(self.conn))

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "index not open"
        return self._conn

    # -- recording use ---------------------------------------------------
    def record(
        self,
        version: str,
        index: int,
        nbytes: int,
        about: tuple[str, int] | None = None,
        *,
        written: bool = True,
    ) -> None:
        """Note block ``index`` of version ``version`` (relative to the layout
        root), ``nbytes`` long, written (or, ``written`` false, only read) now;
        stored on the next flush (with ``about``, the object's cache key and
        size, which the admin API lists). A read makes no new row."""
        self._use.record(version, index, nbytes, about, written)

    async def take_stats(self) -> Stats:
        """What the policy did since the last call (the metrics add it up). On
        the index's thread, where every job that counts runs: none is lost."""

        def take() -> Stats:
            stats, self.stats = self.stats, Stats()
            return stats

        return await self._run(take)

    def hit(self, version: str, index: int) -> None:
        """Note a hit on a block: served from the cache to a client that did not
        cause its fetch (S3-FIFO's counter; read-ahead and first reads are not hits)."""
        self._use.hit(version, index)

    @property
    def backlogged(self) -> bool:
        """Half of usage.PENDING_MAX waits: flush sooner."""
        return self._use.backlogged

    @property
    def pending_bytes(self) -> int:
        """Bytes of the blocks written since the last flush (an upper bound of
        what the flush will add to the totals: a block only read adds nothing).
        Eviction flushes between slices while it is not zero; a stream of hits
        alone does not make it do so (a transaction per slice, measured at a
        fifth of eviction's pace under hits)."""
        return self._use.written_bytes

    @property
    def pending_on_disk(self) -> int:
        """What the blocks written since the last flush take on disk, their
        versions' files and their rows included (footprint.py): an upper bound
        of what the flush adds to ``Totals.on_disk`` (a version with rows
        already adds no files). What the pressure check counts."""
        use = self._use
        return use.written_bytes + footprint.overhead(use.written_versions, use.written_blocks)

    @property
    def flush_due(self) -> bool:
        """Whether anything was recorded and the last flush is FLUSH_INTERVAL old."""
        late = time.monotonic() - self._flushed_at >= FLUSH_INTERVAL
        return late and not self._use.empty

    async def flush(self) -> bool:
        """Store what was recorded, and wait for the flushes before; False when
        SQLite could not (a full disk): the records are kept for the next
        flush, and nothing is lost but accounting.

        The write is a task of its own, awaited through a shield. A caller
        cancelled meanwhile (upkeep stopped at shutdown, a client hanging up
        on an admin request) once took the records out with it: the job,
        still queued for the index's thread, was cancelled unrun, and a
        daemon stopped "clean" with blocks on disk and no rows."""
        self._flushed_at = time.monotonic()
        last = self._flushing
        if self._use.empty and (last is None or last.done()):
            return True
        self._flushing = asyncio.ensure_future(self._write(last))
        return await asyncio.shield(self._flushing)

    async def _write(self, last: asyncio.Task[bool] | None) -> bool:
        if last is not None:  # its records first (put back, if it failed)
            await asyncio.wait([last])
        batch = self._use.take()
        if batch.empty:  # nothing recorded since the flush before took its batch
            self._use.put_back(batch)  # but keys, kept for the next rows
            return True

        def write() -> Totals:
            accounting.record(self.conn, batch.blocks, batch.hits, self.stats, batch.keys)
            return self._totals_sync()

        try:
            self.last_totals = await self._run(write)
        except BaseException as exc:
            self._use.put_back(batch)
            if not isinstance(exc, sqlite3.Error):
                raise
            log.warning("could not write the cache index (retrying later): %s", exc)
            return False
        return True

    def forget_pending(self, version: str) -> None:
        """Drop what this process recorded of one version dir and has not flushed."""
        self._use.forget(version)

    async def forget_version(self, version: str) -> None:
        """Drop the rows of the blocks of one version dir."""
        self.forget_pending(version)

        def delete() -> None:
            with self.conn:
                self.conn.execute(schema.DELETE_VERSION, (version,))

        await self._run(delete)

    # -- size and eviction -------------------------------------------------
    def _totals_sync(self) -> Totals:
        row = self.conn.execute(schema.QUEUE_TOTALS).fetchone()
        total, small, blocks, _, ghosts, pinned, versions = map(int, row)
        return Totals(total, blocks, small, ghosts, pinned, versions)

    async def totals(self) -> Totals:
        self.last_totals = await self._run(self._totals_sync)
        return self.last_totals

    async def evict_slice(
        self, target_bytes: int, capacity: int, batch: int = EVICT_BATCH
    ) -> Evicted:
        """Evict by the policy, looking at up to ``batch`` blocks, as many as it
        takes for the index to total at most ``target_bytes`` (``capacity``: the
        --cache-size the small queue's share is of). Rows in one transaction on
        the index's thread, then the files, unlinked by the eviction helper
        (unlinker.py) while the next slice's rows are chosen.

        The whole slice is one job off the event loop: under a stream of hits
        each hop back to the loop waits its turn, and with a hop per step the
        eviction of a 1M-block cache ran at a third of its idle rate."""

        def evict() -> accounting.Slice:
            if self.eviction is Eviction.LRU:
                found = accounting.evict_lru(self.conn, target_bytes, batch, self.stats)
            else:
                found = accounting.evict_s3fifo(
                    self.conn, target_bytes, capacity, batch, self.stats
                )
            self.last_totals = self._totals_sync()
            # This slice's files go while the next slice's rows are chosen:
            # the slice before is settled first (its files gone, then its
            # emptied versions' dirs), and the last slice before a pause is
            # settled at once, so a slice saying "no more" leaves no file.
            path = self._layout.version_path
            self._unlinker.start(groups_of(found.chosen, lambda name: str(path(name))))
            self._prune_emptied()
            self._emptied += found.emptied
            if self.last_totals.bytes <= target_bytes or found.looked == 0:
                self._unlinker.settle()
                self._prune_emptied()
            return found

        done = await self._run(evict)
        chosen = done.chosen
        # More to do only if this slice got anywhere: an empty index never shrinks.
        more = self.last_totals.bytes > target_bytes and done.looked > 0
        recent_after = time.time() - RECENT_USE
        recent = sum(atime >= recent_after for _, _, atime in chosen)
        victims = tuple((name, idx) for name, idx, _ in chosen)
        return Evicted(len(chosen), done.freed, recent, more, victims)

    def _prune_emptied(self) -> None:
        """The files (and meta.json) of versions the last settled slice emptied:
        they take space too. One still in use is tried again at the next
        settle. Blocks the slice could not remove mark a reconcile due. On the
        index's thread."""
        if self._unlinker.take_left():  # bytes without rows: reclaimed by a reconcile
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                if not reconcile.is_needed(self.conn):
                    reconcile.mark_needed(self.conn)
        emptied, self._emptied = self._emptied, []
        layout = self._layout
        for version in emptied:
            gone = wholeversions.prune(layout.data_path(version), layout.map_path(version))
            if gone is None:
                self._emptied.append(version)
            elif gone:
                store.prune_object(layout.version_path(version).parent)

    async def evict_to(self, target_bytes: int, capacity: int | None = None) -> Evicted:
        """Evict slice after slice down to ``target_bytes`` (tests and tools; the
        daemon's upkeep runs slices itself, between other work)."""
        await self.flush()
        blocks = freed = recent = 0
        while True:
            done = await self.evict_slice(target_bytes, capacity or target_bytes)
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
        # A slice still being unlinked: its files have no rows any more, and
        # a reconcile step must not take them for orphans to index.
        self._unlinker.settle()
        self._prune_emptied()
        if self._reconciler is None:
            if not reconcile.is_needed(self.conn):
                return None
            self._reconcile_fd = reconcile.take_turn(self._layout)
            if self._reconcile_fd < 0:
                return None
            self._reconciler = Reconciler(self._layout, self.conn)
        try:
            progress = self._reconciler.step(max_files)
        except BaseException:
            self._reconciler = None
            self._reconcile_fd = reconcile.end_turn(self._reconcile_fd)
            raise
        if progress.done:
            self._reconciler = None
            self._reconcile_fd = reconcile.end_turn(self._reconcile_fd)
        self.last_totals = self._totals_sync()
        return progress
