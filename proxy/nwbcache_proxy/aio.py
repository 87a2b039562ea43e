"""Asyncio plumbing the engine shares: a thread pool for disk work, and owned background tasks."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Threads for blocking disk work (opens, reads that miss the page cache,
# writes). Not the loop's default executor: sized for many concurrent block
# opens, and shut down with the cache.
DISK_THREADS = 16


class Disk:
    """Runs blocking file work off the event loop."""

    def __init__(self, threads: int = DISK_THREADS) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="nwbcache-disk"
        )
        # Per lane, the jobs waiting, while a thread runs them (_drain).
        self._lanes: dict[Hashable, collections.deque[_Job[Any]]] = {}
        self._lanes_lock = threading.Lock()

    async def run(self, fn: Callable[[], T]) -> T:
        return await self.start(fn)

    def start(self, fn: Callable[[], T], lane: Hashable | None = None) -> asyncio.Future[T]:
        """Start ``fn`` in a disk thread. Once it runs, it runs to its end;
        cancelling the future (which awaiting it directly does when the
        awaiter is cancelled) only stops a job still queued. Callers that
        must see its end add a done-callback and await a shield, or nothing.

        Jobs given the same ``lane`` run one at a time, in the order started,
        one after another in one thread: writes into one file. Linux takes
        the file's lock for each buffered write, and a thread waiting for it
        spins while the holder runs: a cold fill's concurrent runs writing
        one object's file from several threads spent up to 0.6 s of system
        time per 256 MiB in rwsem_spin_on_owner (perf), in one run of three.
        Each job handed on by the event loop instead (the next one started
        when the last one's end reached the loop) kept blocks waiting in
        memory: 230-260 MB of RSS against 156."""
        loop = asyncio.get_running_loop()
        if lane is None:
            return loop.run_in_executor(self._pool, fn)
        result: asyncio.Future[T] = loop.create_future()
        with self._lanes_lock:
            queue = self._lanes.get(lane)
            idle = queue is None  # else a thread runs the lane, and will take this job too
            if queue is None:
                queue = self._lanes[lane] = collections.deque()
            queue.append(_Job(fn, result, loop))
        if idle:
            try:
                self._pool.submit(self._drain, lane, queue)
            except RuntimeError as exc:  # shut down
                with self._lanes_lock:
                    del self._lanes[lane]
                for job in queue:
                    job.fail(exc)
        return result

    def _drain(self, lane: Hashable, queue: collections.deque[_Job[Any]]) -> None:
        """In a disk thread: the lane's jobs, until none is left. Never dies
        with the lane still taken: its later jobs would wait forever."""
        while True:
            with self._lanes_lock:
                if not queue:
                    del self._lanes[lane]
                    return
                job = queue.popleft()
            try:
                job.run()
            except Exception:
                log.exception("a disk job's outcome was lost")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class _Job(Generic[T]):
    """A lane's job: ``fn`` to run in a disk thread, its outcome for ``result``
    on the event loop."""

    __slots__ = ("fn", "loop", "result")

    def __init__(
        self, fn: Callable[[], T], result: asyncio.Future[T], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.fn = fn
        self.result = result
        self.loop = loop

    def run(self) -> None:
        # Read from this thread, a cancel is seen late at worst: the job then
        # runs, as one already started would.
        if self.result.cancelled():
            return
        try:
            value = self.fn()
        except BaseException as exc:  # delivered, as run_in_executor does
            self.fail(exc)
        else:
            self._deliver(_resolve, value)

    def fail(self, exc: BaseException) -> None:
        self._deliver(_reject, exc)

    def _deliver(self, how: Callable[[asyncio.Future[T], Any], None], what: Any) -> None:
        """To the loop, unless it has closed (nobody is left to hear it, as
        with run_in_executor)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self.loop.call_soon_threadsafe(how, self.result, what)


def _resolve(result: asyncio.Future[T], value: T) -> None:
    if not result.done():
        result.set_result(value)


def _reject(result: asyncio.Future[Any], exc: BaseException) -> None:
    if not result.done():
        result.set_exception(exc)


class Tasks:
    """Background tasks with an owner: kept referenced while they run (the loop
    holds tasks only weakly) and cancelled together at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, grace: float = 0.0) -> None:
        """Give the tasks ``grace`` seconds to finish, then cancel what is left."""
        if grace > 0 and self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
