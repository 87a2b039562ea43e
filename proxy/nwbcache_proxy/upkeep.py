"""Keeping the cache in shape in the background: sweeps, reconciling, flushes, eviction,
idle versions, gauges."""

from __future__ import annotations

import asyncio
import logging

from . import footprint, staging
from .aio import Disk, Tasks
from .index import FLUSH_INTERVAL, CacheIndex
from .inflight import POOL
from .layout import Layout
from .metrics import Metrics
from .openversions import OpenVersions
from .trace import TraceWriter

log = logging.getLogger(__name__)

# Eviction goes down to this fraction of the capacity, so it runs in bursts
# rather than one block per publish.
LOW_WATER = 0.95
# The reconciler's pace (nginx's loader_files and loader_sleep): files per
# step, and the pause between steps, in which requests, flushes and
# eviction run. A step of 4,096 files takes ~20-40 ms.
LOADER_FILES = 4096
LOADER_SLEEP = 0.02
# How often a process looks for versions other processes dropped (a slice
# of its table each time: openversions.UNLINKED_CHECKS).
UNLINKED_TICK = 0.25
# How often a process looks for a reconcile due but not running (its
# runner died, or it is another process's turn).
RECONCILE_POLL = 30.0


class Upkeep:
    def __init__(
        self,
        layout: Layout,
        index: CacheIndex,
        table: OpenVersions,
        disk: Disk,
        *,
        capacity: int,
        metrics: Metrics,
        trace: TraceWriter | None = None,
    ) -> None:
        self.layout = layout
        self.index = index
        self.trace = trace
        self.table = table
        self.disk = disk
        self.capacity = capacity
        self.metrics = metrics
        metrics.cache_capacity.set(capacity)
        self._wakeup = asyncio.Event()
        self._tasks = Tasks()

    def start(self) -> None:
        self._tasks.spawn(self._sweep_and_reconcile())
        self._tasks.spawn(self._loop())
        self.wake()  # a first pass at once: a cut --cache-size is acted on now

    async def close(self) -> None:
        await self._tasks.close()

    def wake(self) -> None:
        """Run a pass now rather than at the next interval (the cache may be
        over capacity, or the disk refused a write)."""
        self._wakeup.set()

    async def _sweep_and_reconcile(self) -> None:
        swept = await self.disk.run(lambda: staging.sweep_leftovers(self.layout))
        if swept.dead or swept.trash:
            log.info(
                "swept the leftovers of earlier runs: %d dead processes' temp dirs, %d in trash",
                swept.dead,
                swept.trash,
            )
        if swept.dead:
            # A process died without closing: rows it had not flushed, or files
            # an eviction had not yet unlinked, may be missing from the index.
            await self.index.mark_reconcile()
        files = 0
        while True:
            try:
                progress = await self.index.reconcile_step(LOADER_FILES)
            except Exception:
                log.exception("reconciling the index failed; retrying")
                progress = None
            self.metrics.reconciling.set(progress is not None and not progress.done)
            if progress is not None:
                self.metrics.reconciled_files.inc(progress.files - files)
                files = 0 if progress.done else progress.files
            if progress is None:
                await asyncio.sleep(RECONCILE_POLL)
            elif progress.done:
                log.info(
                    "index reconciled with disk: %d files, %d rows added, %d removed, "
                    "%d blocks moved from format 1",
                    progress.files,
                    progress.added,
                    progress.removed,
                    progress.moved,
                )
                self.wake()
                await asyncio.sleep(RECONCILE_POLL)
            else:
                await asyncio.sleep(LOADER_SLEEP)

    async def _loop(self) -> None:
        while True:
            deadline = asyncio.get_running_loop().time() + FLUSH_INTERVAL
            while not self._wakeup.is_set():
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(min(left, UNLINKED_TICK)):
                        await self._wakeup.wait()
                except TimeoutError:
                    # Versions other processes dropped: this process's fds would
                    # keep their space until closed.
                    self.table.close_unlinked()
            self._wakeup.clear()
            try:
                await self.run_pass()
            except Exception:
                log.exception("cache maintenance failed; retrying")
                await asyncio.sleep(FLUSH_INTERVAL)

    async def run_pass(self) -> None:
        """Close idle versions, flush use to the index, evict down to the low-water mark
        if over capacity, and update the gauges."""
        self.table.close_idle()
        self.table.close_unlinked()
        # The totals as last read (at start, the index's): gauges set only at the
        # end of a pass read 0 at start, for as long as a first pass evicting a
        # cut --cache-size took under load (25 s under one client's hits, 1M blocks).
        self._gauge_totals()
        await self.index.flush()
        if self.trace is not None:
            await self.trace.flush()
        if self.index.last_totals.on_disk > self.capacity:
            await self._evict(int(self.capacity * LOW_WATER))
        self._gauge_totals()
        self.metrics.buffer_pool.set(POOL.kept_bytes)
        await self._report_policy()

    def _gauge_totals(self) -> None:
        totals = self.index.last_totals
        self.metrics.cache_size.set(totals.bytes)
        self.metrics.cache_overhead.set(totals.on_disk - totals.bytes)
        self.metrics.cache_blocks.set(totals.blocks)
        self.metrics.queue_bytes.labels("small").set(totals.small_bytes)
        main = totals.bytes - totals.small_bytes - totals.pinned_bytes
        self.metrics.queue_bytes.labels("main").set(main)
        self.metrics.queue_bytes.labels("pinned").set(totals.pinned_bytes)
        self.metrics.pinned_bytes.set(totals.pinned_bytes)

    async def _report_policy(self) -> None:
        """Add what the policy did since the last pass to the counters."""
        done = await self.index.take_stats()
        for queue, count in done.admitted.items():
            self.metrics.admissions.labels(queue).inc(count)
        for queue, count in done.evicted.items():
            self.metrics.evictions.labels(queue).inc(count)
        self.metrics.promotions.inc(done.promoted)

    async def _evict(self, target: int) -> None:
        """Slice after slice down to ``target`` bytes on disk: each a bounded job
        on the index's thread, so this process's flushes and reconcile steps run
        between them."""
        while True:
            totals = self.index.last_totals
            room = footprint.block_room(target, totals.versions, totals.blocks)
            done = await self.index.evict_slice(room, self.capacity)
            self.metrics.evicted_recent.inc(done.recent)
            self._gauge_totals()
            if not done.more:
                return
            if self.index.pending_bytes or self.index.flush_due:
                # Blocks published meanwhile count too; hits, at the flush interval.
                await self.index.flush()
