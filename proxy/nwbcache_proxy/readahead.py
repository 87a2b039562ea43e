"""Read-ahead, decided: how far past a read to fetch, and how a response's fetch window grows. Pure.

Two mechanisms, both bounded by ``--readahead``:

- **Across requests** (``SequentialDetector``): a read that continues the
  previous read of the same object (starts at or just after its end; remfile
  reads back to back, h5py chunk scans leave small gaps) extends a streak,
  and the blocks fetched past its end double with the streak (1, 2, 4, ...),
  as remfile grows its own requests. A few back-to-back metadata reads on
  open cost a block or two; a scan soon streams with the full read-ahead.
- **Within one response** (``StreamWindow``): a ranged GET names its bytes,
  so all of them up to the read-ahead are fetched at once. A plain GET does
  not: its window starts at one block and grows only once the client has
  taken the second block, so a client that hangs up after the headers
  (remfile learning the size) costs at most two blocks upstream, while a
  real download soon streams with the full window.
"""

from __future__ import annotations

import dataclasses

from .lru import BoundedLRU

# Objects whose last read position is remembered (per process).
STREAMS_REMEMBERED = 4096


class SequentialDetector:
    def __init__(self, block_size: int, max_blocks: int, remembered: int = STREAMS_REMEMBERED):
        self.block_size = block_size
        self.max_blocks = max_blocks
        # Per object: where the last read ended, and how many reads in a row
        # continued the one before.
        self._last: BoundedLRU[str, tuple[int, int]] = BoundedLRU(remembered)

    def blocks_after(self, key: str, start: int, end: int) -> int:
        """Record a read of bytes [start, end) of object ``key``; return how many
        blocks to fetch past its last block (0: not sequential)."""
        last = self._last.get(key)
        continues = last is not None and 0 <= start - last[0] <= self.block_size
        streak = last[1] + 1 if continues and last is not None else 0
        self._last.put(key, (end, streak))
        return 0 if streak == 0 else min(self.max_blocks, 2 ** (streak - 1))


@dataclasses.dataclass(slots=True)
class StreamWindow:
    """The fetch window of one response over blocks [first, stop)."""

    first: int
    stop: int
    size: int  # blocks the window spans now
    limit: int  # --readahead in blocks
    planned_until: int  # blocks before this one have been asked for

    @classmethod
    def open(cls, first: int, stop: int, *, eager: bool, limit: int) -> StreamWindow:
        size = limit if eager else 1
        return cls(first, stop, size, limit, first + size)

    def wanted_end(self, index: int) -> int:
        """Where a fetch started for block ``index`` may extend to (exclusive)."""
        return min(self.stop, index + self.size)

    def after(self, index: int) -> range:
        """Block ``index`` has been handed to the client: the blocks to fetch
        now (often none). Stays up to one window ahead of the reader and tops
        up when half of it is consumed, so fetch runs stay long."""
        if index == self.first:
            return range(0)  # no growth until the second block is asked for
        self.size = min(self.limit, self.size * 2)
        if self.planned_until < self.stop and self.planned_until - (index + 1) <= self.size // 2:
            upto = min(self.stop, index + 1 + self.size)
            lo, self.planned_until = self.planned_until, upto
            return range(lo, upto)
        return range(0)
