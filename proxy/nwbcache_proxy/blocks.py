"""This process's view of the block files: open-file table, presence, verification, use, publish.

Presence is always the file (store.py); what is kept here only saves work:
fds of blocks opened and checked before (openblocks.py), and which blocks
this process has verified the checksum of. Every use of a block is reported
to the index, which keeps the LRU accounting.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Sequence

from . import publish, store
from .aio import Disk
from .blockfile import Parts
from .index import FLUSH_SHARE, CacheIndex
from .layout import Layout
from .lru import BoundedLRU
from .openblocks import OpenBlocks, SharedFd, pread_nowait
from .staging import Staging
from .store import OpenBlock
from .version import Version

log = logging.getLogger(__name__)

# Blocks whose checksum this process has verified, so later hits go straight
# to sendfile. Bounded: forgetting only costs one more verification.
VERIFIED_MEMORY = 200_000
# Spans up to this size are read along with the open (from the page cache on
# the loop when it holds them), so a small read needs no sendfile set-up.
SMALL_READ = 128 * 1024
# How many block files a single presence check looks at.
PRESENCE_CHECK_LIMIT = 64


class Blocks:
    def __init__(
        self,
        layout: Layout,
        index: CacheIndex,
        disk: Disk,
        table: OpenBlocks,
        *,
        capacity: int,
        fsync: bool,
        on_pressure: Callable[[], None],
    ) -> None:
        self.layout = layout
        self.index = index
        self.disk = disk
        self.table = table
        self.capacity = capacity
        self.fsync = fsync
        # Called when the cache may be over capacity or the disk refused a write.
        self._on_pressure = on_pressure
        self._verified: BoundedLRU[str, int] = BoundedLRU(VERIFIED_MEMORY)
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

    # -- reading ---------------------------------------------------------------
    def held(self, v: Version, index: int) -> SharedFd | None:
        """The block's fd if this process holds it open, acquired (release it)."""
        return self.table.get(v.name, index)

    async def open(
        self,
        v: Version,
        index: int,
        *,
        need_data: bool = False,
        span: tuple[int, int] | None = None,
    ) -> OpenBlock | None:
        """The block, open, or None when it is not on disk.

        ``need_data``: with the block's bytes read (and verified). ``span``:
        the part of the block the caller will send, read at once when small.
        """
        small = span is not None and span[1] - span[0] <= SMALL_READ
        shared = self.table.get(v.name, index)
        if shared is not None:  # opened and checked before: no open, no header
            block = OpenBlock(
                fd=shared.fd,
                length=v.block_length(index),
                file_size=shared.file_size,
                data=None,
                owner=shared,
            )
            complete = True
            try:
                if need_data:
                    block.data = await self.pread(shared.fd, block.length, block.data_offset)
                    complete = block.data is not None
                elif small and span is not None:
                    piece = await self.pread(
                        shared.fd, span[1] - span[0], block.data_offset + span[0]
                    )
                    complete = piece is not None
                    block.piece = None if piece is None else (span[0], piece)
            except BaseException:
                block.close()
                raise
            if complete:
                self.touch(v, index, shared.file_size)
                return block
            block.close()  # a short read: the file is not what it was; look again
            self.table.forget(v.name, index)
        return await self._open_file(v, index, need_data=need_data, span=span if small else None)

    async def _open_file(
        self, v: Version, index: int, *, need_data: bool, span: tuple[int, int] | None
    ) -> OpenBlock | None:
        path = v.block_path(index)
        verify = need_data or self._verified.get(path) is None
        length = v.block_length(index)
        piece = span if not verify else None
        opened = await self.disk.run(
            lambda: store.open_block(
                path, index=index, length=length, digest=v.digest, verify=verify, span=piece
            )
        )
        if opened is None:
            return None
        if verify:
            self._verified.put(path, 1)
        opened.owner = self.table.adopt(v.name, index, opened.fd, opened.file_size)
        self.touch(v, index, opened.file_size)
        return opened

    async def pread(self, fd: int, length: int, offset: int) -> bytes | None:
        """Bytes of an open block file: from the page cache on the loop, else in
        a thread. None when the file is shorter than it should be."""
        data = pread_nowait(fd, length, offset)
        if data is None:
            data = await self.disk.run(lambda: os.pread(fd, length, offset))
        return data if len(data) == length else None

    def read_held(self, v: Version, blocks: range, start: int, end: int) -> list[bytes] | None:
        """Bytes [start, end) as one piece per block, at once, when every block
        is held open and the page cache has the bytes (the common warm hit);
        else None. No await, no thread."""
        bs = v.block_size
        shares: list[SharedFd] = []
        pieces: list[bytes] = []
        try:
            for i in blocks:
                shared = self.table.get(v.name, i)
                if shared is None:
                    return None
                shares.append(shared)
            for i, shared in zip(blocks, shares, strict=True):
                lo = max(start, i * bs) - i * bs
                hi = min(end, (i + 1) * bs) - i * bs
                piece = pread_nowait(shared.fd, hi - lo, OpenBlock.data_offset + lo)
                if piece is None:
                    return None
                pieces.append(piece)
        finally:
            for shared in shares:
                shared.release()
        for i, shared in zip(blocks, shares, strict=True):
            self.touch(v, i, shared.file_size)
        return pieces

    async def present(self, v: Version, indices: Iterable[int]) -> set[int]:
        """Which of these blocks are on disk (held open, or a file exists)."""
        indices = list(indices)
        held = {i for i in indices if self.table.holds(v.name, i)}
        paths = [(i, v.block_path(i)) for i in indices if i not in held]
        if not paths:
            return held
        on_disk = await self.disk.run(lambda: {i for i, p in paths if os.path.exists(p)})
        return held | on_disk

    def hit(self, v: Version, index: int) -> None:
        """The block was served from the cache to a client whose read did not
        fetch it (the eviction policy counts these)."""
        self.index.hit(v.name, index)

    def touch(self, v: Version, index: int, file_size: int) -> None:
        """Tell the index the block was used now."""
        self.index.record(v.name, index, file_size, v.about)

    # -- writing ---------------------------------------------------------------
    async def publish(self, v: Version, index: int, data: bytes | memoryview) -> bool:
        """Write a fetched block to disk; False when it could not be (disk full):
        the caller still has the bytes to serve, so nothing is lost but the caching."""
        (written,) = await asyncio.shield(self.publish_group(v, [(index, [data])]))
        return written

    def publish_group(
        self, v: Version, group: Sequence[tuple[int, Parts]]
    ) -> asyncio.Future[list[bool]]:
        """Start writing fetched blocks (index, their bytes in parts) to disk, all in one disk
        thread job: a fill pays one thread hand-off per group, not per block.
        The future says which were written; await it through asyncio.shield.
        The bookkeeping (fds kept, the index told) is done when the job ends,
        whoever awaits the future or not, so a fetch cancelled meanwhile loses
        no record of its blocks."""
        staging = self.staging
        items = [(v.block_path(i), i, data) for i, data in group]
        job = self.disk.start(
            lambda: publish.publish_blocks(staging, items, v.digest, fsync=self.fsync)
        )
        done: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()

        def finish(job: asyncio.Future[list[tuple[int, int] | OSError]]) -> None:
            if job.cancelled():  # still queued at shutdown: nothing was written
                done.cancel()
                return
            if (failure := job.exception()) is not None:
                done.set_exception(failure)
                return
            results = job.result()
            written: list[bool] = []
            try:
                for (path, i, _), result in zip(items, results, strict=True):
                    written.append(self._published(v, path, i, result))
            except Exception as exc:  # the fill must hear of it, not wait forever
                for result in results[len(written) + 1 :]:  # fds nobody took
                    if not isinstance(result, OSError):
                        os.close(result[1])
                done.set_exception(exc)
                return
            done.set_result(written)

        job.add_done_callback(finish)
        return done

    def _published(
        self, v: Version, path: str, index: int, result: tuple[int, int] | OSError
    ) -> bool:
        if isinstance(result, OSError):
            log.warning("could not cache block %d of %s: %s", index, v.key, result)
            self._on_pressure()
            return False
        size, fd = result
        self._verified.put(path, 1)
        # Held open from now: its first reader needs no open (eviction forgets it).
        self.table.adopt(v.name, index, fd, size).release()
        self.touch(v, index, size)
        pending = self.index.pending_bytes
        if pending > FLUSH_SHARE * self.capacity or (
            self.index.last_totals.bytes + pending > self.capacity
        ):
            self._on_pressure()
        return True

    def forget_version(self, v: Version) -> None:
        """Close this process's fds of a version being dropped."""
        self.table.drop_version(v.name)
