"""Belady's MIN, the offline optimum: with the whole trace known, evict what is needed last.

Belady, "A study of replacement algorithms for a virtual-storage computer", IBM
Systems Journal 5(2), 1966: replacing the block whose next use is furthest in the
future minimises misses. This version may also *bypass*: a missed block whose next
use is further than every block it would displace is not cached at all, which is
still optimal and makes MIN a lower bound for policies that refuse admission
(W-TinyLFU) as well as for demand policies. For blocks of equal size its miss
count is the minimum; with mixed sizes the byte-sized problem is NP-hard and this
is the furthest-next-use heuristic, not a bound.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from bench.policysim.base import Key, Policy

# The "next use" of an access that is the key's last one.
NEVER = 1 << 62


def next_uses(keys: Sequence[Key]) -> list[int]:
    """For each position ``i``, the position of the next access to ``keys[i]``, or ``NEVER``."""
    out = [NEVER] * len(keys)
    seen: dict[Key, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        key = keys[i]
        out[i] = seen.get(key, NEVER)
        seen[key] = i
    return out


class Belady(Policy):
    """MIN over a known future; ``access`` must be called with the trace's keys in order."""

    name = "belady"

    def __init__(self, capacity: int, future: Sequence[Key]) -> None:
        super().__init__(capacity)
        self._keys = future
        self._next = next_uses(future)
        self._t = 0
        self._resident: dict[Key, tuple[int, int]] = {}  # key -> (next use, size)
        self._used = 0
        # Max-heap of (-next use, position, key); an entry is stale once the key's next
        # use has moved on or the key has gone, and is dropped when it reaches the top.
        self._heap: list[tuple[int, int, Key]] = []

    def access(self, key: Key, size: int) -> bool:
        t = self._t
        if t >= len(self._keys) or self._keys[t] != key:
            raise ValueError(f"access {t} is {key!r}, but the trace given has another key there")
        self._t = t + 1
        nxt = self._next[t]
        held = self._resident.get(key)
        if held is not None:
            self._resident[key] = (nxt, held[1])
            heapq.heappush(self._heap, (-nxt, t, key))
            return True
        if size > self.capacity or nxt == NEVER:
            return False  # never used again: caching it cannot save a miss
        victims: list[tuple[int, int, Key]] = []
        freed = 0
        while self._used - freed + size > self.capacity:
            entry = self._pop_valid()
            victims.append(entry)
            freed += self._resident[entry[2]][1]
            if -entry[0] < nxt:  # a resident block is needed before this one: bypass
                for kept in victims:
                    heapq.heappush(self._heap, kept)
                return False
        for _, _, victim in victims:
            self._used -= self._resident.pop(victim)[1]
        self._resident[key] = (nxt, size)
        self._used += size
        heapq.heappush(self._heap, (-nxt, t, key))
        return False

    def _pop_valid(self) -> tuple[int, int, Key]:
        while True:
            entry = heapq.heappop(self._heap)
            held = self._resident.get(entry[2])
            if held is not None and held[0] == -entry[0]:
                return entry

    def __contains__(self, key: object) -> bool:
        return key in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    @property
    def used(self) -> int:
        return self._used
