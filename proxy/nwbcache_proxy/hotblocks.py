"""A small in-memory tier of recently read blocks, bounded in bytes.

Small hits are dominated by fixed costs in Python (an executor hop to open
and read the block file), not by the bytes: h5py opening a file asks for
many small pieces of the same few blocks. Keeping those blocks in memory
serves them with no system call and no thread hop. Blocks are immutable for
a version (the key includes the version dir), so a copy can never be stale;
dropping a version purges its copies. Disk stays the shared, durable tier.
"""

from __future__ import annotations

from collections import OrderedDict


class HotBlocks:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.size = 0
        self._blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def get(self, vkey: str, index: int) -> bytes | None:
        data = self._blocks.get((vkey, index))
        if data is not None:
            self._blocks.move_to_end((vkey, index))
        return data

    def holds(self, vkey: str, index: int) -> bool:
        """Whether the block is here, without counting as a use."""
        return (vkey, index) in self._blocks

    def put(self, vkey: str, index: int, data: bytes) -> None:
        if len(data) > self.capacity // 8:  # one block must not flush the tier
            return
        old = self._blocks.pop((vkey, index), None)
        if old is not None:
            self.size -= len(old)
        self._blocks[(vkey, index)] = data
        self.size += len(data)
        while self.size > self.capacity:
            _, evicted = self._blocks.popitem(last=False)
            self.size -= len(evicted)

    def drop_version(self, vkey: str) -> None:
        for key in [k for k in self._blocks if k[0] == vkey]:
            self.size -= len(self._blocks.pop(key))
