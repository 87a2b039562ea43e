"""This process's view of the cached blocks: open versions, presence, verification, use, publish.

Presence is always the version's map file (versionfile.py); what is kept
here only saves work: versions opened before (openversions.py), and which
blocks this process has verified the checksum of. Every use of a block is
reported to the index, which keeps the LRU accounting.

Bytes are copied out of a data file under a read lock, never sent from it
with ``sendfile``: a hole punched by an eviction would change bytes a
socket had not sent yet (docs/format-3-design.md, Hazards 1). Blocks
fetched ahead of their reader are also kept in memory a moment once
written (recent.py), and that reader takes them from there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from . import blockio, mapfile
from .aio import Disk
from .blockfile import Buffer, CorruptBlock, Parts
from .index import FLUSH_SHARE, CacheIndex
from .layout import Layout
from .marks import BlockMarks
from .openversions import OpenVersions, SharedVersion
from .recent import RecentBlocks
from .staging import Staging
from .version import Version
from .versionfile import VersionFiles

log = logging.getLogger(__name__)
T = TypeVar("T")

# Blocks whose checksum this process has verified, so later hits read only
# the bytes asked for, in chunks of marks.CHUNK_BLOCKS: 8 MiB of bits, all
# of 67M blocks (or 8,192 scattered ones; ~11 MB at most). Bounded:
# forgetting only costs one more verification.
VERIFIED_CHUNKS = 8192
# How many blocks a single presence check looks at.
PRESENCE_CHECK_LIMIT = 64
# How long removing a corrupt block waits for its other readers.
CORRUPT_PATIENCE = 1.0


@dataclasses.dataclass(slots=True)
class CachedBlock:
    """Bytes of a block read from the cache: ``data`` from ``start`` in the block
    (the whole block when it was read to verify it)."""

    start: int
    data: Buffer

    def bytes_of(self, start: int, end: int) -> Buffer | None:
        """Bytes [start, end) of the block if they were read."""
        if start < self.start or end > self.start + len(self.data):
            return None
        if start == self.start and end - start == len(self.data):
            return self.data
        return self.data[start - self.start : end - self.start]


class Blocks:
    def __init__(
        self,
        layout: Layout,
        index: CacheIndex,
        disk: Disk,
        table: OpenVersions,
        *,
        capacity: int,
        fsync: bool,
        on_pressure: Callable[[], None],
        recent_bytes: int,
    ) -> None:
        self.layout = layout
        self.index = index
        self.disk = disk
        self.table = table
        self.capacity = capacity
        self.fsync = fsync
        # Called when the cache may be over capacity or the disk refused a write.
        self._on_pressure = on_pressure
        self._verified = BlockMarks(VERIFIED_CHUNKS)
        self.recent = RecentBlocks(recent_bytes)
        self._staging: Staging | None = None

    async def start(self) -> None:
        self._staging = await self.disk.run(lambda: Staging(self.layout))

    async def close(self, *, keep_staging: bool = False) -> None:
        """``keep_staging``: leave the staging dir as a crash would, so the next
        start reconciles the index (staging.sweep_leftovers)."""
        if self._staging is not None:
            staging = self._staging
            await self.disk.run(staging.release if keep_staging else staging.close)
        self.table.close_all()

    @property
    def staging(self) -> Staging:
        assert self._staging is not None, "cache not started"
        return self._staging

    # -- the version's files ----------------------------------------------------
    async def _version(self, v: Version) -> SharedVersion | None:
        """The version's files, open and acquired (release them), or None when
        the version has none on disk."""
        shared = self.table.get(v.name)
        if shared is not None:
            return shared
        job = self.disk.start(lambda: blockio.open_version(v, create=False))
        try:
            files = await asyncio.shield(job)
        except asyncio.CancelledError:  # the thread goes on: its files are closed after
            job.add_done_callback(_close_unclaimed)
            raise
        return None if files is None else self.table.adopt(v.name, files)

    async def _in_thread(self, shared: SharedVersion, fn: Callable[[], T]) -> T:
        """``fn()`` on a disk thread, with ``shared`` held until it ends, even if
        the caller is cancelled meanwhile: its files are never closed under
        it (a closed fd's number may be another file's at once)."""
        job = self.disk.start(fn)
        shared.acquire()
        job.add_done_callback(lambda done: _settled(done, shared))
        return await asyncio.shield(job)

    # -- reading ---------------------------------------------------------------
    async def open(
        self,
        v: Version,
        index: int,
        *,
        need_data: bool = False,
        span: tuple[int, int] | None = None,
    ) -> CachedBlock | None:
        """The block's bytes, or None when it is not on disk (or is being
        written or evicted right now).

        ``need_data``: the whole block. ``span``: the part of the block the
        caller will send; the whole block is read anyway the first time this
        process serves it, to verify its checksum.
        """
        if (kept := self._kept(v, index)) is not None:
            return kept
        shared = await self._version(v)
        if shared is None:
            return None
        try:
            verify = span is None or need_data or not self._verified.has(v.name, index)
            lo, hi = (0, v.block_length(index)) if verify or span is None else span
            files = shared.files
            try:
                try:
                    data = blockio.read(files, index, lo, hi, verify, on_loop=True)
                except blockio.Miss:
                    data = await self._in_thread(
                        shared, lambda: blockio.read(files, index, lo, hi, verify)
                    )
            except CorruptBlock as exc:  # from the loop's read or the thread's
                await self._drop_corrupt(v, files, index, exc)
                return None
        finally:
            shared.release()
        if data is None:
            return None
        if verify:
            self._verified.add(v.name, index)
        self.touch(v, index)
        return CachedBlock(lo, data)

    async def _drop_corrupt(
        self, v: Version, files: VersionFiles, index: int, exc: CorruptBlock
    ) -> None:
        """Remove a block that failed its check, waiting for its other readers. Left
        mapped (if they outlast the wait), it is never marked verified: every
        read checks it again, and the next write of its bytes rewrites it
        (VersionFiles.write_group reads a mapped block back before it skips it)."""
        log.warning("dropping corrupt block %d of %s: %s", index, v.key, exc)
        self._verified.discard(v.name, index)
        removed = await self.disk.run(
            lambda: files.remove(index, 1, fsync=self.fsync, patience=CORRUPT_PATIENCE)
        )
        if not removed:
            log.warning("corrupt block %d of %s stays locked; it is written again", index, v.key)

    def read_held(self, v: Version, blocks: range, start: int, end: int) -> Buffer | None:
        """Bytes [start, end), at once, when the version is held open, the map
        has every block and the page cache has their bytes (the common warm
        hit), or of one block written a moment ago from memory (recent.py);
        else None. No await, no thread. Blocks this process has not
        verified yet (after a start) are read whole and checked here, a
        span at a time; a block that fails its check is left to the
        block-at-a-time path, which drops it."""
        if len(blocks) == 1 and (kept := self._kept(v, blocks.start)) is not None:
            at = blocks.start * v.block_size
            return kept.bytes_of(start - at, end - at)
        verify = not self._verified.has_all(v.name, blocks)
        shared = self.table.get(v.name)
        if shared is None:
            return None
        try:
            data = blockio.read_span(shared.files, blocks, start, end, verify=verify)
        except CorruptBlock:
            return None
        finally:
            shared.release()
        if data is None:
            return None
        if verify:
            self._verified.add_all(v.name, blocks)
        for i in blocks:
            self.touch(v, i)
        return data

    def _kept(self, v: Version, index: int) -> CachedBlock | None:
        """The block, written a moment ago, from its buffer kept in memory
        (recent.py); taken only while this process holds the very files it
        was written into (a version dropped, or swept as unlinked, takes its
        kept blocks with it, even once its files are made again)."""
        if not self.recent.has(v.name, index):  # the hit path's usual case: one look
            return None
        owner = self.table.current(v.name)
        kept = self.recent.take(v.name, index, owner) if owner is not None else None
        if kept is None:
            return None
        self.touch(v, index)
        return CachedBlock(0, kept)

    async def present(self, v: Version, indices: Iterable[int]) -> set[int]:
        """Which of these blocks the version's map has."""
        wanted = sorted(set(indices))
        if not wanted:
            return set()
        shared = await self._version(v)
        if shared is None:
            return set()
        try:
            first, count = wanted[0], wanted[-1] + 1 - wanted[0]
            files = shared.files
            try:
                entries = files.entries(first, count, blockio.nowait)
            except blockio.Miss:
                entries = await self._in_thread(shared, lambda: files.entries(first, count))
        finally:
            shared.release()
        there = mapfile.mapped(files.header, first, entries)
        return {i for i in wanted if there[i - first]}

    def hit(self, v: Version, index: int) -> None:
        """The block was served from the cache to a client whose read did not
        fetch it (the eviction policy counts these)."""
        self.index.hit(v.name, index)
        if self.index.backlogged:
            self._on_pressure()

    def touch(self, v: Version, index: int, *, written: bool = False) -> None:
        """Tell the index the block was read (or ``written``) now."""
        self.index.record(v.name, index, v.block_length(index), v.about, written=written)
        if self.index.backlogged:
            self._on_pressure()

    # -- writing ---------------------------------------------------------------
    async def publish(self, v: Version, index: int, data: bytes | memoryview) -> bool:
        """Write a fetched block to disk; False when it could not be (disk full):
        the caller still has the bytes to serve, so nothing is lost but the caching."""
        (written,) = await asyncio.shield(self.publish_group(v, [(index, [data])]))
        return written

    def publish_group(
        self,
        v: Version,
        group: Sequence[tuple[int, Parts]],
        keep: Callable[[int], memoryview | None] | None = None,
    ) -> asyncio.Future[list[bool]]:
        """Start writing fetched blocks (index, their bytes in parts) to disk, all in one disk
        thread job: a fill pays one thread hand-off per group, not per block,
        and one write per run of consecutive blocks. The future says which
        were written; await it through asyncio.shield. The bookkeeping (the
        index told) is done when the job ends, whoever awaits the future or
        not, so a fetch cancelled meanwhile loses no record of its blocks.
        ``keep(i)``: block ``i``'s buffer, to stay in memory a moment once
        written (recent.py) for a reader on its way, or None."""
        held = self.table.get(v.name)
        fsync = self.fsync
        items = sorted(group, key=lambda item: item[0])
        # One job at a time writes into a version's file (aio.Disk.start).
        job = self.disk.start(lambda: blockio.write(v, held, items, fsync), lane=v.name)
        done: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()

        def finish(job: asyncio.Future[tuple[VersionFiles | None, list[OSError | None]]]) -> None:
            if held is not None:
                held.release()
            if job.cancelled():  # still queued at shutdown: nothing was written
                done.cancel()
                return
            if (failure := job.exception()) is not None:
                done.set_exception(failure)
                return
            opened, results = job.result()
            try:
                if opened is not None:  # held files, if any, were dropped meanwhile
                    self.table.forget(v.name)
                    self.table.adopt(v.name, opened).release()
                written = [
                    self._published(v, i, result)
                    for (i, _), result in zip(items, results, strict=True)
                ]
                # Kept under the files written into, while the table still has them.
                owner = self.table.current(v.name)
                if keep is not None and owner is not None and (opened or owner is held):
                    for (i, _), ok in zip(items, written, strict=True):
                        if ok and (buffer := keep(i)) is not None:
                            self.recent.keep(v.name, i, buffer, owner)
            except Exception as exc:  # the fill must hear of it, not wait forever
                done.set_exception(exc)
                return
            done.set_result(written)

        job.add_done_callback(finish)
        return done

    def _published(self, v: Version, index: int, result: OSError | None) -> bool:
        if result is not None:
            log.warning("could not cache block %d of %s: %s", index, v.key, result)
            self._on_pressure()
            return False
        self._verified.add(v.name, index)
        self.touch(v, index, written=True)
        # What waits for a flush counts as it will stand on disk, a version's
        # files beside its blocks' bytes (16 KiB beside 4-32 KiB for small
        # objects). Counting the bytes alone, 8 clients filling 8,000 objects
        # of 1-8 blocks of 4 KiB ran a 50 MB cache up to 1.33x over by du
        # (make bench-overshoot: now 1.00-1.13x).
        pending = self.index.pending_on_disk
        if pending > FLUSH_SHARE * self.capacity or (
            self.index.last_totals.on_disk + pending > self.capacity
        ):
            self._on_pressure()
        return True

    def forget(self, name: str) -> None:
        """Close this process's files of a version being dropped (or evicted by
        hand), and forget the blocks of it kept in memory."""
        self.table.forget(name)
        self.recent.forget(name)


def _settled(job: asyncio.Future[Any], shared: SharedVersion) -> None:
    shared.release()
    if not job.cancelled():
        job.exception()  # retrieved: a caller cancelled meanwhile no longer asks


def _close_unclaimed(job: asyncio.Future[VersionFiles | None]) -> None:
    if not job.cancelled() and job.exception() is None and (files := job.result()) is not None:
        files.close()
