"""One upstream body filling a run of in-flight blocks: where its bytes go, and when whole
blocks go to disk.

The sink (wireconn.Sink) of a fetch run: the connection receives straight
into the space of the run's next block, and each block that completes joins
a group; a group of PUBLISH_GROUP_BYTES goes to disk as one job. At most one
job per run is under way: a full group waits for the one before, and the
body pauses meanwhile, which bounds the memory held to two groups. Readers
wait for none of it: they stream from the blocks, which stay registered
until their files exist.

Across runs, the process's whole blocks not yet written (WriteBacklog) are
bounded too: past the limit, a run hands what it has whole to disk at once
and pauses at its next block until writes catch up. Only blocks handed to
disk jobs then count, and those jobs end, so the pause always does.
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


class WriteBacklog:
    """Bytes of a process's fetched blocks, whole, not yet written to disk;
    the runs waiting for them to fall to the limit (buffers.WRITE_BEHIND_BYTES)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._waiters: list[asyncio.Future[None]] = []

    def add(self, nbytes: int) -> None:
        self.bytes += nbytes

    def written(self, nbytes: int) -> None:
        """``nbytes`` of them are on disk now (or failed to get there)."""
        self.bytes -= nbytes
        if self.bytes <= self.limit and self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def room(self) -> asyncio.Future[None] | None:
        """None when under the limit; else a future done once under it."""
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
        ``backlog``: the process's, which the run's whole blocks join until
        written."""
        self._pending = collections.deque(run)
        self._group_blocks = max(1, PUBLISH_GROUP_BYTES // block_size)
        self._publish = publish
        self._completed = completed
        self._backlog = backlog
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
        if self._backlog is not None:
            self._backlog.add(block.length)
        room = None
        if len(self._group) < self._group_blocks and self._pending:
            # Too much of the process's fetch waits for disk: hand on what
            # is whole now, and wait (see the module's docstring).
            room = self._backlog.room() if self._backlog is not None else None
            if room is None:
                return None
        group, self._group = self._group, []
        writing = self._writing
        if writing is None or writing.done():
            self._writing = self._start(group)
            return room
        # The job before is under way: this group waits for it, and the body
        # with it. This callback is added before the connection's own, so the
        # next job has started when reading resumes.
        self._queued = group
        writing.add_done_callback(self._write_queued)
        return writing if room is None else _both(writing, room)

    def _start(self, group: list[InflightBlock]) -> asyncio.Future[list[bool]]:
        """Publish a group; once written, its bytes leave the backlog."""
        job = self._publish(group)
        if self._backlog is not None:
            backlog, nbytes = self._backlog, sum(b.length for b in group)
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
        self._queued, self._group = [], []
        try:
            while groups:
                if self._writing is not None:
                    await asyncio.shield(self._writing)
                self._writing = self._start(groups.pop(0))
        finally:
            if groups and self._backlog is not None:  # cancelled: never to be written
                self._backlog.written(sum(b.length for g in groups for b in g))
        if self._writing is not None:
            await asyncio.shield(self._writing)


def _both(first: asyncio.Future[Any], second: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """A future done once both are."""
    both: asyncio.Future[Any] = asyncio.gather(first, second, return_exceptions=True)
    return both
