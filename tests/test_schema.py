"""The index's SQLite check (schema.py) and its batch statements (batchsql.py, and the
reconciler's in schema.py): what they do, and that a batch is one statement whatever its rows."""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nwbcache_proxy import accounting, batchsql, policy, schema


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


def _statements(conn: sqlite3.Connection, work: Callable[[], None]) -> int:
    """How many statements ``work`` runs on ``conn``, with the triggers dropped
    first (SQLite reports a trigger's run as its statement's again)."""
    triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
    for (name,) in triggers:
        conn.execute(f"DROP TRIGGER {name}")
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        work()
    finally:
        conn.set_trace_callback(None)
    return len(seen)


def _flush(conn: sqlite3.Connection, rows: int, *, again: bool = False) -> None:
    """``rows`` blocks of each of two versions used (written, or ``again`` read) and hit."""
    now = time.time()
    names = ("objects/aa/a/v.16", "objects/bb/b/v.16")
    pending = {(v, i): (16, now, not again) for v in names for i in range(rows)}
    hits = {(v, i): 1 for v, i in pending}
    accounting.record(conn, pending, hits, accounting.Stats())


@pytest.mark.parametrize("again", [False, True], ids=["new rows", "rows there"])
def test_a_flush_of_2000_rows_runs_the_statements_of_one_of_10(tmp_path: Path, again: bool) -> None:
    """Each statement step gives the GIL up and waits to get it back: with one
    per row, a flush under a busy event loop took seconds (batchsql.py)."""
    counts = []
    for rows in (10, 2000):
        conn = schema.connect(tmp_path / f"{rows}.sqlite3")
        if again:
            _flush(conn, rows)
        counts.append(_statements(conn, functools.partial(_flush, conn, rows, again=again)))
        got = conn.execute("SELECT count(*), sum(freq), min(freq) FROM blocks").fetchone()
        assert got == (2 * rows, 2 * rows * (2 if again else 1), 2 if again else 1)
        conn.close()
    assert counts[0] == counts[1] < 30


def test_a_flush_keeps_every_total(conn: sqlite3.Connection) -> None:
    _flush(conn, 50)
    _flush(conn, 60, again=True)  # 10 of them only read: no rows of their own
    assert conn.execute("SELECT count(*) FROM blocks").fetchone()[0] == 100
    _totals_agree(conn)


def test_record_upserts_keep_a_rows_place_and_take_its_later_use(
    conn: sqlite3.Connection,
) -> None:
    a = _put(conn, "objects/aa/a/v.16", [(0, 10, 1, 4)])
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        rows = [(a, 0, 10, 9.5, 0, 8), (a, 1, 20, 3.0, 0, 9)]
        batchsql.run_batch(conn, batchsql.UPSERT_BLOCKS, rows)
        batchsql.run_batch(conn, batchsql.UPSERT_BLOCKS, [(a, 1, 20, 2.0, 0, 10)])
        batchsql.run_batch(conn, batchsql.COUNT_HITS, [(a, 0, 2), (a, 1, 9), (a, 7, 1)])
    got = conn.execute("SELECT idx, bytes, atime, queue, seq, freq FROM blocks ORDER BY idx")
    assert got.fetchall() == [(0, 10, 9.5, 1, 4, 2), (1, 20, 3.0, 0, 9, policy.MAX_FREQ)]
    _totals_agree(conn)
    assert batchsql.those_in(conn, batchsql.EXISTING, [1, 2, 0], a) == {0, 1}
    assert batchsql.those_in(conn, batchsql.EXISTING, [], a) == set()
    assert batchsql.those_in(conn, batchsql.VERSIONS_LEFT, [a, a + 1]) == {a}


def test_ghost_keys_of_any_size_are_found_and_dropped(conn: sqlite3.Connection) -> None:
    big = [policy.ghost_key("objects/ff/f/v.16", i) for i in (0, 2**25)]
    assert all(k >= 2**40 for k in big)
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        batchsql.run_batch(conn, batchsql.ADD_GHOSTS, [(k, n) for n, k in enumerate(big)])
        assert batchsql.those_in(conn, batchsql.GHOSTS_FOUND, [*big, 5]) == set(big)
        batchsql.run_batch(conn, batchsql.DELETE_GHOSTS, big[:1])
    assert batchsql.those_in(conn, batchsql.GHOSTS_FOUND, big) == {big[1]}
    _totals_agree(conn)


def test_the_reconcilers_batches(conn: sqlite3.Connection) -> None:
    name = "objects/aa/a/v.16"
    a = _put(conn, name, [(0, 10, 1, 1)])
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        schema.add_found(conn, a, [(0, 99, 5.0), (3, 16, 2.0), (4, 16, 7.0)])  # 0 is kept
        schema.add_found(conn, a, [])
    assert schema.rows_in(conn, a, range(0, 4)) == {0: (1.5, 10), 3: (2.0, 16)}
    assert schema.rows_in(conn, a, range(5, 9)) == {}
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        schema.resize_rows(conn, name, [(3, 12), (9, 1)])
        schema.delete_older(conn, a, [0, 3, 4], than=3.0)  # 4 is newer than the listing
        schema.delete_older(conn, a, [], than=3.0)
    assert schema.rows_in(conn, a, range(0, 10)) == {4: (7.0, 16)}
    _totals_agree(conn)
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        schema.resize_rows(conn, name, [(4, 12)])
    assert schema.rows_in(conn, a, range(0, 10)) == {4: (7.0, 12)}
    _totals_agree(conn)
    seqs = [r[0] for r in conn.execute("SELECT seq FROM blocks ORDER BY idx")]
    assert len(set(seqs)) == len(seqs)


BATCHES = {
    "UPSERT_BLOCKS": (batchsql.UPSERT_BLOCKS, ("[]",)),
    "COUNT_HITS": (batchsql.COUNT_HITS, ("[]",)),
    "EXISTING": (batchsql.EXISTING, (1, "[]")),
    "GHOSTS_FOUND": (batchsql.GHOSTS_FOUND, ("[]",)),
    "DELETE_GHOSTS": (batchsql.DELETE_GHOSTS, ("[]",)),
    "VERSIONS_LEFT": (batchsql.VERSIONS_LEFT, ("[]",)),
    "MOVE_BLOCKS": (batchsql.MOVE_BLOCKS, ("[]",)),
    "DELETE_BLOCKS": (batchsql.DELETE_BLOCKS, ("[]",)),
    "TO_PINNED_BLOCKS": (batchsql.TO_PINNED_BLOCKS, ("[]",)),
    "ADD_GHOSTS": (batchsql.ADD_GHOSTS, ("[]",)),
    "INSERT_FOUND": (schema.INSERT_FOUND, ("[]",)),
    "RESIZE_BLOCKS": (schema.RESIZE_BLOCKS, ("[]",)),
    "DELETE_BLOCKS_OLDER": (schema.DELETE_BLOCKS_OLDER, (1, 2.0, "[]")),
}


@pytest.mark.parametrize(("statement", "params"), BATCHES.values(), ids=BATCHES.keys())
def test_a_batch_looks_each_row_up_never_walks_a_table(
    conn: sqlite3.Connection, statement: str, params: tuple[object, ...]
) -> None:
    """SQLite walks the batch and finds each row by its key: a plan that walks
    the blocks (or a version's blocks) costs the table's size per batch, as
    the resize did when its version was a constant."""
    plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + statement, params)]
    for step in plan:
        assert not step.startswith("SCAN") or "json_each" in step or step.startswith("SCAN m ")
        if "blocks USING PRIMARY KEY" in step:
            assert "(version=? AND idx=?)" in step, step


def test_rows_come_back_with_their_exact_last_use(conn: sqlite3.Connection) -> None:
    """The reconciler compares a row's atime with a listing's time exactly:
    SQLite's JSON writes reals with 15 digits, a few µs off today's times."""
    now = [time.time() + n / 7 for n in range(50)]
    a = _put(conn, "objects/aa/a/v.16", [])
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        schema.add_found(conn, a, [(i, 16, t) for i, t in enumerate(now)])
        schema.add_found(conn, a, [(50, 16, 0.0), (51, 16, 1e-07)])
    got = schema.rows_in(conn, a, range(0, 52))
    assert [got[i][0] for i in range(52)] == [*now, 0.0, 1e-07]
