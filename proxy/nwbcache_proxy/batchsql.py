"""The index's statements that take or give a whole batch of rows as one JSON array.

One statement step per batch, not one per row: Python's sqlite3 gives up the
GIL around every step (an ``executemany`` row, a fetched row), and each
hand-back waits for whichever thread holds it, up to the 5 ms switch
interval when the event loop is busy. Measured with a busy thread beside
it: a flush's per-row upsert took 4.8 ms a row, this one 6 us; in the
daemon, a fill of 4 KiB blocks at 60 MB/s had flushes of 3-6 s (eviction,
which waits for them, fell behind the fill) and a reconcile that never
ended. Eviction's deletes: 46,000 rows/s per row, 69,000 set-based. The
triggers of schema.py keep the totals as for any other statement.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from .policy import MAX_FREQ

# -- recording use (accounting.record), one version's rows at a time -------------
# Each [version id, index, bytes, atime, queue, seq]: a new row enters its
# queue; a row already there keeps its place and takes the later use.
UPSERT_BLOCKS = (
    "INSERT INTO blocks(version, idx, bytes, atime, queue, seq) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
    "json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]'), "
    "json_extract(value, '$[5]') FROM json_each(?) "
    "WHERE true ON CONFLICT(version, idx) DO UPDATE SET atime = max(atime, excluded.atime)"
)
# Each [version id, index, hits]: S3-FIFO's counter, capped.
COUNT_HITS = (
    f"UPDATE blocks SET freq = min({MAX_FREQ}, freq + json_extract(m.value, '$[2]')) "
    "FROM json_each(?) AS m WHERE blocks.version = json_extract(m.value, '$[0]') "
    "AND blocks.idx = json_extract(m.value, '$[1]')"
)
# Of a version's block indices, those with a row.
EXISTING = (
    "SELECT json_group_array(idx) FROM blocks "
    "WHERE version = ? AND idx IN (SELECT value FROM json_each(?))"
)
# Of ghost keys (policy.ghost_key), those the ghost list holds; and their removal.
GHOSTS_FOUND = (
    "SELECT json_group_array(key) FROM ghosts WHERE key IN (SELECT value FROM json_each(?))"
)
DELETE_GHOSTS = "DELETE FROM ghosts WHERE key IN (SELECT value FROM json_each(?))"
# Of version ids, those still with a row (a version's row goes with its last block).
VERSIONS_LEFT = (
    "SELECT json_group_array(id) FROM versions WHERE id IN (SELECT value FROM json_each(?))"
)

# -- eviction ----------------------------------------------------------------------
# S3-FIFO: the oldest blocks of one queue, each [seq, version id, index,
# bytes, atime, freq], and their versions, each [id, dir, pinned] (a block
# pinned since it entered its queue moves, never goes). A version's name
# once, not once a row: a tail is runs of a few versions' blocks.
QUEUE_TAIL = (
    "WITH t AS MATERIALIZED (SELECT seq, version, idx, bytes, atime, freq FROM blocks "
    "WHERE queue = ? ORDER BY seq LIMIT ?) "
    "SELECT (SELECT json_group_array(json_array(seq, version, idx, bytes, atime, freq)) FROM t), "
    "(SELECT json_group_array(json_array(id, name, pinned)) FROM versions "
    "WHERE id IN (SELECT version FROM t))"
)
# Each [queue, freq, seq, version id, index].
MOVE_BLOCKS = (
    "UPDATE blocks SET queue = json_extract(m.value, '$[0]'), "
    "freq = json_extract(m.value, '$[1]'), seq = json_extract(m.value, '$[2]') "
    "FROM json_each(?) AS m WHERE blocks.version = json_extract(m.value, '$[3]') "
    "AND blocks.idx = json_extract(m.value, '$[4]')"
)
# Each [version id, index].
DELETE_BLOCKS = (
    "DELETE FROM blocks WHERE (version, idx) IN "
    "(SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))"
)
TO_PINNED_BLOCKS = (
    "UPDATE blocks SET queue = 2 WHERE (version, idx) IN "
    "(SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))"
)
# Each [key, seq]. An update, not a replace, for a key already there: a
# replace's delete fires no trigger and the count would drift.
ADD_GHOSTS = (
    "INSERT INTO ghosts(key, seq) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?) "
    "WHERE true ON CONFLICT(key) DO UPDATE SET seq = excluded.seq"
)
# The least recently used blocks not in the pinned queue, with their version
# dir and whether it is pinned (eviction candidates), as one JSON array of
# [atime, version id, version dir, index, bytes, pinned]. ``queue < 2`` lets
# SQLite use the partial index. A row whose version has no row (none should)
# comes with a null dir, for the caller to delete: a join would leave it
# where it is, taking a place in every batch.
OLDEST = (
    "SELECT json_group_array(json_array(t.atime, t.version, v.name, t.idx, t.bytes, v.pinned)) "
    "FROM (SELECT atime, version, idx, bytes FROM blocks INDEXED BY blocks_by_atime_unpinned "
    "WHERE queue < 2 ORDER BY atime LIMIT ?) AS t LEFT JOIN versions AS v ON v.id = t.version"
)


def oldest(conn: sqlite3.Connection, limit: int) -> list[list[Any]]:
    """OLDEST's rows, least recently used first."""
    rows: list[list[Any]] = json.loads(conn.execute(OLDEST, (limit,)).fetchone()[0])
    rows.sort(key=_first)  # json_group_array's order is not promised
    return rows


def queue_tail(
    conn: sqlite3.Connection, queue: int, limit: int
) -> tuple[list[list[Any]], dict[int, tuple[str, bool]]]:
    """The oldest ``limit`` blocks of ``queue`` (QUEUE_TAIL's rows, oldest
    first), and version id -> (dir, pinned) of their versions (a row whose
    version has no row, which none should, is missing from it)."""
    rows_text, versions_text = conn.execute(QUEUE_TAIL, (queue, limit)).fetchone()
    rows: list[list[Any]] = json.loads(rows_text)
    rows.sort(key=_first)  # json_group_array's order is not promised
    names = {int(i): (str(n), bool(p)) for i, n, p in json.loads(versions_text)}
    return rows, names


def _first(row: list[Any]) -> Any:
    return row[0]


def run_batch(conn: sqlite3.Connection, statement: str, rows: Sequence[Any], *first: Any) -> None:
    """One step of a statement that takes a batch of rows as a JSON array (its
    last parameter; ``first``: those before it). Nothing for no rows."""
    if rows:
        conn.execute(statement, (*first, json.dumps(rows)))


def those_in(
    conn: sqlite3.Connection, statement: str, items: Sequence[int], *first: Any
) -> set[int]:
    """The items a statement that answers with a JSON array of them (EXISTING,
    GHOSTS_FOUND, VERSIONS_LEFT) finds; ``first``: its parameters before the batch."""
    if not items:
        return set()
    found = conn.execute(statement, (*first, json.dumps(items))).fetchone()[0]
    return {int(i) for i in json.loads(found)}
