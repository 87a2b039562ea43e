"""policy: S3-FIFO's rules, table-tested (pure)."""

from __future__ import annotations

import pytest

from nwbcache_proxy.policy import (
    MAX_FREQ,
    SMALL_FRACTION,
    Eviction,
    Fate,
    Queue,
    admit,
    evict_from,
    fate,
    ghost_key,
    ghost_limit,
    hit,
)


@pytest.mark.parametrize(
    ("index", "ghost", "queue"),
    [
        (5, False, Queue.SMALL),  # a new block: on probation
        (5, True, Queue.MAIN),  # evicted recently and wanted again
        (0, False, Queue.MAIN),  # every object's block 0: the HDF5 superblock
        (0, True, Queue.MAIN),
    ],
)
def test_admit(index: int, ghost: bool, queue: Queue) -> None:
    assert admit(index, ghost=ghost) is queue


@pytest.mark.parametrize(
    ("queue", "freq", "expected"),
    [
        (Queue.SMALL, 0, Fate.GHOST),  # a one-hit wonder: quick demotion
        (Queue.SMALL, 1, Fate.TO_MAIN),
        (Queue.SMALL, MAX_FREQ, Fate.TO_MAIN),
        (Queue.MAIN, 0, Fate.EVICT),
        (Queue.MAIN, 1, Fate.REINSERT),  # lazy promotion: one more lap
        (Queue.MAIN, MAX_FREQ, Fate.REINSERT),
    ],
)
def test_fate(queue: Queue, freq: int, expected: Fate) -> None:
    assert fate(queue, freq) is expected


CAP = 1000


@pytest.mark.parametrize(
    ("small", "main", "queue"),
    [
        (int(SMALL_FRACTION * CAP), 500, Queue.SMALL),  # at its share: the small queue gives
        (int(SMALL_FRACTION * CAP) + 1, 0, Queue.SMALL),
        (int(SMALL_FRACTION * CAP) - 1, 500, Queue.MAIN),  # below it: main gives
        (50, 0, Queue.SMALL),  # main empty: small gives whatever its size
        (0, 900, Queue.MAIN),
        (0, 0, Queue.MAIN),  # nothing anywhere: the caller finds an empty tail
    ],
)
def test_evict_from(small: int, main: int, queue: Queue) -> None:
    assert evict_from(small, main, CAP) is queue


@pytest.mark.parametrize(
    ("freq", "hits", "after"), [(0, 1, 1), (1, 1, 2), (2, 5, MAX_FREQ), (MAX_FREQ, 1, MAX_FREQ)]
)
def test_hit_saturates(freq: int, hits: int, after: int) -> None:
    assert hit(freq, hits) == after


@pytest.mark.parametrize(
    ("capacity", "total", "blocks", "limit"),
    [
        (1000, 500, 5, 9),  # blocks of 100 B: main's 900 B hold 9
        (1000, 1000, 40, 36),
        (1000, 0, 0, 0),  # an empty cache remembers nothing
    ],
)
def test_ghost_limit(capacity: int, total: int, blocks: int, limit: int) -> None:
    assert ghost_limit(capacity, total, blocks) == limit


def test_ghost_keys_are_stable_positive_and_distinct() -> None:
    keys = {ghost_key(f"objects/aa/{v}/x.16", i) for v in range(50) for i in range(200)}
    assert len(keys) == 50 * 200
    assert all(0 <= k < 2**63 for k in keys)  # fits SQLite's signed INTEGER
    assert ghost_key("objects/aa/1/x.16", 7) == ghost_key("objects/aa/1/x.16", 7)


def test_eviction_names() -> None:
    assert [e.value for e in Eviction] == ["s3fifo", "lru"]


def test_a_versions_ghost_keys_are_neighbours() -> None:
    """A slice's ghosts, runs of a version's blocks, land on a few pages of
    the ghosts table: keys of consecutive blocks are consecutive."""
    version = "objects/aa/1/x.16"
    first = ghost_key(version, 0)
    assert [ghost_key(version, i) - first for i in range(2000)] == list(range(2000))
    assert ghost_key("objects/aa/2/x.16", 0) != first


def test_ghost_keys_of_huge_indices_stay_in_63_bits() -> None:
    keys = [ghost_key("objects/ff/9/y.4096", i) for i in (2**26 - 1, 2**26, 2**40, 2**62)]
    assert all(0 <= k < 2**63 for k in keys)
