"""Blocks just written, kept in memory a moment for the reader read-ahead ran ahead of.

Read-ahead fetches a reader's next blocks before it asks for them; with a
fast upstream they are on disk before the reader gets there, and it reads
them back (a ``pread``, a read lock, the map's entries). Their buffers were
in memory until a moment before: keeping the last RECENT_BYTES of them lets
the reader take them from there. A block is taken once (the reader behind
read-ahead is the one it was fetched for); the oldest go first.

The bytes are those written for the version (its name is the key), so they
stay right whatever happens to the block's file meanwhile; a version dropped
(changed upstream, evicted by hand) is forgotten here too (blocks.py).
"""

from __future__ import annotations

import collections

# Bytes of blocks kept. Read-ahead runs up to config.DEFAULT_READAHEAD
# (16 MiB) ahead of each sequential reader: this covers two such readers
# whole, more in part; a block not kept is read from disk as before.
RECENT_BYTES = 32 * 1024 * 1024


class RecentBlocks:
    def __init__(self, limit: int = RECENT_BYTES) -> None:
        self._limit = limit
        self._blocks: collections.OrderedDict[tuple[str, int], memoryview] = (
            collections.OrderedDict()
        )
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def keep(self, name: str, index: int, data: memoryview) -> None:
        """Block ``index`` of version ``name`` was written with these bytes,
        which nobody changes again (inflight.py's buffers)."""
        if len(data) > self._limit:
            return
        self._drop((name, index))
        self._blocks[(name, index)] = data
        self._bytes += len(data)
        while self._bytes > self._limit:
            _, old = self._blocks.popitem(last=False)
            self._bytes -= len(old)

    def has(self, name: str, index: int) -> bool:
        return (name, index) in self._blocks

    def take(self, name: str, index: int) -> memoryview | None:
        """The block's bytes, if kept; no longer kept after."""
        data = self._blocks.pop((name, index), None)
        if data is not None:
            self._bytes -= len(data)
        return data

    def drop(self, name: str, index: int) -> None:
        """No longer keep block ``index`` of version ``name`` (a client had it)."""
        self._drop((name, index))

    def forget(self, name: str) -> None:
        """Every block of version ``name``."""
        for key in [k for k in self._blocks if k[0] == name]:
            self._drop(key)

    def _drop(self, key: tuple[str, int]) -> None:
        data = self._blocks.pop(key, None)
        if data is not None:
            self._bytes -= len(data)
