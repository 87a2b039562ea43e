"""One upstream body filling a run of in-flight blocks: where its bytes go, and when whole
blocks go to disk.

The sink (wireconn.Sink) of a fetch run: the connection receives straight
into the space of the run's next block, and each block that completes joins
a group; a group of PUBLISH_GROUP_BYTES goes to disk as one job. At most one
job per run is under way: a full group waits for the one before, and the
body pauses meanwhile, which bounds the memory held to two groups. Readers
wait for none of it: they stream from the blocks, which stay registered
until their files exist.

Across runs, the process's blocks handed to disk jobs and not yet written
(WriteBacklog) are bounded too: when a run's whole blocks would take them
past the limit, it hands them on at once, short of a group, and pauses
until writes bring them down to half of it. Only blocks in disk jobs count,
and those jobs end, so the pause always does; a paused run holds no whole
block that is not on its way to disk.
"""

from __future__ import annotations

import asyncio
import collections
import sys
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


class WriteBacklog:
    """Bytes of a process's fetched blocks in disk jobs, not yet written; the
    runs waiting for them to fall (buffers.WRITE_BEHIND_BYTES). Waiters wake
    at half the limit, not at it: woken at the limit, each run's next block
    took it over again, and went to disk alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._waiters: list[asyncio.Future[None]] = []

    def add(self, nbytes: int) -> None:
        self.bytes += nbytes

    def written(self, nbytes: int) -> None:
        """``nbytes`` of them are on disk now (or failed to get there)."""
        self.bytes -= nbytes
        if self.bytes <= self.limit // 2 and self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def room(self) -> asyncio.Future[None] | None:
        """None when at most the limit; else a future done at half of it."""
        if self.bytes <= self.limit:
            return None
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter


class RunFill:
    def __init__(
        self,
        run: list[InflightBlock],
        block_size: int,
        publish: Publish,
        completed: Callable[[InflightBlock], None],
        backlog: WriteBacklog | None = None,
    ) -> None:
        """``publish`` starts a disk job for a group; ``completed`` is told of each
        block as it completes, before its group is handed on (fresh marks);
        ``backlog``: the process's, which the run's groups join until
        written (by default one of its own, without a limit)."""
        self._pending = collections.deque(run)
        self._group_blocks = max(1, PUBLISH_GROUP_BYTES // block_size)
        self._publish = publish
        self._completed = completed
        self._backlog = backlog or WriteBacklog(sys.maxsize)
        self._group: list[InflightBlock] = []
        self._group_bytes = 0
        self._writing: asyncio.Future[list[bool]] | None = None
        # Blocks waiting for the job before theirs: a full group, or more when a
        # new connection of a retried request did not pause.
        self._queued: list[InflightBlock] = []
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
        self._group_bytes += block.length
        if len(self._group) < self._group_blocks and self._pending and not self._behind():
            return None
        group, self._group, self._group_bytes = self._group, [], 0
        writing = self._writing
        if writing is None or writing.done():
            self._writing = self._start(group)
            return self._backlog.room()
        # The job before is under way: this group waits for it, and the body
        # with it. This callback is added before the connection's own, so the
        # next job has started when reading resumes.
        if not self._queued:
            writing.add_done_callback(self._write_queued)
        self._queued += group
        room = self._backlog.room()
        return writing if room is None else _both(writing, room)

    def _behind(self) -> bool:
        """Whether this run's whole blocks would take the process's writes
        past their limit: then they go to disk now, short of a group."""
        return self._backlog.bytes + self._group_bytes > self._backlog.limit

    def _start(self, group: list[InflightBlock]) -> asyncio.Future[list[bool]]:
        """Publish a group; its bytes are in the backlog until written."""
        job = self._publish(group)
        backlog, nbytes = self._backlog, sum(b.length for b in group)
        backlog.add(nbytes)
        job.add_done_callback(lambda _: backlog.written(nbytes))
        return job

    def _write_queued(self, _: asyncio.Future[list[bool]]) -> None:
        group, self._queued = self._queued, []
        if group:
            self._writing = self._start(group)

    # -- the end -------------------------------------------------------------------
    async def close(self) -> None:
        """Publish what is whole, also after a failure (those blocks are whole),
        and wait until it is on disk. A cancelled wait leaves the jobs running."""
        groups = [g for g in (self._queued, self._group) if g]
        self._queued, self._group, self._group_bytes = [], [], 0
        for group in groups:
            if self._writing is not None:
                await asyncio.shield(self._writing)
            self._writing = self._start(group)
        if self._writing is not None:
            await asyncio.shield(self._writing)


def _both(first: asyncio.Future[Any], second: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """A future done once both are."""
    both: asyncio.Future[Any] = asyncio.gather(first, second, return_exceptions=True)
    return both
