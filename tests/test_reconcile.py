"""reconcile: the index learns the versions' maps after an unclean stop, in bounded resumable
steps; bytes a crash left without map entries are punched out, half versions removed.

Caches are built here with the real storage layer (versionfile.VersionFiles) and the
real index schema; the reconciler is driven directly (``Reconciler.step``) or through
the daemon's index (``CacheIndex.reconcile_step``). Moving formats 1 and 2 into data
files is tests/test_migrate.py's.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
import tracemalloc
from collections.abc import Iterable
from pathlib import Path

import pytest

from nwbcache_proxy import mapfile, reconcile, schema
from nwbcache_proxy.index import CacheIndex
from nwbcache_proxy.layout import Layout
from nwbcache_proxy.mapfile import MapHeader
from nwbcache_proxy.reconcile import CHUNK_BLOCKS, Reconciler
from nwbcache_proxy.spanlocks import runs_of
from nwbcache_proxy.versionfile import VersionFiles
from tests.support.helpers import allocated, reconcile_all

BS = 16
V1 = "objects/aa/aaaa/0123.16"
V2 = "objects/bb/bbbb/4567.16"
V3 = "objects/cc/cccc/89ab.16"


def _data(name: str, index: int, length: int) -> bytes:
    """Block ``index`` of version ``name``: bytes no other block has."""
    seed = hashlib.sha256(f"{name}/{index}".encode()).digest()
    return (seed * (length // len(seed) + 1))[:length]


def _header(name: str, size: int, bs: int = BS) -> MapHeader:
    return MapHeader(bs, size, hashlib.sha256(name.encode()).digest())


def _open(layout: Layout, name: str, header: MapHeader) -> VersionFiles:
    files = VersionFiles.open(layout.data_path(name), layout.map_path(name), header, create=True)
    assert files is not None
    return files


def _version(
    layout: Layout,
    name: str,
    size: int,
    blocks: Iterable[int],
    *,
    bs: int = BS,
    mtime: float | None = None,
) -> MapHeader:
    """A format-3 version of ``size`` bytes with ``blocks`` written and mapped, as the
    daemon writes them (VersionFiles.write_group); the data file's mtime ``mtime``."""
    h = _header(name, size, bs)
    files = _open(layout, name, h)
    try:
        for first, count in runs_of(sorted(blocks)):
            parts = [[_data(name, i, h.length_of(i))] for i in range(first, first + count)]
            files.write_group(first, parts)
    finally:
        files.close()
    if mtime is not None:
        os.utime(layout.data_path(name), (mtime, mtime))
    return h


def _conn(layout: Layout) -> sqlite3.Connection:
    layout.root.mkdir(parents=True, exist_ok=True)
    return schema.connect(layout.index_path)


def _rows(conn: sqlite3.Connection) -> dict[tuple[str, int], tuple[int, float]]:
    return {
        (v, i): (b, a)
        for v, i, b, a in conn.execute(
            "SELECT v.name, b.idx, b.bytes, b.atime "
            "FROM blocks b JOIN versions v ON v.id = b.version"
        )
    }


def _add_row(conn: sqlite3.Connection, version: str, n: int, size: int, atime: float) -> None:
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        vid = schema.version_id(conn, version, create=True)
        assert vid is not None
        schema.add_found(conn, vid, [(n, size, atime)])


def _mark(conn: sqlite3.Connection) -> None:
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        reconcile.mark_needed(conn)


def test_blocks_without_rows_are_added_and_rows_without_blocks_dropped(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    conn = _conn(layout)
    size = BS * (CHUNK_BLOCKS + 4) + 5  # two chunks of the map; a short last block
    last = CHUNK_BLOCKS + 4
    h = _version(layout, V1, size, [0, CHUNK_BLOCKS + 2, last], mtime=1000.0)
    assert h.length_of(last) == 5
    _add_row(conn, V1, 5, BS, atime=1.0)  # its block is gone from the map
    _add_row(conn, V1, CHUNK_BLOCKS + 3, BS, atime=1.0)  # in the second chunk: gone too
    _add_row(conn, V2, 0, 60, atime=1.0)  # its whole version is gone
    assert reconcile.is_needed(conn)  # a new index is reconciled
    p = reconcile_all(layout, conn)
    assert (p.added, p.removed, p.done) == (3, 3, True)
    assert _rows(conn) == {
        (V1, 0): (BS, 1000.0),  # the block's own bytes, the data file's mtime
        (V1, CHUNK_BLOCKS + 2): (BS, 1000.0),
        (V1, last): (5, 1000.0),
    }
    assert schema.totals(conn) == (2 * BS + 5, 3)
    assert conn.execute("SELECT name, bytes, blocks FROM versions").fetchall() == [
        (V1, 2 * BS + 5, 3)
    ]
    assert not reconcile.is_needed(conn)
    again = reconcile_all(layout, conn)  # nothing due: a no-op
    assert (again.files, again.added, again.removed) == (0, 0, 0)
    _mark(conn)  # an unclean stop later: everything agrees already
    third = reconcile_all(layout, conn)
    assert (third.files, third.added, third.removed) == (h.blocks, 0, 0)
    assert len(_rows(conn)) == 3


def test_a_block_whose_entry_does_not_fit_its_place_is_not_indexed(tmp_path: Path) -> None:
    """An entry of another length than its block's (a corrupt map) says the block is absent."""
    layout = Layout(tmp_path)
    conn = _conn(layout)
    h = _version(layout, V1, 4 * BS, [0, 1, 2])
    with layout.map_path(V1).open("r+b") as fh:  # block 1's entry: the right CRC, 1 byte short
        fh.seek(mapfile.entry_offset(1))
        crc = fh.read(4)
        fh.seek(mapfile.entry_offset(1))
        fh.write(crc + (BS - 1).to_bytes(4, "little"))
    p = reconcile_all(layout, conn)
    assert set(_rows(conn)) == {(V1, 0), (V1, 2)}
    assert p.added == 2 and h.blocks == 4


def test_a_row_newer_than_the_listing_is_kept(tmp_path: Path) -> None:
    """A block written (and recorded) after its chunk was read is no orphan row."""
    layout = Layout(tmp_path)
    conn = _conn(layout)
    _version(layout, V1, 4 * BS, [0])
    _add_row(conn, V1, 1, BS, atime=time.time() + 60)
    _add_row(conn, V1, 2, BS, atime=time.time() - 60)  # older: dropped
    p = reconcile_all(layout, conn)
    assert set(_rows(conn)) == {(V1, 0), (V1, 1)}
    assert (p.added, p.removed) == (1, 1)


def test_an_interrupted_reconcile_resumes_where_it_was(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    conn = _conn(layout)
    versions = [f"objects/{p:02x}/{p:02x}{'c' * 62}/ab.16" for p in range(6)]
    size = BS * (CHUNK_BLOCKS + 1)  # two chunks each
    for v in versions:
        _version(layout, v, size, [0, 1, CHUNK_BLOCKS])
    first = Reconciler(layout, conn)
    partial = first.step(CHUNK_BLOCKS + 2)  # the first version's two chunks, then "a crash"
    assert not partial.done
    assert partial.files == CHUNK_BLOCKS + 1 + CHUNK_BLOCKS  # and the second's first chunk
    cursor = schema.get_state(conn, schema.RECONCILE)
    assert cursor == f"01/{versions[1].split('/')[2]}/ab.16/b000000000000", cursor
    assert len(_rows(conn)) == 3 + 2  # the second version's first chunk is in
    conn.close()
    conn = _conn(layout)  # another process, after the crash
    second = Reconciler(layout, conn)
    rest = second.step(1_000_000)
    assert rest.done
    assert partial.files + rest.files == 6 * (CHUNK_BLOCKS + 1)  # nothing looked at twice
    assert partial.added + rest.added == 18 and rest.versions == 6
    assert len(_rows(conn)) == 18
    assert schema.totals(conn) == (18 * BS, 18)


def test_rows_past_a_versions_last_block_are_dropped(tmp_path: Path) -> None:
    """Rows no chunk of the map sees (a version is a given number of blocks; a corrupt
    or foreign row may name any index) go in the version's last unit."""
    layout = Layout(tmp_path)
    conn = _conn(layout)
    size = BS * (CHUNK_BLOCKS + 1)  # blocks 0..4096: chunk 0 and one block of chunk 1
    _version(layout, V1, size, [0, CHUNK_BLOCKS])
    for n in (CHUNK_BLOCKS + 1, 3 * CHUNK_BLOCKS, 10**9):  # past the end, in and beyond chunk 1
        _add_row(conn, V1, n, BS, atime=1.0)
    p = reconcile_all(layout, conn)
    assert set(_rows(conn)) == {(V1, 0), (V1, CHUNK_BLOCKS)}
    assert (p.added, p.removed) == (2, 3)


def test_rows_of_versions_without_a_map_are_dropped(tmp_path: Path) -> None:
    """The last phase: versions whose files went while their rows stayed (a crash
    between a drop's unlinks and its rows' delete), in batches of VERSION_BATCH."""
    layout = Layout(tmp_path)
    conn = _conn(layout)
    _version(layout, V1, 4 * BS, [0])
    gone = [f"objects/dd/{n:064x}/ab.16" for n in range(reconcile.VERSION_BATCH + 20)]
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        for name in gone:
            vid = schema.version_id(conn, name, create=True)
            assert vid is not None
            schema.add_found(conn, vid, [(0, BS, 1.0), (1, BS, 1.0)])
    p = reconcile_all(layout, conn, max_files=100)
    assert set(_rows(conn)) == {(V1, 0)}
    assert p.removed == 2 * len(gone)
    assert p.versions == len(gone) + 1  # V1's row was added in the walk, then checked
    assert conn.execute("SELECT count(*) FROM versions").fetchone() == (1,)
    assert schema.totals(conn) == (BS, 1)


def test_a_lone_data_file_or_map_is_removed_and_its_rows_dropped(tmp_path: Path) -> None:
    """What a crash between creating or removing a version's two files leaves."""
    layout = Layout(tmp_path)
    conn = _conn(layout)
    _version(layout, V1, 4 * BS, [0, 1])
    _version(layout, V2, 4 * BS, [0, 1])
    _version(layout, V3, 4 * BS, [0, 1])
    layout.map_path(V1).unlink()  # a data file without its map
    layout.data_path(V2).unlink()  # a map without its data file
    layout.map_path(V3).write_bytes(b"not a map" * 10)  # a map that is not one
    kept = "objects/ee/eeee/cdef.16"
    _version(layout, kept, 4 * BS, [3])
    for name in (V1, V2, V3):
        _add_row(conn, name, 0, BS, atime=1.0)
    p = reconcile_all(layout, conn)
    for name in (V1, V2, V3):
        assert not layout.data_path(name).exists(), name
        assert not layout.map_path(name).exists(), name
    assert layout.data_path(kept).exists() and layout.map_path(kept).exists()
    assert set(_rows(conn)) == {(kept, 3)}
    assert p.removed == 3
    # The object dirs' other files are not touched.
    assert sorted(e.name for e in layout.object_dir("eeee").iterdir()) == [
        "cdef.16.data",
        "cdef.16.map",
    ]


def test_bytes_no_entry_maps_are_punched_out(tmp_path: Path) -> None:
    """A crash between a group's bytes and its entries leaves bytes no row counts:
    the reconciler frees them; mapped blocks keep theirs."""
    layout = Layout(tmp_path)
    conn = _conn(layout)
    bs = 64 * 1024
    name = f"objects/ff/ffff/0123.{bs}"
    size = 40 * bs + 100  # a short last block
    h = _version(layout, name, size, range(0, 8), bs=bs)
    data = layout.data_path(name)
    fd = os.open(data, os.O_WRONLY)
    try:  # blocks 16..23 and the last written, their entries never
        os.pwrite(fd, b"\x5a" * (8 * bs), h.offset_of(16))
        os.pwrite(fd, b"\x5a" * 100, h.offset_of(40))
        os.fsync(fd)
    finally:
        os.close(fd)
    before = allocated(data)
    assert before >= 16 * bs + 100
    p = reconcile_all(layout, conn)
    after = allocated(data)
    assert before - after >= 8 * bs + 100, (before, after)
    assert after <= 8 * bs + 4096  # the mapped blocks, give or take a filesystem block
    assert p.reclaimed >= 8 * bs + 100
    raw = data.read_bytes()
    assert raw[h.offset_of(16) : h.offset_of(24)] == bytes(8 * bs)
    assert raw[h.offset_of(40) : size] == bytes(100)
    files = VersionFiles.open_existing(data, layout.map_path(name))
    assert files is not None
    try:
        for i in range(8):
            assert files.read_block(i) == _data(name, i, bs)
        assert files.mapped(0, h.blocks) == [i < 8 for i in range(h.blocks)]
    finally:
        files.close()
    assert set(_rows(conn)) == {(name, i) for i in range(8)}
    _mark(conn)
    assert reconcile_all(layout, conn).reclaimed == 0  # nothing left to free


def test_a_span_being_written_is_not_punched_until_a_later_pass(tmp_path: Path) -> None:
    """A writer between its bytes and its entries holds the span's write lock: the
    reconciler leaves those bytes (they are about to be mapped)."""
    layout = Layout(tmp_path)
    conn = _conn(layout)
    bs = 64 * 1024
    name = f"objects/ff/ffff/0123.{bs}"
    h = _version(layout, name, 16 * bs, [0], bs=bs)
    writer = _open(layout, name, h)  # another open: its locks conflict with the reconciler's
    try:
        assert writer.try_lock(4, 2)
        os.pwrite(writer.data_fd, b"\x11" * (2 * bs), h.offset_of(4))
        p = reconcile_all(layout, conn)
        assert p.reclaimed == 0
        assert layout.data_path(name).read_bytes()[h.offset_of(4) : h.offset_of(6)] == (
            b"\x11" * (2 * bs)
        )
        writer.unlock(4, 2)
        _mark(conn)  # the writer died before its entries: the next pass frees them
        again = reconcile_all(layout, conn)
        assert again.reclaimed >= 2 * bs
        assert layout.data_path(name).read_bytes()[h.offset_of(4) : h.offset_of(6)] == bytes(2 * bs)
    finally:
        writer.close()


async def test_one_process_reconciles_at_a_time_and_the_daemon_index_finishes(
    tmp_path: Path,
) -> None:
    layout = Layout(tmp_path)
    layout.root.mkdir(parents=True)
    _version(layout, V1, 60 * BS, range(50))
    _version(layout, V2, 60 * BS, range(10, 20))
    a, b = CacheIndex(layout), CacheIndex(layout)
    await a.open()
    await b.open()
    try:
        first = await a.reconcile_step(10)
        assert first is not None and not first.done
        assert await b.reconcile_step(10) is None  # a holds the reconcile lock
        steps = 1
        while True:
            step = await a.reconcile_step(10)
            assert step is not None  # a's reconcile, until it is done
            steps += 1
            if step.done:
                break
        assert steps >= 3  # bounded: about 10 blocks, at least a unit, per step
        assert (a.last_totals.bytes, a.last_totals.blocks) == (60 * BS, 60)
        assert await a.reconcile_step(10) is None  # done: nothing due
        await b.mark_reconcile()  # a later unclean stop: b may do the next one
        again = await b.reconcile_step(1000)
        assert again is not None and again.done and (again.added, again.removed) == (0, 0)
        assert (b.last_totals.bytes, b.last_totals.blocks) == (60 * BS, 60)
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("versions", [100])
def test_memory_does_not_grow_with_the_number_of_blocks(tmp_path: Path, versions: int) -> None:
    """Memory holds one chunk of one map, never a listing of the cache: 100 versions
    of 100 blocks and one of 4 chunks (26,384 blocks) cost what one chunk does."""
    layout = Layout(tmp_path)
    for i in range(versions):
        _version(layout, f"objects/{i % 256:02x}/{i:064x}/ab.1", 100, range(100), bs=1)
    big = "objects/ff/ffff/cd.1"
    _version(layout, big, 4 * CHUNK_BLOCKS, range(4 * CHUNK_BLOCKS), bs=1)
    conn = _conn(layout)
    tracemalloc.start()
    try:
        p = reconcile_all(layout, conn, max_files=CHUNK_BLOCKS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    blocks = versions * 100 + 4 * CHUNK_BLOCKS
    assert p.added == blocks and schema.totals(conn) == (blocks, blocks)
    # One chunk's blocks and rows take ~2.2-3.2 MB (its rows go to and from SQLite
    # as one JSON text beside them); a row or a dict entry per block of the cache
    # (>= 100 B each) would take 2.6 MB more.
    assert peak < 4_000_000, f"peak {peak} B"


@pytest.mark.parametrize(
    ("blocks", "chunks", "last"),
    [
        (0, 0, None),
        (1, 1, (0, 1)),
        (CHUNK_BLOCKS, 1, (0, CHUNK_BLOCKS)),
        (CHUNK_BLOCKS + 1, 2, (CHUNK_BLOCKS, 1)),
        (3 * CHUNK_BLOCKS - 2, 3, (2 * CHUNK_BLOCKS, CHUNK_BLOCKS - 2)),
    ],
)
def test_a_versions_chunks_cover_its_blocks_once_the_last_one_short(
    blocks: int, chunks: int, last: tuple[int, int] | None
) -> None:
    assert reconcile.chunk_count(blocks) == chunks
    spans = [reconcile.chunk_span(blocks, c) for c in range(chunks)]
    assert [i for first, count in spans for i in range(first, first + count)] == list(range(blocks))
    assert (spans[-1] if spans else None) == last
