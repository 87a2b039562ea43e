"""What an admin does to the cache by hand: list objects, pin and unpin them, evict them.

Every step that touches the index is one bounded job on its thread
(catalog.py, pins.py); files go on the disk threads. Pins live in the shared
index, so every process on the cache dir keeps them and they survive a
restart; each process also runs ``upkeep``: pins whose time is up are
unpinned, and an unpin a stop interrupted is finished.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from typing import Any

from nwbcache.urls import UpstreamURL

from . import catalog, pins, store
from .cache import BlockCache
from .catalog import Entry, Order
from .layout import Layout, key_hash
from .metrics import Metrics
from .pins import PinLimit

log = logging.getLogger(__name__)

# How often each process looks for expired pins and unpins to finish.
UPKEEP_INTERVAL = 30.0

__all__ = ["Admin", "Entry", "Order", "PinLimit"]


@dataclasses.dataclass(frozen=True, slots=True)
class Pinned:
    url: str
    size: int
    new: bool  # False: it was pinned already (its expiry is now the new one)
    expires: float | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(slots=True)
class Evicted:
    objects: int = 0
    bytes: int = 0
    skipped_pinned: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Admin:
    def __init__(self, cache: BlockCache, metrics: Metrics, *, pin_limit: int) -> None:
        self.cache = cache
        self.metrics = metrics
        self.index = cache.index
        self.layout: Layout = cache.layout
        self.pin_limit = pin_limit
        metrics.pin_limit.set(pin_limit)

    # -- listing ---------------------------------------------------------
    async def objects(
        self,
        *,
        key: str | None = None,
        prefix: str | None = None,
        order: Order = Order.BYTES,
        limit: int | None = None,
    ) -> list[Entry]:
        """Cached objects, their figures added up over their versions."""
        if key is not None or prefix is not None or order in (Order.URL,):
            await self.learn_keys()
        return await self.index.call(
            lambda conn: catalog.entries(conn, key=key, prefix=prefix, order=order, limit=limit)
        )

    async def learn_keys(self) -> None:
        """Cache keys for versions indexed without one, a step at a time."""
        while await self.index.call(lambda conn: catalog.learn_keys(conn, self.layout)):
            pass

    async def pin_totals(self) -> tuple[int, int]:
        """(bytes the pins count against --pin-limit, pins); the gauges follow."""
        size, count = await self.index.call(pins.pinned_size)
        self.metrics.pinned_size.set(size)
        self.metrics.pins.set(count)
        return size, count

    async def pins(self) -> list[pins.Pin]:
        return await self.index.call(pins.pins)

    # -- pins ------------------------------------------------------------
    async def pin(self, urls: list[UpstreamURL], ttl: float | None = None) -> list[Pinned]:
        """Keep the objects the URLs name, whatever is cached of them now or
        later, for ``ttl`` seconds (None: until unpinned). Sizes are upstream's
        (a discovery for an object not cached). All or nothing: raises the
        first URL's upstream error, or PinLimit when the new pins do not fit in
        --pin-limit, pinning nothing."""
        found = [(await self.cache.resolve(url)).version for url in urls]
        objects = [(self._odir(v.key), v.key, v.remote.size) for v in found]
        expires = None if ttl is None else time.time() + ttl
        done = await self.index.call(
            lambda conn: pins.pin(conn, objects, expires=expires, limit=self.pin_limit)
        )
        for _, vids in done:
            for vid in vids:
                await self._move(vid, 0, to_pinned=True)
        return [
            Pinned(key, size, new, expires)
            for (_, key, size), (new, _) in zip(objects, done, strict=True)
        ]

    async def unpin(self, key: str) -> bool:
        """Let the object with cache key ``key`` go the way of the policy again;
        False if it was not pinned."""
        was, vids = await self.index.call(lambda conn: pins.unpin(conn, self._odir(key)))
        for vid in vids:
            await self._move(vid, 0, to_pinned=False)
        return was

    async def _move(self, vid: int, start: int, *, to_pinned: bool) -> None:
        at: int | None = start
        while at is not None:
            at = await self.index.call(
                functools.partial(pins.move_step, vid=vid, start=at, to_pinned=to_pinned)
            )

    async def upkeep(self) -> None:
        """Finish unpins a stop interrupted, and unpin pins whose time is up."""
        for vid, start in await self.index.call(pins.unpins_under_way):
            await self._move(vid, start, to_pinned=False)
        while expired := await self.index.call(lambda conn: pins.expired(conn, time.time())):
            for odir in expired:
                pin = await self.index.call(functools.partial(pins.pin_of, odir=odir))
                if pin is not None:
                    log.info("pin of %s expired: unpinned", pin.key)
                    await self.unpin(pin.key)
        await self.pin_totals()

    async def run(self) -> None:
        """``upkeep`` now and every UPKEEP_INTERVAL seconds, until cancelled."""
        while True:
            try:
                await self.upkeep()
            except Exception:
                log.exception("pin upkeep failed; retrying")
            await asyncio.sleep(UPKEEP_INTERVAL)

    # -- eviction by hand ------------------------------------------------
    async def evict(
        self, *, key: str | None = None, prefix: str | None = None, unpin: bool = False
    ) -> Evicted:
        """Drop the cached objects with cache key ``key`` or under ``prefix``:
        their blocks, metadata and rows. Pinned ones are skipped unless ``unpin``."""
        await self.learn_keys()
        odirs = await self.index.call(
            lambda conn: catalog.object_dirs(conn, key=key, prefix=prefix)
        )
        if key is not None and not odirs:
            # Nothing indexed, but meta.json may exist (a discovery, no block yet).
            odirs = [self._odir(key)]
        done = Evicted()
        for odir in odirs:
            pin = await self.index.call(functools.partial(pins.pin_of, odir=odir))
            if pin is not None:
                if not unpin:
                    done.skipped_pinned.append(pin.key)
                    continue
                await self.unpin(pin.key)
            freed = await self._evict_object(odir)
            if freed is not None:
                done.objects += 1
                done.bytes += freed
        return done

    async def _evict_object(self, odir: str) -> int | None:
        """Drop one object; the bytes the index counted for it, or None when
        there was nothing of it.

        The files go first, out of sight at once (the object dir renamed into
        trash): a reader in any process then finds no file and fetches again,
        never a wrong byte. Then the rows, a span at a time up to the last
        index there was. A block another process publishes meanwhile is a new,
        valid block with its own row; a use recorded meanwhile from an fd held
        on a trashed file leaves a row without a file, which only makes the
        size imprecise until eviction takes it (as after a crash)."""
        meta_path = self.layout.root / odir / "meta.json"
        raw = await self.cache.disk.run(lambda: store.read_meta(meta_path))
        key = raw.get("cache_key") if raw else None
        versions = await self.index.call(lambda conn: catalog.versions_of(conn, odir))
        if raw is None and not versions:
            return None
        if isinstance(key, str):
            self.cache.versions.forget_object(key)
        await self.cache.disk.run(lambda: store.drop_dir(self.layout, self.layout.root / odir))
        freed = 0
        for vid, name, nbytes in versions:
            self.cache.blocks.forget(name)  # this process's open files, kept blocks
            self.index.forget_pending(name)
            last = await self.index.call(functools.partial(catalog.last_index, vid=vid))
            at: int | None = 0 if last is not None else None
            while at is not None and last is not None:
                at = await self.index.call(
                    functools.partial(catalog.drop_step, vid=vid, start=at, last=last)
                )
            freed += nbytes
        return freed

    def _odir(self, key: str) -> str:
        return self.layout.relative(self.layout.object_dir(key_hash(key)))
