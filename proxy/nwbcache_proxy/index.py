"""LRU accounting of the cache in SQLite, shared by every daemon process.

The index answers "how big is the cache" and "which blocks were used least
recently"; it never answers "is this block cached" (the file does). It may
lag the files by a flush interval, and after a crash it may miss blocks or
list gone ones: ``reconcile`` repairs both, and a row without a file or a
file without a row never causes a wrong byte, only an imprecise size.

All SQLite work runs on one dedicated thread with its own connection, so the
event loop never blocks on the database and no connection crosses threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from . import store
from .layout import Layout

log = logging.getLogger(__name__)
T = TypeVar("T")

# Schema version, in SQLite's user_version. 1 (unnumbered, user_version 0)
# called the version column "object"; migrate() renames it.
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    path TEXT PRIMARY KEY,      -- the block file, relative to the layout root
    version TEXT NOT NULL,      -- its version dir, relative to the layout root
    bytes INTEGER NOT NULL,     -- file size on disk
    atime REAL NOT NULL         -- last use, seconds since the epoch
);
CREATE INDEX IF NOT EXISTS blocks_by_atime ON blocks(atime);
CREATE INDEX IF NOT EXISTS blocks_by_version ON blocks(version);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    bytes INTEGER NOT NULL,
    blocks INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
-- Totals kept by triggers: reading the cache size is O(1), not a SUM over
-- every row, which matters when each of several processes polls it.
CREATE TRIGGER IF NOT EXISTS blocks_ins AFTER INSERT ON blocks BEGIN
    UPDATE totals SET bytes = bytes + NEW.bytes, blocks = blocks + 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS blocks_del AFTER DELETE ON blocks BEGIN
    UPDATE totals SET bytes = bytes - OLD.bytes, blocks = blocks - 1 WHERE id = 0;
END;
"""

# Schema 1 -> 2: the column holding the version dir says so.
MIGRATE_1_TO_2 = """
ALTER TABLE blocks RENAME COLUMN object TO version;
DROP INDEX IF EXISTS blocks_by_object;
"""

UPSERT = (
    "INSERT INTO blocks(path, version, bytes, atime) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(path) DO UPDATE SET atime = max(atime, excluded.atime)"
)
# Adds rows for files found on disk, leaving rows already there as they are.
INSERT_FOUND = "INSERT OR IGNORE INTO blocks(path, version, bytes, atime) VALUES (?, ?, ?, ?)"
SELECT_PATHS = "SELECT path FROM blocks"
DELETE_PATH = "DELETE FROM blocks WHERE path = ?"

# How many rows one eviction transaction removes: bounded work per step, so
# other processes' writes are never locked out for long (diskcache's cull_limit).
EVICT_BATCH = 256
# An evicted block used more recently than this means the cache is too small
# for the working set (the "thrashing" alert counts these).
RECENT_USE = 600.0
# Pending index writes are flushed at this interval or at this many entries.
FLUSH_INTERVAL = 1.0
FLUSH_MAX_PENDING = 2000


@dataclasses.dataclass(frozen=True, slots=True)
class Totals:
    bytes: int
    blocks: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Pending:
    version: str
    bytes: int
    atime: float


class CacheIndex:
    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="nwbcache-index"
        )
        self._conn: sqlite3.Connection | None = None
        self._pending: dict[str, _Pending] = {}
        self._pending_bytes = 0
        self.last_totals = Totals(0, 0)

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        await self._run(self._open_sync)
        self.last_totals = await self._run(self._totals_sync)

    async def close(self) -> None:
        try:
            await self.flush()
            await self._run(self._close_sync)
        finally:
            self._executor.shutdown(wait=True)

    def _open_sync(self) -> None:
        self._layout.root.mkdir(parents=True, exist_ok=True)
        self._conn = connect(self._layout.index_path)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "index not open"
        return self._conn

    # -- recording use ---------------------------------------------------
    def record(self, path: str, version: str, nbytes: int) -> None:
        """Note a block (``path``, in version dir ``version``, both relative to the
        layout root) written or read now; written to SQLite on the next flush."""
        old = self._pending.get(path)
        if old is not None:
            self._pending_bytes -= old.bytes
        self._pending[path] = _Pending(version, nbytes, time.time())
        self._pending_bytes += nbytes

    @property
    def pending_bytes(self) -> int:
        """Bytes of the blocks recorded since the last flush (an upper bound of
        what the flush will add to the totals)."""
        return self._pending_bytes

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        self._pending_bytes = 0
        rows = [(path, p.version, p.bytes, p.atime) for path, p in batch.items()]

        def write() -> Totals:
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.executemany(UPSERT, rows)
            return self._totals_sync()

        self.last_totals = await self._run(write)

    async def forget_version(self, version: str) -> None:
        """Drop the rows of the blocks of one version dir."""
        for path in [p for p, v in self._pending.items() if v.version == version]:
            self._pending_bytes -= self._pending.pop(path).bytes

        def delete() -> None:
            with self.conn:
                self.conn.execute("DELETE FROM blocks WHERE version = ?", (version,))

        await self._run(delete)

    # -- size and eviction -------------------------------------------------
    def _totals_sync(self) -> Totals:
        row = self.conn.execute("SELECT bytes, blocks FROM totals WHERE id = 0").fetchone()
        return Totals(int(row[0]), int(row[1]))

    async def totals(self) -> Totals:
        self.last_totals = await self._run(self._totals_sync)
        return self.last_totals

    async def evict_to(self, target_bytes: int) -> tuple[int, int]:
        """Remove least-recently-used blocks until the index totals at most
        ``target_bytes``. Returns how many blocks were evicted, and how many of
        them had been used within RECENT_USE seconds (a sign of thrashing)."""
        await self.flush()
        return await self._run(lambda: self._evict_sync(target_bytes))

    def _evict_sync(self, target_bytes: int) -> tuple[int, int]:
        evicted = 0
        recent = 0
        recent_after = time.time() - RECENT_USE
        while True:
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                total = self._totals_sync().bytes
                if total <= target_bytes:
                    break
                candidates = self.conn.execute(
                    "SELECT path, bytes, atime FROM blocks ORDER BY atime LIMIT ?",
                    (EVICT_BATCH,),
                ).fetchall()
                if not candidates:
                    break
                # Only as many as it takes to reach the target: a batch is a
                # bound on work, not an amount to evict.
                rows = []
                for path, nbytes, atime in candidates:
                    rows.append((path, atime))
                    total -= nbytes
                    if total <= target_bytes:
                        break
                # Delete rows first, files after commit: two evicting processes
                # then never count the same block twice, and a crash in
                # between leaves only orphan files that reconcile re-adds.
                self.conn.executemany(DELETE_PATH, [(r[0],) for r in rows])
            for path, atime in rows:
                store.unlink_quietly(self._layout.root / path)
                recent += atime >= recent_after
            evicted += len(rows)
        self.last_totals = self._totals_sync()
        return evicted, recent

    async def top_versions(self, limit: int) -> list[tuple[str, int, int]]:
        """(version dir, bytes, blocks) of the versions taking most of the cache."""
        await self.flush()

        def query() -> list[tuple[str, int, int]]:
            rows = self.conn.execute(
                "SELECT version, SUM(bytes), COUNT(*) FROM blocks GROUP BY version "
                "ORDER BY 2 DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]

        return await self._run(query)

    # -- repair ----------------------------------------------------------
    async def reconcile(self) -> tuple[int, int] | None:
        """Make the index agree with the files. Returns (added, removed), or
        None when another process is already reconciling."""
        await self.flush()
        return await self._run(self._reconcile_sync)

    def _reconcile_sync(self) -> tuple[int, int] | None:
        fd = os.open(self._layout.reconcile_lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            started = time.time()
            files = store.walk_blocks(self._layout)
            on_disk = {path: (size, mtime) for path, size, mtime in files}
            in_index = indexed_paths(self.conn)
            missing = [
                (path, Layout.version_of_block(path), size, mtime)
                for path, (size, mtime) in on_disk.items()
                if path not in in_index
            ]
            # Rows for files that vanished. A file published after the walk
            # started is kept: its row may legitimately be newer than the walk.
            gone = [(path,) for path in in_index - on_disk.keys()]
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.executemany(UPSERT, missing)
                self.conn.executemany(
                    "DELETE FROM blocks WHERE path = ? AND atime < ?",
                    [(p, started) for (p,) in gone],
                )
            self.last_totals = self._totals_sync()
            return len(missing), len(gone)
        finally:
            os.close(fd)


# -- the same database, for tools that run beside the daemons (nwbcache check) --
def connect(path: Path) -> sqlite3.Connection:
    """A connection to the index at ``path``, created or migrated to SCHEMA_VERSION."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    migrate(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION, keeping every row."""
    with conn:
        conn.execute("BEGIN IMMEDIATE")  # two daemons starting at once: one migrates
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(blocks)")}
            if "object" in columns:
                _run_script(conn, MIGRATE_1_TO_2)
            _run_script(conn, SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the cache index has schema {version}, newer than this nwbcache "
                f"knows ({SCHEMA_VERSION}): upgrade nwbcache"
            )


def _run_script(conn: sqlite3.Connection, script: str) -> None:
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


def indexed_paths(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute(SELECT_PATHS)}


def add_found(conn: sqlite3.Connection, rows: list[tuple[str, str, int, float]]) -> None:
    """Rows (path, version, bytes, atime) for block files that have none."""
    conn.executemany(INSERT_FOUND, rows)


def delete_paths(conn: sqlite3.Connection, paths: list[str]) -> None:
    conn.executemany(DELETE_PATH, [(p,) for p in paths])
