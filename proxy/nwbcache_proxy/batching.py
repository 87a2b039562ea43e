"""Consecutive pieces of a response gathered into one write, and what is owed once it is sent.

A read that finds its next blocks already in memory (complete in a fetch
run, or kept once written: recent.py) sends them together: one ``writev``
instead of a write per block. A cold fill sent 256 KiB per write; each
write woke the client, which on a small machine took the event loop's CPU
from it (the loop was preempted ~1,400 times per GiB, 0.4 s in all, mostly
by the client's threads). Gathered up to 1 MiB, a 512 MiB fill ran at
1.11x the MB/s on 0.90x the CPU (6 paired runs; 2 and 4 MiB gave no more).

A batch never waits: the reader sends what it has before anything that
could (a block to open or to fetch, bytes still on their way), so the
first bytes of a slow upstream go out as soon as they come. What must
follow a block's bytes going out (a read-ahead window grown, a trace
record) is kept with the batch and done once the batch is sent.

What a batch holds stays in memory until its client takes it, so the
responses being streamed at once share a budget (buffers.py): many slow
clients get a block or two per write, not 1 MiB each. (A range of up to
reader.BODY_MAX read at once from the page cache is not streamed, and not
counted.)
"""

from __future__ import annotations

from collections.abc import Iterable

from .blockfile import Buffer

# A batch is sent once it holds this many bytes...
BATCH_BYTES = 1024 * 1024
# ...or this many pieces (the kernel takes 1,024 in one writev).
BATCH_PIECES = 64


def batch_bytes(streams: int, budget: int) -> int:
    """The bytes one of ``streams`` responses being streamed at once gathers
    for a write: BATCH_BYTES while few are, an equal share of ``budget``
    (what they may gather between them, buffers.py) when many are (a batch
    always takes at least one piece)."""
    return min(BATCH_BYTES, budget // max(1, streams))


class Batch:
    __slots__ = ("blocks", "limit", "nbytes", "pieces")

    def __init__(self, limit: int = BATCH_BYTES) -> None:
        # Bytes at which it is full (batch_bytes).
        self.limit = limit
        self.pieces: list[Buffer] = []
        self.nbytes = 0
        # Whose bytes are in it, in order, and whether each is to be traced
        # once sent (a span read was traced as it was read).
        self.blocks: list[tuple[int, bool]] = []

    def add(self, piece: Buffer, blocks: Iterable[int], *, trace: bool = True) -> None:
        """``piece``: bytes of ``blocks``, the next ones of the response."""
        self.pieces.append(piece)
        self.nbytes += len(piece)
        self.blocks.extend((i, trace) for i in blocks)

    @property
    def room(self) -> int:
        """Bytes it takes before it is full."""
        return max(0, self.limit - self.nbytes)

    @property
    def full(self) -> bool:
        return self.nbytes >= self.limit or len(self.pieces) >= BATCH_PIECES

    def __bool__(self) -> bool:
        return bool(self.pieces)
