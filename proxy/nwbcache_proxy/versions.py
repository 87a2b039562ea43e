"""Which version of an object is current: resolve from memory, disk or upstream; revalidate; drop.

Discovery is single flight per object: concurrent requests for an object
whose version is unknown (or due for revalidation) share one upstream
request, a ranged GET of block 0 that tells the size and validators and warms
the first block. A version that changed upstream is dropped whole (metadata,
block files, fds, index rows) before anyone can read the new one.

Discovery also settles whether the object is private (access.py): when the
discovering request carries credentials, upstream is asked once without
them; a refusal makes the object private in its meta.json, for every process
and every restart. A 401/403 for an object believed public makes it private
too. An object whose privacy is not known (meta.json of format 1) is
discovered again before anyone is served from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from nwbcache.urls import UpstreamURL, cache_key, redact_url

from . import store
from .access import Access
from .aio import Disk
from .blocks import Blocks
from .credentials import Credentials, anonymous
from .errors import ProxyError, UpstreamStatus
from .fetcher import Fetcher
from .index import CacheIndex
from .layout import Layout, key_hash
from .lru import BoundedLRU
from .metrics import Metrics
from .objectmeta import ObjectMeta
from .upstream import Upstream
from .version import Version

log = logging.getLogger(__name__)

# Objects whose current version is kept in memory; the rest is re-read from meta.json.
VERSIONS_MEMORY = 10_000


class Versions:
    def __init__(
        self,
        layout: Layout,
        index: CacheIndex,
        disk: Disk,
        blocks: Blocks,
        fetcher: Fetcher,
        access: Access,
        upstream: Upstream,
        *,
        block_size: int,
        revalidate_after: float,
        metrics: Metrics,
    ) -> None:
        self.layout = layout
        self.index = index
        self.disk = disk
        self.blocks = blocks
        self.upstream = upstream
        self.block_size = block_size
        self.revalidate_after = revalidate_after
        self.metrics = metrics
        self.fetcher = fetcher
        self.access = access
        # By cache key: the current version and when upstream last confirmed it.
        self._known: BoundedLRU[str, tuple[Version, float]] = BoundedLRU(VERSIONS_MEMORY)
        self._discovering: dict[str, asyncio.Task[Version]] = {}

    async def resolve(self, url: UpstreamURL, creds: Credentials) -> Version:
        """The current version of the object, from memory, disk or upstream.

        ``creds``: what the request presents upstream (a discovery is made
        with them). Whether the request may read a private object is not
        decided here (access.Access.authorize)."""
        key = cache_key(url)
        known = self._fresh(key)
        if known is not None:
            return known
        task = self._discovering.get(key)
        if task is None:
            stale = self._known.get(key)
            if stale is None:
                on_disk = await self._read_meta(key)
                if on_disk is not None and self._usable(on_disk):
                    v = self._remember(on_disk)
                    return v
                stale_version = None if on_disk is None else self._version(on_disk)
            else:
                stale_version = stale[0]
            # Look again after the disk read: a discovery may have started, or
            # finished, meanwhile (finished ones leave _discovering at once).
            known = self._fresh(key)
            if known is not None:
                return known
            task = self._discovering.get(key)
            if task is None:
                task = asyncio.ensure_future(self._discover(url, key, stale_version, creds))
                self._discovering[key] = task
                task.add_done_callback(lambda _t: self._discovering.pop(key, None))
                return await asyncio.shield(task)
        self.metrics.coalesced.inc()  # joined a discovery already under way
        # shield: a client hanging up must not cancel a discovery others wait on.
        return await asyncio.shield(task)

    def _is_fresh(self, validated_at: float) -> bool:
        return time.time() - validated_at < self.revalidate_after

    def _usable(self, meta: ObjectMeta) -> bool:
        """Servable without asking upstream first."""
        return meta.private is not None and self._is_fresh(meta.validated_at)

    def _fresh(self, key: str) -> Version | None:
        known = self._known.get(key)
        if known is None or known[0].private is None or not self._is_fresh(known[1]):
            return None
        return known[0]

    def _version(self, meta: ObjectMeta) -> Version:
        return Version.of(self.layout, meta, self.block_size)

    def _remember(self, meta: ObjectMeta) -> Version:
        v = self._version(meta)
        self._known.put(meta.cache_key, (v, meta.validated_at))
        return v

    async def _read_meta(self, key: str) -> ObjectMeta | None:
        path = self.layout.meta_path(key_hash(key))
        raw = await self.disk.run(lambda: store.read_meta(path))
        return ObjectMeta.from_json(raw, key) if raw is not None else None

    async def _discover(
        self, url: UpstreamURL, key: str, stale: Version | None, creds: Credentials
    ) -> Version:
        try:
            found, first = await self.upstream.discover(
                url, self.block_size, authorization=creds.authorization
            )
        except UpstreamStatus as exc:
            if exc.status in (401, 403) and stale is not None and stale.private is not True:
                await self._mark_private(stale)
            raise
        private = creds.present and not await self._public(url)
        meta = ObjectMeta(key, found, time.time(), private)
        v = self._version(meta)
        if private:
            self.access.remember_accepted(v, creds)  # upstream just served them
        if stale is not None and not stale.remote.same_version(found):
            log.info("object changed upstream, dropping old version: %s", redact_url(url.url))
            await self.drop(stale)
        # Block 0 first, then the metadata that makes the object known: a
        # reader that finds the metadata (here or in another process) must
        # find block 0 too, or it would fetch it a second time.
        if found.size > 0:
            await self.fetcher.publish_first(v, first)
        path = self.layout.meta_path(key_hash(key))
        staging = self.blocks.staging
        await self.disk.run(lambda: store.write_meta(staging, path, meta.to_json()))
        self._known.put(key, (v, meta.validated_at))
        return v

    async def _public(self, url: UpstreamURL) -> bool:
        """Whether upstream serves the object without credentials. A probe that
        fails (upstream down) counts as "no": privacy errs on the safe side."""
        try:
            return await self.upstream.is_public(anonymous(url))
        except ProxyError as exc:
            log.warning("could not tell whether %s is public: %s", redact_url(url.url), exc)
            return False

    async def _mark_private(self, v: Version) -> None:
        """Upstream now refuses an object believed public: make it private here and on disk."""
        log.info("upstream refuses %s without credentials now: private", v.key)
        private = dataclasses.replace(v, private=True)
        known = self._known.get(v.key)
        if known is not None and known[0] == v:
            self._known.put(v.key, (private, known[1]))
        meta_path = self.layout.meta_path(key_hash(v.key))
        staging = self.blocks.staging

        def mark() -> None:
            raw = store.read_meta(meta_path)
            on_disk = ObjectMeta.from_json(raw, v.key) if raw else None
            if on_disk is not None and on_disk.version.same_version(v.remote):
                marked = dataclasses.replace(on_disk, private=True)
                store.write_meta(staging, meta_path, marked.to_json())

        await self.disk.run(mark)

    async def drop(self, v: Version) -> None:
        """Forget one version: metadata, blocks, open fds and index rows."""
        known = self._known.get(v.key)
        if known is not None and known[0] == v:
            self._known.pop(v.key)
        meta_path = self.layout.meta_path(key_hash(v.key))

        def drop() -> None:
            raw = store.read_meta(meta_path)
            on_disk = ObjectMeta.from_json(raw, v.key) if raw else None
            if on_disk is not None and on_disk.version.same_version(v.remote):
                store.unlink_quietly(meta_path)
            store.drop_dir(self.layout, v.dir)

        self.blocks.forget_version(v)
        await self.disk.run(drop)
        await self.index.forget_version(v.name)
