"""Pins and the admin API's view of the index: objects listed, pinned, unpinned.

Functions on a connection from schema.connect, each one bounded transaction,
run on the index's thread (index.CacheIndex.call). A pin is a row of
``pins`` (by object dir, so every version of the object is kept) and a mark
on the object's versions; their blocks then live in the pinned queue, which
no eviction reads. Moving blocks between queues goes a range of block
indices at a time, so a 100 GB object never holds the index for long; an
unpin under way is written down (``state``) and resumed after a crash, so no
block is left pinned for an object that is not. A pin under way needs no
such note: eviction moves a pinned version's block it meets, never evicts it.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time

from . import schema

# Block indices one move step covers (rows in one transaction).
MOVE_SPAN = 8192

PIN = (
    "INSERT INTO pins(odir, key, size, created, expires) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(odir) DO UPDATE SET expires = excluded.expires, key = excluded.key"
)
PIN_OF = "SELECT key, size, created, expires FROM pins WHERE odir = ?"
PINNED_SIZE = "SELECT coalesce(sum(size), 0), count(*) FROM pins"
UNPIN = "DELETE FROM pins WHERE odir = ?"
PINS = "SELECT odir, key, size, created, expires FROM pins ORDER BY key"
EXPIRED = "SELECT odir FROM pins WHERE expires IS NOT NULL AND expires <= ? LIMIT ?"
# A version dir's name is ``<odir>/<vd>.<bs>``: ``/`` sorts just before ``0``,
# so one range on the UNIQUE index finds an object's versions.
VERSIONS_OF = "SELECT id, name, bytes FROM versions WHERE name > ? || '/' AND name < ? || '0'"
MARK_PINNED = "UPDATE versions SET pinned = ? WHERE name > ? || '/' AND name < ? || '0'"
MAX_INDEX = "SELECT max(idx) FROM blocks WHERE version = ?"
# Each move checks the version's mark in its own transaction: an unpin (or a
# pin) that landed between two steps of the other wins, and no block of an
# unpinned version is moved into the pinned queue after its unpin.
TO_PINNED_SPAN = (
    "UPDATE blocks SET queue = 2 WHERE version = ?1 AND idx >= ?2 AND idx < ?3 AND queue < 2 "
    "AND (SELECT pinned FROM versions WHERE id = ?1) = 1"
)
# Unpinned blocks re-enter main at its head (they were being kept: a
# working set, as a migrated cache's blocks are), in index order.
FROM_PINNED_SPAN = (
    "UPDATE blocks SET queue = 1, freq = 0, seq = ?4 + idx "
    "WHERE version = ?1 AND idx >= ?2 AND idx < ?3 AND queue = 2 "
    "AND (SELECT pinned FROM versions WHERE id = ?1) = 0"
)
UNPINNING = "SELECT key, value FROM state WHERE key LIKE 'unpin:%'"


class PinLimit(Exception):
    """A pin would take the pinned bytes over --pin-limit."""

    def __init__(self, size: int, pinned: int, limit: int) -> None:
        super().__init__(
            f"pinning {size:,} more bytes would take the pinned total to {pinned + size:,} "
            f"bytes, over --pin-limit ({limit:,} bytes): unpin something or raise the limit"
        )
        self.size, self.pinned, self.limit = size, pinned, limit


@dataclasses.dataclass(frozen=True, slots=True)
class Pin:
    odir: str
    key: str
    size: int
    created: float
    expires: float | None


def pin(
    conn: sqlite3.Connection,
    objects: list[tuple[str, str, int]],
    *,
    expires: float | None,
    limit: int,
    now: float | None = None,
) -> list[tuple[bool, list[int]]]:
    """Pin the objects (object dir, cache key, size) in one transaction, renewing
    the expiry of those pinned already. Raises PinLimit, pinning nothing, when
    the new ones would take the pinned total over ``limit`` bytes. Returns per
    object whether its pin is new and its versions' ids, whose blocks the
    caller moves to the pinned queue (move_step)."""
    done = []
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        new = {o for o, _, _ in objects if conn.execute(PIN_OF, (o,)).fetchone() is None}
        adding = sum({o: s for o, _, s in objects if o in new}.values())
        pinned = int(conn.execute(PINNED_SIZE).fetchone()[0])
        if new and pinned + adding > limit:
            raise PinLimit(adding, pinned, limit)
        now = time.time() if now is None else now
        for odir, key, size in objects:
            conn.execute(PIN, (odir, key, size, now, expires))
            conn.execute(MARK_PINNED, (1, odir, odir))
            vids = [int(r[0]) for r in conn.execute(VERSIONS_OF, (odir, odir))]
            done.append((odir in new, vids))
    return done


def unpin(conn: sqlite3.Connection, odir: str) -> tuple[bool, list[int]]:
    """Unpin the object in ``odir``; whether it was pinned, and its versions' ids,
    whose blocks the caller moves back (move_step), noted for resume_unpins."""
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        was = conn.execute(UNPIN, (odir,)).rowcount > 0
        conn.execute(MARK_PINNED, (0, odir, odir))
        vids = [int(r[0]) for r in conn.execute(VERSIONS_OF, (odir, odir))]
        for vid in vids:
            conn.execute(schema.SET_STATE, (f"unpin:{vid}", "0"))
    return was, vids


def move_step(conn: sqlite3.Connection, vid: int, start: int, *, to_pinned: bool) -> int | None:
    """Move the blocks of version ``vid`` with indices in [start, start +
    MOVE_SPAN) into (or out of) the pinned queue. Returns where the next step
    starts, or None when the version is done."""
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(MAX_INDEX, (vid,)).fetchone()
        last = None if row is None or row[0] is None else int(row[0])
        end = start + MOVE_SPAN
        if last is not None and start <= last:
            if to_pinned:
                conn.execute(TO_PINNED_SPAN, (vid, start, end))
            else:
                first = schema.take_seq(conn, MOVE_SPAN)
                conn.execute(FROM_PINNED_SPAN, (vid, start, end, first - start))
        done = last is None or end > last
        if not to_pinned:
            if done:
                conn.execute(schema.CLEAR_STATE, (f"unpin:{vid}",))
            else:
                conn.execute(schema.SET_STATE, (f"unpin:{vid}", str(end)))
    return None if done else end


def unpins_under_way(conn: sqlite3.Connection) -> list[tuple[int, int]]:
    """(version id, next block index) of unpins a stop interrupted."""
    return [(int(k.partition(":")[2]), int(v)) for k, v in conn.execute(UNPINNING)]


def expired(conn: sqlite3.Connection, now: float, limit: int = 100) -> list[str]:
    return [str(r[0]) for r in conn.execute(EXPIRED, (now, limit))]


def pins(conn: sqlite3.Connection) -> list[Pin]:
    return [
        Pin(str(o), str(k), int(s), float(c), None if e is None else float(e))
        for o, k, s, c, e in conn.execute(PINS)
    ]


def pinned_size(conn: sqlite3.Connection) -> tuple[int, int]:
    """(bytes the pins count against --pin-limit, pins)."""
    size, count = conn.execute(PINNED_SIZE).fetchone()
    return int(size), int(count)


def pin_of(conn: sqlite3.Connection, odir: str) -> Pin | None:
    row = conn.execute(PIN_OF, (odir,)).fetchone()
    if row is None:
        return None
    key, size, created, expires = row
    expiry = None if expires is None else float(expires)
    return Pin(odir, str(key), int(size), float(created), expiry)
