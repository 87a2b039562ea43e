"""The index database: its schema, migrations, and every SQL statement.

One owner for the SQL: the daemon's index (index.py), the reconciler
(reconcile.py) and ``nwbcache check`` all go through here; the batch
statements of recording use and eviction are batchsql.py's.
docs/on-disk-format.md describes the schema and its history.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from . import batchsql

# Schema version, in SQLite's user_version. 1 (user_version 0) called the
# version column "object"; 2 keyed rows by the block's path (578 B a row at a
# million rows); 3 keys them by (version id, block index) and keeps totals per
# version, so reports never scan the table; 4 adds pins (a queue eviction
# never reads, and the pins table), and per version its cache key, last use
# and hits, so the admin API lists and matches objects from the index alone;
# 5 is cache format 3's (a row's bytes are its block's; a trigger keeps the
# totals as rows' bytes change); 6 counts versions (footprint.py) in the totals.
SCHEMA_VERSION = 6

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a stale id names nothing
    name TEXT NOT NULL UNIQUE,             -- the version dir, relative to the layout root
    bytes INTEGER NOT NULL DEFAULT 0,      -- kept by the triggers below
    blocks INTEGER NOT NULL DEFAULT 0,
    key TEXT,                              -- the object's cache key; NULL until a process says
    size INTEGER,                          -- the object's size, with the key
    last_use REAL NOT NULL DEFAULT 0,      -- the newest block use a flush stored
    hits INTEGER NOT NULL DEFAULT 0,       -- blocks served to clients that did not fetch them
    pinned INTEGER NOT NULL DEFAULT 0      -- 1 while its object has a row in pins
);
CREATE INDEX IF NOT EXISTS versions_by_bytes ON versions(bytes);
CREATE INDEX IF NOT EXISTS versions_by_key ON versions(key);
CREATE TABLE IF NOT EXISTS blocks (
    version INTEGER NOT NULL,              -- versions.id
    idx INTEGER NOT NULL,                  -- block index within the object
    bytes INTEGER NOT NULL,                -- the block's length
    atime REAL NOT NULL,                   -- last use, seconds since the epoch (LRU)
    queue INTEGER NOT NULL DEFAULT 0,      -- 0 small, 1 main (S3-FIFO), 2 pinned (policy.Queue)
    freq INTEGER NOT NULL DEFAULT 0,       -- S3-FIFO: hits, 0 to 3
    seq INTEGER NOT NULL DEFAULT 0,        -- S3-FIFO: order of entry into its queue
    PRIMARY KEY (version, idx)
) WITHOUT ROWID;
-- LRU's order, pinned blocks left out: eviction never walks past them.
CREATE INDEX IF NOT EXISTS blocks_by_atime_unpinned ON blocks(atime) WHERE queue < 2;
CREATE INDEX IF NOT EXISTS blocks_by_queue ON blocks(queue, seq);
-- S3-FIFO's ghost list: blocks evicted from the small queue, by policy.ghost_key.
CREATE TABLE IF NOT EXISTS ghosts (key INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ghosts_by_seq ON ghosts(seq);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    bytes INTEGER NOT NULL,
    blocks INTEGER NOT NULL,
    small_bytes INTEGER NOT NULL DEFAULT 0,  -- in the small queue
    small_blocks INTEGER NOT NULL DEFAULT 0,
    ghosts INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL DEFAULT 0,          -- the last queue position handed out
    pinned_bytes INTEGER NOT NULL DEFAULT 0, -- in the pinned queue
    pinned_blocks INTEGER NOT NULL DEFAULT 0,
    versions INTEGER NOT NULL DEFAULT 0      -- rows in versions
);
INSERT OR IGNORE INTO totals(id, bytes, blocks) VALUES (0, 0, 0);
-- Objects kept whatever the policy says (nwbcache pin), by object dir.
CREATE TABLE IF NOT EXISTS pins (
    odir TEXT PRIMARY KEY,                 -- objects/<kh[0:2]>/<kh>, relative to the layout root
    key TEXT NOT NULL,                     -- the object's cache key
    size INTEGER NOT NULL,                 -- the object's size when pinned: what --pin-limit counts
    created REAL NOT NULL,
    expires REAL                           -- NULL: until unpinned
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pins_by_expiry ON pins(expires) WHERE expires IS NOT NULL;
-- Work in progress that must survive a crash: the reconciler's cursor.
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Totals kept by triggers: the cache's size, a version's and a queue's are
-- O(1) reads. A version's row goes with its last block, so the table lists
-- what is cached.
CREATE TRIGGER IF NOT EXISTS blocks_ins AFTER INSERT ON blocks BEGIN
    UPDATE totals SET bytes = bytes + NEW.bytes, blocks = blocks + 1,
        small_bytes = small_bytes + NEW.bytes * (NEW.queue = 0),
        small_blocks = small_blocks + (NEW.queue = 0),
        pinned_bytes = pinned_bytes + NEW.bytes * (NEW.queue = 2),
        pinned_blocks = pinned_blocks + (NEW.queue = 2) WHERE id = 0;
    UPDATE versions SET bytes = bytes + NEW.bytes, blocks = blocks + 1 WHERE id = NEW.version;
END;
CREATE TRIGGER IF NOT EXISTS blocks_del AFTER DELETE ON blocks BEGIN
    UPDATE totals SET bytes = bytes - OLD.bytes, blocks = blocks - 1,
        small_bytes = small_bytes - OLD.bytes * (OLD.queue = 0),
        small_blocks = small_blocks - (OLD.queue = 0),
        pinned_bytes = pinned_bytes - OLD.bytes * (OLD.queue = 2),
        pinned_blocks = pinned_blocks - (OLD.queue = 2) WHERE id = 0;
    UPDATE versions SET bytes = bytes - OLD.bytes, blocks = blocks - 1 WHERE id = OLD.version;
    DELETE FROM versions WHERE id = OLD.version AND blocks <= 0;
END;
CREATE TRIGGER IF NOT EXISTS blocks_queue AFTER UPDATE OF queue ON blocks
WHEN OLD.queue != NEW.queue BEGIN
    UPDATE totals SET
        small_bytes = small_bytes + NEW.bytes * (NEW.queue = 0) - OLD.bytes * (OLD.queue = 0),
        small_blocks = small_blocks + (NEW.queue = 0) - (OLD.queue = 0),
        pinned_bytes = pinned_bytes + NEW.bytes * (NEW.queue = 2) - OLD.bytes * (OLD.queue = 2),
        pinned_blocks = pinned_blocks + (NEW.queue = 2) - (OLD.queue = 2) WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS blocks_bytes AFTER UPDATE OF bytes ON blocks
WHEN OLD.bytes != NEW.bytes BEGIN
    UPDATE totals SET bytes = bytes + NEW.bytes - OLD.bytes,
        small_bytes = small_bytes + (NEW.bytes - OLD.bytes) * (NEW.queue = 0),
        pinned_bytes = pinned_bytes + (NEW.bytes - OLD.bytes) * (NEW.queue = 2) WHERE id = 0;
    UPDATE versions SET bytes = bytes + NEW.bytes - OLD.bytes WHERE id = NEW.version;
END;
CREATE TRIGGER IF NOT EXISTS versions_ins AFTER INSERT ON versions
BEGIN UPDATE totals SET versions = versions + 1 WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS versions_del AFTER DELETE ON versions
BEGIN UPDATE totals SET versions = versions - 1 WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS ghosts_ins AFTER INSERT ON ghosts BEGIN
    UPDATE totals SET ghosts = ghosts + 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS ghosts_del AFTER DELETE ON ghosts BEGIN
    UPDATE totals SET ghosts = ghosts - 1 WHERE id = 0;
END;
"""

# Schema 1 -> 2: the column holding the version dir says so.
MIGRATE_1_TO_2 = """
ALTER TABLE blocks RENAME COLUMN object TO version;
DROP INDEX IF EXISTS blocks_by_object;
"""

# Schema 2 -> 3: rows keyed by (version id, index); every row and its access
# time kept, in S3-FIFO's main queue in LRU order (a warm cache is the
# established working set). The old tables' indexes and triggers move with
# the renames, so they are dropped first to free their names.
MIGRATE_2_TO_3_BEFORE = """
ALTER TABLE totals RENAME TO totals_2;
DROP TRIGGER IF EXISTS blocks_ins;
DROP TRIGGER IF EXISTS blocks_del;
DROP INDEX IF EXISTS blocks_by_atime;
DROP INDEX IF EXISTS blocks_by_version;
ALTER TABLE blocks RENAME TO blocks_2;
"""
MIGRATE_2_TO_3_AFTER = """
DROP TABLE totals_2;
INSERT OR IGNORE INTO versions(name) SELECT DISTINCT version FROM blocks_2;
INSERT OR IGNORE INTO blocks(version, idx, bytes, atime, queue, freq, seq)
    SELECT v.id, CAST(substr(b.path, length(b.version) + 2) AS INTEGER), b.bytes, b.atime,
        1, 0, row_number() OVER (ORDER BY b.atime)
    FROM blocks_2 AS b JOIN versions AS v ON v.name = b.version;
UPDATE totals SET seq = (SELECT count(*) FROM blocks) WHERE id = 0;
DROP TABLE blocks_2;
"""

# Schema 3 -> 4: new columns, the pins table, pinned totals in the triggers
# (dropped here, created again by SCHEMA) and LRU's index without pinned rows.
# Nothing is pinned yet, so no total needs computing; cache keys are learnt as
# processes use the versions, or from meta.json when a report needs them.
MIGRATE_3_TO_4 = """
DROP TRIGGER IF EXISTS blocks_ins;
DROP TRIGGER IF EXISTS blocks_del;
DROP TRIGGER IF EXISTS blocks_queue;
DROP INDEX IF EXISTS blocks_by_atime;
ALTER TABLE versions ADD COLUMN key TEXT;
ALTER TABLE versions ADD COLUMN size INTEGER;
ALTER TABLE versions ADD COLUMN last_use REAL NOT NULL DEFAULT 0;
ALTER TABLE versions ADD COLUMN hits INTEGER NOT NULL DEFAULT 0;
ALTER TABLE versions ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN pinned_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN pinned_blocks INTEGER NOT NULL DEFAULT 0;
"""

# Schema 5 -> 6 (3, 4 on their way): the totals count the versions (SCHEMA's triggers).
MIGRATE_5_TO_6 = "ALTER TABLE totals ADD COLUMN versions INTEGER NOT NULL DEFAULT 0"
COUNT_VERSIONS = "UPDATE totals SET versions = (SELECT count(*) FROM versions) WHERE id = 0"

# A new version of a pinned object is pinned from its first block.
ENSURE_VERSION = (
    "INSERT INTO versions(name, pinned) VALUES (?, EXISTS(SELECT 1 FROM pins WHERE odir = ?)) "
    "ON CONFLICT(name) DO NOTHING"
)
VERSION_ID = "SELECT id, pinned FROM versions WHERE name = ?"
# What a flush learnt of a version besides its blocks.
VERSION_USE = (
    "UPDATE versions SET last_use = max(last_use, ?), hits = hits + ?, "
    "key = coalesce(nullif(key, ''), ?), size = coalesce(size, ?) WHERE id = ?"
)
VERSION_NAMES = "SELECT id, name FROM versions WHERE id > ? ORDER BY id LIMIT ?"
# The reconciler's statements take and give a batch as one JSON array: one
# statement step, not one per row, each of which gives up the GIL and waits to
# get it back from a busy event loop (batchsql.py says why and what it cost).
# Rows for files found on disk, each [version id, index, bytes, atime, seq];
# rows already there are left as they are.
INSERT_FOUND = (
    "INSERT OR IGNORE INTO blocks(version, idx, bytes, atime, queue, seq) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
    "json_extract(value, '$[2]'), json_extract(value, '$[3]'), 0, json_extract(value, '$[4]') "
    "FROM json_each(?)"
)
# Hands out ``?`` queue positions: the last one is returned.
TAKE_SEQ = "UPDATE totals SET seq = seq + ? WHERE id = 0 RETURNING seq"
QUEUE_TOTALS = (
    "SELECT bytes, small_bytes, blocks, small_blocks, ghosts, pinned_bytes, versions "
    "FROM totals WHERE id = 0"
)
TRIM_GHOSTS = "DELETE FROM ghosts WHERE key IN (SELECT key FROM ghosts ORDER BY seq LIMIT ?)"
# Each [version id, index, bytes]: the version from the batch too, so that
# SQLite walks the batch and looks each row up (with it a constant, it
# walked the version's rows and the batch for each).
RESIZE_BLOCKS = (
    "UPDATE blocks SET bytes = json_extract(m.value, '$[2]') FROM json_each(?) AS m "
    "WHERE blocks.version = json_extract(m.value, '$[0]') "
    "AND blocks.idx = json_extract(m.value, '$[1]')"
)
# Only rows older than a listing: a newer row may be of a file published since.
DELETE_BLOCKS_OLDER = (
    "DELETE FROM blocks WHERE version = ? AND atime < ? AND idx IN (SELECT value FROM json_each(?))"
)
DELETE_VERSION = "DELETE FROM blocks WHERE version = (SELECT id FROM versions WHERE name = ?)"
DELETE_VERSION_ID = "DELETE FROM blocks WHERE version = ?"
# atime with 17 digits: SQLite's JSON writes a real with 15, a few µs off
# today's times, and the caller compares it with a listing's time exactly.
ROWS_IN = (
    "SELECT json_group_array(json_array(idx, json(printf('%!.17g', atime)), bytes)) "
    "FROM blocks WHERE version = ? AND idx >= ? AND idx < ?"
)
TOTALS = "SELECT bytes, blocks FROM totals WHERE id = 0"
TOP_VERSIONS = "SELECT name, bytes, blocks FROM versions ORDER BY bytes DESC LIMIT ?"
GET_STATE = "SELECT value FROM state WHERE key = ?"
SET_STATE = "INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)"
CLEAR_STATE = "DELETE FROM state WHERE key = ?"

WAL_LIMIT = 4 * 1024 * 1024
# The reconciler's cursor (reconcile.py): present while a reconcile is due.
RECONCILE = "reconcile"


# The oldest SQLite with every statement here: RETURNING (TAKE_SEQ) and a
# MATERIALIZED common table expression (QUEUE_TAIL) came in 3.35.0 (2021).
MIN_SQLITE = (3, 35, 0)


def require_sqlite(found: tuple[int, int, int]) -> None:
    """A clear error if this Python's SQLite (``found``) is older than MIN_SQLITE."""
    if found < MIN_SQLITE:
        need, have = (".".join(map(str, v)) for v in (MIN_SQLITE, found))
        raise RuntimeError(
            f"nwbcache's index needs SQLite {need} or newer; this Python has {have} "
            "(a newer Python, or one built against a newer libsqlite3, has it)"
        )


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the index at ``path``, created or migrated to SCHEMA_VERSION.

    A new index, or one migrated from a schema without a reconciler, is
    marked for reconciling: the files on disk are the truth it must learn.
    """
    require_sqlite(sqlite3.sqlite_version_info)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("SELECT json_array()")  # built in from 3.38; optional before
    except sqlite3.OperationalError:
        conn.close()
        raise RuntimeError(
            "nwbcache's index needs SQLite's JSON functions; this Python's SQLite "
            f"{sqlite3.sqlite_version} was built without them"
        ) from None
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    # The WAL is truncated back to this after a checkpoint: it sits in the cache
    # dir beside the blocks and would otherwise keep its largest size.
    conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
    migrate(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION, keeping every row."""
    with conn:
        conn.execute("BEGIN IMMEDIATE")  # two daemons starting at once: one migrates
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the cache index has schema {version}, newer than this nwbcache "
                f"knows ({SCHEMA_VERSION}): upgrade nwbcache"
            )
        if version == SCHEMA_VERSION:
            return
        if version in (3, 4, 5):  # rows kept
            if version == 3:
                run_script(conn, MIGRATE_3_TO_4)
            conn.execute(MIGRATE_5_TO_6)
            run_script(conn, SCHEMA)
            conn.execute(COUNT_VERSIONS)
            if version < 5:  # the reconciler moves format 2's blocks
                conn.execute(SET_STATE, (RECONCILE, ""))
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        columns = {row[1] for row in conn.execute("PRAGMA table_info(blocks)")}
        if "object" in columns:
            run_script(conn, MIGRATE_1_TO_2)
            columns = (columns - {"object"}) | {"version"}
        old = "path" in columns
        if old:
            run_script(conn, MIGRATE_2_TO_3_BEFORE)
        run_script(conn, SCHEMA)
        if old:
            run_script(conn, MIGRATE_2_TO_3_AFTER)
        conn.execute(COUNT_VERSIONS)
        conn.execute(SET_STATE, (RECONCILE, ""))
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def run_script(conn: sqlite3.Connection, script: str) -> None:
    """Statements one by one: executescript would commit the open transaction."""
    for statement in _statements(script):
        conn.execute(statement)


def _statements(script: str) -> list[str]:
    """The statements of a script (sqlite3.complete_statement keeps triggers whole)."""
    out: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--") and not current:
            continue
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out


def version_id(conn: sqlite3.Connection, name: str, *, create: bool) -> int | None:
    """The id of version dir ``name``; created if asked (inside a transaction)."""
    row = version_row(conn, name, create=create)
    return None if row is None else row[0]


def version_row(conn: sqlite3.Connection, name: str, *, create: bool) -> tuple[int, bool] | None:
    """(id, pinned) of version dir ``name``; created if asked (inside a
    transaction), pinned from the start when its object is."""
    if create:
        conn.execute(ENSURE_VERSION, (name, object_dir_of(name)))
    row = conn.execute(VERSION_ID, (name,)).fetchone()
    return None if row is None else (int(row[0]), bool(row[1]))


def object_dir_of(version_name: str) -> str:
    """The object dir (``objects/<kh[0:2]>/<kh>``) of a version dir's name."""
    return version_name.rpartition("/")[0]


def totals(conn: sqlite3.Connection) -> tuple[int, int]:
    row = conn.execute(TOTALS).fetchone()
    return int(row[0]), int(row[1])


def rows_in(conn: sqlite3.Connection, vid: int, indices: range) -> dict[int, tuple[float, int]]:
    """Block index -> (atime, bytes) of the rows of version ``vid`` within ``indices``."""
    found = conn.execute(ROWS_IN, (vid, indices.start, indices.stop)).fetchone()[0]
    return {int(i): (float(a), int(n)) for i, a, n in json.loads(found)}


def take_seq(conn: sqlite3.Connection, count: int) -> int:
    """The first of ``count`` new queue positions (inside a transaction)."""
    last = int(conn.execute(TAKE_SEQ, (count,)).fetchone()[0])
    return last - count + 1


def add_found(conn: sqlite3.Connection, vid: int, found: Iterable[tuple[int, int, float]]) -> None:
    """Rows (index, bytes, atime) of version ``vid`` for files that have none:
    into the small queue, as any block nobody has hit yet."""
    rows = list(found)
    if not rows:
        return
    first = take_seq(conn, len(rows))
    batch = [(vid, i, b, a, first + n) for n, (i, b, a) in enumerate(rows)]
    batchsql.run_batch(conn, INSERT_FOUND, batch)


def resize_rows(conn: sqlite3.Connection, name: str, blocks: Iterable[tuple[int, int]]) -> None:
    """Rows (index, bytes) of version ``name`` that now take ``bytes`` (format 2's
    rows counted a block file's header); inside the caller's transaction."""
    vid = version_id(conn, name, create=False)
    if vid is not None:
        batchsql.run_batch(conn, RESIZE_BLOCKS, [(vid, i, n) for i, n in blocks])


def delete_older(conn: sqlite3.Connection, vid: int, indices: Iterable[int], than: float) -> None:
    batchsql.run_batch(conn, DELETE_BLOCKS_OLDER, list(indices), vid, than)


def get_state(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute(GET_STATE, (key,)).fetchone()
    return None if row is None else str(row[0])
