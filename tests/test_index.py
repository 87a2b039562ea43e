"""index and schema: accounting in SQLite (per version and in all), eviction in slices,
the migrations from every older schema, and the helpers `nwbcache check` shares.

Eviction is checked on format-3 versions written by versionfile.py: an evicted
block is out of its version's map and its bytes are a hole in the data file
(its space freed); every other block reads back as written."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from nwbcache_proxy import footprint, schema, unlinker, usage
from nwbcache_proxy.index import EVICT_BATCH, CacheIndex, Evicted, Totals
from nwbcache_proxy.layout import Layout
from nwbcache_proxy.mapfile import MapHeader
from nwbcache_proxy.policy import Eviction
from nwbcache_proxy.reconcile import is_needed
from nwbcache_proxy.spanlocks import runs_of
from nwbcache_proxy.unlinker import UNLINK_GROUP, groups_of
from nwbcache_proxy.versionfile import VersionFiles
from tests.support.helpers import mapped_exactly

# A filesystem block: an evicted block's space is freed, not only zeroed.
BS = 4096
V1 = f"objects/aa/aaaa/0123.{BS}"
V2 = f"objects/bb/bbbb/4567.{BS}"
# Every version here has this many blocks (its files are sparse: only the
# blocks written take space).
VERSION_BLOCKS = 10_000
# What a data file may take beyond its mapped blocks' bytes: the filesystem's
# own blocks for the extents of a file full of holes.
EXTENT_SLACK = 16 * BS


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[CacheIndex]:
    """An index evicting by LRU (test_s3fifo.py has S3-FIFO's)."""
    idx = CacheIndex(Layout(tmp_path), Eviction.LRU)
    await idx.open()
    try:
        yield idx
    finally:
        await idx.close()


def _bb(totals: Totals) -> tuple[int, int]:
    return totals.bytes, totals.blocks


def _rows(layout: Layout) -> dict[tuple[str, int], int]:
    """(version dir, block index) -> bytes, as stored."""
    conn = sqlite3.connect(layout.index_path)
    try:
        return {
            (v, i): b
            for v, i, b in conn.execute(
                "SELECT v.name, b.idx, b.bytes FROM blocks b JOIN versions v ON v.id = b.version"
            )
        }
    finally:
        conn.close()


def _versions(layout: Layout) -> dict[str, tuple[int, int]]:
    conn = sqlite3.connect(layout.index_path)
    try:
        return {n: (b, c) for n, b, c in conn.execute("SELECT name, bytes, blocks FROM versions")}
    finally:
        conn.close()


# -- format-3 versions on disk ----------------------------------------------------
def _header(version: str) -> MapHeader:
    assert Layout.block_size_of(version) == BS
    return MapHeader(BS, VERSION_BLOCKS * BS, hashlib.sha256(version.encode()).digest())


def _block(version: str, n: int) -> bytes:
    return random.Random(f"{version}/{n}").randbytes(BS)


def _write(layout: Layout, version: str, indices: Iterable[int]) -> None:
    """Blocks of a version written (and mapped) as the daemon writes them."""
    files = VersionFiles.open(
        layout.data_path(version), layout.map_path(version), _header(version), create=True
    )
    assert files is not None
    try:
        for first, count in runs_of(sorted(indices)):
            files.write_group(first, [[_block(version, first + k)] for k in range(count)])
    finally:
        files.close()


def _cached(layout: Layout, version: str) -> list[int] | None:
    """The blocks the version's map has, or None when both its files are gone.
    Each is read back and compared with what was written; the data file holds
    bytes at exactly those blocks (every other one a hole) and takes the
    space of those only."""
    data_path, map_path = layout.data_path(version), layout.map_path(version)
    if not data_path.exists() and not map_path.exists():
        return None
    files = VersionFiles.open_existing(data_path, map_path)
    assert files is not None, f"half a version left of {version}"
    try:
        mapped = mapped_exactly(files, lambda i: _block(version, i), BS)
    finally:
        files.close()
    allocated = os.stat(data_path).st_blocks * 512
    assert len(mapped) * BS <= allocated <= len(mapped) * BS + EXTENT_SLACK
    return mapped


@pytest.mark.parametrize(
    ("records", "pending"),
    [
        ([], 0),
        ([(V1, 0, 80)], 80),
        ([(V1, 0, 80), (V1, 1, 50)], 130),
        # the same block again (a touch) replaces its entry, not adds to it
        ([(V1, 0, 80), (V1, 0, 80)], 80),
        ([(V1, 0, 80), (V1, 0, 90)], 90),
        ([(V1, 0, 80), (V2, 0, 90)], 170),
    ],
)
async def test_pending_bytes(
    index: CacheIndex, records: list[tuple[str, int, int]], pending: int
) -> None:
    for version, n, nbytes in records:
        index.record(version, n, nbytes)
    assert index.pending_bytes == pending
    await index.flush()
    assert index.pending_bytes == 0
    assert _bb(index.last_totals) == (pending, len({r[:2] for r in records}))


@pytest.mark.parametrize(
    ("records", "versions", "blocks"),
    [
        ([], 0, 0),
        ([(V1, 0, 80, True), (V1, 1, 50, True)], 1, 2),
        ([(V1, 0, 80, True), (V2, 0, 90, True)], 2, 2),
        ([(V1, 0, 80, True), (V2, 0, 90, False)], 1, 1),  # a read brings no files
        ([(V1, 0, 80, True), (V1, 0, 80, True)], 1, 1),  # written twice: one block
    ],
)
async def test_pending_on_disk_counts_the_files_of_what_was_written(
    index: CacheIndex, records: list[tuple[str, int, int, bool]], versions: int, blocks: int
) -> None:
    """The pressure check's figure (blocks.Blocks._published): written bytes
    and, for their versions and blocks, the files' share (footprint.py)."""
    for version, n, nbytes, written in records:
        index.record(version, n, nbytes, written=written)
    want = index.pending_bytes + footprint.overhead(versions, blocks)
    assert index.pending_on_disk == want
    await index.flush()
    assert index.pending_on_disk == 0


@pytest.mark.parametrize(
    ("records", "pending"),
    [
        ([(V1, 0, 80, False)], 0),  # a read adds nothing to the totals
        ([(V1, 0, 80, False), (V1, 1, 50, True)], 50),
        ([(V1, 0, 80, False), (V1, 0, 80, True)], 80),  # read, then written
        ([(V1, 0, 80, True), (V1, 0, 80, False)], 80),  # written, then read: still written
        ([(V1, 0, 80, True), (V2, 0, 90, False), (V2, 0, 90, False)], 80),
    ],
)
async def test_pending_bytes_count_only_writes(
    index: CacheIndex, records: list[tuple[str, int, int, bool]], pending: int
) -> None:
    """Eviction flushes between slices while pending bytes are not zero: hits
    alone must not make it do so."""
    for version, n, nbytes, written in records:
        index.record(version, n, nbytes, written=written)
    assert index.pending_bytes == pending
    index.forget_pending(V2)
    assert index.pending_bytes == sum(b for v, _, b, w in records if w and v == V1)
    await index.flush()
    assert index.pending_bytes == 0


async def test_flush_upserts_rows_and_keeps_per_version_totals(
    index: CacheIndex, tmp_path: Path
) -> None:
    layout = Layout(tmp_path)
    index.record(V1, 0, 80)
    await index.flush()
    index.record(V1, 0, 80)
    index.record(V1, 7, 30)
    index.record(V2, 3, 20)
    await index.flush()
    assert _rows(layout) == {(V1, 0): 80, (V1, 7): 30, (V2, 3): 20}
    assert _versions(layout) == {V1: (110, 2), V2: (20, 1)}
    assert _bb(await index.totals()) == (130, 3)


async def test_forget_version_drops_its_rows_flushed_or_not(
    index: CacheIndex, tmp_path: Path
) -> None:
    index.record(V1, 0, 80)
    index.record(V2, 0, 20)
    await index.flush()
    index.record(V1, 1, 70)  # pending only
    await index.forget_version(V1)
    assert index.pending_bytes == 0
    await index.flush()
    assert _rows(Layout(tmp_path)) == {(V2, 0): 20}
    assert _versions(Layout(tmp_path)) == {V2: (20, 1)}  # V1's row went with its blocks
    assert _bb(await index.totals()) == (20, 1)


async def _fill(index: CacheIndex, layout: Layout, version: str, count: int) -> None:
    """Blocks 0..count-1 of a version written, with rows, each used after the last."""
    for n in range(count):
        _write(layout, version, [n])
        index.record(version, n, BS)
        await index.flush()  # one flush per block: distinct, increasing access times
        await asyncio.sleep(0.002)


async def test_evict_removes_least_recent_first_and_only_what_it_must(
    index: CacheIndex, tmp_path: Path
) -> None:
    layout = Layout(tmp_path)
    await _fill(index, layout, V1, 10)
    done = await index.evict_to(65 * BS // 10)
    assert (done.blocks, done.bytes, done.recent) == (4, 4 * BS, 4)  # 10 -> 6 blocks: 0-3
    assert sorted(_rows(layout)) == [(V1, n) for n in range(4, 10)]
    assert _cached(layout, V1) == list(range(4, 10))
    assert _versions(layout) == {V1: (6 * BS, 6)}
    assert await index.evict_to(1000 * BS) == Evicted()
    assert _cached(layout, V1) == list(range(4, 10))


@pytest.mark.slow  # slices this big go to the eviction helper (a process)
async def test_a_slice_is_bounded_and_says_whether_more_is_needed(
    index: CacheIndex, tmp_path: Path
) -> None:
    count = EVICT_BATCH * 2 + 10
    for n in range(count):
        index.record(V1, n, 1)
    await index.flush()
    first = await index.evict_slice(0, 100)
    assert (first.blocks, first.more) == (EVICT_BATCH, True)
    assert len(first.victims) == EVICT_BATCH and first.victims[0] == (V1, 0)
    small = await index.evict_slice(0, 100, batch=10)
    assert (small.blocks, small.more) == (10, True)
    rest = await index.evict_to(0)
    assert rest.blocks == count - EVICT_BATCH - 10
    assert _bb(await index.totals()) == (0, 0)
    assert _versions(Layout(tmp_path)) == {}


async def test_eviction_takes_whole_versions_out_of_the_versions_table(
    index: CacheIndex, tmp_path: Path
) -> None:
    layout = Layout(tmp_path)
    await _fill(index, layout, V1, 3)
    await _fill(index, layout, V2, 3)
    await index.evict_to(3 * BS)
    assert _versions(layout) == {V2: (3 * BS, 3)}
    assert _cached(layout, V1) is None  # its files went with its last block
    assert _cached(layout, V2) == [0, 1, 2]


async def test_top_versions(index: CacheIndex) -> None:
    for n in range(3):
        index.record(V1, n, 10)
    index.record(V2, 0, 100)
    await index.flush()
    assert await index.top_versions(10) == [(V2, 100, 1), (V1, 30, 3)]
    assert await index.top_versions(1) == [(V2, 100, 1)]


def _old_index(path: Path, *, schema_1: bool) -> None:
    """An index as schema 1 (no user_version, an `object` column) or schema 2
    (user_version 2, a `version` column) daemons wrote it."""
    column = "object" if schema_1 else "version"
    conn = sqlite3.connect(path)
    conn.executescript(
        f"""
        CREATE TABLE blocks (path TEXT PRIMARY KEY, {column} TEXT NOT NULL,
                             bytes INTEGER NOT NULL, atime REAL NOT NULL);
        CREATE INDEX blocks_by_atime ON blocks(atime);
        CREATE INDEX blocks_by_{column} ON blocks({column});
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
    rows = [
        (f"{V1}/0.blk", V1, 64, 3.0),
        (f"{V1}/12345.blk", V1, 16, 1.0),
        (f"{V2}/1.blk", V2, 36, 2.0),
    ]
    conn.executemany("INSERT INTO blocks VALUES (?, ?, ?, ?)", rows)
    if not schema_1:
        conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("schema_1", [True, False], ids=["schema-1", "schema-2"])
async def test_an_old_index_is_migrated_with_every_row_and_its_last_use(
    tmp_path: Path, schema_1: bool
) -> None:
    layout = Layout(tmp_path)
    layout.root.mkdir(parents=True)
    _old_index(layout.index_path, schema_1=schema_1)
    idx = CacheIndex(layout, Eviction.LRU)
    await idx.open()
    try:
        assert _bb(idx.last_totals) == (116, 3)
        assert _rows(layout) == {(V1, 0): 64, (V1, 12345): 16, (V2, 1): 36}
        assert _versions(layout) == {V1: (80, 2), V2: (36, 1)}
        # The access times came along: the least recently used block goes first.
        done = await idx.evict_slice(100, 116, batch=1)
        assert done.victims == ((V1, 12345),)
        await idx.forget_version(V1)
        assert _bb(await idx.totals()) == (36, 1)
    finally:
        await idx.close()
    conn = sqlite3.connect(layout.index_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "blocks_2" not in tables and "blocks_by_version" not in tables
        # A migrated index is reconciled: format 1's blocks must move into data files.
        assert is_needed(conn)
    finally:
        conn.close()


def test_an_index_newer_than_this_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="upgrade nwbcache"):
        schema.connect(path)


def test_connect_is_idempotent_and_a_new_index_asks_for_a_reconcile(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    conn = schema.connect(path)
    assert is_needed(conn)  # it knows nothing of the files yet
    conn.execute(schema.CLEAR_STATE, (schema.RECONCILE,))
    vid = schema.version_id(conn, V1, create=True)
    assert vid is not None
    schema.add_found(conn, vid, [(0, 5, 1.0)])
    conn.close()
    conn = schema.connect(path)
    try:
        assert not is_needed(conn)
        assert schema.version_id(conn, V1, create=False) == vid
        assert schema.rows_in(conn, vid, range(0, 10)) == {0: (1.0, 5)}
        schema.delete_older(conn, vid, [0], than=0.5)  # the row is newer: kept
        assert schema.totals(conn) == (5, 1)
        schema.delete_older(conn, vid, [0], than=2.0)
        assert schema.totals(conn) == (0, 0)
        assert schema.version_id(conn, V1, create=False) is None
    finally:
        conn.close()


async def test_a_failed_flush_keeps_its_records_for_the_next(
    index: CacheIndex, tmp_path: Path
) -> None:
    index.record(V1, 0, 80)
    index.hit(V1, 0)
    conn = index.conn
    broken = sqlite3.connect(":memory:")
    broken.close()
    index._conn = broken  # SQLite refuses (as on a full disk: "disk I/O error")
    try:
        assert await index.flush() is False
        index.record(V1, 1, 20)
        assert index.pending_bytes == 100  # kept, and added to
    finally:
        index._conn = conn
    assert await index.flush() is True
    assert _rows(Layout(tmp_path)) == {(V1, 0): 80, (V1, 1): 20}


@pytest.mark.parametrize("then", ["flush", "close"])
async def test_a_flush_whose_caller_is_cancelled_still_stores_its_records(
    tmp_path: Path, then: str
) -> None:
    """A caller cancelled while its flush waits for the index's thread (upkeep
    stopped at shutdown, a client hanging up on an admin request) does not
    take the records with it: the next flush, or the close, finds them
    stored. (The records once went with the cancelled job: a daemon stopped
    "clean" with blocks on disk and no rows.)"""
    index = CacheIndex(Layout(tmp_path), Eviction.LRU)
    await index.open()
    busy, gate = threading.Event(), threading.Event()

    def hold(_: sqlite3.Connection) -> None:  # the thread busy, as with an eviction slice
        busy.set()
        gate.wait(10)

    holding = asyncio.create_task(index.call(hold))
    assert await asyncio.to_thread(busy.wait, 10)
    index.record(V1, 0, 80)
    index.record(V1, 1, 20)
    index.hit(V1, 0)
    flushing = asyncio.create_task(index.flush())
    await asyncio.sleep(0.05)  # it has taken the records and waits for the thread
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    assert index.pending_bytes == 0  # taken: only the write can store them now
    gate.set()
    await holding
    if then == "flush":
        assert await index.flush() is True
        assert _bb(index.last_totals) == (100, 2)
    await index.close()
    assert _rows(Layout(tmp_path)) == {(V1, 0): 80, (V1, 1): 20}
    conn = sqlite3.connect(Layout(tmp_path).index_path)
    try:
        freq = conn.execute("SELECT freq FROM blocks WHERE idx = 0").fetchone()[0]
    finally:
        conn.close()
    assert freq == 1  # the hit too


async def test_an_object_with_nothing_cached_leaves_nothing_on_disk(
    index: CacheIndex, tmp_path: Path
) -> None:
    """Evicting a version's last block removes its data file and map; its object's
    meta.json and dir go too once no other version of it is left."""
    layout = Layout(tmp_path)
    other_version = f"objects/aa/aaaa/9999.{BS}"  # the same object, another version
    for version in (V1, other_version, V2):
        layout.meta_path_of_version(version).parent.mkdir(parents=True, exist_ok=True)
        layout.meta_path_of_version(version).write_text("{}")
    await _fill(index, layout, V1, 3)
    await _fill(index, layout, other_version, 1)
    await _fill(index, layout, V2, 1)
    obj = layout.meta_path_of_version(V1).parent
    await index.evict_to(2 * BS)  # LRU: V1's three blocks
    assert _cached(layout, V1) is None
    # other_version is still cached: its files and the object's meta.json stay
    assert sorted(p.name for p in obj.iterdir()) == [
        f"9999.{BS}.data",
        f"9999.{BS}.map",
        "meta.json",
    ]
    assert _cached(layout, other_version) == [0]
    await index.evict_to(BS)
    assert not obj.exists()  # the object is gone
    assert obj.parent.is_dir()  # (its kh[:2] dir is shared: left)
    assert _cached(layout, V2) == [0]
    assert layout.meta_path_of_version(V2).exists()


def test_unlink_groups_cover_every_victim_once_as_runs_taking_turns(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    v3 = f"objects/cc/cccc/89ab.{BS}"
    victims = [(V1, i, 0.0) for i in range(2 * UNLINK_GROUP + 100)]  # three groups
    victims += [(V2, i, 0.0) for i in (7, 4, 3, 5, 10, 9, 20)]  # unsorted, with gaps
    victims += [(v3, 5000 + i, 0.0) for i in range(UNLINK_GROUP + 1)]  # two groups
    groups = groups_of(victims, lambda name: str(layout.version_path(name)))
    names = {str(layout.version_path(v)): v for v in (V1, V2, v3)}
    assert all(Path(stem).is_absolute() for stem, _ in groups)
    flat: list[tuple[str, int]] = []
    for stem, runs in groups:
        assert runs and sum(n for _, n in runs) <= UNLINK_GROUP
        assert all(n > 0 for _, n in runs)
        # sorted, and maximal: a gap between every two runs of a group
        assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(runs))
        flat += [(names[stem], first + k) for first, n in runs for k in range(n)]
    assert sorted(flat) == sorted((name, i) for name, i, _ in victims)
    assert len(flat) == len(set(flat))  # each once
    assert [runs for stem, runs in groups if names[stem] == V2] == [
        [(3, 3), (7, 1), (9, 2), (20, 1)]
    ]
    # the versions take turns: every version's first group before any second one
    assert [names[stem] for stem, _ in groups] == [V1, V2, v3, V1, v3, V1]
    assert groups_of([], lambda name: str(layout.version_path(name))) == []


async def test_eviction_removes_exactly_its_victims_across_a_version(
    index: CacheIndex, tmp_path: Path
) -> None:
    """Blocks far apart in a data file (megabytes of holes between them) go exactly,
    whether a version goes whole or in runs with gaps."""
    layout = Layout(tmp_path)
    spread = [0, 1, 2, 4095, 4096, 4097, 8191, 8192]
    for version in (V1, V2):
        _write(layout, version, spread)
        for n in spread:
            index.record(version, n, BS)
        await index.flush()
        await asyncio.sleep(0.002)  # V1's blocks were used before V2's
    done = await index.evict_to(len(spread) * BS)  # all of V1, none of V2
    assert (done.blocks, done.bytes) == (len(spread), len(spread) * BS)
    assert _cached(layout, V1) is None  # emptied: its files pruned too
    assert _cached(layout, V2) == spread
    keep = [0, 2, 4096, 8191]
    await asyncio.sleep(0.002)
    for n in keep:  # used again: the others, every one a run of its own, go next
        index.record(V2, n, BS)
    done = await index.evict_to(len(keep) * BS)
    assert (done.blocks, done.bytes) == (4, 4 * BS)  # 1, 4095, 4097 and 8192
    assert _cached(layout, V2) == keep
    assert sorted(_rows(layout)) == [(V2, n) for n in keep]


async def test_a_run_in_use_is_left_whole_and_its_version_kept(
    index: CacheIndex,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run read (through another open) for longer than the remover's patience
    stays mapped, bytes and all, for a reconcile; the other versions of the
    slice still go, and a version whose map still has blocks is not pruned."""
    monkeypatch.setattr(unlinker, "REMOVE_PATIENCE", 0.05)
    layout = Layout(tmp_path)
    await _fill(index, layout, V1, 4)
    await _fill(index, layout, V2, 4)
    reader = VersionFiles.open_existing(layout.data_path(V1), layout.map_path(V1))
    assert reader is not None
    try:
        assert reader.lock_shared(2, 1)
        with caplog.at_level(logging.WARNING, logger="nwbcache_proxy.unlinker"):
            done = await index.evict_to(0)  # a small slice: removed in this process
        assert done.blocks == 8
        assert _cached(layout, V1) == [0, 1, 2, 3]  # the run (0, 4) was in use
    finally:
        reader.unlock_shared(2, 1)
        reader.close()
    assert _cached(layout, V2) is None
    assert _rows(layout) == {}  # the index forgot them all the same
    assert f"could not evict 4 blocks of {layout.version_path(V1)}" in caplog.text


async def test_an_emptied_version_looked_at_meanwhile_goes_once_let_go(tmp_path: Path) -> None:
    """A reader looking for a block the version does not have (a miss: its read
    lock is taken before it finds the entry empty) when the version's last
    cached block is evicted: the version's files and its object's dir still go,
    once the reader has let go (here 0.3 s later, then another slice and the
    index's close)."""
    layout = Layout(tmp_path)
    layout.meta_path_of_version(V1).parent.mkdir(parents=True)
    layout.meta_path_of_version(V1).write_text("{}")
    index = CacheIndex(layout, Eviction.LRU)
    await index.open()
    try:
        await _fill(index, layout, V1, 2)
        await _fill(index, layout, V2, 2)
        reader = VersionFiles.open_existing(layout.data_path(V1), layout.map_path(V1))
        assert reader is not None
        let_go = threading.Timer(0.3, reader.unlock_shared, (5, 1))
        try:
            assert reader.lock_shared(5, 1)  # block 5 was never cached
            let_go.start()
            done = await index.evict_to(2 * BS)  # V1's two blocks
            assert done.blocks == 2
            assert _versions(layout) == {V2: (2 * BS, 2)}
            let_go.join()
            await index.evict_to(BS)  # another slice
        finally:
            let_go.cancel()
            reader.close()
    finally:
        await index.close()
    assert _cached(layout, V2) == [1]
    assert _cached(layout, V1) is None
    assert not layout.meta_path_of_version(V1).parent.exists()


@pytest.mark.slow  # slices this big go to the eviction helper (a process)
async def test_pipelined_slices_leave_no_block_when_done_or_closed(tmp_path: Path) -> None:
    """A slice's blocks are removed (by the helper) while the next slice's rows are
    chosen; a slice saying "no more", and closing the index, leave none behind."""
    layout = Layout(tmp_path)
    idx = CacheIndex(layout, Eviction.LRU)
    await idx.open()
    count = 3 * EVICT_BATCH
    _write(layout, V1, range(count))
    for n in range(count):
        idx.record(V1, n, BS)
    await idx.flush()
    try:
        first = await idx.evict_slice(EVICT_BATCH * BS, count * BS)  # 3 -> 2 slices' worth
        assert (first.blocks, first.more) == (EVICT_BATCH, True)
        assert idx._unlinker.helper_pid is not None  # the slice went to the helper
        last = await idx.evict_slice(EVICT_BATCH * BS, count * BS)  # -> 1 slice's worth: done
        assert (last.blocks, last.more) == (EVICT_BATCH, False)
        assert _cached(layout, V1) == list(range(2 * EVICT_BATCH, count))
        # Half of the rest, in a slice that wants more: its blocks still in the
        # helper's hands when the index closes.
        cut = await idx.evict_slice(0, count * BS, batch=EVICT_BATCH // 2)
        assert (cut.blocks, cut.more) == (EVICT_BATCH // 2, True)
    finally:
        await idx.close()
    assert _cached(layout, V1) == list(range(2 * EVICT_BATCH + EVICT_BATCH // 2, count))


async def test_reads_and_hits_waiting_for_a_flush_are_bounded(
    index: CacheIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past PENDING_MAX blocks waiting, a new block's read or hit is not
    recorded (memory stays bounded when reads outpace flushes), a written
    block always is (it makes the row), and past half the owner is told to
    flush sooner."""
    for i in range(6):
        index.record(V1, i, 10)
    await index.flush()
    monkeypatch.setattr(usage, "PENDING_MAX", 4)
    monkeypatch.setattr(time, "time", lambda: 2e9)  # the reads' last use
    assert not index.backlogged
    for i in range(6):
        index.record(V1, i, 10, written=False)
        index.hit(V1, i)
        assert index.backlogged == (i >= 1)  # from 2 of 4 waiting
    index.record(V1, 0, 10, written=False)  # already waiting: recorded again
    index.hit(V1, 0)
    index.record(V2, 9, 30)  # written: recorded past the bound
    await index.flush()
    assert not index.backlogged
    conn = sqlite3.connect(Layout(tmp_path).index_path)
    try:
        rows = conn.execute(
            "SELECT b.idx, b.atime = 2e9, b.freq FROM blocks b JOIN versions v "
            "ON v.id = b.version WHERE v.name = ? ORDER BY b.idx",
            (V1,),
        ).fetchall()
        assert rows == [(0, 1, 2), (1, 1, 1), (2, 1, 1), (3, 1, 1), (4, 0, 0), (5, 0, 0)]
    finally:
        conn.close()
    assert _bb(index.last_totals) == (90, 7)
