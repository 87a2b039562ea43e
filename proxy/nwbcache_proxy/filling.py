"""One upstream body filling a run of in-flight blocks: where its bytes go, and when whole
blocks go to disk.

The sink (wireconn.Sink) of a fetch run: the connection receives straight
into the space of the run's next block, and each block that completes joins
a group; a group of PUBLISH_GROUP_BYTES goes to disk as one job. At most one
job per run is under way: a full group waits for the one before, and the
body pauses meanwhile, which bounds the memory held to two groups. Readers
wait for none of it: they stream from the blocks, which stay registered
until their files exist.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from .inflight import InflightBlock

# A fill writes its complete blocks to disk in groups of this many bytes
# (at least one block), one disk thread job each: 16 blocks of the default
# 256 KiB, a whole run (fetcher.MAX_RUN_BYTES) at most. Every system call of
# a job hands the GIL to the event loop and takes it back: blocks handed
# over one by one measured ~50 futex calls per block on two cores; groups of
# 1 MiB, with their writes in one io_submit (aiowrite.py), still ~8 thread
# switches per MiB. Groups of 4 MiB ran a 1 GiB cold fill at 1.15x the MB/s
# on 0.82x the CPU of 1 MiB ones written call by call (bench/coldfill.py
# --size 1G, 4 paired runs); 4 MiB groups alone gave 1.06x, io_submit
# alone 0.99x. A block is readable from its buffer all the while.
PUBLISH_GROUP_BYTES = 4 * 1024 * 1024

Publish = Callable[[list[InflightBlock]], "asyncio.Future[list[bool]]"]


class RunFill:
    def __init__(
        self,
        run: list[InflightBlock],
        block_size: int,
        publish: Publish,
        completed: Callable[[InflightBlock], None],
    ) -> None:
        """``publish`` starts a disk job for a group; ``completed`` is told of each
        block as it completes, before its group is handed on (fresh marks)."""
        self._pending = collections.deque(run)
        self._group_blocks = max(1, PUBLISH_GROUP_BYTES // block_size)
        self._publish = publish
        self._completed = completed
        self._group: list[InflightBlock] = []
        self._writing: asyncio.Future[list[bool]] | None = None
        self._queued: list[InflightBlock] = []  # a full group waiting for the job before it
        for block in run:
            block.from_upstream = True

    # -- the sink ----------------------------------------------------------------
    def space(self) -> memoryview:
        return self._pending[0].space()

    def received(self, n: int) -> asyncio.Future[Any] | None:
        block = self._pending[0]
        block.advance(n)
        if not block.complete:
            return None
        self._pending.popleft()
        self._completed(block)
        self._group.append(block)
        if len(self._group) < self._group_blocks and self._pending:
            return None
        group, self._group = self._group, []
        writing = self._writing
        if writing is None or writing.done():
            self._writing = self._publish(group)
            return None
        # The job before is under way: this group waits for it, and the body
        # with it. This callback is added before the connection's own, so the
        # next job has started when reading resumes.
        self._queued = group
        writing.add_done_callback(self._write_queued)
        return writing

    def _write_queued(self, _: asyncio.Future[list[bool]]) -> None:
        group, self._queued = self._queued, []
        if group:
            self._writing = self._publish(group)

    # -- the end -------------------------------------------------------------------
    async def close(self) -> None:
        """Publish what is whole, also after a failure (those blocks are whole),
        and wait until it is on disk. A cancelled wait leaves the jobs running."""
        groups = [g for g in (self._queued, self._group) if g]
        self._queued, self._group = [], []
        for group in groups:
            if self._writing is not None:
                await asyncio.shield(self._writing)
            self._writing = self._publish(group)
        if self._writing is not None:
            await asyncio.shield(self._writing)
