"""A bounded set of (version, block) marks, kept as bitmaps of runs of blocks.

The daemon remembers two facts per block for millions of blocks: which it
has verified the checksum of since it started, and which came from upstream
and no client has read yet. Kept as a tuple key per block in an LRU, that
cost ~190 bytes a block and ~50 MB at the bounds it had (issue 11: the
daemon's memory must stay flat at any cache size); here a block costs one
bit, in chunks of ``CHUNK_BLOCKS`` consecutive blocks of one version, and
whole chunks are forgotten least recently used first. Forgetting a mark
only costs work its owner redoes (a verification, a hit counted as a miss).
The bound is on chunks: marks spread one to a chunk (many small objects,
scattered reads) keep only as many marks as there are chunks.
"""

from __future__ import annotations

from collections import OrderedDict

# Blocks per chunk: 1 KiB of bits. Small enough that a reader touching one
# block here and there pins little; large enough that a scan's marks cost
# ~1.3 KB of Python objects per 8,192 blocks.
CHUNK_SHIFT = 13
CHUNK_BLOCKS = 1 << CHUNK_SHIFT
_MASK = CHUNK_BLOCKS - 1
_EMPTY = bytes(CHUNK_BLOCKS // 8)


class BlockMarks:
    """Marks on blocks of versions, at most ``chunks`` chunks of them."""

    def __init__(self, chunks: int) -> None:
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, not {chunks}")
        self._capacity = chunks
        self._chunks: OrderedDict[tuple[str, int], bytearray] = OrderedDict()

    def add(self, version: str, index: int) -> None:
        chunk = self._chunk((version, index >> CHUNK_SHIFT))
        bit = index & _MASK
        chunk[bit >> 3] |= 1 << (bit & 7)

    def has(self, version: str, index: int) -> bool:
        key = (version, index >> CHUNK_SHIFT)
        chunk = self._chunks.get(key)
        if chunk is None:
            return False
        self._chunks.move_to_end(key)
        bit = index & _MASK
        return bool(chunk[bit >> 3] & (1 << (bit & 7)))

    def has_all(self, version: str, blocks: range) -> bool:
        """Whether every block of a run (step 1) is marked: ``all(has(...))``, a
        chunk's bits at once instead of a look-up per block (the warm hit path
        asks this for up to 256 blocks a span)."""
        for key, lo, hi in _pieces(version, blocks):
            chunk = self._chunks.get(key)
            if chunk is None:
                return False
            self._chunks.move_to_end(key)
            b0, b1, mask = _span(lo, hi)
            if int.from_bytes(chunk[b0:b1], "little") & mask != mask:
                return False
        return True

    def add_all(self, version: str, blocks: range) -> None:
        """Mark every block of a run (step 1): ``add`` of each, a chunk at a time."""
        for key, lo, hi in _pieces(version, blocks):
            chunk = self._chunk(key)
            b0, b1, mask = _span(lo, hi)
            bits = int.from_bytes(chunk[b0:b1], "little") | mask
            chunk[b0:b1] = bits.to_bytes(b1 - b0, "little")

    def _chunk(self, key: tuple[str, int]) -> bytearray:
        """The chunk of ``key``, made if absent (the least recently used one
        forgotten past the bound), now the most recently used."""
        chunk = self._chunks.get(key)
        if chunk is None:
            chunk = self._chunks[key] = bytearray(_EMPTY)
            if len(self._chunks) > self._capacity:
                self._chunks.popitem(last=False)
        else:
            self._chunks.move_to_end(key)
        return chunk

    def discard(self, version: str, index: int) -> bool:
        """Take the mark off; whether there was one."""
        key = (version, index >> CHUNK_SHIFT)
        chunk = self._chunks.get(key)
        if chunk is None:
            return False
        bit = index & _MASK
        byte, flag = bit >> 3, 1 << (bit & 7)
        if not chunk[byte] & flag:
            return False
        chunk[byte] &= ~flag & 0xFF
        if not chunk[byte] and chunk == _EMPTY:  # empty: it would only hold a place
            del self._chunks[key]
        return True

    def __len__(self) -> int:
        """Chunks held (not marks)."""
        return len(self._chunks)


def _pieces(version: str, blocks: range) -> list[tuple[tuple[str, int], int, int]]:
    """A run's chunks in order: (key, first bit, end bit) of each."""
    assert blocks.step == 1, blocks
    out = []
    i = blocks.start
    while i < blocks.stop:
        end = min(blocks.stop, (i | _MASK) + 1)
        out.append(((version, i >> CHUNK_SHIFT), i & _MASK, ((end - 1) & _MASK) + 1))
        i = end
    return out


def _span(lo: int, hi: int) -> tuple[int, int, int]:
    """Bits [lo, hi) of a chunk: its bytes [b0, b1), and their mask as a
    little-endian integer of those bytes."""
    b0, b1 = lo >> 3, (hi + 7) >> 3
    return b0, b1, ((1 << (hi - lo)) - 1) << (lo - (b0 << 3))
