"""Asyncio plumbing the engine shares: a thread pool for disk work, and owned background tasks."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

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

    async def run(self, fn: Callable[[], T]) -> T:
        return await self.start(fn)

    def start(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Start ``fn`` in a disk thread. Once it runs, it runs to its end;
        cancelling the future (which awaiting it directly does when the
        awaiter is cancelled) only stops a job still queued. Callers that
        must see its end add a done-callback and await a shield, or nothing."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


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
