"""Reading a byte range of a version: the read plan, its segments, byte accounting, and the one
place that says HIT, MISS or PARTIAL.

The first block of a range is acquired before ``read`` returns, so the
outcome is known before response headers go out, and a version change found
on the way surfaces while the request can still start over.

Accounting: a byte sent to a client counts as served from upstream when its
block came from upstream for this read: streamed from a fetch in flight (not
one a client had whole: as from its file), or read from a file whose fresh
mark this read claimed (fetcher.py). Every other byte is served from the
cache. A response is a HIT when none of its blocks had to come from upstream,
a MISS when all did, else PARTIAL; a HIT upstream did not confirm is STALE.

An offline read (``Cache-Control: only-if-cached``) fetches nothing: every
block must be on disk before the headers go out, or it is a 504 (NotCached).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from nwbcache.urls import UpstreamURL

from .batching import Batch, batch_bytes
from .blockfile import Buffer
from .blocks import PRESENCE_CHECK_LIMIT, Blocks, CachedBlock
from .errors import NotCached
from .fetcher import Fetcher
from .inflight import InflightBlock
from .metrics import Metrics
from .rangereader import RangeReader, Segments, Tally
from .readahead import SequentialDetector, StreamWindow
from .readfor import PLAIN, ReadFor, classify
from .trace import TraceWriter
from .version import Version

# A range up to this size whose version is held open and whose blocks are in
# the page cache is answered from memory in one write (Blocks.read_held): one
# lock, one read of the map's entries and one of the bytes for all its
# blocks, no await, no thread (a 1 MiB range a block at a time ran at ~0.6x the GB/s, measured
# with the raw section of bench/suite.py). Bounded so that many slow
# clients cannot pin much memory in socket buffers; such a range is not a
# stream, and takes no share of the send budget (batching.batch_bytes).
BODY_MAX = 1024 * 1024


Source = CachedBlock | InflightBlock


class Reader:
    def __init__(
        self,
        blocks: Blocks,
        fetcher: Fetcher,
        *,
        block_size: int,
        readahead_blocks: int,
        metrics: Metrics,
        trace: TraceWriter | None = None,
        send_budget: int,
    ) -> None:
        self.blocks = blocks
        self.trace = trace
        self.fetcher = fetcher
        self.sequential = SequentialDetector(block_size, readahead_blocks)
        # A range's own bytes are fetched up to this many blocks at a time: the
        # read-ahead, but never less than a fetch run, so that a small
        # --readahead (0: nothing past what is asked) does not fetch a range a
        # block per request, in turn (2 MB of 4 KiB blocks: 512 of them). A
        # plain GET's window grows to the read-ahead as its client reads.
        self.window_blocks = max(readahead_blocks, fetcher.max_run_blocks)
        self.plain_window_blocks = max(1, readahead_blocks)
        self._from_upstream = metrics.served_bytes.labels("upstream")
        self._from_cache = metrics.served_bytes.labels("cache")
        self._coalesced = metrics.coalesced
        # Responses being streamed now (in _segments): they share what
        # batches may hold, send_budget (batching.batch_bytes).
        self.streams = 0
        self.send_budget = send_budget

    def _traced(self, v: Version, blocks: range) -> None:
        if self.trace is not None:
            for i in blocks:
                self.trace.record(v, i)

    def _served(self, nbytes: int, *, upstream: bool, tally: Tally | None = None) -> None:
        (self._from_upstream if upstream else self._from_cache).inc(nbytes)
        if upstream and tally is not None:
            tally.upstream += nbytes

    async def read(
        self,
        v: Version,
        url: UpstreamURL,
        start: int,
        end: int,
        *,
        eager: bool,
        how: ReadFor = PLAIN,
    ) -> RangeReader:
        """Plan a read of bytes [start, end) of ``url``'s version ``v``: how much
        is cached, and the bytes (``how``: see ReadFor; a HIT of a stale
        version says STALE, an offline read fetches nothing).

        ``eager``: the client named the bytes it wants (a Range): fetch them
        at once, up to the read-ahead. Otherwise (a plain GET) the fetch
        window grows as the client consumes (readahead.StreamWindow).
        """
        url, auth = how.upstream(v, url)
        stale, offline = how.stale, how.offline
        blocks = v.blocks_for(start, end)
        readahead = how.readahead and not offline
        ahead = self.sequential.blocks_after(v.key, start, end) if readahead else 0
        if end - start <= BODY_MAX:
            body = self.blocks.read_held(v, blocks, start, end)
            if body is not None:
                if ahead:
                    self.fetcher.prefetch(v, url, blocks.stop, blocks.stop + ahead, auth)
                return self._held_body(v, blocks, start, end, body, stale)
        if offline and not await self.cached(v, start, end):
            raise NotCached("not all of the range is in the cache (only-if-cached)")
        limit = self.window_blocks if eager else self.plain_window_blocks
        window = StreamWindow.open(blocks.start, blocks.stop, eager=eager, limit=limit)
        span = _span_in_block(v, blocks.start, start, end)
        first, first_fresh = await self._acquire(
            v,
            url,
            auth,
            blocks.start,
            wanted_end=window.wanted_end(blocks.start),
            span=span,
            offline=offline,
        )
        if isinstance(first, InflightBlock):
            await first.first_bytes()
        rest = range(blocks.start + 1, min(blocks.stop, blocks.start + 1 + PRESENCE_CHECK_LIMIT))
        # Blocks in flight count as missing, and are not looked for on disk,
        # but for those a client has had whole (only their write is pending).
        inflight = [self.fetcher.inflight(v, i) for i in rest]
        look = [i for i, b in zip(rest, inflight, strict=True) if b is None]
        on_disk = await self.blocks.present(v, look) if look else set()
        cached = sum(1 for i in on_disk if not self.fetcher.is_fresh(v, i))
        cached += sum(1 for b in inflight if b is not None and b.had)
        if isinstance(first, CachedBlock) and not first_fresh:
            cached += 1
        outcome = classify(cached, 1 + len(rest), stale=stale)
        if eager and not offline:
            missing = [i for i in rest if i not in on_disk]
            self.fetcher.fetch(v, url, missing[: self.window_blocks], auth)
        if ahead:
            self.fetcher.prefetch(v, url, blocks.stop, blocks.stop + ahead, auth)
        if len(blocks) == 1 and isinstance(first, CachedBlock):
            body = first.bytes_of(*span)
            if body is not None:  # one block, already in memory: no streaming
                if not first_fresh:
                    self.blocks.hit(v, blocks.start)
                self._traced(v, blocks)
                self._served(len(body), upstream=first_fresh)
                return RangeReader.of_body(outcome, body)
        tally = Tally()
        segments = self._segments(
            v, url, auth, start, end, first, first_fresh, window, offline=offline, tally=tally
        )
        return RangeReader(outcome, segments, tally=tally)

    async def cached(self, v: Version, start: int, end: int) -> bool:
        """Whether every block of bytes [start, end) is on disk."""
        blocks = v.blocks_for(start, end)
        return len(await self.blocks.present(v, blocks)) == len(blocks)

    def _held_body(
        self, v: Version, blocks: range, start: int, end: int, body: Buffer, stale: bool
    ) -> RangeReader:
        fresh_blocks = self._account_held(v, blocks, start, end, len(body))
        outcome = classify(len(blocks) - fresh_blocks, len(blocks), stale=stale)
        return RangeReader.of_body(outcome, body)

    def _account_held(
        self,
        v: Version,
        blocks: range,
        start: int,
        end: int,
        nbytes: int,
        tally: Tally | None = None,
    ) -> int:
        """Count ``nbytes`` of ``blocks`` (bytes [start, end)), read at once, as
        served: from upstream for blocks whose fresh mark this read claims, else
        from the cache (and a hit). Returns how many were claimed."""
        fresh_blocks = fresh_bytes = 0
        for i in blocks:
            if self.fetcher.claim(v, i):
                lo, hi = _span_in_block(v, i, start, end)
                fresh_blocks += 1
                fresh_bytes += hi - lo
            else:
                self.blocks.hit(v, i)
        if fresh_bytes:
            self._served(fresh_bytes, upstream=True, tally=tally)
        if fresh_bytes < nbytes:
            self._served(nbytes - fresh_bytes, upstream=False)
        self._traced(v, blocks)
        return fresh_blocks

    def _held_run(
        self, v: Version, i: int, stop: int, start: int, end: int, limit: int
    ) -> tuple[range, Buffer] | None:
        """Blocks from ``i`` on (before ``stop``, ``limit`` bytes of them at most) and
        their part of [start, end), read at once if all are on disk and in the
        page cache (Blocks.read_held); None for fewer than two. A segment per
        batch, not per block: 4 KiB blocks went at 55 MB/s, now 221."""
        bs = v.block_size
        run = range(i, min(stop, i + limit // bs))
        if len(run) < 2 or self.fetcher.inflight(v, i) is not None:
            return None  # (a cold read's next block is most often in flight)
        if self.blocks.recent.has(v.name, i):
            return None  # in memory: taken by the block (recent.py)
        lo, hi = max(start, run.start * bs), min(end, run.stop * bs)
        body = self.blocks.read_held(v, run, lo, hi)
        return None if body is None else (run, body)

    async def _segments(
        self,
        v: Version,
        url: UpstreamURL,
        auth: str | None,
        start: int,
        end: int,
        first: Source,
        first_fresh: bool,
        window: StreamWindow,
        *,
        offline: bool,
        tally: Tally,
    ) -> AsyncGenerator[Segments, None]:
        """The range's bytes, a batch at a time; bytes from upstream counted in
        ``tally`` as they go."""
        self.streams += 1
        try:
            source: Source | None = first
            fresh = first_fresh
            batch = self._batch(v)
            # The first block goes alone: its client may want only the headers
            # (sending.PACED_SEGMENTS), and nothing after it is read, taken or
            # counted as served before the client has had it.
            alone = True
            # After a span read fails (a block missing, uncached or corrupt), its
            # blocks go one at a time: trying at each would copy the span again.
            no_span_before = window.first
            i = window.first - 1
            while i + 1 < window.stop:
                i += 1
                lo, hi = _span_in_block(v, i, start, end)
                held = None
                if source is None and i >= no_span_before:
                    held = self._held_run(v, i, window.stop, start, end, batch.room)
                    if held is None:
                        no_span_before = min(window.stop, i + batch.room // v.block_size)
                if held is not None:
                    run, body = held
                    self._account_held(v, run, start, end, len(body), tally)  # (traced there)
                    batch.add(body, run, trace=False)
                    i = run.stop - 1
                else:
                    if source is None:
                        if batch and not self._ready(v, i, hi):  # send before waiting
                            yield batch.pieces
                            batch = self._sent(v, url, auth, batch.blocks, window, offline)
                        source, fresh = await self._acquire(
                            v,
                            url,
                            auth,
                            i,
                            wanted_end=window.wanted_end(i),
                            span=(lo, hi),
                            offline=offline,
                        )
                    if isinstance(source, CachedBlock):
                        piece = source.bytes_of(lo, hi)
                        assert piece is not None  # read for this span (_acquire)
                        self._served(hi - lo, upstream=fresh, tally=tally)
                        if not fresh:
                            self.blocks.hit(v, i)
                        batch.add(piece, (i,))
                    elif (piece := source.span(lo, hi)) is not None:  # all there already
                        self._served(hi - lo, upstream=fresh or source.from_upstream, tally=tally)
                        batch.add(piece, (i,))
                    else:  # its bytes go out as they come
                        if batch:
                            yield batch.pieces
                            batch = self._sent(v, url, auth, batch.blocks, window, offline)
                        async for chunk in source.chunks(lo, hi):
                            self._served(
                                len(chunk), upstream=fresh or source.from_upstream, tally=tally
                            )
                            yield [chunk]
                            alone = False
                        batch = self._sent(v, url, auth, [(i, True)], window, offline)
                    source = None
                if batch.full or (batch and alone):
                    yield batch.pieces
                    batch = self._sent(v, url, auth, batch.blocks, window, offline)
                    alone = False
            if batch:
                yield batch.pieces
                self._sent(v, url, auth, batch.blocks, window, offline)
        finally:
            self.streams -= 1

    def _ready(self, v: Version, i: int, hi: int) -> bool:
        """Whether block ``i``'s bytes up to ``hi`` are in memory already: a
        fetch's, come in, or kept once written (recent.py)."""
        inflight = self.fetcher.inflight(v, i)
        if inflight is not None:
            return inflight.span(0, hi) is not None
        return self.blocks.recent.has(v.name, i)

    def _sent(
        self,
        v: Version,
        url: UpstreamURL,
        auth: str | None,
        blocks: list[tuple[int, bool]],
        window: StreamWindow,
        offline: bool,
    ) -> Batch:
        """What is owed once ``blocks``' bytes went out (a write to a client gone
        ends the loop at its yield, before this): each traced if it says so,
        and the read-ahead window grown past it. A new batch."""
        for i, trace in blocks:
            if trace and self.trace is not None:
                self.trace.record(v, i)
            todo = window.after(i)
            if todo and not offline:
                self.fetcher.prefetch(v, url, todo.start, todo.stop, auth)
        return self._batch(v)

    def _batch(self, v: Version) -> Batch:
        """A new batch, full at this stream's share of the send budget in whole
        blocks (held runs are whole blocks; ``_held_run`` is given what room
        is left: given the share, a second run overshot it, 1.5 MiB a write
        for a share of 768 KiB)."""
        bs = v.block_size
        return Batch(max(bs, batch_bytes(self.streams, self.send_budget) // bs * bs))

    async def _acquire(
        self,
        v: Version,
        url: UpstreamURL,
        auth: str | None,
        i: int,
        *,
        wanted_end: int,
        span: tuple[int, int],
        offline: bool = False,
    ) -> tuple[Source, bool]:
        """The block from disk, or its fetch in flight (started if needed), and
        whether this read claimed its fresh mark. ``span``: the bytes of the
        block the caller will send (read at once if small). Fetches of the
        following missing blocks up to ``wanted_end`` join the block's run."""
        inflight = self.fetcher.inflight(v, i)
        if inflight is None:
            opened = await self.blocks.open(v, i, span=span)
            if opened is not None:
                return opened, self.fetcher.claim(v, i)
            inflight = self.fetcher.inflight(v, i)
        if offline:  # evicted since the presence check, or being fetched: not cached
            raise NotCached("a block of the range left the cache (only-if-cached)")
        if inflight is not None:
            if inflight.had:  # read as from its file (it was counted PARTIAL)
                return CachedBlock(0, inflight.parts[0]), False
            self._coalesced.inc()
            return inflight, self.fetcher.claim(v, i, inflight)
        upto = min(wanted_end, i + self.window_blocks, v.block_count)
        # The run extends while blocks are missing: up to the first in flight,
        # then up to the first on disk.
        following = range(i + 1, upto)
        for j in following:
            if self.fetcher.inflight(v, j) is not None:
                following = range(i + 1, j)
                break
        on_disk = await self.blocks.present(v, following) if len(following) else set()
        run = [i]
        for j in following:
            if j in on_disk:
                break
            run.append(j)
        started = self.fetcher.inflight(v, i)
        if started is None:
            self.fetcher.fetch(v, url, run, auth)
            started = self.fetcher.inflight(v, i)
            assert started is not None
        return started, self.fetcher.claim(v, i, started)


def _span_in_block(v: Version, i: int, start: int, end: int) -> tuple[int, int]:
    """The part of bytes [start, end) that lies in block ``i``, relative to the block."""
    bs = v.block_size
    return max(start, i * bs) - i * bs, min(end, (i + 1) * bs) - i * bs
