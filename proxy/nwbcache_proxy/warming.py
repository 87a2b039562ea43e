"""Warm-up jobs run in the daemon: a dandiset's metadata, or every byte, fetched ahead of readers.

A job (jobs.py) is a list of files and a mode. Each process runs the jobs it
was given or took over, one at a time, ``job.jobs`` files at once:

- **metadata**: a worker process (warmworkers.py: a pool of ``job.jobs``,
  each importing h5py and PyNWB once) opens the file through this daemon's
  own port with h5py and PyNWB (warmfile.py says what it reads). Processes,
  not threads: h5py holds the GIL, and a crash or a hang in a reader costs
  one file, not the daemon.
- **full**: the file's bytes as parallel 16 MiB ranged reads, drained.

Both go through the daemon's HTTP port like any reader, so single flight,
parents, retries and privacy apply unchanged, and blocks already cached cost
nothing. Errors stay with their file (404, 403, not HDF5, a timeout); the
job goes on. The job's file is rewritten as it goes, so any process can
report it and a restarted daemon resumes it (files done are not read again).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from typing import Any

import aiohttp

from nwbcache.urls import cache_key, parse_upstream_url, proxied_url

from . import catalog
from .cache import BlockCache
from .jobs import FileState, Job, JobStore, Mode, State, WarmFile, new_id
from .metrics import Metrics
from .warmworkers import WarmError, WorkerPool

log = logging.getLogger(__name__)

# How long one file may take before its worker is stopped.
FILE_TIMEOUT = 900.0
# A full warm's ranges, and how many of one file are read at once.
FULL_RANGE = 16 * 1024 * 1024
FULL_PARALLEL = 4
# A metadata warm fetches a file of at most this many bytes whole first.
WHOLE_BELOW = 16 * 1024 * 1024
# Files warmed at once, at most (a job asks for its own number up to this).
MAX_JOBS = 16
# A job's file is rewritten at most this often while files are running.
SAVE_INTERVAL = 0.5


@dataclasses.dataclass
class Loopback:
    """This daemon's own base URL, as its workers reach it: known once it listens."""

    url: str = ""
    known: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def set(self, host: str, port: int) -> None:
        host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host, host)
        self.url = f"http://{host}:{port}"
        self.known.set()


class Warming:
    def __init__(
        self, cache: BlockCache, store: JobStore, metrics: Metrics, loopback: Loopback
    ) -> None:
        self.cache = cache
        self.store = store
        self.metrics = metrics
        self.loopback = loopback
        self._queue: asyncio.Queue[tuple[Job, int]] = asyncio.Queue()
        self._runner: asyncio.Task[None] | None = None
        self._locks: dict[str, int] = {}  # job id -> lock fd, while this process has it
        self._session: aiohttp.ClientSession | None = None
        self._last_save = 0.0
        self._stopping = False
        self.whole_below = WHOLE_BELOW

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())
        self.report()

    def report(self) -> None:
        """The jobs-by-state gauge, from the jobs on record (every process's)."""
        counts = {s: 0 for s in State}
        for job in self.store.all():
            counts[job.state] += 1
        for state, n in counts.items():
            self.metrics.warm_jobs.labels(state.value).set(n)

    async def close(self) -> None:
        """Stop, before the daemon stops listening (its reads go through its own
        port): the job under way stays "running" on disk, its unfinished files
        queued, and the next start resumes it. Idempotent."""
        self._stopping = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        for fd in self._locks.values():
            os.close(fd)
        self._locks.clear()

    # -- what the admin API asks -------------------------------------------
    def submit(self, files: list[WarmFile], mode: Mode, jobs: int) -> Job:
        job = Job(new_id(), mode, max(1, min(MAX_JOBS, jobs)), files, time.time())
        fd = self.store.lock(job.id)
        assert fd is not None  # a new id: nobody else has it
        self._locks[job.id] = fd
        self.store.save(job)
        self._queue.put_nowait((job, fd))
        self.metrics.warm_jobs_total.inc()
        self.report()
        log.info("warm-up job %s: %d files, %s", job.id, len(files), mode.value)
        return job

    def get(self, job_id: str) -> Job | None:
        return self.store.load(job_id)

    def all(self) -> list[Job]:
        return self.store.all()

    def cancel(self, job_id: str) -> Job | None:
        """Ask the job's runner (whichever process) to stop: no file starts
        after it, and a full warm stops between ranges."""
        job = self.store.load(job_id)
        if job is None or job.state.final:
            return job
        self.store.request_cancel(job_id)
        fd = self.store.lock(job_id)
        if fd is None:
            return job  # a live process runs it and will see the mark
        try:  # left by a stopped daemon: nobody else will see the mark
            job = self.store.load(job_id)  # as it is now, under the lock
            if job is not None and not job.state.final:
                job.state, job.finished = State.CANCELLED, time.time()
                self.store.save(job)
        finally:
            os.close(fd)
        return job

    # -- running ---------------------------------------------------------------
    async def _run(self) -> None:
        await self.loopback.known.wait()
        self._resume_left_over()
        while True:
            job, fd = await self._queue.get()
            try:
                await self._run_job(job)
            except Exception:
                log.exception("warm-up job %s failed", job.id)
            finally:
                self._locks.pop(job.id, None)
                os.close(fd)
            self.store.prune()
            self.report()

    def _resume_left_over(self) -> None:
        """Take up the jobs a stopped process left unfinished (whose lock is free)."""
        for listed in self.store.all():
            if listed.state.final or listed.id in self._locks:
                continue
            fd = self.store.lock(listed.id)
            if fd is None:
                continue  # another live process runs it
            job = self.store.load(listed.id)  # as it is now, under the lock
            if job is None or job.state.final:
                os.close(fd)
                continue
            job.resumed += 1
            for f in job.files:
                if f.state is FileState.RUNNING:
                    f.state = FileState.QUEUED
            self._locks[job.id] = fd
            self.store.save(job)
            self._queue.put_nowait((job, fd))
            log.info("warm-up job %s resumed after a restart", job.id)

    async def _run_job(self, job: Job) -> None:
        job.state = State.RUNNING
        job.started = job.started or time.time()
        self.store.save(job)
        todo = [f for f in job.files if f.state is FileState.QUEUED]
        slots = asyncio.Semaphore(job.jobs)
        workers = WorkerPool(min(job.jobs, len(todo)) or 1, FILE_TIMEOUT)

        async def one(f: WarmFile) -> None:
            async with slots:
                if not self.store.cancel_requested(job.id):
                    await self._warm(job, f, workers)

        try:
            async with asyncio.TaskGroup() as group:
                for f in todo:
                    group.create_task(one(f))
        except BaseException:
            # Stopping (or a bug): what did not finish is queued again, and
            # the job stays "running" on disk for the next start to resume.
            for f in job.files:
                if f.state is FileState.RUNNING:
                    f.state = FileState.QUEUED
            self.store.save(job)
            raise
        finally:
            await workers.close()
        left = any(f.state is FileState.QUEUED for f in job.files)
        job.state = State.CANCELLED if left else State.DONE
        job.finished = time.time()
        self.store.save(job)
        summary = job.summary()
        log.info(
            "warm-up job %s %s: %d done, %d failed, %d skipped, %d bytes fetched",
            job.id, job.state.value, summary["done"], summary["failed"],
            summary["skipped"], summary["fetched_bytes"],
        )  # fmt: skip

    async def _warm(self, job: Job, f: WarmFile, workers: WorkerPool) -> None:
        f.state = FileState.RUNNING
        self._save_soon(job)
        started = time.monotonic()
        key = cache_key(parse_upstream_url(f.url))
        before = await self._cached_bytes(key)
        url = proxied_url(f.url, self.loopback.url)
        try:
            size = await self._head(url)
            if job.mode is Mode.FULL:
                f.detail = await self._read_all(url, size, job.id)
            elif size <= self.whole_below:
                # A small file is mostly metadata (an icephys file: 97 %):
                # fetched whole in one round trip, then visited from the
                # cache, instead of hundreds of round trips upstream.
                whole = await self._read_all(url, size, job.id)
                f.detail = {**await workers.warm(url), "fetched_whole": whole["bytes"]}
            else:
                f.detail = await workers.warm(url)
            f.state, f.error = FileState.DONE, None
        except WarmError as exc:
            f.state, f.error = FileState.FAILED, str(exc)
            if self._stopping:  # refused by this daemon going away: not the file's fault
                f.state, f.error = FileState.QUEUED, None
                return
        except _Cancelled:
            f.state = FileState.QUEUED  # not read: the job was cancelled meanwhile
            return
        except Exception as exc:  # never the job's end: this file failed
            log.warning("warm-up of %s failed", f.url, exc_info=True)
            f.state, f.error = FileState.FAILED, f"{type(exc).__name__}: {exc}"[:300]
        f.seconds = round(time.monotonic() - started, 3)
        f.fetched_bytes = max(0, await self._cached_bytes(key) - before)
        self.metrics.warm_files.labels(f.state.value).inc()
        self.metrics.warm_fetched_bytes.inc(f.fetched_bytes)
        self._save_soon(job)

    def _save_soon(self, job: Job) -> None:
        """Rewrite the job's file at most every SAVE_INTERVAL (a job of many files
        would otherwise rewrite it after each); _run_job saves at its end."""
        now = time.monotonic()
        if now - self._last_save >= SAVE_INTERVAL:
            self._last_save = now
            self.store.save(job)

    async def _cached_bytes(self, key: str) -> int:
        entries = await self.cache.index.call(lambda conn: catalog.entries(conn, key=key))
        return sum(e.cached_bytes for e in entries)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=FILE_TIMEOUT)
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        return self._session

    async def _head(self, url: str) -> int:
        """The file's size, or its error as the daemon words it (404, 403...)."""
        try:
            async with self._client().head(url) as resp:
                if resp.status >= 400:
                    raise WarmError(_http_error(resp.status))
                return int(resp.headers.get("Content-Length", "0"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WarmError(f"the daemon did not answer: {exc!r}") from None

    async def _read_all(self, url: str, size: int, job_id: str) -> dict[str, Any]:
        """Every byte, FULL_PARALLEL ranges at a time; a failed range stops the
        others, and so does a cancel of the job (between ranges)."""
        starts = list(range(0, size, FULL_RANGE))
        slots = asyncio.Semaphore(FULL_PARALLEL)

        async def part(start: int) -> None:
            end = min(size, start + FULL_RANGE) - 1
            async with slots:
                if self.store.cancel_requested(job_id):
                    raise _Cancelled
                ranged = {"Range": f"bytes={start}-{end}"}
                async with self._client().get(url, headers=ranged) as r:
                    if r.status >= 400:
                        raise WarmError(_http_error(r.status))
                    async for _ in r.content.iter_chunked(1 << 20):
                        pass

        try:
            async with asyncio.TaskGroup() as group:
                for start in starts:
                    group.create_task(part(start))
        except* _Cancelled:
            raise _Cancelled from None
        except* WarmError as group_error:
            raise group_error.exceptions[0] from None
        except* (aiohttp.ClientError, TimeoutError) as group_error:
            raise WarmError(f"reading the file failed: {group_error.exceptions[0]!r}") from None
        return {"ranges": len(starts), "bytes": size}


class _Cancelled(Exception):
    """The job was cancelled in the middle of a file."""


def _http_error(status: int) -> str:
    words = {404: "not found upstream", 403: "refused upstream (private?)", 416: "empty"}
    return f"HTTP {status}: {words.get(status, 'the daemon could not read it')}"
