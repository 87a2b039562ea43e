"""Pins and the catalog in the index (schema 4), against real SQLite: pinned blocks
never evicted by either policy, the pin limit all or nothing, unpins moved back and
resumed after a crash, expiry, listing by key and prefix, keys learnt from meta.json,
and the migration from schema 3 keeping every row."""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nwbcache_proxy import batchsql, catalog, pins, schema
from nwbcache_proxy.catalog import Order
from nwbcache_proxy.index import CacheIndex
from nwbcache_proxy.layout import Layout
from nwbcache_proxy.policy import Eviction, Queue
from nwbcache_proxy.reconcile import is_needed

B = 100  # bytes per block
SCHEMA_3 = Path(__file__).parent / "support" / "schema3.sql"


def _odir(n: int) -> str:
    return f"objects/{n % 256:02x}/{n:064x}"


def _v(n: int, version: str = "e") -> str:
    return f"{_odir(n)}/{version * 32}.16"


def _key(n: int) -> str:
    return f"https://bucket.s3.amazonaws.com/lab/obj{n:03d}.nwb"


@pytest.fixture(params=[Eviction.S3FIFO, Eviction.LRU], ids=["s3fifo", "lru"])
async def index(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[CacheIndex]:
    idx = CacheIndex(Layout(tmp_path), request.param)
    await idx.open()
    try:
        yield idx
    finally:
        await idx.close()


async def _publish(index: CacheIndex, n: int, blocks: range, version: str = "e") -> None:
    for i in blocks:
        index.record(_v(n, version), i, B, (_key(n), len(blocks) * B))
    await index.flush()


def _queues(layout: Layout) -> dict[tuple[str, int], int]:
    conn = sqlite3.connect(layout.index_path)
    try:
        return {
            (v, i): q
            for v, i, q in conn.execute(
                "SELECT v.name, b.idx, b.queue FROM blocks b JOIN versions v ON v.id = b.version"
            )
        }
    finally:
        conn.close()


async def _pin(
    index: CacheIndex, *ns: int, limit: int = 10**9, expires: float | None = None
) -> list[tuple[bool, list[int]]]:
    objects = [(_odir(n), _key(n), 10 * B) for n in ns]
    done = await index.call(
        functools.partial(pins.pin, objects=objects, expires=expires, limit=limit)
    )
    for _, vids in done:
        for vid in vids:
            at: int | None = 0
            while at is not None:
                at = await index.call(
                    functools.partial(pins.move_step, vid=vid, start=at, to_pinned=True)
                )
    return done


async def test_pinned_blocks_are_never_evicted_and_new_ones_enter_pinned(
    index: CacheIndex, tmp_path: Path
) -> None:
    await _publish(index, 1, range(10))
    await _pin(index, 1)
    assert set(_queues(Layout(tmp_path)).values()) == {Queue.PINNED}
    assert index.last_totals.pinned_bytes == 0  # not refreshed yet
    assert (await index.totals()).pinned_bytes == 10 * B
    for n in range(2, 30):  # a scan of other objects through the cache
        await _publish(index, n, range(10))
        await index.evict_to(30 * B, 30 * B)
    queues = _queues(Layout(tmp_path))
    assert {i for (v, i) in queues if v == _v(1)} == set(range(10))
    assert (await index.totals()).bytes <= 30 * B
    # Blocks of a pinned object cached later are pinned from the start, and so
    # is a new version of it.
    await _publish(index, 1, range(10, 12))
    await _publish(index, 1, range(2), version="f")
    queues = _queues(Layout(tmp_path))
    assert queues[(_v(1), 11)] == queues[(_v(1, "f"), 0)] == Queue.PINNED
    # Everything else may go; the pinned blocks stay.
    await index.evict_to(0, 30 * B)
    assert set(_queues(Layout(tmp_path))) == {(_v(1), i) for i in range(12)} | {
        (_v(1, "f"), i) for i in range(2)
    }


async def test_a_pinned_versions_block_still_in_a_queue_is_moved_not_evicted(
    index: CacheIndex, tmp_path: Path
) -> None:
    """A stop between the pin and its moves leaves blocks in the policy's queues;
    eviction that meets them moves them to the pinned queue."""
    await _publish(index, 1, range(5))
    await _publish(index, 2, range(5))
    await index.call(
        functools.partial(pins.pin, objects=[(_odir(1), _key(1), 5 * B)], expires=None, limit=10**9)
    )  # no move steps
    assert Queue.PINNED not in _queues(Layout(tmp_path)).values()
    await index.evict_to(0, 10 * B)
    queues = _queues(Layout(tmp_path))
    assert queues == {(_v(1), i): Queue.PINNED for i in range(5)}


async def test_the_pin_limit_is_all_or_nothing_and_a_renewal_costs_nothing(
    index: CacheIndex,
) -> None:
    await _publish(index, 1, range(2))
    await _pin(index, 1, limit=25 * B)  # each object's size: 10 blocks
    with pytest.raises(pins.PinLimit, match="over --pin-limit"):
        await _pin(index, 2, 3, limit=25 * B)
    assert [p.key for p in await index.call(pins.pins)] == [_key(1)]
    [(new, _)] = await _pin(index, 1, limit=10 * B, expires=123.0)  # already pinned
    assert not new
    assert (await index.call(pins.pins))[0].expires == 123.0
    assert await index.call(pins.pinned_size) == (10 * B, 1)
    [(new, _)] = await _pin(index, 2, limit=25 * B)
    assert new


async def test_unpin_moves_blocks_back_and_an_interrupted_unpin_is_resumed(
    index: CacheIndex, tmp_path: Path
) -> None:
    await _publish(index, 1, range(3))
    await _pin(index, 1)
    was, vids = await index.call(functools.partial(pins.unpin, odir=_odir(1)))
    assert was
    # Stopped here: the note says what is left to move.
    assert await index.call(pins.unpins_under_way) == [(vids[0], 0)]
    for vid, start in await index.call(pins.unpins_under_way):
        assert (
            await index.call(
                functools.partial(pins.move_step, vid=vid, start=start, to_pinned=False)
            )
            is None
        )
    assert await index.call(pins.unpins_under_way) == []
    assert set(_queues(Layout(tmp_path)).values()) == {Queue.MAIN}
    assert (await index.totals()).pinned_bytes == 0
    await index.evict_to(0, 3 * B)
    assert _queues(Layout(tmp_path)) == {}
    was, _ = await index.call(functools.partial(pins.unpin, odir=_odir(1)))
    assert not was


async def test_moves_go_a_span_at_a_time(index: CacheIndex, tmp_path: Path) -> None:
    blocks = range(0, 3 * pins.MOVE_SPAN, 1000)  # sparse, over three spans
    await _publish(index, 1, blocks)
    [(_, [vid])] = await index.call(
        functools.partial(pins.pin, objects=[(_odir(1), _key(1), B)], expires=None, limit=10**9)
    )
    starts = [0]
    while (
        nxt := await index.call(
            functools.partial(pins.move_step, vid=vid, start=starts[-1], to_pinned=True)
        )
    ) is not None:
        starts.append(nxt)
    assert starts == [0, pins.MOVE_SPAN, 2 * pins.MOVE_SPAN]
    assert set(_queues(Layout(tmp_path)).values()) == {Queue.PINNED}


async def test_expired_pins_are_found(index: CacheIndex) -> None:
    await _pin(index, 1, expires=100.0)
    await _pin(index, 2, expires=200.0)
    await _pin(index, 3)
    assert await index.call(functools.partial(pins.expired, now=150.0)) == [_odir(1)]
    assert set(await index.call(functools.partial(pins.expired, now=250.0))) == {
        _odir(1),
        _odir(2),
    }


async def test_the_catalog_lists_matches_and_learns_keys(index: CacheIndex, tmp_path: Path) -> None:
    await _publish(index, 1, range(4))
    await _publish(index, 2, range(2))
    index.hit(_v(2), 0)
    index.hit(_v(2), 1)
    await index.flush()
    entries = await index.call(catalog.entries)
    assert [(e.url, e.cached_bytes, e.blocks, e.size) for e in entries] == [
        (_key(1), 4 * B, 4, 4 * B),
        (_key(2), 2 * B, 2, 2 * B),
    ]
    by_hits = await index.call(functools.partial(catalog.entries, order=Order.HITS))
    assert [(e.url, e.hits) for e in by_hits] == [(_key(2), 2), (_key(1), 0)]
    assert all(e.last_use > 0 for e in entries)
    one = await index.call(functools.partial(catalog.entries, key=_key(2)))
    assert [e.url for e in one] == [_key(2)]
    under = await index.call(
        functools.partial(
            catalog.object_dirs, key=None, prefix="https://bucket.s3.amazonaws.com/lab/obj00"
        )
    )
    assert under == sorted([_odir(1), _odir(2)])
    # A version indexed without its key (before schema 4, or found by the
    # reconciler) learns it from meta.json; one without meta.json is marked.
    index.record(_v(3), 0, B)
    index.record(_v(4), 0, B)
    await index.flush()
    meta = Layout(tmp_path).root / _odir(3) / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"format": 2, "cache_key": _key(3), "size": 77}))
    layout = Layout(tmp_path)
    assert await index.call(functools.partial(catalog.learn_keys, layout=layout)) == 2
    assert await index.call(functools.partial(catalog.learn_keys, layout=layout)) == 0
    third = await index.call(functools.partial(catalog.entries, key=_key(3)))
    assert [(e.url, e.size) for e in third] == [(_key(3), 77)]
    urls = {e.url for e in await index.call(catalog.entries)}
    assert None in urls  # the one whose metadata is gone


async def test_drop_step_deletes_a_version_a_span_at_a_time(index: CacheIndex) -> None:
    await _publish(index, 1, range(0, 2 * pins.MOVE_SPAN + 1, 4096))
    [(vid, name, nbytes)] = await index.call(functools.partial(catalog.versions_of, odir=_odir(1)))
    assert (name, nbytes) == (_v(1), 5 * B)
    last = await index.call(functools.partial(catalog.last_index, vid=vid))
    assert last == 2 * pins.MOVE_SPAN
    at: int | None = 0
    steps = 0
    while at is not None:
        at = await index.call(functools.partial(catalog.drop_step, vid=vid, start=at, last=last))
        steps += 1
        # A reader's use of a low block recorded meanwhile (an fd held on the
        # file) cannot keep the drop going: its end was fixed when it began.
        index.record(_v(1), 5, B)
        await index.flush()
    assert steps == 3
    assert [
        v[1] for v in await index.call(functools.partial(catalog.versions_of, odir=_odir(1)))
    ] == [_v(1)]
    assert (await index.totals()).bytes == B  # that one row, until eviction takes it


async def test_a_pins_moves_after_an_unpin_move_nothing(index: CacheIndex, tmp_path: Path) -> None:
    """Pin, then an unpin (another worker, an expiry) before the pin's moves ran:
    the moves must not leave blocks in the pinned queue of an unpinned version."""
    await _publish(index, 1, range(4))
    [(_, [vid])] = await index.call(
        functools.partial(pins.pin, objects=[(_odir(1), _key(1), 4 * B)], expires=None, limit=10**9)
    )
    await index.call(functools.partial(pins.unpin, odir=_odir(1)))
    await index.call(functools.partial(pins.move_step, vid=vid, start=0, to_pinned=True))
    assert Queue.PINNED not in _queues(Layout(tmp_path)).values()
    # And the other way: an unpin's moves after a new pin move nothing out.
    await _pin(index, 1)
    await index.call(functools.partial(pins.move_step, vid=vid, start=0, to_pinned=False))
    assert set(_queues(Layout(tmp_path)).values()) == {Queue.PINNED}
    await index.evict_to(0, 4 * B)
    assert len(_queues(Layout(tmp_path))) == 4


async def test_a_key_is_never_lost(index: CacheIndex, tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    # Learnt while meta.json was gone: marked unknown, then a use brings it.
    index.record(_v(1), 0, B)
    await index.flush()
    assert await index.call(functools.partial(catalog.learn_keys, layout=layout)) == 1
    assert [e.url for e in await index.call(catalog.entries)] == [None]
    index.record(_v(1), 1, B, (_key(1), 2 * B))
    await index.flush()
    assert [e.url for e in await index.call(catalog.entries)] == [_key(1)]
    # A version's row goes with its last block; when it comes back, its key
    # comes with it.
    await index.evict_to(0, 2 * B)
    assert await index.call(catalog.entries) == []
    index.record(_v(1), 0, B, (_key(1), 2 * B))
    await index.flush()
    assert [e.url for e in await index.call(catalog.entries)] == [_key(1)]


def test_a_schema_3_index_is_migrated_in_place_its_rows_kept(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SCHEMA_3.read_text())
    conn.execute("INSERT INTO versions(name) VALUES (?), (?)", (_v(1), _v(2)))
    conn.executemany(
        "INSERT INTO blocks(version, idx, bytes, atime, queue, freq, seq) VALUES (?,?,?,?,?,?,?)",
        [(1, 0, 64, 3.0, 1, 2, 1), (1, 1, 16, 1.0, 0, 0, 2), (2, 5, 36, 2.0, 0, 1, 3)],
    )
    conn.execute("UPDATE totals SET seq = 3")
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    conn = schema.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION == 6
        assert is_needed(conn)  # format 2's block files are to be moved into data files
        rows = conn.execute(
            "SELECT version, idx, bytes, atime, queue, freq, seq FROM blocks ORDER BY version, idx"
        ).fetchall()
        assert rows == [
            (1, 0, 64, 3.0, 1, 2, 1),
            (1, 1, 16, 1.0, 0, 0, 2),
            (2, 5, 36, 2.0, 0, 1, 3),
        ]
        assert conn.execute(schema.QUEUE_TOTALS).fetchone() == (116, 52, 3, 2, 0, 0, 2)
        # The new triggers keep the pinned totals.
        conn.execute("UPDATE blocks SET queue = 2 WHERE version = 2")
        assert conn.execute(schema.QUEUE_TOTALS).fetchone() == (116, 16, 3, 1, 0, 36, 2)
        conn.execute("DELETE FROM blocks WHERE version = 2")  # and its version's row
        assert conn.execute(schema.QUEUE_TOTALS).fetchone() == (80, 16, 2, 1, 0, 0, 1)
        # Schema 5's trigger keeps the totals when a row's bytes change (a moved
        # format-2 block loses its header's 64 bytes).
        schema.resize_rows(conn, _v(1), [(0, 0), (1, 16)])
        assert conn.execute(schema.QUEUE_TOTALS).fetchone() == (16, 16, 2, 1, 0, 0, 1)
        assert conn.execute("SELECT bytes FROM versions WHERE id = 1").fetchone() == (16,)
        # LRU's index leaves pinned rows out.
        plan = " ".join(str(r) for r in conn.execute("EXPLAIN QUERY PLAN " + batchsql.OLDEST, (5,)))
        assert "blocks_by_atime_unpinned" in plan
    finally:
        conn.close()
