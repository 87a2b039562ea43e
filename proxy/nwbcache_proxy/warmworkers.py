"""A pool of warm-up worker processes: each imports h5py and PyNWB once and warms file after file.

A worker is ``python -m nwbcache_proxy.warmfile --serve``: a URL per line in,
a JSON line out (warmfile.py). Starting one costs a second or two of imports,
more than warming most files' metadata, so a job keeps ``size`` of them for
all its files. A worker that takes longer than ``timeout`` on a file, or
dies, is killed and replaced; the file fails with the reason. When no worker
can be started at all (no fork, a sandbox), files are read on a thread of
the daemon instead, with a warning: slower, as h5py then shares the GIL with
the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)


class WarmError(Exception):
    """One file's warm-up failed: the message goes to the job."""


class _NoWorker(Exception):
    pass


class WorkerPool:
    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self.timeout = timeout
        self._idle: list[asyncio.subprocess.Process] = []
        self._count = 0  # workers alive, idle or busy
        self._freed = asyncio.Condition()
        self._in_process = False

    async def warm(self, url: str) -> dict[str, Any]:
        """What warming ``url`` (a proxied URL) read; WarmError with why not."""
        if not self._in_process:
            try:
                worker = await self._take()
            except _NoWorker as exc:
                log.warning("cannot start a warm-up worker (%s): files are read in-process", exc)
                self._in_process = True
            else:
                return await self._ask(worker, url)
        return await self._on_thread(url)

    async def close(self) -> None:
        for worker in self._idle:
            await _stop(worker)
        self._idle.clear()

    async def _take(self) -> asyncio.subprocess.Process:
        async with self._freed:
            while not self._idle and self._count >= self.size:
                await self._freed.wait()
            if self._idle:
                return self._idle.pop()
            self._count += 1
        try:
            return await self._start()
        except BaseException:
            await self._release(None)
            raise

    async def _release(self, worker: asyncio.subprocess.Process | None) -> None:
        async with self._freed:
            if worker is None:
                self._count -= 1
            else:
                self._idle.append(worker)
            self._freed.notify()

    async def _start(self) -> asyncio.subprocess.Process:
        # Workers read the proxied URLs they are given, on this machine: none
        # of the user's NWBCACHE_* settings (transparent mode) nor a proxy of
        # the environment (requests, under remfile, sends even 127.0.0.1
        # through HTTP_PROXY without NO_PROXY) applies. Their stderr (h5py's
        # warnings) is not read, so it must not fill a pipe.
        env = {k: v for k, v in os.environ.items() if not _not_for_workers(k)}
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "nwbcache_proxy.warmfile", "--serve",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, env=env,
            )  # fmt: skip
        except Exception as exc:  # no fork, no exec, a sandbox: read in-process
            raise _NoWorker(str(exc)) from None

    async def _ask(self, worker: asyncio.subprocess.Process, url: str) -> dict[str, Any]:
        assert worker.stdin is not None and worker.stdout is not None
        try:
            worker.stdin.write(url.encode() + b"\n")
            await worker.stdin.drain()
            line = await asyncio.wait_for(worker.stdout.readline(), self.timeout)
        except TimeoutError:
            await self._discard(worker)
            raise WarmError(f"timed out after {self.timeout:.0f} s") from None
        except OSError as exc:  # it died while idle (the OOM killer, a stray kill)
            await self._discard(worker)
            raise WarmError(f"the warm-up worker died ({exc})") from None
        except asyncio.CancelledError:
            await self._discard(worker)
            raise
        if not line:  # it died (a crash in HDF5, the OOM killer)
            await self._discard(worker)
            raise WarmError(f"the warm-up worker died ({worker.returncode}) reading it")
        await self._release(worker)
        try:
            result: dict[str, Any] = json.loads(line)
        except ValueError:
            raise WarmError(f"the warm-up worker said {line[:200]!r}") from None
        if not result.pop("ok", False):
            raise WarmError(str(result.get("error", "failed")))
        return result

    async def _discard(self, worker: asyncio.subprocess.Process) -> None:
        await _stop(worker)
        await self._release(None)

    async def _on_thread(self, url: str) -> dict[str, Any]:
        from . import warmfile  # h5py and PyNWB load only when this path is taken

        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(None, warmfile.warm, url), self.timeout
            )
        except TimeoutError:
            # The thread reads on until h5py returns: it cannot be stopped.
            raise WarmError(f"timed out after {self.timeout:.0f} s") from None
        except Exception as exc:
            raise WarmError(warmfile.describe(exc)) from None


def _not_for_workers(name: str) -> bool:
    return name.startswith("NWBCACHE_") or name.lower() in (
        "http_proxy", "https_proxy", "all_proxy", "no_proxy"
    )  # fmt: skip


async def _stop(worker: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        worker.kill()
    await worker.wait()
