"""Keeping the cache in shape in the background: index and trace flushes, eviction, idle fds,
gauges."""

from __future__ import annotations

import asyncio
import logging

from .aio import Tasks
from .index import FLUSH_INTERVAL, CacheIndex
from .metrics import Metrics
from .openblocks import OpenBlocks
from .trace import TraceWriter

log = logging.getLogger(__name__)

# Eviction goes down to this fraction of the capacity, so it runs in bursts
# rather than one block per publish.
LOW_WATER = 0.95


class Upkeep:
    def __init__(
        self,
        index: CacheIndex,
        table: OpenBlocks,
        *,
        capacity: int,
        metrics: Metrics,
        trace: TraceWriter | None = None,
    ) -> None:
        self.index = index
        self.trace = trace
        self.table = table
        self.capacity = capacity
        self.metrics = metrics
        metrics.cache_capacity.set(capacity)
        self._wakeup = asyncio.Event()
        self._tasks = Tasks()

    def start(self) -> None:
        self._tasks.spawn(self._reconcile_then_evict())
        self._tasks.spawn(self._loop())

    async def close(self) -> None:
        await self._tasks.close()

    def wake(self) -> None:
        """Run a pass now rather than at the next interval (the cache may be
        over capacity, or the disk refused a write)."""
        self._wakeup.set()

    async def _reconcile_then_evict(self) -> None:
        result = await self.index.reconcile()
        if result is not None and any(result):
            log.info("index reconciled with disk: %d blocks added, %d removed", *result)
        self.wake()

    async def _loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(FLUSH_INTERVAL):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                await self.run_pass()
            except Exception:
                log.exception("cache maintenance failed; retrying")
                await asyncio.sleep(FLUSH_INTERVAL)

    async def run_pass(self) -> None:
        """Close idle fds, flush use to the index, evict down to the low-water mark
        if over capacity, and update the gauges."""
        self.table.close_idle()
        await self.index.flush()
        if self.trace is not None:
            await self.trace.flush()
        if self.index.last_totals.bytes > self.capacity:
            evicted, recent = await self.index.evict_to(int(self.capacity * LOW_WATER))
            self.metrics.evictions.inc(evicted)
            self.metrics.evicted_recent.inc(recent)
        totals = self.index.last_totals
        self.metrics.cache_size.set(totals.bytes)
        self.metrics.cache_blocks.set(totals.blocks)
