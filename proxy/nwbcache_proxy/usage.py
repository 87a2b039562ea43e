"""What one process used since its last index flush: blocks written or read, hits, object keys.

The index (index.py) takes these in one batch per flush and stores them in
one transaction (accounting.record); a flush SQLite refused puts its batch
back. Reads and hits are bounded (PENDING_MAX); written blocks never are,
as each one is a row the index must get.
"""

from __future__ import annotations

import dataclasses
import time

# (version dir, index) -> (bytes, last use, written: the block was put on disk, not only read)
Pending = dict[tuple[str, int], tuple[int, float, bool]]
Hits = dict[tuple[str, int], int]  # (version dir, index) -> hits since the last flush
Keys = dict[str, tuple[str, int]]  # version dir -> (cache key, object size)

# Blocks read, and blocks hit, waiting for a flush: past this many a new one
# goes unrecorded (its last use, its counter), so memory stays bounded when
# reads outpace flushes (a warm read-back of 4 KiB blocks, ~100,000 a second,
# grew the daemon to 552 MB). Written blocks are always recorded (their rows).
PENDING_MAX = 65_536


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """What one flush stores."""

    blocks: Pending
    hits: Hits
    keys: Keys

    @property
    def empty(self) -> bool:
        """Nothing to store (keys alone go with the next rows)."""
        return not self.blocks and not self.hits


class Usage:
    def __init__(self) -> None:
        self._blocks: Pending = {}
        self._hits: Hits = {}
        # Version dir -> (cache key, size) of its object, for the index's
        # versions table: stored with each flush where it has none (a row
        # made again after its last block went gets them back at once).
        self._keys: Keys = {}
        self._written_bytes = 0
        # Version dir -> its blocks recorded as written (the files' share of a
        # flush to come: footprint.py).
        self._written: dict[str, int] = {}
        self._written_blocks = 0

    def _count_written(self, version: str, nbytes: int, n: int = 1) -> None:
        """``n`` blocks (-1: one less) of ``version``, ``nbytes`` in all, written
        or no longer waiting: the three counters move together."""
        count = self._written.get(version, 0) + n
        if count:
            self._written[version] = count
        else:
            del self._written[version]
        self._written_blocks += n
        self._written_bytes += nbytes

    def record(
        self, version: str, index: int, nbytes: int, about: tuple[str, int] | None, written: bool
    ) -> None:
        """Block ``index`` of ``version``, ``nbytes`` long, written (or only read) now."""
        if about is not None:
            self._keys[version] = about
        old = self._blocks.get((version, index))
        if old is None and not written and len(self._blocks) >= PENDING_MAX:
            return  # its use goes unrecorded (PENDING_MAX)
        if old is not None and old[2]:  # written before: its length may change
            self._written_bytes += nbytes - old[0]
            written = True
        elif written:
            self._count_written(version, nbytes)
        self._blocks[(version, index)] = (nbytes, time.time(), written)

    def hit(self, version: str, index: int) -> None:
        key = (version, index)
        count = self._hits.get(key)
        if count is None and len(self._hits) >= PENDING_MAX:
            return  # unrecorded (PENDING_MAX)
        self._hits[key] = (count or 0) + 1

    @property
    def empty(self) -> bool:
        return not self._blocks and not self._hits

    @property
    def backlogged(self) -> bool:
        """Half of PENDING_MAX waits: flush sooner."""
        return max(len(self._blocks), len(self._hits)) >= PENDING_MAX // 2

    @property
    def written_bytes(self) -> int:
        """Bytes of the blocks written (an upper bound of what a flush adds to
        the index's totals: a block only read adds nothing)."""
        return self._written_bytes

    @property
    def written_blocks(self) -> int:
        """Blocks recorded as written."""
        return self._written_blocks

    @property
    def written_versions(self) -> int:
        """Versions with a block recorded as written (an upper bound of the
        versions a flush adds: some have rows already)."""
        return len(self._written)

    def take(self) -> Batch:
        """Everything recorded, for a flush; nothing is left."""
        batch = Batch(self._blocks, self._hits, self._keys)
        self._blocks, self._hits, self._keys = {}, {}, {}
        self._written, self._written_blocks, self._written_bytes = {}, 0, 0
        return batch

    def put_back(self, batch: Batch) -> None:
        """A batch a flush could not store: newer records win, but a block
        written stays written (its row is still owed), and hits add up."""
        for key, value in batch.blocks.items():
            newer = self._blocks.get(key)
            if newer is None:
                self._blocks[key] = value
                if value[2]:
                    self._count_written(key[0], value[0])
            elif value[2] and not newer[2]:
                self._blocks[key] = (newer[0], newer[1], True)
                self._count_written(key[0], newer[0])
        for key, count in batch.hits.items():
            self._hits[key] = self._hits.get(key, 0) + count
        self._keys = {**batch.keys, **self._keys}

    def forget(self, version: str) -> None:
        """Drop what was recorded of one version dir."""
        for key in [k for k in self._blocks if k[0] == version]:
            nbytes, _, written = self._blocks.pop(key)
            if written:
                self._count_written(version, -nbytes, -1)
        for key in [k for k in self._hits if k[0] == version]:
            del self._hits[key]
