"""S3-FIFO: three static FIFO queues (Yang, Zhang, Qiu, Yue & Vinayak, SOSP 2023).

From §4 of "FIFO queues are all you need for cache eviction": a small FIFO S
(10 % of the cache) takes new keys; a main FIFO M takes the rest; a ghost FIFO G
remembers keys evicted from S, as many as M holds. Each resident key has a
2-bit access count (capped at 3). When S is at or over its share, its oldest
key moves to M if it was accessed while in S, otherwise it leaves for G
("quick demotion" of one-hit wonders). M evicts like CLOCK with a counter:
an oldest key with a count is reinserted with the count decremented ("lazy
promotion"). A miss on a key in G inserts it straight into M.

Every operation is a FIFO push or pop plus a small counter, which is why the
paper can make it lock-free; its state per key is a queue tag and 2 bits.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.policysim.base import Key, Policy, Queue

MAX_FREQ = 3  # §4.2: two bits per object


class S3FIFO(Policy):
    """S3-FIFO with byte sizes: the 10 % and the ghost's size are in bytes.

    ``move_threshold`` is how many hits in S earn a place in M. The paper's text says
    "accessed at least once" (1, the default); its Algorithm 1 listing reads
    ``freq > 1``. A key moved from S to M starts M with its count cleared.

    ``protect`` (not in the paper) names keys that skip S and enter M directly, as a key
    remembered in G does: the variants ``s3fifo-meta`` and ``s3fifo-b0`` give metadata
    blocks, or only each object's block 0, that head start.
    """

    name = "s3fifo"

    def __init__(
        self,
        capacity: int,
        small_fraction: float = 0.1,
        move_threshold: int = 1,
        protect: Callable[[Key], bool] | None = None,
    ) -> None:
        super().__init__(capacity)
        self.protect = protect
        self.small_capacity = small_fraction * capacity
        self.main_capacity = capacity - self.small_capacity
        self.move_threshold = move_threshold
        self.small = Queue()
        self.main = Queue()
        self.ghost = Queue()
        self._freq: dict[Key, int] = {}
        # What happened, for tests and the report.
        self.moved_to_main = 0
        self.ghost_admissions = 0

    def access(self, key: Key, size: int) -> bool:
        freq = self._freq.get(key)
        if freq is not None:
            if freq < MAX_FREQ:
                self._freq[key] = freq + 1
            return True
        if size > self.capacity:
            return False
        while self.used + size > self.capacity:
            self._evict()
        if key in self.ghost:
            self.ghost.remove(key)
            self.main.push(key, size)
            self.ghost_admissions += 1
        elif self.protect is not None and self.protect(key):
            self.main.push(key, size)
        else:
            self.small.push(key, size)
        self._freq[key] = 0
        return False

    def _evict(self) -> None:
        if self.small and (self.small.bytes >= self.small_capacity or not self.main):
            self._evict_small()
        else:
            self._evict_main()

    def _evict_small(self) -> None:
        """Free one key's worth from S: move accessed keys to M until one leaves for G."""
        while self.small:
            key, size = self.small.pop_oldest()
            if self._freq[key] >= self.move_threshold:
                self._freq[key] = 0
                self.main.push(key, size)
                self.moved_to_main += 1
                if self.main.bytes > self.main_capacity:
                    self._evict_main()
                    return
            else:
                del self._freq[key]
                self.ghost.push(key, size)
                while self.ghost.bytes > self.main_capacity:
                    self.ghost.pop_oldest()
                return

    def _evict_main(self) -> None:
        """Evict one key from M, reinserting the counted ones it passes."""
        while self.main:
            key, size = self.main.pop_oldest()
            freq = self._freq[key]
            if freq > 0:
                self._freq[key] = freq - 1
                self.main.push(key, size)
            else:
                del self._freq[key]
                return

    def in_main(self, key: Key) -> bool:
        return key in self.main

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    @property
    def used(self) -> int:
        return self.small.bytes + self.main.bytes
