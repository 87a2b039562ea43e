"""reconcile: the index learns the files after an unclean stop, in bounded resumable steps,
moving format-1 blocks into shard dirs on the way."""

from __future__ import annotations

import os
import sqlite3
import time
import tracemalloc
from pathlib import Path

import pytest

from nwbcache_proxy import reconcile, schema, store
from nwbcache_proxy.index import CacheIndex, Totals
from nwbcache_proxy.layout import BLOCKS_PER_DIR, Layout
from nwbcache_proxy.reconcile import Reconciler

V1 = "objects/aa/aaaa/0123.16"
V2 = "objects/bb/bbbb/4567.16"


def _file(layout: Layout, version: str, n: int, size: int = 10, mtime: float | None = None) -> Path:
    path = layout.block_path(version, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"z" * size)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _conn(layout: Layout) -> sqlite3.Connection:
    layout.root.mkdir(parents=True, exist_ok=True)
    return schema.connect(layout.index_path)


def _bb(totals: Totals) -> tuple[int, int]:
    return totals.bytes, totals.blocks


def _rows(conn: sqlite3.Connection) -> dict[tuple[str, int], tuple[int, float]]:
    return {
        (v, i): (b, a)
        for v, i, b, a in conn.execute(
            "SELECT v.name, b.idx, b.bytes, b.atime "
            "FROM blocks b JOIN versions v ON v.id = b.version"
        )
    }


def _run(layout: Layout, conn: sqlite3.Connection, max_files: int = 10_000) -> reconcile.Progress:
    r = Reconciler(layout, conn)
    while not (p := r.step(max_files)).done:
        pass
    return p


def _add_row(conn: sqlite3.Connection, version: str, n: int, size: int, atime: float) -> None:
    vid = schema.version_id(conn, version, create=True)
    assert vid is not None
    schema.add_found(conn, vid, [(n, size, atime)])


def test_files_without_rows_are_added_and_rows_without_files_dropped(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    conn = _conn(layout)
    _file(layout, V1, 0, 33, mtime=1000.0)
    _file(layout, V1, BLOCKS_PER_DIR + 2, 44, mtime=1001.0)  # another shard
    _add_row(conn, V1, 5, 50, atime=1.0)  # its file is gone
    _add_row(conn, V2, 0, 60, atime=1.0)  # its whole version dir is gone
    p = _run(layout, conn)
    assert (p.added, p.removed, p.done) == (2, 2, True)
    assert _rows(conn) == {(V1, 0): (33, 1000.0), (V1, BLOCKS_PER_DIR + 2): (44, 1001.0)}
    assert schema.totals(conn) == (77, 2)
    assert not reconcile.is_needed(conn)
    assert _run(layout, conn).added == 0  # nothing due: a no-op


def test_a_row_newer_than_the_listing_is_kept(tmp_path: Path) -> None:
    """A block published (and recorded) after its shard was listed is no orphan row."""
    layout = Layout(tmp_path)
    conn = _conn(layout)
    _file(layout, V1, 0)
    _add_row(conn, V1, 1, 10, atime=time.time() + 60)
    _run(layout, conn)
    assert set(_rows(conn)) == {(V1, 0), (V1, 1)}


def test_an_interrupted_reconcile_resumes_where_it_was(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    conn = _conn(layout)
    versions = [f"objects/{p:02x}/{p:02x}{'c' * 62}/ab.16" for p in range(6)]
    for v in versions:
        for n in (0, 1, BLOCKS_PER_DIR):
            _file(layout, v, n)
    first = Reconciler(layout, conn)
    partial = first.step(4)  # units of 2, 1 and 2 files, then "a crash"
    assert not partial.done and 0 < partial.files < 18
    cursor = schema.get_state(conn, schema.RECONCILE)
    assert cursor and cursor.startswith("01/")  # the second object's first shard
    second = Reconciler(layout, conn)
    rest = second.step(1000)
    assert rest.done
    assert partial.files + rest.files == 18 and rest.versions == 6
    assert len(_rows(conn)) == 18


def test_format_1_blocks_are_moved_into_shard_dirs(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    legacy = layout.legacy_root / V1
    legacy.mkdir(parents=True)
    for n in (0, 3, BLOCKS_PER_DIR + 1):
        (legacy / f"{n}.blk").write_bytes(bytes([n % 251]) * 8)
    assert store.adopt_legacy_root(layout)
    assert not layout.legacy_root.exists()
    assert not store.adopt_legacy_root(layout)  # once
    conn = _conn(layout)
    p = _run(layout, conn, max_files=2)
    assert p.moved == 3 and p.added == 3
    for n in (0, 3, BLOCKS_PER_DIR + 1):
        assert layout.block_path(V1, n).read_bytes() == bytes([n % 251]) * 8
    assert not list(layout.version_path(V1).glob("*.blk"))


def test_the_legacy_root_is_left_alone_when_a_new_root_exists(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.legacy_root.mkdir(parents=True)
    layout.root.mkdir(parents=True)
    assert not store.adopt_legacy_root(layout)
    assert layout.legacy_root.exists()


async def test_one_process_reconciles_at_a_time_and_the_daemon_index_finishes(
    tmp_path: Path,
) -> None:
    layout = Layout(tmp_path)
    for n in range(50):
        _file(layout, V1, n)
    a, b = CacheIndex(layout), CacheIndex(layout)
    await a.open()
    await b.open()
    try:
        first = await a.reconcile_step(10)
        assert first is not None and not first.done
        assert await b.reconcile_step(10) is None  # a holds the reconcile lock
        while not (step := await a.reconcile_step(10)) or not step.done:
            assert step is not None
        assert _bb(a.last_totals) == (500, 50)
        assert await a.reconcile_step(10) is None  # done: nothing due
        await b.mark_reconcile()  # a later unclean stop: b may do the next one
        again = await b.reconcile_step(1000)
        assert again is not None and again.done and again.added == 0
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("count", [20_000])
def test_memory_does_not_grow_with_the_number_of_files(tmp_path: Path, count: int) -> None:
    layout = Layout(tmp_path)
    for i in range(count // 100):
        v = f"objects/{i % 256:02x}/{i:064x}/ab.16"
        for n in range(100):
            _file(layout, v, n, size=1)
    conn = _conn(layout)
    tracemalloc.start()
    try:
        p = _run(layout, conn, max_files=4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert p.added == count
    # Holding every path (as the old reconcile did) takes ~200 B a file, 4 MB here.
    assert peak < 1_500_000, f"peak {peak} B"


def test_rows_of_a_shard_whose_dir_is_gone_are_dropped(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    conn = _conn(layout)
    _file(layout, V1, 0)
    _file(layout, V1, 2 * BLOCKS_PER_DIR)  # shards 0 and 2 exist
    for n in (5, BLOCKS_PER_DIR + 1, 3 * BLOCKS_PER_DIR, 10**9):  # rows in shards 1, 3 and far
        _add_row(conn, V1, n, 10, atime=1.0)
    _add_row(conn, V1, BLOCKS_PER_DIR + 7, 10, atime=time.time() + 60)  # published after the walk
    p = _run(layout, conn)
    assert set(_rows(conn)) == {(V1, 0), (V1, 2 * BLOCKS_PER_DIR), (V1, BLOCKS_PER_DIR + 7)}
    assert (p.added, p.removed) == (2, 4)
