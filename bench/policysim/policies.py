"""The eviction policies compared, each written from its paper, and the registry by name.

Classical ones are here (LRU, FIFO, CLOCK, SLRU, 2Q, ARC); S3-FIFO, W-TinyLFU
and Belady's MIN have modules of their own. All count capacity in bytes, so a
trace whose blocks differ in size (an object's last block) is replayed as the
daemon would store it. Where a paper counts pages, its rule is applied to the
byte sums of the same lists; with equal blocks that is the paper's algorithm.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.policysim.base import CacheSpec, Key, Policy, Queue, Segmented
from bench.policysim.belady import Belady
from bench.policysim.s3fifo import S3FIFO
from bench.policysim.tinylfu import WTinyLFU

__all__ = [
    "ARC",
    "FIFO",
    "LRU",
    "POLICIES",
    "S3FIFO",
    "SLRU",
    "Belady",
    "Clock",
    "TwoQ",
    "WTinyLFU",
    "make",
]


class _OneQueue(Policy):
    """A policy whose resident keys are one ``Queue``."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._queue = Queue()

    def __contains__(self, key: object) -> bool:
        return key in self._queue

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def used(self) -> int:
        return self._queue.bytes


class LRU(_OneQueue):
    """Least recently used: a hit moves the key to the newest end; evict the oldest.
    What the daemon does today."""

    name = "lru"

    def access(self, key: Key, size: int) -> bool:
        if key in self._queue:
            self._queue.touch(key)
            return True
        if size <= self.capacity:
            while self._queue.bytes + size > self.capacity:
                self._queue.pop_oldest()
            self._queue.push(key, size)
        return False


class FIFO(_OneQueue):
    """First in, first out: hits change nothing; evict the oldest insertion."""

    name = "fifo"

    def access(self, key: Key, size: int) -> bool:
        if key in self._queue:
            return True
        if size <= self.capacity:
            while self._queue.bytes + size > self.capacity:
                self._queue.pop_oldest()
            self._queue.push(key, size)
        return False


class Clock(_OneQueue):
    """CLOCK (Corbató, 1968), as FIFO with reinsertion: a hit sets the key's reference bit;
    the hand passes over the oldest key, and one whose bit is set has it cleared and goes
    round again instead of being evicted. A key enters with its bit clear, so one access
    earns no second chance (the variant S3-FIFO's paper calls FIFO-Reinsertion, §2)."""

    name = "clock"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._referenced: set[Key] = set()

    def access(self, key: Key, size: int) -> bool:
        if key in self._queue:
            self._referenced.add(key)
            return True
        if size <= self.capacity:
            while self._queue.bytes + size > self.capacity:
                oldest = self._queue.oldest()
                if oldest in self._referenced:
                    self._referenced.discard(oldest)
                    self._queue.touch(oldest)
                else:
                    self._queue.pop_oldest()
            self._queue.push(key, size)
        return False


class SLRU(Policy):
    """Segmented LRU (Karedla, Love & Wherry, 1994): a probationary and a protected LRU
    segment, protected 80 % of the bytes; a key must be hit once to be protected, so a
    scan passes through probation only."""

    name = "slru"

    def __init__(self, capacity: int, protected_fraction: float = 0.8) -> None:
        super().__init__(capacity)
        self._main = Segmented(protected_fraction * capacity)

    def access(self, key: Key, size: int) -> bool:
        if self._main.hit(key):
            return True
        if size <= self.capacity:
            while self._main.bytes + size > self.capacity:
                self._main.evict()
            self._main.add(key, size)
        return False

    def __contains__(self, key: object) -> bool:
        return key in self._main

    def __len__(self) -> int:
        return len(self._main)

    @property
    def used(self) -> int:
        return self._main.bytes


class TwoQ(Policy):
    """2Q, the full version (Johnson & Shasha, VLDB 1994, §2.1 "Full Version"): new keys
    enter A1in, a FIFO of ``Kin`` (25 %) where hits change nothing (correlated references);
    keys leaving A1in are remembered in the ghost list A1out (``Kout``: 50 % of the
    capacity's worth of keys); a miss on a key in A1out puts it in Am, an LRU.
    Reclaim evicts from A1in while it is over ``Kin``, else from Am."""

    name = "2q"

    def __init__(self, capacity: int, kin: float = 0.25, kout: float = 0.5) -> None:
        super().__init__(capacity)
        self._kin = kin * capacity
        self._kout = kout * capacity
        self._a1in = Queue()
        self._a1out = Queue()
        self._am = Queue()

    def access(self, key: Key, size: int) -> bool:
        if key in self._am:
            self._am.touch(key)
            return True
        if key in self._a1in:
            return True
        if size > self.capacity:
            return False
        remembered = key in self._a1out
        if remembered:
            self._a1out.remove(key)
        while self.used + size > self.capacity:
            self._reclaim()
        (self._am if remembered else self._a1in).push(key, size)
        return False

    def _reclaim(self) -> None:
        if self._a1in and (self._a1in.bytes > self._kin or not self._am):
            self._a1out.push(*self._a1in.pop_oldest())
            while self._a1out.bytes > self._kout:
                self._a1out.pop_oldest()
        else:
            self._am.pop_oldest()

    def __contains__(self, key: object) -> bool:
        return key in self._a1in or key in self._am

    def __len__(self) -> int:
        return len(self._a1in) + len(self._am)

    @property
    def used(self) -> int:
        return self._a1in.bytes + self._am.bytes


class ARC(Policy):
    """Adaptive Replacement Cache (Megiddo & Modha, FAST 2003, Fig. 4). T1 holds keys seen
    once recently, T2 keys seen at least twice; B1 and B2 remember what each evicted. A hit
    in B1 grows the target size ``p`` of T1, a hit in B2 shrinks it, each by the ratio of
    the ghost lists' sizes (at least one block); REPLACE evicts from T1 while T1 exceeds
    ``p``, else from T2. The directory (T1+B1 ≤ c, all four ≤ 2c) is kept in bytes."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.p = 0.0
        self.t1, self.t2, self.b1, self.b2 = Queue(), Queue(), Queue(), Queue()

    def access(self, key: Key, size: int) -> bool:
        c = self.capacity
        if key in self.t1:  # Case I: a hit moves the key to T2's newest end.
            self.t2.push(key, self.t1.remove(key))
            return True
        if key in self.t2:
            self.t2.touch(key)
            return True
        if size > c:
            return False
        if key in self.b1:  # Case II: T1 was too small; adapt towards recency.
            delta = max(self.b2.bytes / self.b1.bytes, 1.0) * size
            self.p = min(float(c), self.p + delta)
            self.b1.remove(key)
            self._make_room(size, in_b2=False)
            self.t2.push(key, size)
        elif key in self.b2:  # Case III: T2 was too small; adapt towards frequency.
            delta = max(self.b1.bytes / self.b2.bytes, 1.0) * size
            self.p = max(0.0, self.p - delta)
            self.b2.remove(key)
            self._make_room(size, in_b2=True)
            self.t2.push(key, size)
        else:  # Case IV: a key in no list.
            if self.t1.bytes + self.b1.bytes + size > c:  # A: L1 is full.
                while self.b1 and self.t1.bytes + self.b1.bytes + size > c:
                    self.b1.pop_oldest()
                while self.t1.bytes + self.b1.bytes + size > c:
                    self.t1.pop_oldest()  # T1 alone fills L1: drop without a ghost.
            else:  # B: trim the whole directory to 2c.
                while self.b2 and self._directory() + size > 2 * c:
                    self.b2.pop_oldest()
            self._make_room(size, in_b2=False)
            self.t1.push(key, size)
        return False

    def _directory(self) -> int:
        return self.t1.bytes + self.t2.bytes + self.b1.bytes + self.b2.bytes

    def _make_room(self, size: int, in_b2: bool) -> None:
        while self.used + size > self.capacity:
            self._replace(in_b2)

    def _replace(self, in_b2: bool) -> None:
        """REPLACE(x, p): T1's oldest to B1 if T1 is over its target, else T2's to B2."""
        t1 = self.t1.bytes
        if self.t1 and (t1 > self.p or (in_b2 and t1 >= self.p) or not self.t2):
            self.b1.push(*self.t1.pop_oldest())
        else:
            self.b2.push(*self.t2.pop_oldest())

    def __contains__(self, key: object) -> bool:
        return key in self.t1 or key in self.t2

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2)

    @property
    def used(self) -> int:
        return self.t1.bytes + self.t2.bytes


PolicyFactory = Callable[[CacheSpec], Policy]

# Name -> how to build the policy for one cache size of one trace. The order is the
# order of the tables: the classics, the recency/frequency hybrids, the optimum last.
POLICIES: dict[str, PolicyFactory] = {
    LRU.name: lambda spec: LRU(spec.capacity),
    FIFO.name: lambda spec: FIFO(spec.capacity),
    Clock.name: lambda spec: Clock(spec.capacity),
    SLRU.name: lambda spec: SLRU(spec.capacity),
    TwoQ.name: lambda spec: TwoQ(spec.capacity),
    ARC.name: lambda spec: ARC(spec.capacity),
    S3FIFO.name: lambda spec: S3FIFO(spec.capacity),
    "s3fifo-meta": lambda spec: S3FIFO(spec.capacity, protect=spec.metadata.__contains__),
    "s3fifo-b0": lambda spec: S3FIFO(spec.capacity, protect=spec.first_blocks.__contains__),
    WTinyLFU.name: lambda spec: WTinyLFU(
        spec.capacity, expected_entries=max(1, spec.capacity // spec.block_size)
    ),
    Belady.name: lambda spec: Belady(spec.capacity, spec.future),
}


def make(name: str, spec: CacheSpec) -> Policy:
    """The policy called ``name`` (a key of ``POLICIES``) for ``spec``."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None
    return factory(spec)
