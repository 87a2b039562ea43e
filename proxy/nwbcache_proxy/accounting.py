"""The index's writes on its thread: recording use, choosing blocks to evict (LRU, S3-FIFO).

Each function is one bounded transaction on a connection from schema.connect;
policy.py says what the S3-FIFO steps do, schema.py and batchsql.py own the
statements.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections import Counter
from collections.abc import Iterable

from . import batchsql, policy, schema
from .policy import Fate, Queue
from .usage import Hits, Pending

# Rows of a queue's tail read at a time during an S3-FIFO slice.
_TAIL_READ = 1024


@dataclasses.dataclass(slots=True)
class Stats:
    """What the policy did in this process since the metrics last took it."""

    admitted: Counter[str] = dataclasses.field(default_factory=Counter)  # small, main, ghost
    evicted: Counter[str] = dataclasses.field(default_factory=Counter)  # small, main, lru
    promoted: int = 0  # small -> main, hit while in small


Victim = tuple[str, int, float]  # (version dir, index, last use)


@dataclasses.dataclass(slots=True)
class Slice:
    """One eviction transaction: the blocks whose rows it deleted (their files
    are the caller's to unlink), their bytes, and how many blocks it looked at
    (S3-FIFO moves some instead of evicting them)."""

    chosen: list[Victim] = dataclasses.field(default_factory=list)
    freed: int = 0
    looked: int = 0
    emptied: list[str] = dataclasses.field(default_factory=list)  # versions left with no block


def record(
    conn: sqlite3.Connection,
    pending: Pending,
    hits: Hits,
    stats: Stats,
    keys: dict[str, tuple[str, int]] | None = None,
) -> None:
    """Store the use of blocks: new rows, of blocks written, enter their queue
    (policy.admit), existing ones get their access time, hit blocks their
    counter. A block only read makes no row: it may be one an eviction took
    and has not punched out yet (a reconcile adds rows of blocks a crash left
    without). Per version, its last
    use, its hits and (``keys``: version dir -> (cache key, object size)) its
    object's key and size if the index has none yet. One transaction."""
    keys = keys or {}
    by_version: dict[str, list[tuple[int, int, float]]] = {}
    written: set[tuple[str, int]] = set()
    for (version, index), (nbytes, atime, wrote) in pending.items():
        by_version.setdefault(version, []).append((index, nbytes, atime))
        if wrote:
            written.add((version, index))
    by_hit: dict[str, list[tuple[int, int]]] = {}
    for (version, index), count in hits.items():
        by_hit.setdefault(version, []).append((index, count))
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        ghosts = int(conn.execute(schema.QUEUE_TOTALS).fetchone()[4])
        for version, rows in by_version.items():
            found = schema.version_row(conn, version, create=True)
            assert found is not None
            vid, pinned = found
            known = _existing(conn, vid, [i for i, _, _ in rows])
            new = [r for r in rows if r[0] not in known and (version, r[0]) in written]
            remembered = _ghosts(conn, version, [i for i, _, _ in new]) if ghosts else set()
            params = [(vid, i, b, a, 0, 0) for i, b, a in rows if i in known]
            if new:
                first = schema.take_seq(conn, len(new))
                for n, (i, b, a) in enumerate(new):
                    queue = policy.admit(i, ghost=i in remembered, pinned=pinned)
                    stats.admitted["ghost" if i in remembered else queue.name.lower()] += 1
                    params.append((vid, i, b, a, int(queue), first + n))
            batchsql.run_batch(conn, batchsql.UPSERT_BLOCKS, params)
            batchsql.run_batch(
                conn, batchsql.DELETE_GHOSTS, [policy.ghost_key(version, i) for i in remembered]
            )
            counts = by_hit.pop(version, [])
            _count_hits(conn, vid, counts)
            version_hits = sum(c for _, c in counts)
            last_use = max(a for _, _, a in rows)
            key, size = keys.get(version, (None, None))
            conn.execute(schema.VERSION_USE, (last_use, version_hits, key, size, vid))
        for version, counts in by_hit.items():  # hits on versions with no new use
            hit_vid = schema.version_id(conn, version, create=False)
            if hit_vid is not None:
                _count_hits(conn, hit_vid, counts)
                total = sum(c for _, c in counts)
                key, size = keys.get(version, (None, None))
                conn.execute(schema.VERSION_USE, (0.0, total, key, size, hit_vid))


def _count_hits(conn: sqlite3.Connection, vid: int, counts: Iterable[tuple[int, int]]) -> None:
    batchsql.run_batch(conn, batchsql.COUNT_HITS, [(vid, i, c) for i, c in counts])


def _existing(conn: sqlite3.Connection, vid: int, indices: list[int]) -> set[int]:
    return batchsql.those_in(conn, batchsql.EXISTING, indices, vid)


def _ghosts(conn: sqlite3.Connection, version: str, indices: list[int]) -> set[int]:
    """Which of these blocks of ``version`` the ghost list remembers."""
    keys = {policy.ghost_key(version, i): i for i in indices}
    return {keys[k] for k in batchsql.those_in(conn, batchsql.GHOSTS_FOUND, list(keys))}


def evict_lru(conn: sqlite3.Connection, target: int, batch: int, stats: Stats) -> Slice:
    """Delete the rows of up to ``batch`` least recently used blocks, as many as
    it takes to total at most ``target`` bytes. Returns them and their bytes."""
    chosen: list[Victim] = []
    keys: list[tuple[int, int]] = []
    pins: list[tuple[int, int]] = []
    touched: dict[int, str] = {}
    emptied: list[str] = []
    freed = 0
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        total = schema.totals(conn)[0]
        if total > target:
            for atime, vid, name, idx, nbytes, pinned in batchsql.oldest(conn, batch):
                if pinned:  # pinned since it was used: out of LRU's order
                    pins.append((vid, idx))
                    continue
                keys.append((vid, idx))
                freed += nbytes
                if name is not None:  # else a row of no version: no file to name
                    chosen.append((name, idx, atime))
                    touched[vid] = name
                if total - freed <= target:
                    break  # a batch is a bound on work, not an amount to evict
            batchsql.run_batch(conn, batchsql.TO_PINNED_BLOCKS, pins)
            batchsql.run_batch(conn, batchsql.DELETE_BLOCKS, keys)
            emptied = _emptied(conn, touched)
    stats.evicted["lru"] += len(chosen)
    return Slice(chosen, freed, len(keys) + len(pins), emptied)


def evict_s3fifo(
    conn: sqlite3.Connection, target: int, capacity: int, batch: int, stats: Stats
) -> Slice:
    """S3-FIFO: walk the tails of the small and main queues (policy.evict_from
    says which), looking at most ``batch`` blocks: each is moved, reinserted or
    evicted (policy.fate) until the cache totals at most ``target`` bytes."""
    chosen: list[Victim] = []
    touched: dict[int, str] = {}
    freed = 0
    looked = 0
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        total, small, blocks, _, _, pinned, _ = conn.execute(schema.QUEUE_TOTALS).fetchone()
        main = total - small - pinned
        # The policy shares out what pins leave of the cache.
        capacity = max(0, capacity - pinned)
        seq = schema.take_seq(conn, batch)
        while looked < batch and total - freed > target:
            queue = policy.evict_from(small, main, capacity)
            tail, names = batchsql.queue_tail(conn, queue, min(_TAIL_READ, batch - looked))
            if not tail:
                break
            # Decide the whole tail read, then write it: a statement per kind
            # of change (batchsql.run_batch), not per row. The loop runs once
            # per block looked at: names bound once, counts kept in locals.
            moves: list[tuple[int, int, int, int, int]] = []
            deletes: list[tuple[int, int]] = []
            new_ghosts: list[tuple[int, int]] = []
            fate_of, evict_from, ghost_key = policy.fate, policy.evict_from, policy.ghost_key
            from_small = queue is Queue.SMALL
            to_main, to_pinned = int(Queue.MAIN), int(Queue.PINNED)
            evicted = 0
            for _, vid, idx, nbytes, atime, freq in tail:
                looked += 1
                found = names.get(vid)
                name, pinned_version = found or ("", False)
                fate = None if found is None else fate_of(queue, freq, pinned_version)
                # Every block looked at leaves its queue; one moved or
                # reinserted enters main's head.
                if from_small:
                    small -= nbytes
                else:
                    main -= nbytes
                if fate is None:  # a row of no version: no file to name; deleted
                    deletes.append((vid, idx))
                    freed += nbytes
                elif fate is Fate.GHOST or fate is Fate.EVICT:
                    deletes.append((vid, idx))
                    chosen.append((name, idx, atime))
                    touched[vid] = name
                    freed += nbytes
                    evicted += 1
                    if from_small:
                        new_ghosts.append((ghost_key(name, idx), seq))
                        seq += 1
                elif fate is Fate.PIN:
                    moves.append((to_pinned, freq, seq, vid, idx))
                    seq += 1
                else:  # TO_MAIN or REINSERT
                    moves.append((to_main, 0 if from_small else freq - 1, seq, vid, idx))
                    seq += 1
                    main += nbytes
                    if from_small:
                        stats.promoted += 1
                if total - freed <= target or evict_from(small, main, capacity) is not queue:
                    break
            blocks -= len(deletes)
            stats.evicted["small" if from_small else "main"] += evicted
            batchsql.run_batch(conn, batchsql.MOVE_BLOCKS, moves)
            batchsql.run_batch(conn, batchsql.DELETE_BLOCKS, deletes)
            batchsql.run_batch(conn, batchsql.ADD_GHOSTS, new_ghosts)
        ghosts = int(conn.execute(schema.QUEUE_TOTALS).fetchone()[4])  # (a re-added key adds none)
        excess = ghosts - policy.ghost_limit(capacity, total - freed, blocks)
        if excess > 0:
            conn.execute(schema.TRIM_GHOSTS, (excess,))
        emptied = _emptied(conn, touched)
    return Slice(chosen, freed, looked, emptied)


def _emptied(conn: sqlite3.Connection, touched: dict[int, str]) -> list[str]:
    """Which of these versions (id -> name) lost their last block: their rows in
    ``versions`` went with it (the blocks_del trigger)."""
    left = batchsql.those_in(conn, batchsql.VERSIONS_LEFT, list(touched))
    return [name for vid, name in touched.items() if vid not in left]
