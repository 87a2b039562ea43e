"""The block cache's front: builds the engine's parts and offers what the HTTP layer uses.

- versions.py: which version of an object is current (discovery, revalidation, drop)
- access.py: whether a request may read a private object (its credentials checked upstream)
- blocks.py: this process's view of the cached blocks (open versions, presence, publish)
- fetcher.py: blocks on their way from upstream (single flight, runs, fresh marks)
- claims.py: single flight across processes (locks on one shared file)
- reader.py: a byte range of a version as segments, its accounting and outcome
- readahead.py: how far ahead to fetch (pure)
- upkeep.py: index flushes, eviction, idle versions, gauges
"""

from __future__ import annotations

import logging
from pathlib import Path

from nwbcache.urls import AllowList, UpstreamURL

from .access import Access
from .aio import Disk
from .blocks import Blocks
from .buffers import Budget
from .claims import Claims
from .credentials import NONE, Credentials
from .fetcher import Fetcher
from .freshness import Policy
from .index import CacheIndex
from .inflight import POOL
from .layout import Layout
from .metrics import Metrics
from .openversions import OpenVersions, raise_fd_limit, table_capacity
from .rangereader import RangeReader
from .reader import Reader
from .readfor import PLAIN, ReadFor
from .trace import TraceWriter
from .upkeep import Upkeep
from .upstream import Upstream
from .version import Version
from .versions import Resolved, Versions

log = logging.getLogger(__name__)
# The filesystem block eviction frees whole (a punched hole's granularity).
PAGE = 4096


class BlockCache:
    def __init__(
        self,
        layout: Layout,
        index: CacheIndex,
        upstream: Upstream,
        *,
        block_size: int,
        capacity: int,
        readahead: int,
        revalidate_after: float,
        stale_if_error: float,
        immutable: AllowList,
        negative_ttl: float,
        fsync: bool,
        metrics: Metrics,
        trace: Path | None = None,
        parent_group: int | None = None,
        buffers: Budget,
    ) -> None:
        self.layout = layout
        # The pool is the process's, and a daemon process makes one cache. (In
        # a process with several, as in tests, the last one made sets it for all.)
        POOL.keep(buffers.pool)
        metrics.buffer_memory.set(buffers.total)
        if block_size % PAGE:
            log.warning(
                "--block-size %d is not a multiple of %d: eviction frees only the "
                "filesystem blocks a cached block covers whole, so the disk may hold "
                "more than --cache-size",
                block_size,
                PAGE,
            )
        self.disk = Disk()
        self.trace = TraceWriter(trace, self.disk) if trace is not None else None
        self.open_versions = OpenVersions(table_capacity(raise_fd_limit()))
        self.index = index
        self.upkeep = Upkeep(
            layout,
            index,
            self.open_versions,
            self.disk,
            capacity=capacity,
            metrics=metrics,
            trace=self.trace,
        )
        self.blocks = Blocks(
            layout,
            index,
            self.disk,
            self.open_versions,
            capacity=capacity,
            fsync=fsync,
            on_pressure=self.upkeep.wake,
            recent_bytes=buffers.recent,
        )
        # Upstream work this process has started, for every process on the cache dir to see.
        self.claims = Claims(layout.claims_path)
        self.fetcher = Fetcher(
            self.blocks,
            upstream,
            self.claims,
            block_size=block_size,
            metrics=metrics,
            on_version_changed=self.drop_version,
            group_bytes=parent_group,
        )
        self.access = Access(upstream, metrics=metrics, on_version_changed=self.drop_version)
        self.versions = Versions(
            layout,
            index,
            self.disk,
            self.blocks,
            self.fetcher,
            self.access,
            upstream,
            self.claims,
            block_size=block_size,
            policy=Policy(revalidate_after, stale_if_error),
            immutable=immutable,
            negative_ttl=negative_ttl,
            metrics=metrics,
        )
        self.reader = Reader(
            self.blocks,
            self.fetcher,
            block_size=block_size,
            readahead_blocks=readahead // block_size,
            metrics=metrics,
            trace=self.trace,
            send_budget=buffers.send,
        )

    async def start(self) -> None:
        await self.blocks.start()
        self.upkeep.start()  # sweeps and reconciles in the background: serving starts now

    async def close(self) -> None:
        await self.versions.close()
        await self.fetcher.close()  # fetches under way get a moment to finish
        await self.upkeep.close()
        if self.trace is not None:
            await self.trace.flush()
        # Flushed before the staging dir goes: a process without one stopped
        # cleanly, and its use is in the index (staging.sweep_leftovers). If the
        # index cannot be written, the staging dir stays: the next start then
        # reconciles, as after a crash.
        clean = await self.index.flush()
        if not clean:
            log.warning("the index misses this run's last use: the next start reconciles")
        await self.blocks.close(keep_staging=not clean)
        self.claims.close()
        self.disk.shutdown()

    async def resolve(
        self,
        url: UpstreamURL,
        creds: Credentials = NONE,
        *,
        offline: bool = False,
        revalidate: bool = False,
    ) -> Resolved:
        """The version of the object ``url`` names to serve, and whether it is stale
        (versions.Versions.resolve)."""
        return await self.versions.resolve(url, creds, offline=offline, revalidate=revalidate)

    async def authorize(
        self, v: Version, url: UpstreamURL, creds: Credentials, *, offline: bool = False
    ) -> None:
        """Return if a request with ``creds`` may read ``v``, else raise upstream's
        refusal (or NotCached when ``offline`` and upstream would have to be asked)."""
        if v.private is not False:
            await self.access.authorize(v, url, creds, offline=offline)

    async def read(
        self,
        v: Version,
        url: UpstreamURL,
        start: int,
        end: int,
        *,
        eager: bool,
        how: ReadFor = PLAIN,
    ) -> RangeReader:
        """Bytes [start, end) of version ``v`` (see reader.Reader.read)."""
        return await self.reader.read(v, url, start, end, eager=eager, how=how)

    async def cached(self, v: Version, start: int, end: int) -> bool:
        """Whether every block of bytes [start, end) of ``v`` is on disk."""
        return await self.reader.cached(v, start, end)

    async def drop_version(self, v: Version) -> None:
        """Forget version ``v``, found changed upstream: metadata, blocks, fds, index rows."""
        self.versions.mark_changed(v)
        await self.versions.drop(v)
