"""index: LRU accounting in SQLite, its migrations, and the helpers `nwbcache check` shares."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nwbcache_proxy import index as index_module
from nwbcache_proxy.index import EVICT_BATCH, SCHEMA_VERSION, CacheIndex, Totals
from nwbcache_proxy.layout import Layout

V1 = "objects/aa/aaaa/0123.16"
V2 = "objects/bb/bbbb/4567.16"


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[CacheIndex]:
    idx = CacheIndex(Layout(tmp_path))
    await idx.open()
    try:
        yield idx
    finally:
        await idx.close()


def _block(version: str, n: int) -> str:
    return f"{version}/{n}.blk"


def _rows(layout: Layout) -> dict[str, tuple[str, int]]:
    conn = sqlite3.connect(layout.index_path)
    try:
        return {p: (v, b) for p, v, b in conn.execute("SELECT path, version, bytes FROM blocks")}
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("records", "pending"),
    [
        ([], 0),
        ([(_block(V1, 0), V1, 80)], 80),
        ([(_block(V1, 0), V1, 80), (_block(V1, 1), V1, 50)], 130),
        # the same block again (a touch) replaces its entry, not adds to it
        ([(_block(V1, 0), V1, 80), (_block(V1, 0), V1, 80)], 80),
        ([(_block(V1, 0), V1, 80), (_block(V1, 0), V1, 90)], 90),
    ],
)
async def test_pending_bytes(
    index: CacheIndex, records: list[tuple[str, str, int]], pending: int
) -> None:
    for path, version, nbytes in records:
        index.record(path, version, nbytes)
    assert index.pending_bytes == pending
    await index.flush()
    assert index.pending_bytes == 0
    assert index.last_totals == Totals(pending, len({r[0] for r in records}))


async def test_flush_upserts_rows_and_keeps_the_latest_use(
    index: CacheIndex, tmp_path: Path
) -> None:
    index.record(_block(V1, 0), V1, 80)
    await index.flush()
    index.record(_block(V1, 0), V1, 80)
    index.record(_block(V2, 3), V2, 20)
    await index.flush()
    assert _rows(Layout(tmp_path)) == {_block(V1, 0): (V1, 80), _block(V2, 3): (V2, 20)}
    assert await index.totals() == Totals(100, 2)


async def test_forget_version_drops_its_rows_flushed_or_not(
    index: CacheIndex, tmp_path: Path
) -> None:
    index.record(_block(V1, 0), V1, 80)
    index.record(_block(V2, 0), V2, 20)
    await index.flush()
    index.record(_block(V1, 1), V1, 70)  # pending only
    await index.forget_version(V1)
    assert index.pending_bytes == 0
    await index.flush()
    assert _rows(Layout(tmp_path)) == {_block(V2, 0): (V2, 20)}
    assert await index.totals() == Totals(20, 1)


async def test_evict_to_removes_least_recent_first_and_only_what_it_must(
    index: CacheIndex, tmp_path: Path
) -> None:
    layout = Layout(tmp_path)
    for n in range(10):
        path = layout.root / _block(V1, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 10)
        index.record(_block(V1, n), V1, 10)
        await index.flush()  # one flush per block: distinct, increasing access times
        await asyncio.sleep(0.002)
    evicted, recent = await index.evict_to(65)
    assert (evicted, recent) == (4, 4)  # 100 -> 60: blocks 0-3, all used just now
    assert sorted(_rows(layout)) == sorted(_block(V1, n) for n in range(4, 10))
    assert [n for n in range(10) if (layout.root / _block(V1, n)).exists()] == list(range(4, 10))
    assert await index.evict_to(1000) == (0, 0)


async def test_eviction_works_in_bounded_batches(index: CacheIndex) -> None:
    count = EVICT_BATCH * 2 + 10
    for n in range(count):
        index.record(_block(V1, n), V1, 1)
    await index.flush()
    evicted, _ = await index.evict_to(0)
    assert evicted == count
    assert await index.totals() == Totals(0, 0)


async def test_top_versions(index: CacheIndex) -> None:
    for n in range(3):
        index.record(_block(V1, n), V1, 10)
    index.record(_block(V2, 0), V2, 100)
    assert await index.top_versions(10) == [(V2, 100, 1), (V1, 30, 3)]
    assert await index.top_versions(1) == [(V2, 100, 1)]


async def test_reconcile_adds_files_and_drops_rows_without_files(
    index: CacheIndex, tmp_path: Path
) -> None:
    layout = Layout(tmp_path)
    on_disk = layout.root / _block(V1, 0)
    on_disk.parent.mkdir(parents=True)
    on_disk.write_bytes(b"y" * 33)
    index.record(_block(V2, 5), V2, 50)  # a row whose file is gone
    await index.flush()
    await asyncio.sleep(0.01)  # rows older than the walk are the ones dropped
    assert await index.reconcile() == (1, 1)
    assert _rows(layout) == {_block(V1, 0): (V1, 33)}
    assert await index.reconcile() == (0, 0)


def _schema_1_index(path: Path) -> None:
    """An index as format 1 daemons wrote it (no user_version, an `object` column)."""
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE blocks (path TEXT PRIMARY KEY, object TEXT NOT NULL,
                             bytes INTEGER NOT NULL, atime REAL NOT NULL);
        CREATE INDEX blocks_by_atime ON blocks(atime);
        CREATE INDEX blocks_by_object ON blocks(object);
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
    conn.execute("INSERT INTO blocks VALUES (?, ?, ?, ?)", (_block(V1, 0), V1, 64, 1.0))
    conn.execute("INSERT INTO blocks VALUES (?, ?, ?, ?)", (_block(V2, 1), V2, 36, 2.0))
    conn.commit()
    conn.close()


async def test_a_schema_1_index_is_migrated_with_every_row(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.root.mkdir(parents=True)
    _schema_1_index(layout.index_path)
    idx = CacheIndex(layout)
    await idx.open()
    try:
        assert idx.last_totals == Totals(100, 2)
        assert _rows(layout) == {_block(V1, 0): (V1, 64), _block(V2, 1): (V2, 36)}
        await idx.forget_version(V1)  # queries by the renamed column work
        assert await idx.totals() == Totals(36, 1)
    finally:
        await idx.close()
    conn = sqlite3.connect(layout.index_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "blocks_by_object" not in names
        assert "blocks_by_version" in names
    finally:
        conn.close()


def test_an_index_newer_than_this_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="upgrade nwbcache"):
        index_module.connect(path)


def test_connect_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    for _ in range(2):
        conn = index_module.connect(path)
        index_module.add_found(conn, [(_block(V1, 0), V1, 5, 1.0)])
        conn.close()
    conn = index_module.connect(path)
    try:
        assert index_module.indexed_paths(conn) == {_block(V1, 0)}
        index_module.delete_paths(conn, [_block(V1, 0)])
        assert index_module.indexed_paths(conn) == set()
    finally:
        conn.close()
