"""Which version of an object is current: resolve from memory, disk or upstream; revalidate; drop.

Discovery is single flight per object: concurrent requests for an object
whose version is unknown (or no longer servable unconfirmed) share one
upstream request, a ranged GET of block 0 that tells the size and validators
and warms the first block; across processes too (a discovery claim,
claims.py: a process that finds it taken waits, then reads the meta.json the
claimant wrote). A version that changed upstream is dropped whole
(metadata, block files, fds, index rows) before anyone can read the new one.

How long a version is served unconfirmed is freshness.py's call: a stale one
is served at once while a conditional request (no body) revalidates it in
the background. A 404 is remembered for ``--negative-ttl``.

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
from typing import NamedTuple

from nwbcache.urls import AllowList, UpstreamURL, cache_key, redact_url

from .access import Access
from .aio import Disk, Tasks
from .blocks import Blocks
from .claims import CLAIM_PATIENCE, CLAIM_POLL_FIRST, CLAIM_POLL_MAX, Claims, discovery_offset
from .credentials import NONE, Credentials, anonymous
from .errors import NotCached, ProxyError, UpstreamStatus
from .fetcher import Fetcher
from .freshness import Freshness, Policy
from .index import CacheIndex
from .layout import Layout, key_hash
from .lru import BoundedLRU
from .metafiles import MetaFiles
from .metrics import Metrics
from .objectmeta import ObjectMeta
from .upstream import Upstream
from .version import Version

log = logging.getLogger(__name__)

# Objects whose current version is kept in memory; the rest is re-read from meta.json.
VERSIONS_MEMORY = 10_000
# Objects upstream said are not there, remembered for --negative-ttl.
ABSENT_MEMORY = 10_000


@dataclasses.dataclass(slots=True)
class _Known:
    version: Version
    validated_at: float  # when upstream last confirmed it
    immutable: bool
    last_attempt: float | None = None  # last background revalidation started


class Resolved(NamedTuple):
    version: Version
    stale: bool  # served without upstream's confirmation (X-Cache: STALE)


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
        claims: Claims,
        *,
        block_size: int,
        policy: Policy,
        immutable: AllowList,
        negative_ttl: float,
        metrics: Metrics,
    ) -> None:
        self.layout = layout
        self.index = index
        self.meta = MetaFiles(layout, disk, blocks)
        self.blocks = blocks
        self.fetcher = fetcher
        self.access = access
        self.upstream = upstream
        self.claims = claims
        self.block_size = block_size
        self.policy = policy
        self.immutable = immutable
        self.negative_ttl = negative_ttl
        self.metrics = metrics
        self._known: BoundedLRU[str, _Known] = BoundedLRU(VERSIONS_MEMORY)
        self._absent: BoundedLRU[str, float] = BoundedLRU(ABSENT_MEMORY)
        self._discovering: dict[str, asyncio.Task[Version]] = {}
        # key -> fingerprint of the credentials its discovery under way was started with
        self._discoverers: BoundedLRU[str, str] = BoundedLRU(VERSIONS_MEMORY)
        self._revalidating: set[str] = set()
        # Objects whose version was just found changed (mark_changed).
        self._changed: BoundedLRU[str, bool] = BoundedLRU(ABSENT_MEMORY)
        self._tasks = Tasks()

    async def close(self) -> None:
        await self._tasks.close()

    async def resolve(
        self,
        url: UpstreamURL,
        creds: Credentials,
        *,
        offline: bool = False,
        revalidate: bool = False,
    ) -> Resolved:
        """The version of the object to serve, from memory, disk or upstream.

        ``creds``: what the request presents upstream (a discovery is made
        with them); whether it may read a private object is access.py's call.
        ``offline``: never ask upstream (only-if-cached); NotCached if needed.
        """
        key = cache_key(url)
        # Found changed a moment ago (a parent may still hold the old version):
        # the next discovery asks for upstream's word, through every tier.
        revalidate = revalidate or (not offline and self._changed.pop(key) is not None)
        absent_until = self._absent.get(key)
        if absent_until is not None and absent_until > time.time():
            raise UpstreamStatus("upstream answered 404 (remembered)", status=404)
        known = self._known.get(key)
        if known is None and key not in self._discovering:
            meta = await self.meta.read(key)
            # Look again after the disk read: a discovery may have finished meanwhile.
            known = self._known.get(key)
            if known is None and meta is not None:
                known = self._remember(meta, url)
        if known is not None:
            verdict = self._judge(known, offline=offline, revalidate=revalidate)
            if verdict is not Freshness.EXPIRED:
                stale = verdict is Freshness.STALE
                if stale and not offline:
                    self._revalidate_soon(url, key, known, creds)
                return Resolved(known.version, stale)
        if offline:
            raise NotCached("not in the cache (Cache-Control: only-if-cached)")
        if known is not None and known.version.private:
            refusal = self.access.refusal(known.version, creds)
            if refusal is not None:  # refused a moment ago: not asked again
                raise refusal
        return Resolved(await self._discovery(url, key, known, creds, revalidate), False)

    def _remember(self, meta: ObjectMeta, url: UpstreamURL) -> _Known:
        known = self._known_of(meta, url)
        self._known.put(meta.cache_key, known)
        return known

    def _judge(
        self, known: _Known, *, offline: bool = False, revalidate: bool = False
    ) -> Freshness:
        """How ``known`` may be served now (freshness.Policy.judge)."""
        return self.policy.judge(
            age=time.time() - known.validated_at,
            immutable=known.immutable,
            privacy_known=known.version.private is not None,
            offline=offline,
            revalidate=revalidate,
        )

    def _known_of(self, meta: ObjectMeta, url: UpstreamURL) -> _Known:
        v = Version.of(self.layout, meta, self.block_size)
        immutable = self.immutable.permits(url) or _names_a_version(meta.cache_key)
        return _Known(v, meta.validated_at, immutable)

    # -- discovery -------------------------------------------------------------
    async def _discovery(
        self,
        url: UpstreamURL,
        key: str,
        known: _Known | None,
        creds: Credentials,
        revalidate: bool = False,
    ) -> Version:
        stale = known.version if known is not None else None
        task = self._discovering.get(key)
        if task is None:
            task = asyncio.ensure_future(self._discover(url, key, stale, creds, revalidate))
            self._discovering[key] = task
            self._discoverers.put(key, creds.fingerprint(key))
            task.add_done_callback(lambda _t: self._discovering.pop(key, None))
            # shield: a client hanging up must not cancel a discovery others wait on.
            return await asyncio.shield(task)
        self.metrics.coalesced.inc()  # joined a discovery already under way
        started_by = self._discoverers.get(key)
        try:
            return await asyncio.shield(task)
        except UpstreamStatus as exc:
            if exc.status not in (401, 403) or started_by == creds.fingerprint(key):
                raise
        # Upstream refused the credentials of whoever started it, not ours: ask with ours.
        return await self._discover(url, key, stale, creds, revalidate)

    async def _discover(
        self,
        url: UpstreamURL,
        key: str,
        stale: Version | None,
        creds: Credentials,
        revalidate: bool = False,
    ) -> Version:
        claim = discovery_offset(key_hash(key))
        try:
            if not self.claims.take(claim):
                await self._await_claim(claim)
            # Looked for before, but a discovery in another process may have
            # finished (and freed its claim) in between: what it wrote is used.
            found = await self._discovered_elsewhere(url, key, stale, revalidate)
            if found is not None:
                return found
            return await self._discover_upstream(url, key, stale, creds, revalidate)
        finally:
            self.claims.release(claim)

    async def _await_claim(self, claim: int) -> None:
        """Another process is discovering the object: wait until its claim frees
        (and take it), or CLAIM_PATIENCE passes. The caller releases the claim."""
        self.metrics.awaited.labels("discovery").inc()
        delay = CLAIM_POLL_FIRST
        deadline = time.monotonic() + CLAIM_PATIENCE
        while not self.claims.take(claim) and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, CLAIM_POLL_MAX)

    async def _discovered_elsewhere(
        self, url: UpstreamURL, key: str, stale: Version | None, revalidate: bool
    ) -> Version | None:
        """The version another process's discovery wrote to meta.json, if it is
        servable without asking upstream again. None when it is not (none was
        written, the claimant failed or died, or this discovery must ask
        upstream itself): this process discovers."""
        meta = await self.meta.read(key)
        if meta is None or revalidate:
            return None
        known = self._known_of(meta, url)
        if self._judge(known) is not Freshness.FRESH:
            return None
        self._known.put(key, known)
        v = known.version
        if stale is not None and not stale.remote.same_version(v.remote):
            await self.drop(stale)  # what the claimant's discovery found changed
        return v

    async def _discover_upstream(
        self,
        url: UpstreamURL,
        key: str,
        stale: Version | None,
        creds: Credentials,
        revalidate: bool,
    ) -> Version:
        try:
            found, first = await self.upstream.discover(
                url, self.block_size, authorization=creds.authorization, revalidate=revalidate
            )
        except UpstreamStatus as exc:
            await self._refused(exc, key, stale, url, creds)
            raise
        private = creds.present and not await self._public(url)
        meta = ObjectMeta(key, found, time.time(), private)
        v = Version.of(self.layout, meta, self.block_size)
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
        await self.meta.write(meta)
        self._remember(meta, url)
        return v

    async def _refused(
        self,
        exc: UpstreamStatus,
        key: str,
        held: Version | None,
        url: UpstreamURL,
        creds: Credentials,
    ) -> None:
        """Upstream answered a discovery or revalidation with a final refusal."""
        if exc.status in (401, 403) and held is not None:
            self.access.remember_refused(held, creds, exc)
        if exc.status in (401, 403) and held is not None and held.private is not True:
            # Refused with credentials: maybe only they were bad (a wrong or
            # expired signature must not make a public object private).
            if not creds.present or not await self._public(url):
                await self._mark_private(held)
        elif exc.status in (404, 410):
            if held is not None:
                await self.drop(held)  # deleted upstream: no longer served
            if self.negative_ttl > 0:
                self._absent.put(key, time.time() + self.negative_ttl)

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
        known = self._known.get(v.key)
        if known is not None and known.version == v:
            known.version = dataclasses.replace(v, private=True)
        await self.meta.update(v, private=True)

    # -- revalidation ----------------------------------------------------------
    def _revalidate_soon(
        self, url: UpstreamURL, key: str, known: _Known, creds: Credentials
    ) -> None:
        if known.version.private and not creds.present:
            return  # upstream would refuse it: leave it to a request that can ask
        now = time.time()
        running = key in self._revalidating or key in self._discovering
        if not Policy.should_revalidate(now=now, last_attempt=known.last_attempt, running=running):
            return
        known.last_attempt = now
        self._revalidating.add(key)
        self._tasks.spawn(self._revalidate(url, key, known, creds))

    async def _revalidate(
        self, url: UpstreamURL, key: str, known: _Known, creds: Credentials
    ) -> None:
        """Ask upstream whether the stale version is still current, with a
        conditional request that carries no body when it is."""
        v = known.version
        if v.private is False:
            # Asked without credentials: what anyone may read is what is
            # checked, so an embargo after release is noticed even while
            # only requests with credentials come by.
            url, creds = anonymous(url), NONE
        try:
            now = await self.upstream.revalidate(url, v.remote, authorization=creds.authorization)
            if now is None:
                known.validated_at = time.time()
                known.last_attempt = None
                on_disk = await self.meta.update(v, validated_at=known.validated_at)
                if on_disk is not None and on_disk.private and known.version == v:
                    known.version = dataclasses.replace(v, private=True)  # another process saw it
            else:
                await self._discovery(url, key, known, creds)  # drops the old version
        except UpstreamStatus as exc:
            await self._refused(exc, key, v, url, creds)
        except ProxyError as exc:  # upstream down: served stale until --stale-if-error
            log.info("revalidation of %s failed: %s", redact_url(url.url), exc)
        finally:
            self._revalidating.discard(key)

    def mark_changed(self, v: Version) -> None:
        """``v`` was found changed upstream: its next discovery asks for
        upstream's word (``Cache-Control: no-cache``), so a parent (parents.py)
        still holding the old version revalidates instead of serving it again."""
        self._changed.put(v.key, True)

    def forget_object(self, key: str) -> None:
        """Forget what this process knows of an object evicted by hand: its next
        request reads meta.json afresh (gone: a discovery)."""
        self._known.pop(key)

    async def drop(self, v: Version) -> None:
        """Forget one version: metadata, blocks, open fds and index rows."""
        known = self._known.get(v.key)
        if known is not None and known.version == v:
            self._known.pop(v.key)
        self.blocks.forget(v.name)
        await self.meta.drop(v)
        await self.index.forget_version(v.name)


def _names_a_version(key: str) -> bool:
    """Whether a cache key's query has a versionId (S3's name for one version, forever)."""
    query = key.partition("?")[2]
    return any(param.partition("=")[0] == "versionId" for param in query.split("&"))
