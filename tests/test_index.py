"""index and schema: accounting in SQLite (per version and in all), eviction in slices,
the migrations from every older schema, and the helpers `nwbcache check` shares."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nwbcache_proxy import schema
from nwbcache_proxy.index import (
    EVICT_BATCH,
    UNLINK_GROUP,
    CacheIndex,
    Evicted,
    Totals,
    _unlink_groups,
)
from nwbcache_proxy.layout import BLOCKS_PER_DIR, Layout
from nwbcache_proxy.policy import Eviction
from nwbcache_proxy.reconcile import is_needed

V1 = "objects/aa/aaaa/0123.16"
V2 = "objects/bb/bbbb/4567.16"


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[CacheIndex]:
    """An index evicting by LRU (test_s3fifo.py has S3-FIFO's)."""
    idx = CacheIndex(Layout(tmp_path), Eviction.LRU)
    await idx.open()
    try:
        yield idx
    finally:
        await idx.close()


def _bb(totals: Totals) -> tuple[int, int]:
    return totals.bytes, totals.blocks


def _rows(layout: Layout) -> dict[tuple[str, int], int]:
    """(version dir, block index) -> bytes, as stored."""
    conn = sqlite3.connect(layout.index_path)
    try:
        return {
            (v, i): b
            for v, i, b in conn.execute(
                "SELECT v.name, b.idx, b.bytes FROM blocks b JOIN versions v ON v.id = b.version"
            )
        }
    finally:
        conn.close()


def _versions(layout: Layout) -> dict[str, tuple[int, int]]:
    conn = sqlite3.connect(layout.index_path)
    try:
        return {n: (b, c) for n, b, c in conn.execute("SELECT name, bytes, blocks FROM versions")}
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("records", "pending"),
    [
        ([], 0),
        ([(V1, 0, 80)], 80),
        ([(V1, 0, 80), (V1, 1, 50)], 130),
        # the same block again (a touch) replaces its entry, not adds to it
        ([(V1, 0, 80), (V1, 0, 80)], 80),
        ([(V1, 0, 80), (V1, 0, 90)], 90),
        ([(V1, 0, 80), (V2, 0, 90)], 170),
    ],
)
async def test_pending_bytes(
    index: CacheIndex, records: list[tuple[str, int, int]], pending: int
) -> None:
    for version, n, nbytes in records:
        index.record(version, n, nbytes)
    assert index.pending_bytes == pending
    await index.flush()
    assert index.pending_bytes == 0
    assert _bb(index.last_totals) == (pending, len({r[:2] for r in records}))


async def test_flush_upserts_rows_and_keeps_per_version_totals(
    index: CacheIndex, tmp_path: Path
) -> None:
    layout = Layout(tmp_path)
    index.record(V1, 0, 80)
    await index.flush()
    index.record(V1, 0, 80)
    index.record(V1, 7, 30)
    index.record(V2, 3, 20)
    await index.flush()
    assert _rows(layout) == {(V1, 0): 80, (V1, 7): 30, (V2, 3): 20}
    assert _versions(layout) == {V1: (110, 2), V2: (20, 1)}
    assert _bb(await index.totals()) == (130, 3)


async def test_forget_version_drops_its_rows_flushed_or_not(
    index: CacheIndex, tmp_path: Path
) -> None:
    index.record(V1, 0, 80)
    index.record(V2, 0, 20)
    await index.flush()
    index.record(V1, 1, 70)  # pending only
    await index.forget_version(V1)
    assert index.pending_bytes == 0
    await index.flush()
    assert _rows(Layout(tmp_path)) == {(V2, 0): 20}
    assert _versions(Layout(tmp_path)) == {V2: (20, 1)}  # V1's row went with its blocks
    assert _bb(await index.totals()) == (20, 1)


async def _fill(index: CacheIndex, layout: Layout, version: str, count: int, size: int) -> None:
    """``count`` block files of ``size`` bytes with rows, each used after the last."""
    for n in range(count):
        path = layout.block_path(version, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        index.record(version, n, size)
        await index.flush()  # one flush per block: distinct, increasing access times
        await asyncio.sleep(0.002)


async def test_evict_removes_least_recent_first_and_only_what_it_must(
    index: CacheIndex, tmp_path: Path
) -> None:
    layout = Layout(tmp_path)
    await _fill(index, layout, V1, 10, 10)
    done = await index.evict_to(65)
    assert (done.blocks, done.bytes, done.recent) == (4, 40, 4)  # 100 -> 60: blocks 0-3
    assert sorted(_rows(layout)) == [(V1, n) for n in range(4, 10)]
    assert [n for n in range(10) if layout.block_path(V1, n).exists()] == list(range(4, 10))
    assert _versions(layout) == {V1: (60, 6)}
    assert await index.evict_to(1000) == Evicted()


@pytest.mark.slow  # slices this big go to the eviction helper (a process)
async def test_a_slice_is_bounded_and_says_whether_more_is_needed(
    index: CacheIndex, tmp_path: Path
) -> None:
    count = EVICT_BATCH * 2 + 10
    for n in range(count):
        index.record(V1, n, 1)
    await index.flush()
    first = await index.evict_slice(0, 100)
    assert (first.blocks, first.more) == (EVICT_BATCH, True)
    assert len(first.victims) == EVICT_BATCH and first.victims[0] == (V1, 0)
    small = await index.evict_slice(0, 100, batch=10)
    assert (small.blocks, small.more) == (10, True)
    rest = await index.evict_to(0)
    assert rest.blocks == count - EVICT_BATCH - 10
    assert _bb(await index.totals()) == (0, 0)
    assert _versions(Layout(tmp_path)) == {}


async def test_eviction_takes_whole_versions_out_of_the_versions_table(
    index: CacheIndex, tmp_path: Path
) -> None:
    layout = Layout(tmp_path)
    await _fill(index, layout, V1, 3, 10)
    await _fill(index, layout, V2, 3, 10)
    await index.evict_to(30)
    assert _versions(layout) == {V2: (30, 3)}


async def test_top_versions(index: CacheIndex) -> None:
    for n in range(3):
        index.record(V1, n, 10)
    index.record(V2, 0, 100)
    await index.flush()
    assert await index.top_versions(10) == [(V2, 100, 1), (V1, 30, 3)]
    assert await index.top_versions(1) == [(V2, 100, 1)]


def _old_index(path: Path, *, schema_1: bool) -> None:
    """An index as schema 1 (no user_version, an `object` column) or schema 2
    (user_version 2, a `version` column) daemons wrote it."""
    column = "object" if schema_1 else "version"
    conn = sqlite3.connect(path)
    conn.executescript(
        f"""
        CREATE TABLE blocks (path TEXT PRIMARY KEY, {column} TEXT NOT NULL,
                             bytes INTEGER NOT NULL, atime REAL NOT NULL);
        CREATE INDEX blocks_by_atime ON blocks(atime);
        CREATE INDEX blocks_by_{column} ON blocks({column});
        CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL,
                             blocks INTEGER NOT NULL);
        INSERT INTO totals VALUES (0, 0, 0);
        CREATE TRIGGER blocks_ins AFTER INSERT ON blocks BEGIN
            UPDATE totals SET bytes = bytes + NEW.bytes, blocks = blocks + 1 WHERE id = 0;
        END;
        CREATE TRIGGER blocks_del AFTER DELETE ON blocks BEGIN
            UPDATE totals SET bytes = bytes - OLD.bytes, blocks = blocks - 1 WHERE id = 0;
        END;
        """
    )
    rows = [
        (f"{V1}/0.blk", V1, 64, 3.0),
        (f"{V1}/12345.blk", V1, 16, 1.0),
        (f"{V2}/1.blk", V2, 36, 2.0),
    ]
    conn.executemany("INSERT INTO blocks VALUES (?, ?, ?, ?)", rows)
    if not schema_1:
        conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("schema_1", [True, False], ids=["schema-1", "schema-2"])
async def test_an_old_index_is_migrated_with_every_row_and_its_last_use(
    tmp_path: Path, schema_1: bool
) -> None:
    layout = Layout(tmp_path)
    layout.root.mkdir(parents=True)
    _old_index(layout.index_path, schema_1=schema_1)
    idx = CacheIndex(layout, Eviction.LRU)
    await idx.open()
    try:
        assert _bb(idx.last_totals) == (116, 3)
        assert _rows(layout) == {(V1, 0): 64, (V1, 12345): 16, (V2, 1): 36}
        assert _versions(layout) == {V1: (80, 2), V2: (36, 1)}
        # The access times came along: the least recently used block goes first.
        done = await idx.evict_slice(100, 116, batch=1)
        assert done.victims == ((V1, 12345),)
        await idx.forget_version(V1)
        assert _bb(await idx.totals()) == (36, 1)
    finally:
        await idx.close()
    conn = sqlite3.connect(layout.index_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "blocks_2" not in tables and "blocks_by_version" not in tables
        # A migrated index is reconciled: format 1's blocks must move into shards.
        assert is_needed(conn)
    finally:
        conn.close()


def test_an_index_newer_than_this_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="upgrade nwbcache"):
        schema.connect(path)


def test_connect_is_idempotent_and_a_new_index_asks_for_a_reconcile(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    conn = schema.connect(path)
    assert is_needed(conn)  # it knows nothing of the files yet
    conn.execute(schema.CLEAR_STATE, (schema.RECONCILE,))
    vid = schema.version_id(conn, V1, create=True)
    assert vid is not None
    schema.add_found(conn, vid, [(0, 5, 1.0)])
    conn.close()
    conn = schema.connect(path)
    try:
        assert not is_needed(conn)
        assert schema.version_id(conn, V1, create=False) == vid
        assert schema.rows_in(conn, vid, range(0, 10)) == {0: 1.0}
        schema.delete_older(conn, vid, [0], than=0.5)  # the row is newer: kept
        assert schema.totals(conn) == (5, 1)
        schema.delete_older(conn, vid, [0], than=2.0)
        assert schema.totals(conn) == (0, 0)
        assert schema.version_id(conn, V1, create=False) is None
    finally:
        conn.close()


async def test_a_failed_flush_keeps_its_records_for_the_next(
    index: CacheIndex, tmp_path: Path
) -> None:
    index.record(V1, 0, 80)
    index.hit(V1, 0)
    conn = index.conn
    broken = sqlite3.connect(":memory:")
    broken.close()
    index._conn = broken  # SQLite refuses (as on a full disk: "disk I/O error")
    try:
        assert await index.flush() is False
        index.record(V1, 1, 20)
        assert index.pending_bytes == 100  # kept, and added to
    finally:
        index._conn = conn
    assert await index.flush() is True
    assert _rows(Layout(tmp_path)) == {(V1, 0): 80, (V1, 1): 20}


async def test_an_object_with_nothing_cached_leaves_nothing_on_disk(
    index: CacheIndex, tmp_path: Path
) -> None:
    """Evicting a version's last block removes its dirs; its object's meta.json and
    dir go too once no other version of it is left."""
    layout = Layout(tmp_path)
    other_version = "objects/aa/aaaa/9999.16"  # the same object, another version
    for version in (V1, other_version, V2):
        layout.meta_path_of_version(version).parent.mkdir(parents=True, exist_ok=True)
        layout.meta_path_of_version(version).write_text("{}")
    await _fill(index, layout, V1, 3, 10)
    await _fill(index, layout, other_version, 1, 10)
    await _fill(index, layout, V2, 1, 10)
    await index.evict_to(20)  # LRU: V1's three blocks
    assert not layout.version_path(V1).exists()
    assert layout.meta_path_of_version(V1).exists()  # other_version is still cached
    await index.evict_to(10)
    assert not layout.version_path(other_version).exists()
    assert not layout.meta_path_of_version(V1).parent.exists()  # the object is gone
    assert layout.block_path(V2, 0).exists() and layout.meta_path_of_version(V2).exists()


def test_unlink_groups_cover_every_victim_once_a_dir_per_group(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    shard = BLOCKS_PER_DIR
    victims = [(V1, i, 0.0) for i in range(300)]  # one dir, three groups
    victims += [(V1, shard + i, 0.0) for i in range(5)]  # a second shard dir of V1
    victims += [(V2, i, 0.0) for i in range(0, 40, 2)]  # another version
    groups = _unlink_groups(layout, victims)
    dirs = {
        layout.shard_dir(V1, 0): (V1, 0),
        layout.shard_dir(V1, 1): (V1, 1),
        layout.shard_dir(V2, 0): (V2, 0),
    }
    flat = []
    for shard_dir, indices in groups:
        name, s = dirs[shard_dir]
        assert 0 < len(indices) <= UNLINK_GROUP
        assert {i // shard for i in indices} == {s}  # every index in the group's dir
        flat += [(name, i) for i in indices]
    assert sorted(flat) == sorted((name, i) for name, i, _ in victims)
    assert sorted(flat) == sorted(set(flat))
    # the dirs take turns: every dir's first group before the big dir's second
    assert [dirs[d] for d, _ in groups] == [(V1, 0), (V1, 1), (V2, 0), (V1, 0), (V1, 0)]
    assert _unlink_groups(layout, []) == []


async def test_eviction_unlinks_exactly_its_victims_across_shard_dirs(
    index: CacheIndex, tmp_path: Path
) -> None:
    layout = Layout(tmp_path)
    spread = [0, 1, BLOCKS_PER_DIR - 1, BLOCKS_PER_DIR, BLOCKS_PER_DIR + 1, 2 * BLOCKS_PER_DIR]
    for version in (V1, V2):
        for n in spread:
            path = layout.block_path(version, n)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * 10)
            index.record(version, n, 10)
        await index.flush()
        await asyncio.sleep(0.002)  # V1's blocks were used before V2's
    done = await index.evict_to(60)  # 120 -> 60 bytes: all of V1, none of V2
    assert (done.blocks, done.bytes) == (len(spread), 10 * len(spread))
    assert [n for n in spread if layout.block_path(V1, n).exists()] == []
    assert [n for n in spread if layout.block_path(V2, n).exists()] == spread
    assert not layout.version_path(V1).exists()  # its emptied dirs pruned too
    assert sorted(_rows(layout)) == [(V2, n) for n in spread]


@pytest.mark.slow  # slices this big go to the eviction helper (a process)
async def test_pipelined_slices_leave_no_file_when_done_or_closed(tmp_path: Path) -> None:
    """A slice's files are unlinked while the next slice's rows are chosen; a
    slice saying "no more", and closing the index, leave none behind."""
    layout = Layout(tmp_path)
    idx = CacheIndex(layout, Eviction.LRU)
    await idx.open()
    count = 3 * EVICT_BATCH
    for n in range(count):
        path = layout.block_path(V1, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        idx.record(V1, n, 1)
    await idx.flush()
    try:
        first = await idx.evict_slice(EVICT_BATCH, count)  # 3 -> 2 slices' worth: more
        assert (first.blocks, first.more) == (EVICT_BATCH, True)
        last = await idx.evict_slice(EVICT_BATCH, count)  # -> 1 slice's worth: done
        assert (last.blocks, last.more) == (EVICT_BATCH, False)
        assert [n for n in range(count) if layout.block_path(V1, n).exists()] == list(
            range(2 * EVICT_BATCH, count)
        )
        # Half of the rest, in a slice that wants more: its files still in the
        # helper's hands when the index closes.
        cut = await idx.evict_slice(0, count, batch=EVICT_BATCH // 2)
        assert (cut.blocks, cut.more) == (EVICT_BATCH // 2, True)
    finally:
        await idx.close()
    left = [n for n in range(count) if layout.block_path(V1, n).exists()]
    assert left == list(range(2 * EVICT_BATCH + EVICT_BATCH // 2, count))
