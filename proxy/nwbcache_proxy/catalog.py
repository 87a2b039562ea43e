"""What the cache holds, object by object, from the index: for ``nwbcache ls`` and the admin API.

Functions on a connection from schema.connect, run on the index's thread
(index.CacheIndex.call). Versions carry their object's cache key from the
first flush of their use (index.record); a version without one (indexed by a
daemon before schema 4, or found on disk by the reconciler) gets it from its
object's meta.json the first time a report needs it (learn_keys).
"""

from __future__ import annotations

import dataclasses
import enum
import sqlite3
from typing import Any

from . import pins, schema, store
from .layout import Layout

# Versions whose keys one learn_keys step reads from meta.json.
LEARN_STEP = 1000
# A key that could not be learnt (meta.json gone or unreadable): not asked again.
UNKNOWN_KEY = ""

UNKEYED = "SELECT id, name FROM versions WHERE key IS NULL LIMIT ?"
SET_KEY = "UPDATE versions SET key = ?, size = coalesce(size, ?) WHERE id = ?"
_COLUMNS = "v.name, v.key, v.size, v.bytes, v.blocks, v.last_use, v.hits, v.pinned"
_FROM = "FROM versions AS v"


class Order(enum.StrEnum):
    """``nwbcache ls --sort``."""

    BYTES = "bytes"
    LAST_USE = "last-use"
    HITS = "hits"
    URL = "url"


_ORDER_BY = {
    Order.BYTES: "v.bytes DESC",
    Order.LAST_USE: "v.last_use DESC",
    Order.HITS: "v.hits DESC",
    Order.URL: "v.key",
}


@dataclasses.dataclass(slots=True)
class Entry:
    """One cached object: its versions' figures added up."""

    odir: str
    url: str | None  # the cache key (None: not known, its metadata is gone)
    cached_bytes: int = 0
    blocks: int = 0
    versions: int = 0
    last_use: float = 0.0
    hits: int = 0
    size: int | None = None  # the object's (None: not known)
    pinned: bool = False
    pin_expires: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def learn_keys(conn: sqlite3.Connection, layout: Layout, limit: int = LEARN_STEP) -> int:
    """Give up to ``limit`` versions without a cache key the one their meta.json
    names; returns how many were looked at (0: every version has one)."""
    rows = conn.execute(UNKEYED, (limit,)).fetchall()
    learnt = []
    for vid, name in rows:
        raw = store.read_meta(layout.meta_path_of_version(str(name))) or {}
        key, size = raw.get("cache_key"), raw.get("size")
        learnt.append(
            (
                key if isinstance(key, str) else UNKNOWN_KEY,
                size if isinstance(size, int) else None,
                int(vid),
            )
        )
    with conn:
        conn.executemany(SET_KEY, learnt)
    return len(rows)


def entries(
    conn: sqlite3.Connection,
    *,
    key: str | None = None,
    prefix: str | None = None,
    order: Order = Order.BYTES,
    limit: int | None = None,
) -> list[Entry]:
    """Cached objects (their cache key ``key``, or starting with ``prefix``, or
    all), in ``order``, at most ``limit`` versions read."""
    where, params = _where(key, prefix)
    sql = f"SELECT {_COLUMNS} {_FROM} {where} ORDER BY {_ORDER_BY[order]}"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    found: dict[str, Entry] = {}
    for name, k, size, nbytes, blocks, last_use, hits, pinned in conn.execute(sql, params):
        odir = schema.object_dir_of(str(name))
        entry = found.get(odir)
        if entry is None:
            entry = found[odir] = Entry(odir, str(k) if k else None)
        if size is not None:
            entry.size = int(size)  # two versions cached: one of their sizes
        entry.cached_bytes += int(nbytes)
        entry.blocks += int(blocks)
        entry.versions += 1
        entry.last_use = max(entry.last_use, float(last_use))
        entry.hits += int(hits)
        entry.pinned = entry.pinned or bool(pinned)
    for entry in found.values():
        if entry.pinned:
            pin = pins.pin_of(conn, entry.odir)
            if pin is not None:
                entry.pin_expires = pin.expires
    return list(found.values())


def object_dirs(conn: sqlite3.Connection, *, key: str | None, prefix: str | None) -> list[str]:
    """The object dirs of the cached objects with cache key ``key`` or under ``prefix``."""
    where, params = _where(key, prefix)
    rows = conn.execute(f"SELECT v.name {_FROM} {where}", params)
    return sorted({schema.object_dir_of(str(r[0])) for r in rows})


def _where(key: str | None, prefix: str | None) -> tuple[str, list[Any]]:
    if key is not None:
        return "WHERE v.key = ?", [key]
    if prefix is not None:
        # A range on versions_by_key: every string that starts with ``prefix``
        # sorts between it and it followed by the largest code point.
        return "WHERE v.key >= ? AND v.key < ?", [prefix, prefix + "\U0010ffff"]
    return "", []


DROP_SPAN = "DELETE FROM blocks WHERE version = ? AND idx >= ? AND idx < ?"


def versions_of(conn: sqlite3.Connection, odir: str) -> list[tuple[int, str, int]]:
    """(id, name, bytes) of the versions of the object in ``odir``."""
    rows = conn.execute(pins.VERSIONS_OF, (odir, odir))
    return [(int(i), str(n), int(b)) for i, n, b in rows]


def last_index(conn: sqlite3.Connection, vid: int) -> int | None:
    row = conn.execute(pins.MAX_INDEX, (vid,)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def drop_step(conn: sqlite3.Connection, vid: int, start: int, last: int) -> int | None:
    """Delete the rows of version ``vid``'s blocks [start, start + MOVE_SPAN);
    where the next step starts, or None past ``last`` (the last index when the
    drop began: a bound, so that rows added meanwhile cannot keep it going)."""
    end = start + pins.MOVE_SPAN
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(DROP_SPAN, (vid, start, end))
    return None if end > last else end
