"""A block being fetched: its buffer, the bytes in it so far, and the readers waiting on them.

Single-flight: while a block is in flight every reader of it streams from
this one buffer as bytes arrive, so concurrent misses on a block cost one
upstream fetch. A reader going away never affects the fetch.

Upstream's bytes are received straight into the block's buffer (the sink of
wire.py: ``space`` then ``advance``), so the kernel's copy is the only one.
Buffers come from a pool (reads from the page cache take theirs from it
too) and go back to it once nothing refers to them:
a fresh 256 KiB buffer per block cost the zeroing of it and the page
faults of new memory, every block (perf of a cold fill).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

from .buffers import POOL_BYTES

# Size classes are powers of two from this up (a last, shorter block takes
# a buffer of the class above its length); larger blocks are not pooled.
POOL_MIN = 4 * 1024
POOL_MAX = 16 * 1024 * 1024
# Buffers a take looks at before making a new one. A look is cheap, but with
# small blocks thousands are in flight at once: looking through all of them
# per take made the pool most of a 4 KiB-block cold fill's event loop.
POOL_TRIES = 8
# Buffers make_pool makes per turn of the event loop: ~1 ms of the loop's
# time at 256 KiB each.
MAKE_STEP = 8
# Blocks under this size get no buffers made at start. Reads take buffers of
# their spans' size, many small blocks each, and a pool full of free small
# buffers lets them go only POOL_TRIES at a time to make room: with 64 MiB of
# 4 KiB ones made, a warm read-back of 4 KiB blocks (bench/httpfill.py) ran
# at 265 MB/s against 358, its larger buffers made anew at every read.
MAKE_MIN = 64 * 1024


def _unviewed(buf: bytearray) -> bool:
    """Whether no view of ``buf`` lives on: a bytearray refuses to change its
    size while one does. (Not ``sys.getrefcount``: what it counts changes
    between interpreter versions.) ``buf`` has room for the byte tried."""
    try:
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True


class BufferPool:
    """Buffers reused once free. A block holds its buffer only through views
    (InflightBlock._buf), and so does everything it hands the bytes to (a
    transport's write buffer, a disk job's ``writev``): a buffer no view of
    which lives on is free."""

    def __init__(self, keep_bytes: int = POOL_BYTES) -> None:
        # Bytes of free buffers kept, all size classes together (buffers.py).
        self._keep_bytes = keep_bytes
        self._kept_bytes = 0  # in all the rings
        # Per size class, a ring: a take looks at the front and moves what it
        # looked at to the back, so the buffer looked at next is the one taken
        # (or found busy) longest ago. Blocks finish about in the order they
        # start, so it is usually free; one held long (a slow reader's) is
        # passed over once per round, not at every take.
        self._buffers: dict[int, collections.deque[bytearray]] = {}

    @property
    def keep_bytes(self) -> int:
        return self._keep_bytes

    @property
    def kept_bytes(self) -> int:
        """Bytes of the buffers kept, in use or free."""
        return self._kept_bytes

    def keep(self, keep_bytes: int) -> None:
        """Keep no more than ``keep_bytes`` of buffers from now on; those kept
        beyond it are let go now (one in use is freed once its views are)."""
        self._keep_bytes = keep_bytes
        for cap, ring in self._buffers.items():
            while ring and self._kept_bytes > keep_bytes:
                ring.pop()
                self._kept_bytes -= cap

    def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes, of unspecified content. The caller
        keeps only views of it."""
        if size > POOL_MAX:
            return bytearray(size)
        cap = _size_class(size)
        ring = self._buffers.setdefault(cap, collections.deque())
        for _ in range(min(len(ring), POOL_TRIES)):
            buf = ring[0]
            ring.rotate(-1)
            if _unviewed(buf):
                return buf
        buf = _new_buffer(cap)
        if self._room(cap):
            ring.append(buf)
            self._kept_bytes += cap
        return buf

    def make(self, size: int) -> bool:
        """Make one free buffer for ``size`` bytes if the pool has room for it
        as it is (no other buffer let go); whether it did."""
        cap = _size_class(size)
        if size > POOL_MAX or self._kept_bytes + cap > self._keep_bytes:
            return False
        self._buffers.setdefault(cap, collections.deque()).append(_new_buffer(cap))
        self._kept_bytes += cap
        return True

    def _room(self, cap: int) -> bool:
        """Whether one more buffer of class ``cap`` may be kept, once free
        buffers of other classes are let go to make room: the class asking is
        the one in use. Looks at POOL_TRIES buffers of each other class at
        most, and at none when all the others hold could not make the room."""
        if self._kept_bytes + cap <= self._keep_bytes:
            return True
        if (len(self._buffers[cap]) + 1) * cap > self._keep_bytes:
            return False  # its own class fills the budget
        for other, ring in self._buffers.items():
            if other == cap:
                continue
            for _ in range(min(len(ring), POOL_TRIES)):
                if self._kept_bytes + cap <= self._keep_bytes:
                    return True
                buf = ring.popleft()
                if _unviewed(buf):
                    self._kept_bytes -= other
                else:
                    ring.append(buf)
        return self._kept_bytes + cap <= self._keep_bytes


def _size_class(size: int) -> int:
    return max(POOL_MIN, 1 << (size - 1).bit_length())


def _new_buffer(cap: int) -> bytearray:
    buf = bytearray(cap + 1)  # room for _unviewed's byte: it never reallocates
    del buf[cap:]
    return buf


POOL = BufferPool()


async def make_pool(pool: BufferPool, size: int, limit: int) -> int:
    """Make free buffers for blocks of ``size`` bytes until ``pool`` keeps
    ``limit`` bytes (or its budget), MAKE_STEP of them per turn of the event
    loop; how many it made.

    A daemon does this once it serves (app.serve_forever), so that its first
    fill does not pay for new memory: a buffer made costs the zeroing and
    page faults of new pages (~150 us per 256 KiB here), and a cold fill of
    four 16 MiB ranges at a time has ~64 MiB of blocks in flight
    (buffers.START_BYTES). The pool keeps these buffers in any case once a
    fill has made them."""
    if size < MAKE_MIN:
        return 0
    made = 0
    while pool.kept_bytes < limit and pool.make(size):
        made += 1
        if made % MAKE_STEP == 0:
            await asyncio.sleep(0)
    return made


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
        # Taken when the first bytes come (a block waiting in a run holds
        # none). Bytes below ``filled`` are never written again, so views of
        # them stay valid: a transport may hold one.
        self._buf: memoryview | None = None
        self._event = asyncio.Event()

    @property
    def complete(self) -> bool:
        return self.filled == self.length

    @property
    def had(self) -> bool:
        """Whole, and a client has had it: all that is left is its write to
        disk, and another reader of it reads from the cache, not from upstream."""
        return self.complete and self.claimed and self.error is None

    @property
    def parts(self) -> list[memoryview]:
        """The whole block's bytes (for one writev)."""
        assert self.complete and self._buf is not None
        return [self._buf]

    def space(self) -> memoryview:
        """Where the block's next bytes go (a sink's ``space``): write there, then
        ``advance``."""
        if self._buf is None:
            self._buf = memoryview(POOL.take(self.length))[: self.length]
        return self._buf[self.filled :]

    def advance(self, n: int) -> None:
        """``n`` more bytes were written at the start of ``space()``."""
        if n <= 0 or self.filled + n > self.length:
            raise ValueError(f"{self.filled} + {n} bytes for a block of {self.length}")
        self.filled += n
        self._wake()

    def append(self, chunk: bytes | bytearray | memoryview) -> None:
        """The next bytes of the block, copied in; all of a block at once, if
        read-only, is kept as it is (a block read from disk)."""
        view = memoryview(chunk).cast("B")
        if self.filled == 0 and len(view) == self.length and view.readonly:
            self._buf = view
            self.filled = self.length
            self._wake()
            return
        space = self.space()
        if len(view) > len(space):
            raise ValueError(f"{self.filled + len(view)} bytes for a block of {self.length}")
        space[: len(view)] = view
        if view:
            self.advance(len(view))

    def span(self, start: int, end: int) -> memoryview | None:
        """Bytes [start, end) of the block if all of them have come (no copy:
        see _buf), else None."""
        if self.filled < end or self._buf is None:
            return None
        return self._buf[start:end]

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
                upto = min(self.filled, end)
                assert self._buf is not None
                # No copy: a transport may keep this view (see _buf).
                yield self._buf[pos:upto]
                pos = upto
                continue
            if self.error is not None:
                raise self.error
            await self._event.wait()
