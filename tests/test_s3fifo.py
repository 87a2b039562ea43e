"""S3-FIFO in the index: admission, promotion, quick demotion to the ghost list, lazy
reinsertion, scan resistance, and the totals the triggers keep, against real SQLite."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nwbcache_proxy.index import CacheIndex
from nwbcache_proxy.layout import Layout
from nwbcache_proxy.policy import Eviction, ghost_key

B = 100  # bytes per block in these tests


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[CacheIndex]:
    idx = CacheIndex(Layout(tmp_path), Eviction.S3FIFO)
    await idx.open()
    try:
        yield idx
    finally:
        await idx.close()


def _v(n: int) -> str:
    return f"objects/{n % 256:02x}/{n:064x}/{'e' * 32}.16"


def _state(layout: Layout) -> dict[tuple[str, int], tuple[int, int]]:
    """(version, index) -> (queue, freq)."""
    conn = sqlite3.connect(layout.index_path)
    try:
        return {
            (v, i): (q, f)
            for v, i, q, f in conn.execute(
                "SELECT v.name, b.idx, b.queue, b.freq FROM blocks b "
                "JOIN versions v ON v.id = b.version"
            )
        }
    finally:
        conn.close()


def _ghosts(layout: Layout) -> set[int]:
    conn = sqlite3.connect(layout.index_path)
    try:
        return {int(r[0]) for r in conn.execute("SELECT key FROM ghosts")}
    finally:
        conn.close()


async def _publish(index: CacheIndex, version: str, *blocks: int) -> None:
    for i in blocks:
        index.record(version, i, B)
    await index.flush()


async def test_admission_block_0_to_main_the_rest_to_small(
    index: CacheIndex, tmp_path: Path
) -> None:
    await _publish(index, _v(1), 0, 1, 2)
    assert _state(Layout(tmp_path)) == {(_v(1), 0): (1, 0), (_v(1), 1): (0, 0), (_v(1), 2): (0, 0)}
    assert (index.last_totals.small_bytes, index.last_totals.bytes) == (2 * B, 3 * B)
    assert dict(index.stats.admitted) == {"main": 1, "small": 2}


async def test_hits_count_up_to_three_and_touches_do_not(index: CacheIndex, tmp_path: Path) -> None:
    await _publish(index, _v(1), 1)
    index.record(_v(1), 1, B)  # read again, but not a hit (e.g. the fetch's own reader)
    await index.flush()
    assert _state(Layout(tmp_path))[(_v(1), 1)] == (0, 0)
    for _ in range(5):
        index.hit(_v(1), 1)
    await index.flush()
    assert _state(Layout(tmp_path))[(_v(1), 1)] == (0, 3)


async def test_small_tail_hit_moves_to_main_unhit_leaves_for_the_ghost_list(
    index: CacheIndex, tmp_path: Path
) -> None:
    layout = Layout(tmp_path)
    await _publish(index, _v(1), 1, 2, 3, 4)
    index.hit(_v(1), 2)
    await index.flush()
    # Capacity 400 B: the small queue (all 4 blocks) is over its 10 %.
    done = await index.evict_slice(300, 400)
    assert done.victims == ((_v(1), 1),)  # the oldest, never hit
    assert _ghosts(layout) == {ghost_key(_v(1), 1)}
    done = await index.evict_slice(200, 400)
    # Block 2 was hit: it moves to main (counter cleared); block 3 goes.
    assert done.victims == ((_v(1), 3),)
    assert _state(layout)[(_v(1), 2)] == (1, 0)
    assert index.stats.promoted == 1
    assert dict(index.stats.evicted) == {"small": 2}


async def test_a_ghost_comes_back_into_main(index: CacheIndex, tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    await _publish(index, _v(1), 0, 1, 2)
    await index.evict_slice(2 * B, 1000)
    assert ghost_key(_v(1), 1) in _ghosts(layout)
    await _publish(index, _v(1), 1)  # fetched again: it was wanted after all
    assert _state(layout)[(_v(1), 1)] == (1, 0)
    assert ghost_key(_v(1), 1) not in _ghosts(layout)
    assert index.stats.admitted["ghost"] == 1


async def test_main_reinserts_counted_blocks_once_per_count(
    index: CacheIndex, tmp_path: Path
) -> None:
    layout = Layout(tmp_path)
    for n in range(3):  # three blocks 0: straight into main
        await _publish(index, _v(n), 0)
    index.hit(_v(0), 0)
    index.hit(_v(0), 0)
    await index.flush()
    done = await index.evict_slice(2 * B, 3 * B)
    # The oldest (v0) had 2 hits: reinserted with 1; v1 evicted.
    assert done.victims == ((_v(1), 0),)
    assert _state(layout)[(_v(0), 0)] == (1, 1)
    done = await index.evict_slice(B, 3 * B)
    assert done.victims == ((_v(2), 0),)
    done = await index.evict_slice(0, 3 * B)
    assert done.victims == ((_v(0), 0),)  # its last count used up on the way
    assert dict(index.stats.evicted) == {"main": 3}


async def test_a_scan_passes_through_and_the_working_set_stays(
    tmp_path: Path,
) -> None:
    """The issue's scenario in miniature: 24 files' heads read three times, then one
    file read straight through, 20x the cache; S3-FIFO keeps every head, LRU none."""
    kept: dict[Eviction, int] = {}
    for eviction in Eviction:
        index = CacheIndex(Layout(tmp_path / eviction.value), eviction)
        await index.open()
        try:
            capacity = 100 * B
            heads = [(_v(n), i) for n in range(24) for i in (0, 1)]  # superblock + a btree
            for version, i in heads:
                index.record(version, i, B)
            await index.flush()
            for _ in range(2):
                for version, i in heads:
                    index.record(version, i, B)
                    index.hit(version, i)
                await index.flush()
            for n in range(2000):  # the scan, as read-ahead publishes it: no hits
                index.record(_v(99), n + 1, B)
                if n % 50 == 49:
                    await index.flush()
                    if index.last_totals.bytes > capacity:
                        await index.evict_to(int(capacity * 0.95), capacity)
            state = _state(Layout(tmp_path / eviction.value))
            kept[eviction] = sum(h in state for h in heads)
            assert index.last_totals.bytes <= capacity
        finally:
            await index.close()
    assert kept == {Eviction.S3FIFO: 48, Eviction.LRU: 0}


@pytest.mark.slow  # slices this big go to the eviction helper (a process)
async def test_the_ghost_list_is_bounded_by_main(index: CacheIndex, tmp_path: Path) -> None:
    await _publish(index, _v(1), 0, *range(1, 400))  # 1 block in main, 399 in small
    await index.evict_to(10 * B, 10 * B)
    assert index.last_totals.ghosts <= index.last_totals.blocks
    assert len(_ghosts(Layout(tmp_path))) == index.last_totals.ghosts


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.integers(0, 5), st.integers(0, 30)),
            st.tuples(st.just("hit"), st.integers(0, 5), st.integers(0, 30)),
            st.tuples(st.just("evict"), st.integers(0, 3000), st.integers(1, 50)),
        ),
        max_size=60,
    )
)
async def test_totals_always_agree_with_the_rows(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int]]
) -> None:
    path = tmp_path_factory.mktemp("prop")
    index = CacheIndex(Layout(path), Eviction.S3FIFO)
    await index.open()
    try:
        for op, a, b in ops:
            if op == "put":
                index.record(_v(a), b, B + b)
            elif op == "hit":
                index.hit(_v(a), b)
            else:
                await index.flush()
                target = a
                done = await index.evict_to(target, 3000)
                assert index.last_totals.bytes <= target or done.blocks == 0
        await index.flush()
        conn = sqlite3.connect(Layout(path).index_path)
        try:
            rows = conn.execute("SELECT bytes, queue, freq, version FROM blocks").fetchall()
            t = conn.execute("SELECT bytes, blocks, small_bytes, small_blocks, ghosts FROM totals")
            assert t.fetchone() == (
                sum(r[0] for r in rows),
                len(rows),
                sum(r[0] for r in rows if r[1] == 0),
                sum(1 for r in rows if r[1] == 0),
                conn.execute("SELECT count(*) FROM ghosts").fetchone()[0],
            )
            assert all(0 <= r[2] <= 3 for r in rows)
            per_version = dict(conn.execute("SELECT id, bytes FROM versions").fetchall())
            sums: dict[int, int] = {}
            for nbytes, _, _, vid in rows:
                sums[vid] = sums.get(vid, 0) + nbytes
            assert per_version == sums
        finally:
            conn.close()
    finally:
        await index.close()


@pytest.mark.parametrize("policy", [Eviction.S3FIFO, Eviction.LRU])
async def test_rows_of_no_version_are_deleted_not_left_in_the_way(
    tmp_path: Path, policy: Eviction
) -> None:
    """A row whose version has no row (none should have: a bug, or a hand-edited
    index) has no file to name. It is deleted when eviction meets it, and
    never fills a batch: with a whole batch of them at the tail, eviction
    still reaches its target and every total agrees with the rows."""
    layout = Layout(tmp_path)
    idx = CacheIndex(layout, policy)
    await idx.open()
    try:
        await _publish(idx, _v(1), *range(1, 9))
        conn = sqlite3.connect(layout.index_path)
        try:
            with conn:  # 1,500 orphans, oldest of all, in the small queue
                conn.executemany(
                    "INSERT INTO blocks(version, idx, bytes, atime, queue, seq) "
                    "VALUES (999, ?, ?, 1.0, 0, -?)",
                    [(i, B, i) for i in range(1500)],
                )
        finally:
            conn.close()
        done = await idx.evict_to(4 * B, 10 * B)
        assert done.blocks == 4  # the four real blocks evicted, no orphan counted
        conn = sqlite3.connect(layout.index_path)
        try:
            assert conn.execute("SELECT count(*) FROM blocks WHERE version = 999").fetchone() == (
                0,
            )
            rows = conn.execute("SELECT bytes FROM blocks").fetchall()
            assert conn.execute("SELECT bytes, blocks FROM totals").fetchone() == (
                sum(r[0] for r in rows),
                len(rows),
            )
            assert len(rows) == 4
        finally:
            conn.close()
    finally:
        await idx.close()
