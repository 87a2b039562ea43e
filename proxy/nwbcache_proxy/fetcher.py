"""Blocks on their way from upstream: the in-flight registry, fetch runs, publishing, fresh marks.

Single flight: a block being fetched is registered (``inflight``) until it is
published, and every reader of it streams from that one buffer. Consecutive
missing blocks are fetched with one upstream request (a run, up to
MAX_RUN_BYTES); a run first re-checks the disk, since another fetch may have
published its blocks between a reader's presence check and the run's
registration (that re-check is what makes "one upstream fetch per block"
hold under a stampede).

Across processes (workers, daemons on one cache dir), a run claims its
blocks first (claims.py). Blocks another process has claimed are registered
here all the same, so this process's readers still share one buffer, but
they are not fetched: a waiter takes each claim as it frees (its holder
published the block, or died) and reads the block from disk, or fetches it
if the holder left it unwritten.

Fresh marks: a block fetched from upstream that no client has received yet
(fetched by read-ahead, or by a discovery) is "fresh"; the first client read
of it claims the mark, and those bytes count as served from upstream (the
client would have waited for upstream without the fetch made on its
behalf). The mark is set before the block's file becomes visible, so no
reader can find the file without finding the mark.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable

from nwbcache.urls import UpstreamURL, redact_url

from .aio import Tasks
from .blocks import Blocks
from .buffers import WRITE_BEHIND_BYTES
from .claims import CLAIM_PATIENCE, CLAIM_POLL_FIRST, CLAIM_POLL_MAX, Claims
from .errors import UpstreamUnavailable, VersionChanged
from .filling import RunFill, WriteBacklog
from .inflight import InflightBlock
from .marks import BlockMarks
from .metrics import Metrics
from .spanlocks import runs_of
from .upstream import Upstream
from .version import Version

log = logging.getLogger(__name__)

# Longest single upstream request, in bytes: long enough to amortise the
# round trip (4 MiB at 80 MB/s is 50 ms of transfer per 30 ms of latency),
# short enough that a retry after a reset re-reads little, and a quarter of
# the default read-ahead so that a sequential reader keeps several requests
# in flight: S3 caps throughput per connection, and parallel ranged GETs are
# AWS's own advice for reading one large object fast.
MAX_RUN_BYTES = 4 * 1024 * 1024
# On shutdown, fetches under way get this long to finish (their blocks are
# then written and indexed) before cancellation.
SHUTDOWN_GRACE = 5.0
# Fresh marks kept, in chunks of marks.CHUNK_BLOCKS (32M blocks, or 4,096
# scattered ones; ~5 MB at most). Bounded: forgetting one only counts its
# first read as a hit.
FRESH_CHUNKS = 4096


class Fetcher:
    def __init__(
        self,
        blocks: Blocks,
        upstream: Upstream,
        claims: Claims,
        *,
        block_size: int,
        metrics: Metrics,
        on_version_changed: Callable[[Version], Awaitable[None]],
        group_bytes: int | None = None,
    ) -> None:
        self.blocks = blocks
        self.upstream = upstream
        self.claims = claims
        self._awaited = metrics.awaited.labels("block")
        self.max_run_blocks = max(1, MAX_RUN_BYTES // block_size)
        # With parents, a run never crosses a group: each group has its own
        # parent (parents.py), and the run's first byte picks the parent.
        self._group_blocks = max(1, group_bytes // block_size) if group_bytes else None
        # Drops a version found changed mid-fetch (versions.Versions.drop).
        self._on_version_changed = on_version_changed
        self._inflight: dict[tuple[str, int], InflightBlock] = {}
        self._fresh = BlockMarks(FRESH_CHUNKS)
        # This process's fetched blocks not yet written: runs pause beyond it.
        self._backlog = WriteBacklog(WRITE_BEHIND_BYTES)
        self._fetches = Tasks()
        self._plans = Tasks()

    async def close(self) -> None:
        await self._plans.close()
        await self._fetches.close(SHUTDOWN_GRACE)

    @property
    def fetching(self) -> int:
        """Blocks of this process on their way from upstream, or to disk, now."""
        return len(self._inflight)

    # -- what readers ask ------------------------------------------------------
    def inflight(self, v: Version, index: int) -> InflightBlock | None:
        return self._inflight.get((v.name, index))

    def is_fresh(self, v: Version, index: int) -> bool:
        return self._fresh.has(v.name, index)

    def claim(self, v: Version, index: int, block: InflightBlock | None = None) -> bool:
        """A client is about to receive this block (from its file, or from its
        fetch when ``block`` is given): take its fresh mark. True when there
        was one, i.e. the block came from upstream and no client had it yet."""
        if block is not None:
            block.claimed = True  # no mark is set for it once it completes
        self.blocks.recent.drop(v.name, index)  # kept for the client that has it now
        return self._fresh.discard(v.name, index)

    # -- starting fetches ------------------------------------------------------
    def fetch(
        self, v: Version, url: UpstreamURL, indices: list[int], auth: str | None = None
    ) -> None:
        """Fetch these blocks unless in flight already: one upstream request
        per run of consecutive ones. ``url`` and ``auth`` (an Authorization
        header) are those of the request the fetch is made for."""
        run: list[InflightBlock] = []
        for i in indices:
            if (v.name, i) in self._inflight:
                continue
            if run and (
                i != run[-1].index + 1
                or len(run) >= self.max_run_blocks
                or (self._group_blocks and i % self._group_blocks == 0)
            ):
                self._start(v, url, run, auth)
                run = []
            block = InflightBlock(i, v.block_length(i))
            self._inflight[(v.name, i)] = block
            run.append(block)
        if run:
            self._start(v, url, run, auth)

    def _start(
        self, v: Version, url: UpstreamURL, run: list[InflightBlock], auth: str | None
    ) -> None:
        """Fetch the blocks of a run this process can claim; wait for the rest."""
        held = self.claims.take_blocks(v.name, run[0].index, len(run))
        mine = [b for b, h in zip(run, held, strict=True) if h]
        for part in _contiguous(mine):
            self._fetches.spawn(self._fetch_run(v, url, part, auth))
        if len(mine) < len(run):
            theirs = [b for b, h in zip(run, held, strict=True) if not h]
            self._awaited.inc(len(theirs))
            self._fetches.spawn(self._await_claims(v, url, theirs, auth))

    async def _await_claims(
        self, v: Version, url: UpstreamURL, waiting: list[InflightBlock], auth: str | None
    ) -> None:
        """Blocks another process claimed: take each claim as it frees and hand
        the block to a run of this process's own, which reads it from disk (or
        fetches it, when the holder died or failed before writing it). After
        CLAIM_PATIENCE without progress, the rest go to a run unclaimed."""
        for block in waiting:
            # For this process's readers these bytes come from upstream: the
            # block was not cached when they asked (reader.py's accounting).
            block.from_upstream = True
        delay = CLAIM_POLL_FIRST
        progress = time.monotonic()
        try:
            while waiting:
                await asyncio.sleep(delay)
                patience_out = time.monotonic() - progress > CLAIM_PATIENCE
                held = [patience_out or self.claims.take_block(v.name, b.index) for b in waiting]
                taken = [b for b, h in zip(waiting, held, strict=True) if h]
                if not taken:
                    delay = min(delay * 2, CLAIM_POLL_MAX)
                    continue
                progress = time.monotonic()
                waiting = [b for b, h in zip(waiting, held, strict=True) if not h]
                for part in _contiguous(taken):
                    self._fetches.spawn(self._fetch_run(v, url, part, auth))
                delay = CLAIM_POLL_FIRST
        except asyncio.CancelledError:
            for block in waiting:
                block.fail(UpstreamUnavailable("fetch cancelled: the daemon is shutting down"))
            raise
        finally:
            for block in waiting:
                self._done(v, block)

    def prefetch(
        self, v: Version, url: UpstreamURL, lo: int, hi: int, auth: str | None = None
    ) -> None:
        """Fetch blocks [lo, hi) that are neither cached nor in flight, in the background."""
        # Blocks in flight are not looked for on disk: while a reader streams
        # ahead of a fill, most of the window is in flight.
        wanted = [i for i in range(lo, min(hi, v.block_count)) if (v.name, i) not in self._inflight]
        if not wanted:
            return

        async def plan() -> None:
            cached = await self.blocks.present(v, wanted)
            self.fetch(v, url, [i for i in wanted if i not in cached], auth)

        self._plans.spawn(plan())

    async def publish_first(self, v: Version, data: bytes) -> None:
        """Block 0 as a discovery received it, unless a fetch of it is under way or
        it is cached already (a rediscovery of an unchanged version: nobody
        waits for these bytes, so they are not fresh)."""
        if (v.name, 0) in self._inflight or await self.blocks.present(v, range(1)):
            return
        self._fresh.add(v.name, 0)
        await self.blocks.publish(v, 0, data)

    # -- fetch runs ------------------------------------------------------------
    async def _fetch_run(
        self, v: Version, url: UpstreamURL, run: list[InflightBlock], auth: str | None
    ) -> None:
        """Fill consecutive in-flight blocks: from disk where another fetch
        published them meanwhile, else with one upstream request per gap.

        The run keeps only weak references to its blocks: a block that is
        complete (filled from disk, or published) is then freed as soon as
        its readers are done with it, rather than when the whole run ends.
        Holding them all measured 265 MB of RSS with 256 cold streams (runs
        waiting for an upstream connection held their disk-filled blocks).
        """
        refs = [weakref.ref(block) for block in run]

        def pending() -> list[InflightBlock]:
            return [b for b in (r() for r in refs) if b is not None]

        try:
            gaps = _contiguous(await self._fill_from_disk(v, run))
            del run
            while gaps:
                await self._stream_into(v, url, gaps.pop(0), auth)
        except asyncio.CancelledError:
            for block in pending():
                block.fail(UpstreamUnavailable("fetch cancelled: the daemon is shutting down"))
            raise
        except VersionChanged as exc:
            log.warning("object changed upstream mid-read: %s", redact_url(url.url))
            try:
                # Drop first, then wake the readers: a reader that starts over
                # must not find the old version's metadata still on disk.
                await self._on_version_changed(v)
            finally:
                for block in pending():
                    block.fail(exc)
        except Exception as exc:
            for block in pending():
                block.fail(exc)
            log.info("fetch of %s failed: %s", redact_url(url.url), exc)
        finally:
            # A disk job unregisters its own, when done.
            self._done_all(v, [b for b in pending() if not b.writing])

    def _done(self, v: Version, block: InflightBlock) -> None:
        """Unregister a block: new readers open its file (or fetch it again), and
        other processes waiting for it take its claim over (claims.py)."""
        self._done_all(v, [block])

    def _done_all(self, v: Version, blocks: list[InflightBlock]) -> None:
        """_done for each, the claims of consecutive ones given up at once."""
        mine: list[int] = []
        for block in blocks:
            if self._inflight.get((v.name, block.index)) is block:
                del self._inflight[(v.name, block.index)]
                mine.append(block.index)
        for first, count in runs_of(sorted(mine)):
            self.claims.release_blocks(v.name, first, count)

    async def _fill_from_disk(self, v: Version, run: list[InflightBlock]) -> list[InflightBlock]:
        """Complete the blocks that are on disk; return those still missing."""
        present = await self.blocks.present(v, range(run[0].index, run[-1].index + 1))
        missing: list[InflightBlock] = []
        for block in run:
            opened = (
                await self.blocks.open(v, block.index, need_data=True)
                if block.index in present
                else None
            )
            if opened is None:
                missing.append(block)
                continue
            block.append(opened.data)  # the whole block (need_data)
            if block.from_upstream and not block.claimed:
                # Another process fetched it for this one (_await_claims), and
                # no client here has had it yet: see "Fresh marks" above.
                self._fresh.add(v.name, block.index)
            self._done(v, block)
        return missing

    async def _stream_into(
        self, v: Version, url: UpstreamURL, run: list[InflightBlock], auth: str | None
    ) -> None:
        """One upstream request for consecutive blocks, received straight into
        them and published in groups (filling.py)."""
        start = run[0].index * v.block_size
        end = start + sum(b.length for b in run)

        def completed(block: InflightBlock) -> None:
            if not block.claimed:
                # Before the file exists: see "Fresh marks" above.
                self._fresh.add(v.name, block.index)

        fill = RunFill(
            run,
            v.block_size,
            lambda group: self._publish(v, group),
            completed,
            self._backlog,
        )
        del run  # published blocks leave with their last reader (see _fetch_run)
        try:
            await self.upstream.fill(url, start, end, v.remote, fill, authorization=auth)
        finally:
            await fill.close()

    def _publish(self, v: Version, group: list[InflightBlock]) -> asyncio.Future[list[bool]]:
        """Write a group of complete blocks; each is unregistered once its file
        exists (or could not be written), even if the run is cancelled meanwhile
        (the callback runs after publish_group's own bookkeeping)."""
        # Blocks no client has had yet (fresh: read-ahead's) stay in memory a
        # moment once written, for their reader on its way (recent.py).
        buffers = {b.index: b.parts[0] for b in group}
        job = self.blocks.publish_group(
            v,
            [(b.index, b.parts) for b in group],
            keep=lambda i: buffers[i] if self.is_fresh(v, i) else None,
        )
        for block in group:
            block.writing = True

        def unregister(_: asyncio.Future[list[bool]]) -> None:
            self._done_all(v, group)

        job.add_done_callback(unregister)
        return job


def _contiguous(blocks: list[InflightBlock]) -> list[list[InflightBlock]]:
    """Split blocks (sorted by index) into runs of consecutive indices."""
    runs: list[list[InflightBlock]] = []
    for block in blocks:
        if runs and runs[-1][-1].index + 1 == block.index:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs
