"""S3 listings (ListObjects, ListObjectsV2) asked upstream and remembered for a few seconds.

A listing is not cached like an object: keys come and go, and the S3 API
promises a listing reflects writes within moments. So a listing's answer is
kept LISTING_TTL seconds at most, long enough that a notebook or a batch of
jobs listing one prefix at once costs one upstream request (concurrent
askers share it), short enough that a new upload shows up by the next
refresh. Only 200 answers are remembered; a refusal or an error is asked
again each time. The answer goes back as upstream wrote it: its XML names
keys, sizes and ETags exactly as the objects' own requests will see them.
"""

from __future__ import annotations

import asyncio
import time

from nwbcache.urls import UpstreamURL

from .lru import BoundedLRU
from .upstream import Document, Upstream

# How long a listing is reused (S3 clients expect new keys within seconds).
LISTING_TTL = 5.0
# Listings remembered per process.
LISTINGS_MEMORY = 1024
# Largest listing passed on: 1,000 keys (S3's page) of 1 KiB names and their
# fields stay far below it.
LISTING_LIMIT = 8 * 1024 * 1024


class Listings:
    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._known: BoundedLRU[str, tuple[float, Document]] = BoundedLRU(LISTINGS_MEMORY)
        self._asking: dict[str, asyncio.Task[Document]] = {}

    async def get(self, url: UpstreamURL) -> Document:
        """Upstream's answer to the listing ``url`` (ask it, or reuse a recent one)."""
        key = url.url
        known = self._known.get(key)
        if known is not None and known[0] > time.monotonic():
            return known[1]
        task = self._asking.get(key)
        if task is None:
            task = asyncio.ensure_future(self._ask(key, url))
            self._asking[key] = task
            task.add_done_callback(lambda _t: self._asking.pop(key, None))
        # shield: a client hanging up must not cancel what others wait on.
        return await asyncio.shield(task)

    async def _ask(self, key: str, url: UpstreamURL) -> Document:
        answer = await self._upstream.document(url, LISTING_LIMIT)
        if answer.status == 200:
            self._known.put(key, (time.monotonic() + LISTING_TTL, answer))
        return answer
