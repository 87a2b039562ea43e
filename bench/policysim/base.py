"""What every simulated policy shares: the interface, the byte-counted queue, SLRU's segments.

A policy here is a decision procedure, not a store: it holds keys and their sizes
in bytes, never data. ``access(key, size)`` says whether the key was resident
(a hit) and updates the policy's state as if the block had been fetched on a
miss. Capacity is in bytes; a block larger than the whole cache is never kept.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

Key = Hashable


@dataclass(frozen=True)
class CacheSpec:
    """What a policy factory may use: the byte capacity, the trace's block size
    (W-TinyLFU sizes its sketch in entries), the future (only Belady reads it), and the
    keys read as metadata and the keys of objects' block 0 (both known online: the daemon
    sees the request's offset and length)."""

    capacity: int
    block_size: int
    future: Sequence[Key] = field(default=(), repr=False)
    metadata: frozenset[Key] = field(default=frozenset(), repr=False)
    first_blocks: frozenset[Key] = field(default=frozenset(), repr=False)


class Policy(ABC):
    """A byte-capacity cache of blocks; subclasses decide what to evict."""

    name: ClassVar[str]

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0 bytes, not {capacity}")
        self.capacity = capacity

    @abstractmethod
    def access(self, key: Key, size: int) -> bool:
        """Record an access of ``size`` bytes to ``key``; return whether it was a hit."""

    @abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is resident (ghost entries are not)."""

    @abstractmethod
    def __len__(self) -> int:
        """Resident keys."""

    @property
    @abstractmethod
    def used(self) -> int:
        """Bytes of resident keys; never above ``capacity`` between accesses."""


class Queue:
    """Keys in insertion order with their sizes and the sum of the sizes.

    The oldest end is where FIFO and LRU evict; ``touch`` moves a key to the
    newest end (an LRU hit). Ghost lists use it too, holding only keys.
    """

    __slots__ = ("_items", "bytes")

    def __init__(self) -> None:
        self._items: OrderedDict[Key, int] = OrderedDict()
        self.bytes = 0

    def push(self, key: Key, size: int) -> None:
        """Add ``key`` at the newest end (it must not be present)."""
        self._items[key] = size
        self.bytes += size

    def pop_oldest(self) -> tuple[Key, int]:
        key, size = self._items.popitem(last=False)
        self.bytes -= size
        return key, size

    def oldest(self) -> Key:
        return next(iter(self._items))

    def remove(self, key: Key) -> int:
        size = self._items.pop(key)
        self.bytes -= size
        return size

    def touch(self, key: Key) -> None:
        self._items.move_to_end(key)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Key]:
        """Oldest first."""
        return iter(self._items)


class Segmented:
    """The two LRU segments of SLRU (Karedla, Love & Wherry, IEEE Computer 1994, §"Segmented
    LRU"): new keys enter *probation*; a hit there promotes to *protected*; protected's
    overflow is demoted back to probation's newest end; victims come from probation's oldest
    end. W-TinyLFU's main area is one of these (Einziger et al., ACM ToS 2017, §4)."""

    __slots__ = ("probation", "protected", "protected_capacity")

    def __init__(self, protected_capacity: float) -> None:
        self.probation = Queue()
        self.protected = Queue()
        self.protected_capacity = protected_capacity

    @property
    def bytes(self) -> int:
        return self.probation.bytes + self.protected.bytes

    def __contains__(self, key: object) -> bool:
        return key in self.probation or key in self.protected

    def __len__(self) -> int:
        return len(self.probation) + len(self.protected)

    def hit(self, key: Key) -> bool:
        """Record a hit if ``key`` is here; return whether it was."""
        if key in self.protected:
            self.protected.touch(key)
            return True
        if key not in self.probation:
            return False
        self.protected.push(key, self.probation.remove(key))
        while self.protected.bytes > self.protected_capacity and len(self.protected) > 1:
            self.probation.push(*self.protected.pop_oldest())
        return True

    def add(self, key: Key, size: int) -> None:
        self.probation.push(key, size)

    def victim(self) -> Key:
        """The key ``evict`` would remove (the segments must not both be empty)."""
        return self.probation.oldest() if self.probation else self.protected.oldest()

    def evict(self) -> tuple[Key, int]:
        return self.probation.pop_oldest() if self.probation else self.protected.pop_oldest()
