"""The index's SQLite check (schema.py) and eviction's batch statements (batchsql.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwbcache_proxy import batchsql, schema


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = schema.connect(tmp_path / "index.sqlite3")
    try:
        yield c
    finally:
        c.close()


def _put(conn: sqlite3.Connection, name: str, rows: list[tuple[int, int, int, int]]) -> int:
    """Rows (index, bytes, queue, seq) of version ``name``; its id."""
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        vid = schema.version_id(conn, name, create=True)
        assert vid is not None
        conn.executemany(
            "INSERT INTO blocks(version, idx, bytes, atime, queue, seq) "
            "VALUES (?, ?, ?, 1.5, ?, ?)",
            [(vid, i, b, q, s) for i, b, q, s in rows],
        )
    return vid


def _totals_agree(conn: sqlite3.Connection) -> None:
    rows = conn.execute("SELECT bytes, queue FROM blocks").fetchall()
    got = conn.execute("SELECT bytes, blocks, small_bytes, ghosts FROM totals").fetchone()
    assert got == (
        sum(b for b, _ in rows),
        len(rows),
        sum(b for b, q in rows if q == 0),
        conn.execute("SELECT count(*) FROM ghosts").fetchone()[0],
    )


@pytest.mark.parametrize(
    ("found", "ok"),
    [((3, 35, 0), True), ((3, 46, 1), True), ((3, 34, 1), False), ((3, 31, 1), False)],
)
def test_require_sqlite(found: tuple[int, int, int], ok: bool) -> None:
    if ok:
        schema.require_sqlite(found)
    else:
        with pytest.raises(RuntimeError, match=r"needs SQLite 3\.35\.0 or newer; .* has 3\.3"):
            schema.require_sqlite(found)


def test_a_queue_tail_is_oldest_first_with_each_version_named_once(
    conn: sqlite3.Connection,
) -> None:
    a = _put(conn, "objects/aa/a/v.16", [(0, 10, 0, 7), (1, 11, 0, 3), (2, 12, 1, 1)])
    b = _put(conn, "objects/bb/b/v.16", [(5, 20, 0, 5), (6, 21, 0, 9)])
    with conn:
        conn.execute("UPDATE versions SET pinned = 1 WHERE id = ?", (b,))
    rows, names = batchsql.queue_tail(conn, 0, 3)
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(3, a, 1, 11), (5, b, 5, 20), (7, a, 0, 10)]
    assert names == {a: ("objects/aa/a/v.16", False), b: ("objects/bb/b/v.16", True)}
    assert batchsql.queue_tail(conn, 2, 10) == ([], {})


def test_batch_moves_and_deletes_keep_every_total(conn: sqlite3.Connection) -> None:
    a = _put(conn, "objects/aa/a/v.16", [(i, 100 + i, 0, i) for i in range(8)])
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        batchsql.run_batch(conn, batchsql.MOVE_BLOCKS, [(1, 2, 50, a, 0), (2, 0, 51, a, 1)])
        batchsql.run_batch(conn, batchsql.DELETE_BLOCKS, [(a, 2), (a, 3), (a, 99)])
        batchsql.run_batch(conn, batchsql.DELETE_BLOCKS, [])
    got = conn.execute("SELECT idx, queue, freq, seq FROM blocks ORDER BY idx").fetchall()
    assert got[:2] == [(0, 1, 2, 50), (1, 2, 0, 51)]
    assert [r[0] for r in got] == [0, 1, 4, 5, 6, 7]
    _totals_agree(conn)
    pinned = conn.execute("SELECT pinned_bytes, pinned_blocks FROM totals").fetchone()
    assert pinned == (101, 1)
    assert conn.execute("SELECT bytes, blocks FROM versions").fetchone() == (
        sum(100 + i for i in (0, 1, 4, 5, 6, 7)),
        6,
    )


def test_a_ghost_added_again_is_counted_once(conn: sqlite3.Connection) -> None:
    """A key already listed takes the new position; a replace would have
    deleted the old row without its trigger and counted the key twice."""
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        batchsql.run_batch(conn, batchsql.ADD_GHOSTS, [(7, 1), (8, 2)])
        batchsql.run_batch(conn, batchsql.ADD_GHOSTS, [(7, 3)])
    assert conn.execute("SELECT key, seq FROM ghosts ORDER BY key").fetchall() == [(7, 3), (8, 2)]
    _totals_agree(conn)


def test_deleting_a_versions_last_block_deletes_the_version(conn: sqlite3.Connection) -> None:
    a = _put(conn, "objects/aa/a/v.16", [(0, 10, 0, 1), (1, 10, 0, 2)])
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        batchsql.run_batch(conn, batchsql.DELETE_BLOCKS, [(a, 0), (a, 1)])
    assert conn.execute("SELECT count(*) FROM versions").fetchone()[0] == 0
    _totals_agree(conn)
