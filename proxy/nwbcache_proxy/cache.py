"""The block cache: resolve an object's version, then serve byte ranges of it
from block files on disk, fetching the missing blocks from upstream.

Storage (store.py), LRU accounting (index.py) and the upstream client
(upstream.py) are separate; this module is the policy that ties them:
single-flight per block, runs of consecutive missing blocks fetched with one
upstream request, read-ahead for sequential readers, versions that never mix.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import enum
import logging
import os
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from nwbcache.urls import UpstreamURL, cache_key, redact_url

from . import store
from .blockfile import HEADER_SIZE
from .errors import UpstreamUnavailable, VersionChanged
from .index import CacheIndex
from .inflight import InflightBlock
from .layout import Layout, key_hash
from .lru import BoundedLRU
from .metrics import Metrics
from .objectmeta import ObjectMeta, block_count, block_span, blocks_for
from .openblocks import OpenBlocks, pread_nowait, raise_fd_limit, table_capacity
from .store import OpenBlock, Staging
from .upstream import Upstream

log = logging.getLogger(__name__)
T = TypeVar("T")

# Objects whose metadata is kept in memory; the rest is re-read from meta.json.
META_MEMORY = 10_000
# Blocks whose checksum this process has verified, so later hits go straight
# to sendfile. Bounded: forgetting only costs one more verification.
VERIFIED_MEMORY = 200_000
# Longest single upstream request, in bytes: long enough to amortise the
# round trip (4 MiB at 80 MB/s is 50 ms of transfer per 30 ms of latency),
# short enough that a retry after a reset re-reads little, and a quarter of
# the default read-ahead so that a sequential reader keeps several requests
# in flight: S3 caps throughput per connection, and parallel ranged GETs are
# AWS's own advice for reading one large object fast.
MAX_RUN_BYTES = 4 * 1024 * 1024
# Spans up to this size are read into memory (from the page cache on the
# loop when it holds them) and sent with one write; larger ones go out with
# sendfile.
SMALL_READ = 128 * 1024
# A range up to this size whose blocks are all held open is answered from
# memory in one write (_read_held): no await, no thread, no sendfile set-up.
# Bounded so that many slow clients cannot pin much memory in socket buffers.
BODY_MAX = 256 * 1024
# On shutdown, fetches under way get this long to finish before cancellation.
SHUTDOWN_GRACE = 5.0
FETCH_TASK_PREFIX = "nwbcache-fetch"
# How many block files a single presence check looks at.
PRESENCE_CHECK_LIMIT = 64


class CacheOutcome(enum.StrEnum):
    HIT = "HIT"
    MISS = "MISS"
    PARTIAL = "PARTIAL"


@dataclasses.dataclass(frozen=True, slots=True)
class FileSegment:
    """Bytes [start, end) of the data of an open block file (sendfile-able)."""

    block: OpenBlock
    start: int
    end: int


Segment = FileSegment | bytes


class RangeReader:
    """The bytes of one range, and whether they came from cache.

    Iterate it once; ``aclose`` releases the open block files whether or not
    it was iterated (a generator that never started cannot clean up itself).
    The consumer closes each FileSegment's block once it has sent it.

    A reader made with ``of_body`` holds the whole range in memory (a small
    hit) and nothing open: the server answers it with one write, and neither
    iterating nor closing it costs anything on that path.
    """

    def __init__(
        self,
        outcome: CacheOutcome,
        segments: AsyncGenerator[Segment, None] | None,
        first: object,
        body: bytes | None = None,
    ) -> None:
        self.outcome = outcome
        self.body = body
        self._segments = segments
        self._first = first
        self._started = False

    @classmethod
    def of_body(cls, outcome: CacheOutcome, body: bytes) -> RangeReader:
        return cls(outcome, None, None, body)

    def __aiter__(self) -> AsyncIterator[Segment]:
        self._started = True
        if self._segments is None:
            assert self.body is not None
            return _one(self.body)
        return self._segments

    async def aclose(self) -> None:
        if not self._started and isinstance(self._first, OpenBlock):
            self._first.close()
        if self._segments is not None:
            await self._segments.aclose()


class BlockCache:
    def __init__(
        self,
        layout: Layout,
        index: CacheIndex,
        upstream: Upstream,
        *,
        block_size: int,
        capacity: int,
        readahead: int,
        revalidate_after: float,
        fsync: bool,
        metrics: Metrics,
    ) -> None:
        self.layout = layout
        self.index = index
        self.upstream = upstream
        self.block_size = block_size
        self.capacity = capacity
        self.readahead_blocks = max(1, readahead // block_size)
        self.max_run_blocks = max(1, MAX_RUN_BYTES // block_size)
        self.revalidate_after = revalidate_after
        self.fsync = fsync
        self.metrics = metrics
        metrics.cache_capacity.set(capacity)
        self.staging: Staging | None = None
        # Disk work runs here, not in the loop's default executor, so it can be
        # sized for many concurrent block opens.
        self._disk = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="nwbcache-disk")
        self._meta: BoundedLRU[str, ObjectMeta] = BoundedLRU(META_MEMORY)
        self._discovering: dict[str, asyncio.Task[ObjectMeta]] = {}
        self._inflight: dict[tuple[str, int], InflightBlock] = {}
        self._verified: BoundedLRU[str, int] = BoundedLRU(VERIFIED_MEMORY)
        # Per object: where the last read ended, and how many reads in a row
        # continued the one before (drives sequential read-ahead).
        self._last_end: BoundedLRU[str, tuple[int, int]] = BoundedLRU(4096)
        # Blocks fetched (by a discovery or by read-ahead) that no client has
        # read yet: their first read counts as served from upstream, a miss,
        # because the client would have waited for upstream without the fetch
        # made on its behalf. Bounded: forgetting one only counts it as a hit.
        self._unserved: BoundedLRU[tuple[str, int], bool] = BoundedLRU(65_536)
        # By version digest (bytes cache their hash; an ObjectMeta would be
        # hashed field by field on every lookup).
        self._vdirs: BoundedLRU[bytes, tuple[Path, str, str]] = BoundedLRU(META_MEMORY)
        self._fds = OpenBlocks(table_capacity(raise_fd_limit()))
        self._served_upstream = metrics.served_bytes.labels("upstream")
        self._served_cache = metrics.served_bytes.labels("cache")
        self._tasks: set[asyncio.Task[None]] = set()
        self._evict_wakeup = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        self.staging = await self._io(lambda: Staging(self.layout))
        swept = await self._io(lambda: store.sweep_leftovers(self.layout))
        if swept:
            log.info("swept %d leftovers of earlier runs", swept)
        self._spawn(self._reconcile_then_evict())
        self._spawn(self._maintenance_loop())

    async def close(self) -> None:
        # Let fetches under way finish (their blocks are written and indexed)
        # for a moment before cancelling what is left.
        fetches = [t for t in self._tasks if t.get_name().startswith(FETCH_TASK_PREFIX)]
        if fetches:
            await asyncio.wait(fetches, timeout=SHUTDOWN_GRACE)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.staging is not None:
            staging = self.staging
            await self._io(staging.close)
        self._disk.shutdown(wait=True)
        self._fds.close_all()

    def _spawn(
        self, coro: Coroutine[Any, Any, None], name: str | None = None
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _io(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._disk, fn)

    # -- object versions -----------------------------------------------------
    async def resolve(self, url: UpstreamURL) -> ObjectMeta:
        """The current version of the object, from memory, disk or upstream."""
        key = cache_key(url)
        meta = self._fresh_meta(key)
        if meta is not None:
            return meta
        task = self._discovering.get(key)
        if task is None:
            stale = self._meta.get(key)
            if stale is None:
                kh = key_hash(key)
                raw = await self._io(lambda: store.read_meta(self.layout.meta_path(kh)))
                on_disk = ObjectMeta.from_json(raw, key) if raw is not None else None
                if on_disk is not None and self._is_fresh(on_disk):
                    self._meta.put(key, on_disk)
                    return on_disk
                stale = on_disk
            # Look again after the disk read: a discovery may have started, or
            # finished, meanwhile (finished ones leave _discovering at once).
            meta = self._fresh_meta(key)
            if meta is not None:
                return meta
            task = self._discovering.get(key)
            if task is None:
                task = asyncio.ensure_future(self._discover(url, key, stale))
                self._discovering[key] = task
                task.add_done_callback(lambda _t: self._discovering.pop(key, None))
                return await asyncio.shield(task)
        self.metrics.coalesced.inc()  # joined a discovery already under way
        # shield: a client hanging up must not cancel a discovery others wait on.
        return await asyncio.shield(task)

    def _is_fresh(self, meta: ObjectMeta) -> bool:
        return time.time() - meta.validated_at < self.revalidate_after

    def _fresh_meta(self, key: str) -> ObjectMeta | None:
        meta = self._meta.get(key)
        return meta if meta is not None and self._is_fresh(meta) else None

    async def _discover(self, url: UpstreamURL, key: str, stale: ObjectMeta | None) -> ObjectMeta:
        version, first = await self.upstream.discover(url, self.block_size)
        meta = ObjectMeta(key, version, time.time())
        if stale is not None and not stale.version.same_version(version):
            log.info("object changed upstream, dropping old version: %s", redact_url(url.url))
            await self.drop_version(stale)
        # Block 0 first, then the metadata that makes the object known: a
        # reader that finds the metadata (here or in another process) must
        # find block 0 too, or it would fetch it a second time.
        if version.size > 0 and (self._inflight.get((self._vdir_key(meta), 0)) is None):
            await self._publish(meta, 0, first)
        kh = key_hash(key)
        staging = self._require_staging()
        await self._io(lambda: store.write_meta(staging, self.layout.meta_path(kh), meta.to_json()))
        self._meta.put(key, meta)
        return meta

    async def drop_version(self, meta: ObjectMeta) -> None:
        """Forget one version: metadata, blocks and index rows."""
        current = self._meta.get(meta.cache_key)
        if current is not None and current.version.same_version(meta.version):
            self._meta.pop(meta.cache_key)
        kh = key_hash(meta.cache_key)
        vdir = self._vdir(meta)

        def drop() -> None:
            raw = store.read_meta(self.layout.meta_path(kh))
            on_disk = ObjectMeta.from_json(raw, meta.cache_key) if raw else None
            if on_disk is not None and on_disk.version.same_version(meta.version):
                store.unlink_quietly(self.layout.meta_path(kh))
            store.drop_dir(self.layout, vdir)

        self._fds.drop_version(str(vdir))
        await self._io(drop)
        await self.index.forget_object(self._relative(vdir))

    def _require_staging(self) -> Staging:
        assert self.staging is not None, "cache not started"
        return self.staging

    # -- paths -------------------------------------------------------------
    def _vdir(self, meta: ObjectMeta) -> Path:
        return self._vdir_and_key(meta)[0]

    def _vdir_key(self, meta: ObjectMeta) -> str:
        return self._vdir_and_key(meta)[1]

    def _vdir_and_key(self, meta: ObjectMeta) -> tuple[Path, str, str]:
        """(path, its string, relative to the layout root). Memoised: two SHA-256s
        and path arithmetic, asked for several times per block."""
        known = self._vdirs.get(meta.digest)
        if known is None:
            path = self.layout.version_dir(key_hash(meta.cache_key), meta.digest, self.block_size)
            known = (path, str(path), self._relative(path))
            self._vdirs.put(meta.digest, known)
        return known

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.layout.root))

    def _block_path(self, meta: ObjectMeta, index: int) -> Path:
        return self._vdir(meta) / Layout.block_name(index)

    # -- reading -------------------------------------------------------------
    async def read(
        self, meta: ObjectMeta, url: UpstreamURL, start: int, end: int, *, eager: bool
    ) -> RangeReader:
        """Plan a read of bytes [start, end): how much is cached, and the bytes.

        The first block is acquired before returning, so the outcome is known
        before response headers go out and a version change found on the way
        surfaces while the request can still start over.

        ``eager``: the client named the bytes it wants (a Range): fetch them
        at once, up to the read-ahead. Otherwise (a plain GET) the fetch
        window starts at one block and doubles as the client consumes, so a
        client that hangs up after the headers (remfile learning the size)
        costs one block upstream, while a real download soon streams with
        the full read-ahead.
        """
        blocks = blocks_for(start, end, self.block_size)
        ahead = self._sequential_readahead(meta.cache_key, start, end)
        if end - start <= BODY_MAX:
            held = self._read_held(meta, blocks, start, end)
            if held is not None:
                if ahead:
                    self._prefetch(meta, url, blocks.stop, blocks.stop + ahead)
                return held
        window = self.readahead_blocks if eager else 1
        bs = self.block_size
        first_span = (
            start - blocks.start * bs,
            min(end, (blocks.start + 1) * bs) - blocks.start * bs,
        )
        first = await self._acquire(
            meta,
            url,
            blocks.start,
            wanted_end=min(blocks.stop, blocks.start + window),
            span=first_span,
        )
        vkey = self._vdir_key(meta)
        fresh = (
            isinstance(first, OpenBlock) and self._unserved.pop((vkey, blocks.start)) is not None
        )
        present = isinstance(first, OpenBlock) and not fresh
        if isinstance(first, InflightBlock):
            await first.first_bytes()
        rest = range(blocks.start + 1, min(blocks.stop, blocks.start + 1 + PRESENCE_CHECK_LIMIT))
        cached_rest = await self._present(meta, rest) if len(rest) else set()
        if present and len(cached_rest) == len(rest):
            outcome = CacheOutcome.HIT
        elif not present and not cached_rest:
            outcome = CacheOutcome.MISS
        else:
            outcome = CacheOutcome.PARTIAL
        if eager:
            missing = [i for i in rest if i not in cached_rest]
            self._start_runs(meta, url, missing[: self.readahead_blocks])
        if ahead:
            self._prefetch(meta, url, blocks.stop, blocks.stop + ahead)
        if len(blocks) == 1 and isinstance(first, OpenBlock):
            body = first.bytes_of(*first_span)
            if body is not None:  # a small read, already in memory: no streaming
                first.close()
                (self._served_upstream if fresh else self._served_cache).inc(len(body))
                return RangeReader.of_body(outcome, body)
        segments = self._segments(meta, url, start, end, blocks, first, window, fresh)
        return RangeReader(outcome, segments, first)

    def _read_held(
        self, meta: ObjectMeta, blocks: range, start: int, end: int
    ) -> RangeReader | None:
        """The range at once when every block is held open and the page cache
        has its bytes (the common warm hit), else None for the general path."""
        vkey = self._vdir_key(meta)
        bs = self.block_size
        shares = []
        pieces = []
        try:
            for i in blocks:
                shared = self._fds.get(vkey, i)
                if shared is None:
                    return None
                shares.append(shared)
            for i, shared in zip(blocks, shares, strict=True):
                lo = max(start, i * bs) - i * bs
                hi = min(end, (i + 1) * bs) - i * bs
                piece = pread_nowait(shared.fd, hi - lo, HEADER_SIZE + lo)
                if piece is None:
                    return None
                pieces.append(piece)
        finally:
            for shared in shares:
                shared.release()
        fresh_blocks = fresh_bytes = 0
        for i, shared, piece in zip(blocks, shares, pieces, strict=True):
            self._touch(meta, i, shared.file_size)
            if self._unserved.pop((vkey, i)) is not None:
                fresh_blocks += 1
                fresh_bytes += len(piece)
        if fresh_bytes:
            self._served_upstream.inc(fresh_bytes)
        if fresh_bytes < end - start:
            self._served_cache.inc(end - start - fresh_bytes)
        if fresh_blocks == 0:
            outcome = CacheOutcome.HIT
        elif fresh_blocks == len(blocks):
            outcome = CacheOutcome.MISS
        else:
            outcome = CacheOutcome.PARTIAL
        body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return RangeReader.of_body(outcome, body)

    async def _segments(
        self,
        meta: ObjectMeta,
        url: UpstreamURL,
        start: int,
        end: int,
        blocks: range,
        first: OpenBlock | InflightBlock,
        window: int,
        first_fresh: bool,
    ) -> AsyncGenerator[Segment, None]:
        bs = self.block_size
        source: OpenBlock | InflightBlock | None = first
        planned_until = blocks.start + window  # blocks before this were asked for
        try:
            for i in blocks:
                lo = max(start, i * bs) - i * bs
                hi = min(end, (i + 1) * bs) - i * bs
                if source is None:
                    source = await self._acquire(
                        meta, url, i, wanted_end=min(blocks.stop, i + window), span=(lo, hi)
                    )
                if isinstance(source, OpenBlock):
                    if i == blocks.start:
                        fresh = first_fresh
                    else:
                        fresh = self._unserved.pop((self._vdir_key(meta), i)) is not None
                    (self._served_upstream if fresh else self._served_cache).inc(hi - lo)
                    yield FileSegment(source, lo, hi)
                else:
                    async for chunk in source.chunks(lo, hi):
                        self._served_upstream.inc(len(chunk))
                        yield chunk
                source = None
                if i == blocks.start:
                    # The window grows, and the top-ups start, only once the
                    # second block is asked for: a client that hangs up after
                    # the headers of a plain GET (remfile's size probe) costs
                    # at most one block beyond the first, not a window.
                    continue
                window = min(self.readahead_blocks, window * 2)
                # Stay up to one window ahead of the reader; top up when half
                # of it is consumed, so runs stay long rather than one block.
                if planned_until < blocks.stop and planned_until - (i + 1) <= window // 2:
                    upto = min(blocks.stop, i + 1 + window)
                    self._prefetch(meta, url, planned_until, upto)
                    planned_until = upto
        finally:
            if isinstance(source, OpenBlock):
                source.close()

    async def _acquire(
        self,
        meta: ObjectMeta,
        url: UpstreamURL,
        i: int,
        *,
        wanted_end: int,
        span: tuple[int, int] | None = None,
    ) -> OpenBlock | InflightBlock:
        """The block from disk, or its in-flight fetch (started if needed).
        ``span``: the bytes of the block the caller will send (read at once if small)."""
        vkey = self._vdir_key(meta)
        # A reader is attached from here on: the block, once published, has
        # been served (marking it only when streaming starts raced _publish
        # and reported the next read of the block as a miss).
        inflight = self._inflight.get((vkey, i))
        if inflight is not None:
            self.metrics.coalesced.inc()
            inflight.served = True
            return inflight
        opened = await self._open(meta, i, span=span)
        if opened is not None:
            return opened
        inflight = self._inflight.get((vkey, i))
        if inflight is not None:
            self.metrics.coalesced.inc()
            inflight.served = True
            return inflight
        upto = min(
            wanted_end, i + self.readahead_blocks, block_count(meta.version.size, self.block_size)
        )
        following = range(i + 1, upto)
        cached = await self._present(meta, following) if len(following) else set()
        run = [i]
        for j in following:  # extend the run while blocks are missing and not in flight
            if j in cached or (vkey, j) in self._inflight:
                break
            run.append(j)
        self._start_runs(meta, url, run)
        started = self._inflight[(vkey, i)]
        started.served = True
        return started

    async def _open(
        self,
        meta: ObjectMeta,
        i: int,
        *,
        need_data: bool = False,
        span: tuple[int, int] | None = None,
    ) -> OpenBlock | None:
        """The block, open, or None when it is not on disk.

        ``need_data``: with the block's bytes read. ``span``: the part of the
        block the caller will send, read at once when it is small.
        """
        small = span is not None and span[1] - span[0] <= SMALL_READ
        vkey = self._vdir_key(meta)
        shared = self._fds.get(vkey, i)
        if shared is not None:  # opened and checked before: no open, no header
            bstart, bend = block_span(i, meta.version.size, self.block_size)
            block = OpenBlock(
                fd=shared.fd,
                length=bend - bstart,
                file_size=shared.file_size,
                data=None,
                owner=shared,
            )
            complete = True
            try:
                if need_data:
                    block.data = await self._pread(shared.fd, block.length, HEADER_SIZE)
                    complete = block.data is not None
                elif small and span is not None:
                    piece = await self._pread(shared.fd, span[1] - span[0], HEADER_SIZE + span[0])
                    complete = piece is not None
                    block.piece = None if piece is None else (span[0], piece)
            except BaseException:
                block.close()
                raise
            if complete:
                self._touch(meta, i, shared.file_size)
                return block
            block.close()  # a short read: the file is not what it was; look again
            self._fds.forget(vkey, i)
        return await self._open_file(meta, i, need_data=need_data, span=span if small else None)

    async def _open_file(
        self,
        meta: ObjectMeta,
        i: int,
        *,
        need_data: bool,
        span: tuple[int, int] | None,
    ) -> OpenBlock | None:
        path = self._block_path(meta, i)
        bstart, bend = block_span(i, meta.version.size, self.block_size)
        verify = need_data or self._verified.get(str(path)) is None
        digest = meta.digest
        piece = span if not verify else None
        opened = await self._io(
            lambda: store.open_block(
                path, index=i, length=bend - bstart, digest=digest, verify=verify, span=piece
            )
        )
        if opened is None:
            return None
        if verify:
            self._verified.put(str(path), 1)
        opened.owner = self._fds.adopt(self._vdir_key(meta), i, opened.fd, opened.file_size)
        self._touch(meta, i, opened.file_size)
        return opened

    async def _pread(self, fd: int, length: int, offset: int) -> bytes | None:
        """Bytes of an open block: from the page cache on the loop, else in a
        thread. None when the file is shorter than it should be."""
        data = pread_nowait(fd, length, offset)
        if data is None:
            data = await self._io(lambda: os.pread(fd, length, offset))
        return data if len(data) == length else None

    def _touch(self, meta: ObjectMeta, i: int, file_size: int) -> None:
        """Tell the LRU index the block was used."""
        vdir_rel = self._vdir_and_key(meta)[2]
        self.index.record(f"{vdir_rel}/{Layout.block_name(i)}", vdir_rel, file_size)

    async def _present(self, meta: ObjectMeta, indices: range) -> set[int]:
        """Blocks that need no fetch: held open, or on disk."""
        vdir, vkey, _ = self._vdir_and_key(meta)
        held = {i for i in indices if self._fds.holds(vkey, i)}
        names = [(i, vdir / Layout.block_name(i)) for i in indices if i not in held]
        if not names:
            return held
        on_disk = await self._io(lambda: {i for i, p in names if os.path.exists(p)})
        return held | on_disk

    def _sequential_readahead(self, key: str, start: int, end: int) -> int:
        """Blocks to fetch past the end of this read.

        None unless it continues the last read of the object (at or just after
        its end: remfile reads back to back, h5py chunk scans leave small
        gaps; re-reading the same bytes does not count). Then a window that
        doubles with each read in a row that does (1, 2, 4, ... blocks, up to
        --readahead), as remfile grows its own requests: a few back-to-back
        metadata reads on open cost a block or two, a scan soon streams with
        the full read-ahead.
        """
        last = self._last_end.get(key)
        continues = last is not None and 0 <= start - last[0] <= self.block_size
        streak = last[1] + 1 if continues and last is not None else 0
        self._last_end.put(key, (end, streak))
        return 0 if streak == 0 else min(self.readahead_blocks, 2 ** (streak - 1))

    def _prefetch(self, meta: ObjectMeta, url: UpstreamURL, lo: int, hi: int) -> None:
        hi = min(hi, block_count(meta.version.size, self.block_size))
        if lo >= hi:
            return

        async def plan() -> None:
            cached = await self._present(meta, range(lo, hi))
            vkey = self._vdir_key(meta)
            self._start_runs(
                meta,
                url,
                [i for i in range(lo, hi) if i not in cached and (vkey, i) not in self._inflight],
            )

        self._spawn(plan())

    # -- fetching ------------------------------------------------------------
    def _start_runs(self, meta: ObjectMeta, url: UpstreamURL, indices: list[int]) -> None:
        """Fetch these blocks, one upstream request per run of consecutive ones."""
        vkey = self._vdir_key(meta)
        todo = [i for i in indices if (vkey, i) not in self._inflight]
        run: list[InflightBlock] = []
        for i in todo:
            if run and (i != run[-1].index + 1 or len(run) >= self.max_run_blocks):
                self._spawn(self._fetch_run(meta, url, run), FETCH_TASK_PREFIX)
                run = []
            bstart, bend = block_span(i, meta.version.size, self.block_size)
            block = InflightBlock(i, bend - bstart)
            self._inflight[(vkey, i)] = block
            run.append(block)
        if run:
            self._spawn(self._fetch_run(meta, url, run), FETCH_TASK_PREFIX)

    async def _fetch_run(
        self, meta: ObjectMeta, url: UpstreamURL, run: list[InflightBlock]
    ) -> None:
        """Fill consecutive in-flight blocks: from disk where another fetch
        published them meanwhile, else with one upstream request per gap.

        The run keeps only weak references to its blocks: a block that is
        complete (filled from disk, or published) is then freed as soon as
        its readers are done with it, rather than when the whole run ends.
        Holding them all measured 265 MB of RSS with 256 cold streams (runs
        waiting for an upstream connection held their disk-filled blocks).
        """
        vkey = self._vdir_key(meta)
        refs = [weakref.ref(block) for block in run]

        def pending() -> list[InflightBlock]:
            return [b for b in (r() for r in refs) if b is not None]

        try:
            gaps = _contiguous(await self._fill_from_disk(meta, run))
            del run
            while gaps:
                await self._stream_into(meta, url, gaps.pop(0))
        except asyncio.CancelledError:
            for block in pending():
                block.fail(UpstreamUnavailable("fetch cancelled: the daemon is shutting down"))
            raise
        except VersionChanged as exc:
            log.warning("object changed upstream mid-read: %s", redact_url(url.url))
            try:
                # Drop first, then wake the readers: a reader that starts over
                # must not find the old version's metadata still on disk.
                await self.drop_version(meta)
            finally:
                for block in pending():
                    block.fail(exc)
        except Exception as exc:
            for block in pending():
                block.fail(exc)
            log.info("fetch of %s failed: %s", redact_url(url.url), exc)
        finally:
            for block in pending():
                if self._inflight.get((vkey, block.index)) is block:
                    del self._inflight[(vkey, block.index)]

    async def _fill_from_disk(
        self, meta: ObjectMeta, run: list[InflightBlock]
    ) -> list[InflightBlock]:
        """Complete the blocks that are on disk; return those still missing.

        A reader decides to fetch after a presence check that may be stale by
        the time its run is registered (another fetch published the block in
        between); checking again here, after registration, is what makes
        "one upstream fetch per block" hold under a stampede.
        """
        present = await self._present(meta, range(run[0].index, run[-1].index + 1))
        missing: list[InflightBlock] = []
        vkey = self._vdir_key(meta)
        for block in run:
            opened = (
                await self._open(meta, block.index, need_data=True)
                if block.index in present
                else None
            )
            if opened is None:
                missing.append(block)
                continue
            try:
                assert opened.data is not None
                block.append(opened.data)
            finally:
                opened.close()
            if (
                self._inflight.get((vkey, block.index)) is block
            ):  # complete: new readers open the file
                del self._inflight[(vkey, block.index)]
        return missing

    async def _stream_into(
        self, meta: ObjectMeta, url: UpstreamURL, run: list[InflightBlock]
    ) -> None:
        """One upstream request for consecutive blocks, each published when full."""
        vkey = self._vdir_key(meta)
        start = run[0].index * self.block_size
        end = start + sum(b.length for b in run)
        pending = collections.deque(run)
        del run  # published blocks leave with their last reader (see _fetch_run)
        async for chunk in self.upstream.stream(url, start, end, meta.version):
            view = memoryview(chunk)
            while view:
                block = pending[0]
                take = min(len(view), block.length - block.filled)
                block.append(view[:take])
                view = view[take:]
                if block.complete:
                    pending.popleft()
                    await self._publish(meta, block.index, block.data, block)
                    if self._inflight.get((vkey, block.index)) is block:
                        del self._inflight[(vkey, block.index)]

    async def _publish(
        self,
        meta: ObjectMeta,
        index: int,
        data: bytes | memoryview,
        block: InflightBlock | None = None,
    ) -> None:
        """Write a fetched block to disk. A failure (disk full) loses nothing:
        the bytes are still served from memory, just not cached."""
        path = self._block_path(meta, index)
        staging = self._require_staging()
        digest = meta.digest
        try:
            size = await self._io(
                lambda: store.publish_block(staging, path, index, data, digest, fsync=self.fsync)
            )
        except OSError as exc:
            log.warning("could not cache block %d of %s: %s", index, meta.cache_key, exc)
            self._evict_wakeup.set()
            return
        self._verified.put(str(path), 1)
        if block is None or not block.served:
            self._unserved.put((self._vdir_key(meta), index), True)
        self.index.record(self._relative(path), self._relative(path.parent), size)
        if self.index.last_totals.bytes + self.index.pending_bytes > self.capacity:
            self._evict_wakeup.set()

    # -- upkeep ------------------------------------------------------------
    async def _reconcile_then_evict(self) -> None:
        result = await self.index.reconcile()
        if result is not None and any(result):
            log.info("index reconciled with disk: %d blocks added, %d removed", *result)
        self._evict_wakeup.set()

    async def _maintenance_loop(self) -> None:
        """Flush LRU updates and keep the cache under its capacity."""
        from .index import FLUSH_INTERVAL

        while True:
            try:
                async with asyncio.timeout(FLUSH_INTERVAL):
                    await self._evict_wakeup.wait()
            except TimeoutError:
                pass
            self._evict_wakeup.clear()
            try:
                self._fds.close_idle()
                await self.index.flush()
                if self.index.last_totals.bytes > self.capacity:
                    # Down to a low-water mark, so eviction runs in bursts
                    # rather than one block per publish.
                    evicted, recent = await self.index.evict_to(int(self.capacity * 0.95))
                    self.metrics.evictions.inc(evicted)
                    self.metrics.evicted_recent.inc(recent)
                totals = self.index.last_totals
                self.metrics.cache_size.set(totals.bytes)
                self.metrics.cache_blocks.set(totals.blocks)
            except Exception:
                log.exception("cache maintenance failed; retrying")
                await asyncio.sleep(FLUSH_INTERVAL)


async def _one(body: bytes) -> AsyncGenerator[Segment, None]:
    yield body


def _contiguous(blocks: list[InflightBlock]) -> list[list[InflightBlock]]:
    """Split blocks (sorted by index) into runs of consecutive indices."""
    runs: list[list[InflightBlock]] = []
    for block in blocks:
        if runs and runs[-1][-1].index + 1 == block.index:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs
