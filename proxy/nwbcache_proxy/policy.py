"""Eviction policies' rules: S3-FIFO's queues and counters, and LRU. Pure.

S3-FIFO (Yang et al., SOSP '23; chosen by simulation, bench/policysim): new
blocks enter a small FIFO queue (10 % of the cache); a block still there when
it reaches the queue's tail moves to the main FIFO if it was hit meanwhile,
else it leaves, remembered in a ghost list; main reinserts a tail block
whose counter is non-zero, decrementing it (a CLOCK with a 2-bit counter),
else evicts it. A block remembered as a ghost, and every object's block 0
(its HDF5 superblock and root group, read by every open), enter main
directly: one scan through a huge file then passes through the small queue
and never touches what colleagues reuse. The index (index.py, schema.py)
keeps the state; this module says what each step does.
"""

from __future__ import annotations

import enum
import functools
import hashlib

SMALL_FRACTION = 0.1  # the small queue's share of the cache (the paper's 10 %)
MAX_FREQ = 3  # a 2-bit counter
# Hits while in the small queue that earn a place in main: the paper's text
# says "accessed at least once"; its Algorithm 1 reads ``freq > 1``. The
# simulator measured both; 1 kept more of the working set.
MOVE_THRESHOLD = 1


class Eviction(enum.StrEnum):
    """``--eviction``: which blocks go when the cache is full."""

    S3FIFO = "s3fifo"
    LRU = "lru"


def parse_eviction(text: str) -> Eviction:
    """``--eviction``'s value, or a ValueError that lists the choices."""
    try:
        return Eviction(text.strip().lower())
    except ValueError:
        choices = ", ".join(e.value for e in Eviction)
        raise ValueError(f"--eviction must be one of {choices}, got {text!r}") from None


class Queue(enum.IntEnum):
    """Where a block sits (the index's ``queue`` column)."""

    SMALL = 0
    MAIN = 1
    PINNED = 2  # a pinned object's: outside the policy, never evicted


class Fate(enum.Enum):
    """What becomes of a block at the tail of its queue."""

    EVICT = "evict"  # from main: gone
    GHOST = "ghost"  # from small: gone, its key remembered
    TO_MAIN = "to-main"  # from small, hit meanwhile: to main's head, counter cleared
    REINSERT = "reinsert"  # from main, counter > 0: to main's head, counter - 1
    PIN = "pin"  # its object was pinned since it entered: to the pinned queue


def admit(index: int, *, ghost: bool, pinned: bool = False) -> Queue:
    """The queue a newly cached block enters."""
    if pinned:
        return Queue.PINNED
    return Queue.MAIN if ghost or index == 0 else Queue.SMALL


def fate(queue: Queue, freq: int, pinned: bool = False) -> Fate:
    if pinned:
        return Fate.PIN
    if queue is Queue.SMALL:
        return Fate.TO_MAIN if freq >= MOVE_THRESHOLD else Fate.GHOST
    return Fate.REINSERT if freq > 0 else Fate.EVICT


def evict_from(small_bytes: int, main_bytes: int, capacity: int) -> Queue:
    """Which queue's tail an eviction takes next: the small queue while it holds
    its share (or main is empty), else main."""
    if small_bytes > 0 and (small_bytes >= SMALL_FRACTION * capacity or main_bytes <= 0):
        return Queue.SMALL
    return Queue.MAIN


def ghost_limit(capacity: int, total_bytes: int, blocks: int) -> int:
    """How many keys the ghost list keeps: as many blocks as main's share of the
    capacity holds (the paper's bound), at the cache's average block size."""
    if blocks <= 0 or total_bytes <= 0:
        return 0
    return int((1 - SMALL_FRACTION) * capacity * blocks / total_bytes)


def hit(freq: int, hits: int = 1) -> int:
    """A block's counter after ``hits`` more hits."""
    return min(MAX_FREQ, freq + hits)


def ghost_key(version: str, index: int) -> int:
    """A block's key in the ghost list: 37 bits of a hash of its version dir,
    then 26 of its index (a version's id is gone with its last block; its name
    stays). A version's blocks have neighbouring keys, so a slice's ghosts,
    runs of blocks of a few versions, land on a few pages of the table, not
    one page each (measured: 172,000 inserts/s against 29,000 with keys
    hashed whole). An index past 2**26 spills into the hash's bits: two
    blocks may share a key, and a ghost only ever says "seen recently"."""
    return ((_version_hash(version) << _INDEX_BITS) + index) & _MASK


_INDEX_BITS = 26
_MASK = (1 << 63) - 1


@functools.lru_cache(maxsize=4096)
def _version_hash(version: str) -> int:
    """37 bits of BLAKE2b of the version dir (one hash per version, not per block)."""
    digest = hashlib.blake2b(version.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - (63 - _INDEX_BITS))
