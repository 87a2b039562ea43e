"""Blocks just written, kept in memory a moment for the reader read-ahead ran ahead of.

Read-ahead fetches a reader's next blocks before it asks for them; with a
fast upstream they are on disk before the reader gets there, and it reads
them back (a ``pread``, a read lock, the map's entries). Their buffers were
in memory until a moment before: keeping the last of them (a share of
--buffer-memory, buffers.py) lets the reader take them from there. A block
is taken once (the reader behind read-ahead is the one it was fetched for);
the oldest go first.

The bytes are those written for the version (its name is the key), so they
stay right whatever happens to the block's file meanwhile; a version dropped
(changed upstream, evicted by hand) is forgotten here too (blocks.py).
"""

from __future__ import annotations

import collections


class RecentBlocks:
    """(version name, block index) -> the block's bytes and the files it was
    kept under (``owner``): taken only under the same ones, so a version whose
    files were dropped or swept, then made again, never gets old entries back."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._blocks: collections.OrderedDict[tuple[str, int], tuple[memoryview, object]] = (
            collections.OrderedDict()
        )
        self._bytes = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def nbytes(self) -> int:
        """Memory held: the buffers' sizes (a short last block holds a whole pooled one)."""
        return self._bytes

    def keep(self, name: str, index: int, data: memoryview, owner: object) -> None:
        """Block ``index`` of version ``name`` was written with these bytes,
        which nobody changes again (inflight.py's buffers), into the files
        ``owner`` stands for."""
        if _held(data) > self._limit:
            return
        self._drop((name, index))
        self._blocks[(name, index)] = (data, owner)
        self._bytes += _held(data)
        while self._bytes > self._limit:
            _, (old, _owner) = self._blocks.popitem(last=False)
            self._bytes -= _held(old)

    def has(self, name: str, index: int) -> bool:
        return (name, index) in self._blocks

    def take(self, name: str, index: int, owner: object) -> memoryview | None:
        """The block's bytes if kept under ``owner``; no longer kept after."""
        entry = self._blocks.pop((name, index), None)
        if entry is None:
            return None
        self._bytes -= _held(entry[0])
        return entry[0] if entry[1] is owner else None

    def drop(self, name: str, index: int) -> None:
        """No longer keep block ``index`` of version ``name`` (a client had it).
        Called for every block a client gets: nothing made when nothing is kept."""
        if self._blocks:
            self._drop((name, index))

    def forget(self, name: str) -> None:
        """Every block of version ``name``."""
        for key in [k for k in self._blocks if k[0] == name]:
            self._drop(key)

    def _drop(self, key: tuple[str, int]) -> None:
        entry = self._blocks.pop(key, None)
        if entry is not None:
            self._bytes -= _held(entry[0])


def _held(data: memoryview) -> int:
    """The memory a view keeps alive: its whole buffer where it has one."""
    return len(data.obj) if isinstance(data.obj, bytearray) else data.nbytes
