"""A block being fetched: its bytes so far, and the readers waiting on them.

Single-flight: while a block is in flight every reader of it streams from
this one buffer as bytes arrive, so concurrent misses on a block cost one
upstream fetch. A reader going away never affects the fetch.

The bytes are kept as the pieces they arrived in, not copied into one
buffer: a large piece of an upstream response (an immutable ``bytes``) is
kept by reference, and readers and the disk write (one ``writev``) take
views of it. Copying each block into a fresh buffer of its own cost a
quarter of the event loop's time in a cold fill (the copy, the zeroing
of the new buffer, and its page faults: perf, 256 KiB blocks). Small
pieces (a slow upstream trickling packets) are gathered into buffers of
this block's own, so a block is never hundreds of tiny parts.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator

# Pieces at least this long are kept by reference; shorter ones are copied
# into a gathering buffer of GATHER_BYTES (or what is left of the block).
KEEP_MIN = 16 * 1024
GATHER_BYTES = 64 * 1024


class InflightBlock:
    # __weakref__: a fetch run refers to its blocks weakly (fetcher._fetch_run).
    __slots__ = (
        "__weakref__",
        "_event",
        "_parts",
        "_starts",
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
        # Part i holds the block's bytes from _starts[i] up to the next part's
        # start (the last: up to ``filled``). Only the last part may still
        # grow, and only when it is a gathering buffer of this block's own
        # with room left; bytes below ``filled`` are never written again, so
        # views of them stay valid. A kept piece is exactly its bytes long.
        self._parts: list[memoryview] = []
        self._starts: list[int] = []
        self._event = asyncio.Event()

    @property
    def complete(self) -> bool:
        return self.filled == self.length

    @property
    def parts(self) -> list[memoryview]:
        """The whole block's bytes, in order (for one writev)."""
        assert self.complete
        ends = [*self._starts[1:], self.filled]
        return [
            part[: end - start]
            for part, start, end in zip(self._parts, self._starts, ends, strict=True)
        ]

    def append(self, chunk: bytes | bytearray | memoryview) -> None:
        """The next bytes of the block. A read-only chunk (bytes, or a view of
        bytes) of KEEP_MIN or more is kept, not copied: it must not change.
        ValueError if the block cannot hold it (a fetch's bug: the loop of
        gathering would not end)."""
        view = memoryview(chunk)
        if self.filled + len(view) > self.length:
            raise ValueError(f"{self.filled + len(view)} bytes for a block of {self.length}")
        if len(view) >= KEEP_MIN and len(view) > self._room():
            # Kept (a writable piece copied: its owner may change it); a
            # piece that fits the open gathering buffer goes there instead, or
            # pieces of mixed sizes would leave a buffer's room unused each.
            self._add_part(view if view.readonly else memoryview(bytearray(view)))
            self.filled += len(view)
        else:
            while view:
                room = self._room()
                if not room:
                    room = min(GATHER_BYTES, self.length - self.filled)
                    self._add_part(memoryview(bytearray(room)))
                n = min(len(view), room)
                used = self.filled - self._starts[-1]
                self._parts[-1][used : used + n] = view[:n]
                self.filled += n
                view = view[n:]
        self._wake()

    def _room(self) -> int:
        """Bytes the last part can still take (0 unless it is a gathering buffer)."""
        return len(self._parts[-1]) - (self.filled - self._starts[-1]) if self._parts else 0

    def _add_part(self, part: memoryview) -> None:
        self._parts.append(part)
        self._starts.append(self.filled)

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
                i = bisect.bisect_right(self._starts, pos) - 1
                first = self._starts[i]
                last = self._starts[i + 1] if i + 1 < len(self._starts) else self.filled
                upto = min(last, end)
                # No copy: a transport may keep this view (see _parts).
                yield self._parts[i][pos - first : upto - first]
                pos = upto
                continue
            if self.error is not None:
                raise self.error
            await self._event.wait()
