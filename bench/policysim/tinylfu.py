"""W-TinyLFU: a window LRU in front of an SLRU main area guarded by a frequency sketch.

Einziger, Friedman & Manes, "TinyLFU: A Highly Efficient Cache Admission Policy",
ACM Transactions on Storage 13(4), 2017, as Caffeine (Manes) builds it:

* every access is counted in a count-min sketch of 4-bit counters (§3.2), updated
  conservatively (only the smallest counters grow, the "Minimal Increment" of
  §3.2); after ``sample_factor`` × entries additions every counter is halved (the
  *reset*, §3.3), so old popularity fades;
* an optional *doorkeeper* (§3.4.2), a Bloom filter in front of the sketch that
  absorbs each key's first access, cleared at each reset;
* new keys enter a window LRU of 1 % of the cache (§4, "W-TinyLFU"); the window's
  oldest key is the *candidate* for the main area, an SLRU (20 % probation, 80 %
  protected); it is admitted only if the sketch thinks it more frequent than the
  main area's victim (probation's oldest key); otherwise the candidate is dropped.

Not modelled: Caffeine's hill climbing of the window size, and its random
admission of warm candidates against hash flooding.
"""

from __future__ import annotations

from bench.policysim.base import Key, Policy, Queue, Segmented

_M64 = (1 << 64) - 1
_COUNTER_MAX = 15  # 4-bit counters


def _mix(key: Key) -> int:
    """A 64-bit hash of ``key`` spread over all bits (splitmix64's finaliser over ``hash``).

    Python's ``hash`` of an int is the int, and of a ``str`` varies per process: the
    simulator interns keys to ints, so its runs are repeatable.
    """
    x = (hash(key) * 0x9E3779B97F4A7C15) & _M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class FrequencySketch:
    """Count-min sketch of ``depth`` rows of 4-bit counters, with reset and a doorkeeper."""

    def __init__(
        self,
        expected_entries: int,
        depth: int = 4,
        sample_factor: int = 10,
        doorkeeper: bool = False,
        counters_per_entry: int = 4,
    ) -> None:
        # Caffeine keeps 16 counters per entry over its 4 rows: 4 per entry per row.
        width = 16
        while width < counters_per_entry * expected_entries:
            width *= 2
        self.width = width
        self.depth = depth
        self._mask = width - 1
        self._rows = [[0] * width for _ in range(depth)]
        self.sample_size = sample_factor * max(1, expected_entries)
        self.additions = 0
        self.resets = 0
        # The doorkeeper: a Bloom filter of 8 bits per row counter, 2 probes.
        self._door: bytearray | None = bytearray(width) if doorkeeper else None

    def _indexes(self, key: Key) -> list[int]:
        """One index per row by double hashing (Kirsch & Mitzenmacher, 2006)."""
        h = _mix(key)
        h1, h2 = h & 0xFFFFFFFF, (h >> 32) | 1
        return [(h1 + i * h2) & self._mask for i in range(self.depth)]

    def _door_probe(self, key: Key) -> tuple[int, int, int, int]:
        h = _mix((key, "door"))
        a, b = h % (8 * self.width), (h >> 32) % (8 * self.width)
        return a >> 3, 1 << (a & 7), b >> 3, 1 << (b & 7)

    def increment(self, key: Key) -> None:
        if self._door is not None:
            i, m, j, n = self._door_probe(key)
            if not (self._door[i] & m and self._door[j] & n):
                self._door[i] |= m
                self._door[j] |= n
                self._added()
                return
        indexes = self._indexes(key)
        counts = [row[i] for row, i in zip(self._rows, indexes, strict=True)]
        low = min(counts)
        if low < _COUNTER_MAX:
            for row, i, count in zip(self._rows, indexes, counts, strict=True):
                if count == low:
                    row[i] = low + 1
        self._added()

    def estimate(self, key: Key) -> int:
        low = min(row[i] for row, i in zip(self._rows, self._indexes(key), strict=True))
        if self._door is not None:
            i, m, j, n = self._door_probe(key)
            if self._door[i] & m and self._door[j] & n:
                low += 1
        return low

    def _added(self) -> None:
        self.additions += 1
        if self.additions >= self.sample_size:
            self.reset()

    def reset(self) -> None:
        """Halve every counter and the addition count; forget the doorkeeper (§3.3)."""
        for row in self._rows:
            row[:] = [count >> 1 for count in row]
        self.additions //= 2
        self.resets += 1
        if self._door is not None:
            self._door[:] = bytes(len(self._door))


class WTinyLFU(Policy):
    """W-TinyLFU with byte sizes: window and protected shares are fractions of the bytes."""

    name = "wtinylfu"

    def __init__(
        self,
        capacity: int,
        expected_entries: int,
        window_fraction: float = 0.01,
        protected_fraction: float = 0.8,
        doorkeeper: bool = False,
    ) -> None:
        super().__init__(capacity)
        self.window_capacity = window_fraction * capacity
        main_capacity = capacity - self.window_capacity
        self.window = Queue()
        self.main = Segmented(protected_fraction * main_capacity)
        self.sketch = FrequencySketch(expected_entries, doorkeeper=doorkeeper)
        self.admitted = 0
        self.rejected = 0

    def access(self, key: Key, size: int) -> bool:
        self.sketch.increment(key)
        if key in self.window:
            self.window.touch(key)
            return True
        if self.main.hit(key):
            return True
        if size > self.capacity:
            return False
        self.window.push(key, size)
        # The window keeps at least the key just added; what overflows it is a candidate.
        while self.window.bytes > self.window_capacity and len(self.window) > 1:
            self._offer(*self.window.pop_oldest())
        # Only while the window holds more than its share (a cache of few blocks) can the
        # total still be over: the main area gives way without a contest.
        while self.used > self.capacity:
            if self.main:
                self.main.evict()
            else:
                self.window.pop_oldest()
        return False

    def _offer(self, candidate: Key, size: int) -> None:
        """Admit ``candidate`` to probation if it fits or beats the victims it needs out."""
        while self.used + size > self.capacity:
            if not self.main:
                self.rejected += 1
                return
            victim = self.main.victim()
            if self.sketch.estimate(candidate) <= self.sketch.estimate(victim):
                self.rejected += 1
                return
            self.main.evict()
        self.main.add(candidate, size)
        self.admitted += 1

    def __contains__(self, key: object) -> bool:
        return key in self.window or key in self.main

    def __len__(self) -> int:
        return len(self.window) + len(self.main)

    @property
    def used(self) -> int:
        return self.window.bytes + self.main.bytes
