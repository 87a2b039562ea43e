"""A block being fetched: its bytes so far, and the readers waiting on them.

Single-flight: while a block is in flight every reader of it streams from
this one buffer as bytes arrive, so concurrent misses on a block cost one
upstream fetch. A reader going away never affects the fetch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class InflightBlock:
    # __weakref__: a fetch run refers to its blocks weakly (fetcher._fetch_run).
    __slots__ = (
        "__weakref__",
        "_buf",
        "_event",
        "claimed",
        "error",
        "filled",
        "from_upstream",
        "index",
        "length",
        "writing",
    )

    def __init__(self, index: int, length: int) -> None:
        self.index = index
        self.length = length
        self.filled = 0
        self.error: BaseException | None = None
        # A client is attached to it (fetcher.Fetcher.claim): it needs no fresh mark.
        self.claimed = False
        # Its bytes come from upstream, not from a file another fetch published.
        self.from_upstream = False
        # Handed to a disk job, which unregisters it once the file exists.
        self.writing = False
        # Allocated when the first byte arrives: a long run registers all of
        # its blocks at once, but only the one being received holds memory.
        self._buf: bytearray | None = None
        self._event = asyncio.Event()

    @property
    def complete(self) -> bool:
        return self.filled == self.length

    @property
    def data(self) -> memoryview:
        assert self._buf is not None and self.complete
        return memoryview(self._buf)

    def append(self, chunk: bytes | memoryview) -> None:
        if self._buf is None:
            self._buf = bytearray(self.length)
        end = self.filled + len(chunk)
        assert end <= self.length, "more bytes than the block holds"
        self._buf[self.filled : end] = chunk
        self.filled = end
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.error is None and not self.complete:
            self.error = exc
            self._wake()

    def _wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def first_bytes(self) -> None:
        """Wait until bytes arrive; raise the fetch's error if it fails first.

        Lets a response wait for upstream's first answer before sending its
        own headers, so an unreachable upstream or a changed object becomes a
        truthful status (or a clean restart) rather than a cut-short body.
        """
        while self.filled == 0 and not self.complete:
            if self.error is not None:
                raise self.error
            await self._event.wait()

    async def chunks(self, start: int, end: int) -> AsyncIterator[memoryview]:
        """Bytes [start, end) of the block, yielded as soon as they arrive."""
        pos = start
        while pos < end:
            if self.filled > pos:
                assert self._buf is not None
                upto = min(self.filled, end)
                # No copy: bytes below ``filled`` are never written again (the
                # buffer is allocated once, at full length, and only fills its
                # tail), so a transport may keep a view of them.
                yield memoryview(self._buf)[pos:upto]
                pos = upto
                continue
            if self.error is not None:
                raise self.error
            await self._event.wait()
