"""Formats 1 and 2 become format 3: the old root is adopted, the index schema migrated,
and the reconciler moves every block file into its version's data file and map.

The old caches are built here as the old daemons left them: meta.json as
``store.write_meta`` writes it, block files of the real encoder
(``blockfile.encode_header``; format 1's CRC-32 header patched from it), and the
index of their schema (4 for format 2, 2 for format 1). Pure tests drive the
reconciler (``Reconciler.step``); end-to-end ones start the real daemon in front of
the S3 emulator and read every block through it without one upstream request.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sqlite3
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import requests

from nwbcache.urls import cache_key, parse_upstream_url
from nwbcache_proxy import blockfile, migrate, reconcile, schema, store
from nwbcache_proxy.blockfile import HEADER_SIZE
from nwbcache_proxy.index import CacheIndex
from nwbcache_proxy.layout import BLOCKS_PER_DIR, Layout, key_hash
from nwbcache_proxy.mapfile import MapHeader
from nwbcache_proxy.objectmeta import ObjectMeta, ObjectVersion
from nwbcache_proxy.reconcile import Reconciler
from nwbcache_proxy.versionfile import VersionFiles
from tests.support.daemons import DaemonThread
from tests.support.helpers import get_range, proxied, reconcile_all, wait_until
from tests.support.s3emu import S3Emulator

BS = 64
TIMEOUT = 30  # per HTTP request: only there so that a hang fails

# The index schema the format-1 daemons wrote (schema 2, user_version 2), frozen
# from their index.py: a copy, never edited.
SCHEMA_2 = """
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
CREATE TRIGGER IF NOT EXISTS blocks_ins AFTER INSERT ON blocks BEGIN
    UPDATE totals SET bytes = bytes + NEW.bytes, blocks = blocks + 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS blocks_del AFTER DELETE ON blocks BEGIN
    UPDATE totals SET bytes = bytes - OLD.bytes, blocks = blocks - 1 WHERE id = 0;
END;
"""


def block_file(index: int, data: bytes, digest: bytes, *, crc_format: int) -> bytes:
    """A block file's bytes: the real encoder's header (format 2, CRC-32C), or format
    1's (CRC-32: the same header with its version and checksum patched)."""
    header = bytearray(blockfile.encode_header(index, data, digest))
    if crc_format == 1:
        header[8:10] = (1).to_bytes(2, "little")
        header[28:32] = zlib.crc32(data).to_bytes(4, "little")
    raw = bytes(header) + data
    decoded = blockfile.decode_header(raw)  # what the readers of those formats accept
    assert decoded.version == crc_format
    blockfile.check_data(decoded, data)
    return raw


@dataclasses.dataclass(frozen=True)
class Old:
    """One object version in an old cache."""

    key: str  # the cache key
    data: bytes  # the object's bytes (the origin's)
    bs: int
    cached: tuple[int, ...]  # the blocks on disk
    digest: bytes
    name: str  # the version dir relative to the root: the index's name of it

    @property
    def header(self) -> MapHeader:
        return MapHeader(self.bs, len(self.data), self.digest)

    def block(self, index: int) -> bytes:
        return self.data[index * self.bs : (index + 1) * self.bs]


def old_schema(conn: sqlite3.Connection, version: int) -> None:
    """Schema 4 or 5 (as their daemons made it): today's tables without what
    came after, schema 6's count of versions in the totals (and for 4, schema
    5's trigger on a row's bytes)."""
    schema.run_script(conn, schema.SCHEMA)
    conn.execute("DROP TRIGGER versions_ins")
    conn.execute("DROP TRIGGER versions_del")
    conn.execute("ALTER TABLE totals DROP COLUMN versions")
    if version == 4:
        conn.execute("DROP TRIGGER blocks_bytes")
    conn.execute(f"PRAGMA user_version = {version}")


class OldCache:
    """A cache dir as a format-1 (``v1/``, flat version dirs, CRC-32 blocks, index
    schema 2) or format-2 daemon (``v2/``, shard dirs, CRC-32C blocks, schema 4)
    left it."""

    def __init__(self, cache_dir: Path, fmt: int) -> None:
        assert fmt in (1, 2)
        self.fmt = fmt
        self.cache_dir = cache_dir
        self.root = cache_dir / f"v{fmt}"
        self.root.mkdir(parents=True)
        self.conn = sqlite3.connect(self.root / "index.sqlite3", isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        if fmt == 1:
            schema.run_script(self.conn, SCHEMA_2)
            self.conn.execute("PRAGMA user_version = 2")
        else:  # schema 4: today's tables without schema 5's trigger on a row's bytes
            old_schema(self.conn, 4)

    def close(self) -> None:
        self.conn.close()

    def add(
        self,
        url: str,
        data: bytes,
        cached: Iterable[int],
        *,
        etag: str,
        bs: int = BS,
        crc_format: int | None = None,
    ) -> Old:
        """An object of the origin (its URL, bytes and quoted ETag) with blocks
        ``cached`` on disk and in the index (a row of 64 + the block's bytes)."""
        key = cache_key(parse_upstream_url(url))
        meta = ObjectMeta(key, ObjectVersion(len(data), etag, None), time.time(), private=False)
        kh = key_hash(key)
        odir = self.root / "objects" / kh[:2] / kh
        odir.mkdir(parents=True, exist_ok=True)
        (odir / "meta.json").write_text(json.dumps(meta.to_json(), sort_keys=True))
        name = f"objects/{kh[:2]}/{kh}/{meta.digest.hex()[:32]}.{bs}"
        old = Old(key, data, bs, tuple(sorted(cached)), meta.digest, name)
        at = time.time() - 3600  # used an hour ago
        for i in old.cached:
            self.write_block(old, i, crc_format=crc_format)
        self.add_rows(old, [(i, HEADER_SIZE + len(old.block(i)), at) for i in old.cached])
        return old

    def block_path(self, old: Old, index: int) -> Path:
        vdir = self.root / old.name
        if self.fmt == 1:
            return vdir / f"{index}.blk"
        return vdir / str(index // BLOCKS_PER_DIR) / f"{index}.blk"

    def write_block(
        self, old: Old, index: int, raw: bytes | None = None, *, crc_format: int | None = None
    ) -> Path:
        path = self.block_path(old, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        if raw is None:
            fmt = crc_format or self.fmt
            raw = block_file(index, old.block(index), old.digest, crc_format=fmt)
        path.write_bytes(raw)
        return path

    def add_rows(self, old: Old, rows: list[tuple[int, int, float]]) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            if self.fmt == 1:
                self.conn.executemany(
                    "INSERT INTO blocks(path, version, bytes, atime) VALUES (?, ?, ?, ?)",
                    [(f"{old.name}/{i}.blk", old.name, b, a) for i, b, a in rows],
                )
                return
            vid = schema.version_id(self.conn, old.name, create=True)
            assert vid is not None
            schema.add_found(self.conn, vid, rows)
            self.conn.execute(
                "UPDATE versions SET key = ?, size = ? WHERE id = ?", (old.key, len(old.data), vid)
            )


@pytest.fixture
def old2(tmp_path: Path) -> Iterator[OldCache]:
    cache = OldCache(tmp_path / "cache", 2)
    try:
        yield cache
    finally:
        cache.close()


@pytest.fixture
def old1(tmp_path: Path) -> Iterator[OldCache]:
    cache = OldCache(tmp_path / "cache", 1)
    try:
        yield cache
    finally:
        cache.close()


def _bytes(n: int, seed: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += zlib.crc32(f"{seed}/{counter}".encode()).to_bytes(4, "little") * 8
        counter += 1
    return bytes(out[:n])


def _adopt(cache: OldCache) -> tuple[Layout, sqlite3.Connection]:
    """What a daemon's start does: the old root renamed, the index migrated."""
    layout = Layout(cache.cache_dir)
    assert store.adopt_legacy_root(layout) == cache.root
    assert not cache.root.exists() and layout.root.is_dir()
    conn = schema.connect(layout.index_path)
    assert conn.execute("PRAGMA user_version").fetchone() == (schema.SCHEMA_VERSION,)
    assert reconcile.is_needed(conn)
    return layout, conn


def _rows(conn: sqlite3.Connection) -> dict[tuple[str, int], int]:
    return {
        (v, i): b
        for v, i, b in conn.execute(
            "SELECT v.name, b.idx, b.bytes FROM blocks b JOIN versions v ON v.id = b.version"
        )
    }


def _expected_rows(*olds: Old, but: Iterable[tuple[Old, int]] = ()) -> dict[tuple[str, int], int]:
    left_out = {(o.name, i) for o, i in but}
    return {
        (o.name, i): len(o.block(i)) for o in olds for i in o.cached if (o.name, i) not in left_out
    }


def _assert_moved(layout: Layout, old: Old, blocks: Iterable[int]) -> None:
    """The version's data file and map hold exactly ``blocks``, each byte-exact; its
    old dir is gone."""
    want = set(blocks)
    assert not (layout.root / old.name).exists(), old.name
    files = VersionFiles.open(
        layout.data_path(old.name), layout.map_path(old.name), old.header, create=False
    )
    assert files is not None, old.name
    try:
        assert files.mapped(0, old.header.blocks) == [i in want for i in range(old.header.blocks)]
        for i in want:
            assert files.read_block(i) == old.block(i), (old.name, i)
    finally:
        files.close()


def _no_block_files(layout: Layout) -> None:
    assert not list(layout.objects.rglob("*.blk"))
    leftovers = [p for p in layout.objects.glob("*/*/*") if p.is_dir()]
    assert not leftovers, leftovers


# -- adopting the old root ---------------------------------------------------------


def test_the_legacy_root_is_left_alone_when_a_new_root_exists(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    (tmp_path / "v2" / "objects").mkdir(parents=True)
    layout.root.mkdir(parents=True)
    assert store.adopt_legacy_root(layout) is None
    assert (tmp_path / "v2" / "objects").is_dir()


def test_format_2_is_adopted_before_format_1_and_only_once(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    for fmt in ("v1", "v2"):
        (tmp_path / fmt / "objects").mkdir(parents=True)
        (tmp_path / fmt / "mine").write_text(fmt)
    assert store.adopt_legacy_root(layout) == tmp_path / "v2"
    assert (layout.root / "mine").read_text() == "v2"
    assert store.adopt_legacy_root(layout) is None  # once
    assert (tmp_path / "v1" / "mine").read_text() == "v1"


# -- the reconciler's move ---------------------------------------------------------


def test_format_2_blocks_are_moved_and_their_rows_resized(old2: OldCache) -> None:
    n = BLOCKS_PER_DIR + 3  # two shard dirs; a short last block
    cached = [*range(40), *range(BLOCKS_PER_DIR - 5, n)]
    a = old2.add("https://h.example/a", _bytes(n * BS - 7, 1), cached, etag='"a1"')
    b = old2.add("https://h.example/b", _bytes(10 * BS, 2), [0, 4, 9], etag='"b1"')
    # Format 2's dirs may hold format-1 blocks (CRC-32: written before CRC-32C).
    c = old2.add("https://h.example/c", _bytes(5 * BS, 3), [1, 2], etag='"c1"', crc_format=1)
    before = schema.totals(old2.conn)
    blocks = len(cached) + 5
    assert before == (
        sum(HEADER_SIZE + len(o.block(i)) for o in (a, b, c) for i in o.cached),
        blocks,
    )
    layout, conn = _adopt(old2)
    assert schema.totals(conn) == before  # rows kept as they were until moved
    p = reconcile_all(layout, conn, max_files=1000)
    assert p.moved == blocks and p.added == p.removed == 0
    for old in (a, b, c):
        _assert_moved(layout, old, old.cached)
    _no_block_files(layout)
    rows = _expected_rows(a, b, c)
    assert _rows(conn) == rows
    assert rows[(a.name, n - 1)] == BS - 7
    assert schema.totals(conn) == (sum(rows.values()), len(rows))
    assert conn.execute("SELECT sum(bytes), sum(blocks) FROM versions").fetchone() == (
        sum(rows.values()),
        len(rows),
    )
    assert not reconcile.is_needed(conn)


def test_format_1_flat_blocks_are_moved_and_their_rows_resized(old1: OldCache) -> None:
    n = migrate.FLAT_BATCH + 5  # two units of flat files
    a = old1.add("https://h.example/a", _bytes(n * BS + 1, 4), range(n + 1), etag='"a1"')
    b = old1.add("https://h.example/b", _bytes(3 * BS, 5), [2], etag='"b1"')
    layout, conn = _adopt(old1)
    p = reconcile_all(layout, conn, max_files=500)
    assert p.moved == n + 2
    _assert_moved(layout, a, a.cached)
    _assert_moved(layout, b, [2])
    _no_block_files(layout)
    rows = _expected_rows(a, b)
    assert rows[(a.name, n)] == 1
    assert _rows(conn) == rows
    assert schema.totals(conn) == (sum(rows.values()), len(rows))


def test_corrupt_legacy_blocks_are_dropped_not_moved(old2: OldCache) -> None:
    n = 12
    a = old2.add("https://h.example/a", _bytes(n * BS - 3, 6), range(n), etag='"a1"')
    other = old2.add("https://h.example/other", _bytes(n * BS, 7), range(1), etag='"o1"')
    good = block_file
    flipped = bytearray(good(1, a.block(1), a.digest, crc_format=2))
    flipped[-1] ^= 0xFF  # bit rot: the checksum does not match
    old2.write_block(a, 1, bytes(flipped))
    old2.write_block(a, 2, good(2, a.block(2), a.digest, crc_format=2)[:-10])  # torn
    old2.write_block(a, 3, good(4, a.block(3), a.digest, crc_format=2))  # another index's header
    old2.write_block(a, 4, good(4, a.block(4), other.digest, crc_format=2))  # another version's
    old2.write_block(a, 5, a.block(5))  # no header at all
    old2.write_block(a, 6, good(6, a.block(6) + b"x", a.digest, crc_format=2))  # a byte too long
    old2.write_block(a, n - 1, good(n - 1, a.block(0), a.digest, crc_format=2))  # too long too
    (old2.root / a.name / "0" / f"{n + 2}.blk").write_bytes(
        good(n + 2, a.block(0), a.digest, crc_format=2)
    )  # past the version's end
    bad = [1, 2, 3, 4, 5, 6, n - 1]
    layout, conn = _adopt(old2)
    p = reconcile_all(layout, conn)
    assert p.moved == n - len(bad) + 1  # and other's block
    _assert_moved(layout, a, [i for i in range(n) if i not in bad])
    _no_block_files(layout)
    assert _rows(conn) == _expected_rows(a, other, but=[(a, i) for i in bad])
    assert p.removed == len(bad)


def test_a_legacy_dir_of_a_version_meta_json_does_not_name_is_dropped_whole(
    old2: OldCache,
) -> None:
    """A version aged out of meta.json (the object changed upstream) cannot be checked
    against its version: its dir goes, and its rows with it."""
    old = old2.add("https://h.example/a", _bytes(4 * BS, 8), [0, 1], etag='"v1"')
    new = old2.add("https://h.example/a", _bytes(6 * BS, 9), [0, 5], etag='"v2"')  # meta.json now
    assert old.name != new.name and old.name.rpartition("/")[0] == new.name.rpartition("/")[0]
    gone = old2.add("https://h.example/gone", _bytes(2 * BS, 10), [0], etag='"g"')
    (old2.root / gone.name).parent.joinpath("meta.json").unlink()  # no meta.json at all
    foreign = old2.add("https://h.example/f", _bytes(2 * BS, 11), [0], etag='"f"')
    meta = (old2.root / foreign.name).parent / "meta.json"  # another object's meta.json
    meta.write_text(meta.read_text().replace("https://h.example/f", "https://h.example/g"))
    layout, conn = _adopt(old2)
    p = reconcile_all(layout, conn)
    for dropped in (old, gone, foreign):
        assert not (layout.root / dropped.name).exists(), dropped.name
        assert not layout.map_path(dropped.name).exists()
        assert not layout.data_path(dropped.name).exists()
    _assert_moved(layout, new, [0, 5])
    _no_block_files(layout)
    assert _rows(conn) == _expected_rows(new)
    assert p.moved == 2 and p.removed == 4
    assert sorted(e.name for e in layout.trash.iterdir()) == []  # dropped, not only renamed


def test_an_interrupted_migration_resumes_at_its_cursor(old2: OldCache) -> None:
    n = 2 * BLOCKS_PER_DIR + 5  # three shard dirs
    cached = [0, 1, 7, BLOCKS_PER_DIR, BLOCKS_PER_DIR + 9, 2 * BLOCKS_PER_DIR, n - 1]
    a = old2.add("https://h.example/a", _bytes(n * BS, 12), cached, etag='"a1"')
    b = old2.add("https://h.example/b", _bytes(8 * BS, 13), range(8), etag='"b1"')
    layout, conn = _adopt(old2)
    first = Reconciler(layout, conn).step(1)  # a unit: the first shard dir of the first version
    assert not first.done
    first_name, first_old = min((a.name, a), (b.name, b))
    moved = [i for i in first_old.cached if i < BLOCKS_PER_DIR]
    assert first.moved == len(moved)
    cursor = schema.get_state(conn, schema.RECONCILE)
    assert cursor is not None and cursor.endswith("/as000000000000"), cursor
    assert cursor.startswith(first_name.removeprefix("objects/"))
    vdir = layout.root / first_name
    assert not list((vdir / "0").glob("*.blk"))  # the dir itself goes with the version's
    assert len(list(vdir.rglob("*.blk"))) == len(first_old.cached) - len(moved)
    rows = _rows(conn)
    assert all(rows[(first_name, i)] == len(first_old.block(i)) for i in moved)  # resized
    conn.close()  # "a crash"; another process resumes
    conn = schema.connect(layout.index_path)
    rest = reconcile_all(layout, conn, max_files=1)
    assert first.moved + rest.moved == len(a.cached) + len(b.cached)  # none moved twice
    assert first.files + rest.files >= len(a.cached) + len(b.cached)
    _assert_moved(layout, a, a.cached)
    _assert_moved(layout, b, b.cached)
    _no_block_files(layout)
    assert _rows(conn) == _expected_rows(a, b)
    assert schema.totals(conn) == (sum(_expected_rows(a, b).values()), len(a.cached) + 8)


def test_a_unit_cut_short_between_its_moves_and_its_rows_still_ends_with_exact_rows(
    old2: OldCache,
) -> None:
    """A crash after a unit's block files were moved (and unlinked) but before the
    transaction that rewrites their rows and the cursor: the unit is done again, and
    its rows, which still count the old headers, must end up counting the blocks."""
    a = old2.add("https://h.example/a", _bytes(10 * BS, 14), range(10), etag='"a1"')
    layout, conn = _adopt(old2)
    files = VersionFiles.open(
        layout.data_path(a.name), layout.map_path(a.name), a.header, create=True
    )
    assert files is not None
    try:  # the unit's work (reconcile.Reconciler._move), without its transaction
        ((_, paths),) = migrate.units(layout.root / a.name)
        moved, corrupt = migrate.move(files, paths)
    finally:
        files.close()
    assert len(moved) == 10 and corrupt == 0
    assert set(_rows(conn).values()) == {HEADER_SIZE + BS}
    reconcile_all(layout, conn)
    _assert_moved(layout, a, range(10))
    assert _rows(conn) == _expected_rows(a)
    assert schema.totals(conn) == (10 * BS, 10)


def test_a_block_fetched_again_before_its_move_keeps_its_entry(old2: OldCache) -> None:
    """Until its turn, an old block is a miss: the daemon fetches it into the data file
    (and its row stays the old one, a use only updating its time). The move then
    finds it mapped, unlinks its file, and the row counts the block's bytes."""
    a = old2.add("https://h.example/a", _bytes(6 * BS, 15), range(6), etag='"a1"')
    layout, conn = _adopt(old2)
    files = VersionFiles.open(
        layout.data_path(a.name), layout.map_path(a.name), a.header, create=True
    )
    assert files is not None
    try:
        files.write_group(2, [[a.block(2)], [a.block(3)]])  # what a fetch writes
    finally:
        files.close()
    p = reconcile_all(layout, conn)
    assert p.moved == 6
    _assert_moved(layout, a, range(6))
    assert _rows(conn) == _expected_rows(a)


async def test_a_block_whose_file_was_lost_and_that_was_fetched_again_counts_its_bytes(
    old2: OldCache,
) -> None:
    """A format-2 row whose file was gone (a crash of format 2's daemon), read before
    the reconcile came to it: the daemon fetches the block into the data file and
    its flush only updates the row's time (the real index: CacheIndex.record). With
    no file to move, the reconcile must still make the row count the block."""
    a = old2.add("https://h.example/a", _bytes(6 * BS, 16), range(6), etag='"a1"')
    old2.block_path(a, 3).unlink()
    old2.close()
    layout = Layout(old2.cache_dir)
    index = CacheIndex(layout)
    await index.open()  # adopts the old root, migrates the index
    try:
        files = VersionFiles.open(
            layout.data_path(a.name), layout.map_path(a.name), a.header, create=True
        )
        assert files is not None
        try:
            files.write_group(3, [[a.block(3)]])  # the fetch
        finally:
            files.close()
        index.record(a.name, 3, BS, (a.key, len(a.data)))
        assert await index.flush()
        while True:
            step = await index.reconcile_step(1000)
            assert step is not None
            if step.done:
                break
        assert (index.last_totals.bytes, index.last_totals.blocks) == (6 * BS, 6)
    finally:
        await index.close()
    _assert_moved(layout, a, range(6))
    conn = schema.connect(layout.index_path)
    try:
        assert _rows(conn) == _expected_rows(a)
    finally:
        conn.close()


def test_a_migration_holds_a_bounded_number_of_bytes(old2: OldCache) -> None:
    """Moving a shard dir of large blocks reads them a few at a time: a unit's bytes
    (up to 4,096 blocks, 1 GiB at the default 256 KiB) are not held at once."""
    bs = 256 * 1024
    n = 128  # a 32 MiB unit
    a = old2.add("https://h.example/a", os.urandom(n * bs), range(n), etag='"a1"', bs=bs)
    layout, conn = _adopt(old2)
    tracemalloc.start()
    try:
        p = reconcile_all(layout, conn)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert p.moved == n
    _assert_moved(layout, a, range(n))
    assert peak < n * bs // 4, f"peak {peak} B for a unit of {n * bs} B"


# -- end to end: the daemon -----------------------------------------------------------


def _reconciled(layout: Layout) -> bool:
    conn = sqlite3.connect(layout.index_path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        due = conn.execute("SELECT count(*) FROM state WHERE key = ?", (schema.RECONCILE,))
        return bool(version == schema.SCHEMA_VERSION and due.fetchone()[0] == 0)
    finally:
        conn.close()


def _index_rows(layout: Layout) -> tuple[dict[tuple[str, int], int], tuple[int, int]]:
    conn = sqlite3.connect(layout.index_path)
    try:
        return _rows(conn), schema.totals(conn)
    finally:
        conn.close()


def _put(origin: S3Emulator, path: str, data: bytes) -> tuple[str, str]:
    """The object in the origin: its URL and quoted ETag."""
    return origin.url + path, origin.put(path, data)


def _start_migrated(
    make_daemon: Callable[..., DaemonThread], cache: OldCache, layout: Layout
) -> DaemonThread:
    cache.close()  # the old daemon stopped
    daemon = make_daemon(block_size=BS, cache_size=1 << 30)
    assert not cache.root.exists() and layout.root.is_dir()  # adopted at start
    wait_until(lambda: _reconciled(layout), 10, "the daemon's reconcile of the old cache")
    return daemon


def _get(url: str) -> requests.Response:
    r = requests.get(url, timeout=TIMEOUT)
    assert r.status_code == 200, (r.status_code, r.text[:200])
    return r


def test_a_format_2_cache_is_served_after_its_migration_without_upstream_requests(
    old2: OldCache, origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    n = BLOCKS_PER_DIR + 3  # two shard dirs; a short last block
    a_data, b_data = _bytes(n * BS - 9, 20), _bytes(5 * BS, 21)
    a_url, a_etag = _put(origin, "/bucket/a.nwb", a_data)
    b_url, b_etag = _put(origin, "/bucket/b.nwb", b_data)
    runs = [(BLOCKS_PER_DIR - 6, n), (0, 10)]  # one across the two shard dirs
    a = old2.add(a_url, a_data, [i for lo, hi in runs for i in range(lo, hi)], etag=a_etag)
    b = old2.add(b_url, b_data, range(5), etag=b_etag, crc_format=1)  # CRC-32 blocks
    old2.add_rows(a, [(20, HEADER_SIZE + BS, time.time() - 3600)])  # its file is gone
    layout = Layout(old2.cache_dir)
    daemon = _start_migrated(make_daemon, old2, layout)
    _no_block_files(layout)
    rows = _expected_rows(a, b)
    assert rows[(a.name, n - 1)] == BS - 9
    assert _index_rows(layout) == (rows, (sum(rows.values()), len(rows)))
    whole = _get(proxied(daemon.url, origin, "/bucket/b.nwb"))
    assert whole.content == b_data
    assert whole.headers["X-Cache"] == "HIT"
    for lo, hi in runs:  # the last run first: no read-ahead into the blocks not cached
        last = min(hi * BS, len(a_data)) - 1
        r = get_range(proxied(daemon.url, origin, "/bucket/a.nwb"), lo * BS, last)
        assert r.content == a_data[lo * BS : last + 1]
    origin.wait_idle()
    assert origin.requests() == []
    daemon.call(daemon.cache.index.flush())
    assert _index_rows(layout) == (rows, (sum(rows.values()), len(rows)))
    totals = daemon.cache.index.last_totals
    assert (totals.bytes, totals.blocks) == (sum(rows.values()), len(rows))


def test_a_format_1_cache_is_served_after_its_migration_without_upstream_requests(
    old1: OldCache, origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    data = _bytes(3 * migrate.FLAT_BATCH * BS // 2 + 11, 22)  # two units of flat files
    url, etag = _put(origin, "/bucket/f1.nwb", data)
    old = old1.add(url, data, range(-(-len(data) // BS)), etag=etag)
    layout = Layout(old1.cache_dir)
    daemon = _start_migrated(make_daemon, old1, layout)
    _no_block_files(layout)
    _assert_moved(layout, old, old.cached)
    rows = _expected_rows(old)
    assert _index_rows(layout) == (rows, (len(data), len(old.cached)))
    whole = _get(proxied(daemon.url, origin, "/bucket/f1.nwb"))
    assert whole.content == data
    part = get_range(proxied(daemon.url, origin, "/bucket/f1.nwb"), 1000, 5000)
    assert part.content == data[1000:5001]
    origin.wait_idle()
    assert origin.requests() == []


def test_a_corrupt_legacy_block_is_fetched_again_when_read(
    old2: OldCache, origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    data = _bytes(8 * BS, 23)
    url, etag = _put(origin, "/bucket/c.nwb", data)
    old = old2.add(url, data, range(8), etag=etag)
    raw = bytearray(old2.block_path(old, 5).read_bytes())
    raw[HEADER_SIZE + 3] ^= 0x01  # one bit rotted
    old2.write_block(old, 5, bytes(raw))
    layout = Layout(old2.cache_dir)
    daemon = _start_migrated(make_daemon, old2, layout)
    _assert_moved(layout, old, [0, 1, 2, 3, 4, 6, 7])
    rows = _expected_rows(old, but=[(old, 5)])
    assert _index_rows(layout) == (rows, (7 * BS, 7))
    proxied_url = proxied(daemon.url, origin, "/bucket/c.nwb")
    for i in (0, 7, 2):
        assert get_range(proxied_url, i * BS, (i + 1) * BS - 1).content == old.block(i)
    origin.wait_idle()
    assert origin.requests() == []
    assert get_range(proxied_url, 5 * BS, 6 * BS - 1).content == data[5 * BS : 6 * BS]
    origin.wait_idle()
    fetched = origin.requests()
    assert [r.method for r in fetched] == ["GET"], fetched
    assert fetched[0].range == f"bytes={5 * BS}-{6 * BS - 1}", fetched[0].range
    assert _get(proxied_url).content == data  # all of it now from the cache
    origin.wait_idle()
    assert len(origin.requests()) == 1
    _assert_moved(layout, old, range(8))


def test_a_block_read_before_its_move_is_fetched_and_the_move_keeps_it(
    old2: OldCache, origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """Until the reconcile comes to it, an old block is a miss: fetched (exact bytes)
    into the data file. The move then finds it mapped and only unlinks its file."""
    data = _bytes(8 * BS, 24)
    url, etag = _put(origin, "/bucket/early.nwb", data)
    old = old2.add(url, data, range(8), etag=etag)
    # Another process's reconcile holds the lock (it moves with the root it is in).
    fd = os.open(old2.root / "reconcile.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        layout = Layout(old2.cache_dir)
        old2.close()
        daemon = make_daemon(block_size=BS, cache_size=1 << 30)
        assert layout.reconcile_lock.exists() and not _reconciled(layout)
        proxied_url = proxied(daemon.url, origin, "/bucket/early.nwb")
        r = get_range(proxied_url, 2 * BS, 4 * BS - 1)
        assert r.content == data[2 * BS : 4 * BS]
        assert r.headers["X-Cache"] != "HIT"
        origin.wait_idle()
        assert [q.range for q in origin.requests()] == [f"bytes={2 * BS}-{4 * BS - 1}"]
        assert (layout.root / old.name / "0" / "2.blk").exists()  # not moved yet
        assert daemon.call(daemon.cache.index.reconcile_step(1000)) is None  # not its turn
    finally:
        os.close(fd)  # the other process is done (its lock goes with it)
    while not (step := daemon.call(daemon.cache.index.reconcile_step(1000))).done:
        pass
    assert step.moved == 8
    _no_block_files(layout)
    _assert_moved(layout, old, range(8))
    rows = _expected_rows(old)
    assert _index_rows(layout) == (rows, (8 * BS, 8))
    origin.clear_log()
    assert _get(proxied_url).content == data
    origin.wait_idle()
    assert origin.requests() == []


def test_a_schema_5_index_gets_its_versions_counted(tmp_path: Path) -> None:
    """Schema 6 counts the versions in the totals (each has files on disk that
    --cache-size bounds: footprint.py). A schema-5 index is migrated in place:
    its count made once, kept by triggers after; no reconcile is due."""
    path = tmp_path / "index.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    old_schema(conn, 5)
    names = [f"objects/aa/{k}/v.4096" for k in "abc"]
    for name in names:
        conn.execute(schema.ENSURE_VERSION, (name, name.rsplit("/", 1)[0]))
    conn.executemany(
        "INSERT INTO blocks(version, idx, bytes, atime) VALUES (?, ?, 4096, 0)",
        [(vid, i) for vid in (1, 2, 3) for i in range(vid)],
    )
    before = schema.totals(conn)
    conn.close()

    conn = schema.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (6,)
    assert conn.execute("SELECT versions FROM totals").fetchone() == (3,)
    assert schema.totals(conn) == before == (6 * 4096, 6)
    assert schema.get_state(conn, schema.RECONCILE) is None
    conn.execute("DELETE FROM blocks WHERE version = 2")  # its row goes with its last block
    conn.execute(schema.ENSURE_VERSION, ("objects/bb/d/v.4096", "objects/bb/d"))
    conn.execute(schema.ENSURE_VERSION, ("objects/bb/e/v.4096", "objects/bb/e"))
    assert conn.execute("SELECT versions FROM totals").fetchone() == (4,)
    conn.close()
