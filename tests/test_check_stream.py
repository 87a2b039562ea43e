"""``nwbcache check`` in-process, on format-3 caches built here with the real version
files (versionfile.py), meta.json written as the daemon writes it and index rows
through the schema helpers: damage in data files and maps, incomplete versions,
unmapped bytes, format-1 and -2 files not yet moved, blocks being written, streaming
with bounded memory, sampling, --prefix/--object, resume after an interrupt, rows of
versions without a map, and the command line. tests/test_check.py runs it on caches
a real daemon filled."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from nwbcache.cli import main
from nwbcache.urls import cache_key, parse_upstream_url
from nwbcache_proxy import blockfile, mapfile, schema, store
from nwbcache_proxy.blockfile import CorruptBlock
from nwbcache_proxy.check import CheckError, CheckOptions, check_cache, url_key
from nwbcache_proxy.checkreport import CheckReport
from nwbcache_proxy.layout import Layout, block_relpath, key_hash
from nwbcache_proxy.objectmeta import ObjectMeta, ObjectVersion
from nwbcache_proxy.spanlocks import runs_of
from nwbcache_proxy.staging import Staging
from nwbcache_proxy.version import Version
from nwbcache_proxy.versionfile import VersionFiles
from tests.support.helpers import allocated

BS = 64
GROUP = 4096  # blocks per write_group at most (the daemon writes a group at a time)
_ENTRY = struct.Struct("<II")  # a map entry: CRC-32C, length (docs/format-3-design.md)


def block_bytes(index: int, length: int) -> bytes:
    """Block ``index``'s bytes in the objects built here (distinct per block)."""
    return (index.to_bytes(4, "big") * (length // 4 + 1))[:length]


class Cache:
    """A format-3 cache dir filled the way the daemon fills it: meta.json under the
    object's lock through the staging dir, each version's data file and map made by
    ``VersionFiles.open(create=True)`` and written with ``write_group``, and index
    rows of the blocks written."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = cache_dir
        self.layout = Layout(cache_dir)
        self.staging = Staging(self.layout)
        self.conn = schema.connect(self.layout.index_path)
        self.versions: dict[str, Version] = {}

    def close(self) -> None:
        self.staging.close()
        self.conn.close()

    def add(
        self, url: str, blocks: int, *, bs: int = BS, etag: str = "e1", tail: int = 0,
        cached: Iterable[int] | None = None,
    ) -> str:  # fmt: skip
        """An object of ``blocks`` blocks (the last one ``tail`` bytes if ``tail``),
        made its object's current version; the blocks ``cached`` (all by default)
        written and in the index. Returns the version's name (the index's)."""
        key = cache_key(parse_upstream_url(url))
        size = (blocks - 1) * bs + (tail or bs)
        meta = ObjectMeta(key, ObjectVersion(size, etag, None), time.time())
        path = self.layout.meta_path(key_hash(key))
        with store.object_lock(path):
            store.write_meta(self.staging, path, meta.to_json())
        v = Version.of(self.layout, meta, bs)
        self.versions[v.name] = v
        wanted = sorted(range(blocks) if cached is None else cached)
        files = VersionFiles.open(v.data_path, v.map_path, v.header, create=True)
        assert files is not None
        try:
            for start in range(0, len(wanted), GROUP):
                for first, count in runs_of(wanted[start : start + GROUP]):
                    group = [[self.expected(v.name, i)] for i in range(first, first + count)]
                    files.write_group(first, group)
        finally:
            files.close()
        now = time.time()
        self.record(v.name, [(i, v.block_length(i), now) for i in wanted])
        return v.name

    def expected(self, name: str, index: int) -> bytes:
        return block_bytes(index, self.versions[name].block_length(index))

    def record(self, name: str, rows: list[tuple[int, int, float]]) -> None:
        """Index rows (index, bytes, atime) of version ``name``, via the schema helpers."""
        if not rows:
            return
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            vid = schema.version_id(self.conn, name, create=True)
            assert vid is not None
            schema.add_found(self.conn, vid, rows)

    def data(self, name: str) -> Path:
        return self.layout.data_path(name)

    def map(self, name: str) -> Path:
        return self.layout.map_path(name)

    @contextlib.contextmanager
    def opened(self, name: str) -> Iterator[VersionFiles]:
        files = VersionFiles.open_existing(self.data(name), self.map(name))
        assert files is not None, name
        try:
            yield files
        finally:
            files.close()

    def read(self, name: str, index: int) -> bytes:
        """Block ``index`` as a reader gets it (CorruptBlock if the map lacks it)."""
        with self.opened(name) as files:
            return files.read_block(index)

    def entry(self, name: str, index: int) -> tuple[int, int]:
        with self.opened(name) as files:
            (found,) = files.entries(index, 1)
        return found

    def set_entry(self, name: str, index: int, crc: int, length: int) -> None:
        """Block ``index``'s map entry overwritten (a damaged map)."""
        fd = os.open(self.map(name), os.O_WRONLY)
        try:
            os.pwrite(fd, _ENTRY.pack(crc, length), mapfile.entry_offset(index))
        finally:
            os.close(fd)

    def flip(self, name: str, index: int, at: int = 0) -> None:
        """Bit rot: byte ``at`` of block ``index`` in the data file, inverted."""
        offset = index * self.versions[name].block_size + at
        fd = os.open(self.data(name), os.O_RDWR)
        try:
            (byte,) = os.pread(fd, 1, offset)
            os.pwrite(fd, bytes([byte ^ 0xFF]), offset)
        finally:
            os.close(fd)

    def drop_files(self, name: str) -> None:
        """The version's map and data file gone (a crash mid-drop, a lost file)."""
        self.map(name).unlink()
        self.data(name).unlink()

    def add_legacy(self, name: str, indices: Iterable[int], *, flat: bool = False) -> list[Path]:
        """Format-2 block files (``<stem>/<s>/<n>.blk``; with ``flat``, format 1's
        ``<stem>/<n>.blk``) of version ``name``, each with its row: blocks a
        daemon's reconciler is yet to move into the data file."""
        v = self.versions[name]
        paths: list[Path] = []
        for i in indices:
            data = self.expected(name, i)
            path = v.stem / (f"{i}.blk" if flat else block_relpath(i))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blockfile.encode_header(i, data, v.digest) + data)
            paths.append(path)
        now = time.time()
        self.record(name, [(i, v.block_length(i), now) for i in indices])
        return paths

    def execute(self, sql: str, *params: object) -> None:
        with self.conn:
            self.conn.execute(sql, params)

    def rows(self, name: str) -> set[int]:
        """The block indices the index has rows for in version ``name``."""
        vid = schema.version_id(self.conn, name, create=False)
        return set() if vid is None else set(schema.rows_in(self.conn, vid, range(2**40)))


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    c = Cache(tmp_path / "cache")
    try:
        yield c
    finally:
        c.close()


def _comparable(report: CheckReport) -> dict[str, object]:
    return {k: v for k, v in report.to_json().items() if k != "resumed"}


# -- the whole cache ---------------------------------------------------------------


def test_a_clean_cache_is_ok_and_every_block_is_read(cache: Cache) -> None:
    cache.add("https://h.example/a", 10, tail=5)
    cache.add("https://h.example/b", 5000)  # two chunks of its map
    report = check_cache(cache.dir)
    assert report.ok, report.summary()
    assert (report.objects, report.blocks, report.verified) == (2, 5010, 5010)
    assert report.bytes == report.verified_bytes == 9 * BS + 5 + 5000 * BS
    assert report.stale == report.unmoved == report.busy == report.incomplete == 0
    assert report.corrupt == [] and report.reclaimed_bytes == 0
    assert not cache.layout.check_cursor.exists()
    assert "5010 blocks" in report.summary()


def test_damage_in_a_data_file_is_found_then_repaired(cache: Cache) -> None:
    name = cache.add("https://h.example/a", 20)
    cache.flip(name, 3, at=17)  # bit rot
    os.truncate(cache.data(name), 19 * BS + 10)  # a torn write: 10 bytes of block 19
    with cache.opened(name) as files:
        assert files.remove(12, 1)  # evicted, its row left behind
    cache.execute("DELETE FROM blocks WHERE idx = 1")  # a lost row
    cache.record(name, [(9000, 100, 1.0)])  # a row past the version's last block

    found = check_cache(cache.dir)
    assert not found.ok
    assert found.corrupt_count == 2 and len(found.corrupt) == 2
    flipped, torn = found.corrupt
    assert flipped.startswith(f"{name} block 3: ") and "checksum mismatch" in flipped
    assert torn.startswith(f"{name} block 19: ")
    assert f"10 bytes where the map says {BS}" in torn
    assert "corrupt blocks: 2" in found.summary()
    assert (found.blocks, found.verified) == (19, 19)  # all the map has: not block 12
    assert found.missing_from_index == 1
    assert found.index_without_file == 2  # block 12's row and block 9000's
    assert "index rows missing: 1; index rows without a block: 2" in found.summary()
    assert cache.entry(name, 3) != (0, 0)  # found, not repaired

    repaired = check_cache(cache.dir, CheckOptions(repair=True))
    assert repaired.corrupt_count == 2
    assert "corrupt blocks: 2 (removed)" in repaired.summary()
    assert "(reconciled)" in repaired.summary()
    for gone in (3, 19):
        assert cache.entry(name, gone) == (0, 0)
        with pytest.raises(CorruptBlock, match="not in the map"):
            cache.read(name, gone)
    for kept in (0, 1, 2, 4, 11, 13, 18):  # the punched blocks' neighbours are intact
        assert cache.read(name, kept) == cache.expected(name, kept)
    assert cache.rows(name) == set(range(20)) - {3, 12, 19}
    again = check_cache(cache.dir)
    assert again.ok, again.summary()
    assert again.blocks == 17
    assert schema.totals(cache.conn) == (17 * BS, 17)


def test_a_map_entry_with_a_wrong_length_is_found_and_cleared(cache: Cache) -> None:
    name = cache.add("https://h.example/a", 10, tail=30)
    crc, length = cache.entry(name, 4)
    assert length == BS
    cache.set_entry(name, 4, crc, BS - 1)  # a damaged entry: not block 4's length
    cache.set_entry(name, 9, 0, BS)  # the short last block's entry, as a whole block's
    for bad in (4, 9):  # never served from: it reads as absent
        with pytest.raises(CorruptBlock, match="not in the map"):
            cache.read(name, bad)

    found = check_cache(cache.dir)
    assert not found.ok
    assert (found.blocks, found.verified) == (8, 8)
    assert found.corrupt_count == 2, found.summary()
    assert [p.split(":")[0] for p in found.corrupt] == [f"{name} block 4", f"{name} block 9"]

    repaired = check_cache(cache.dir, CheckOptions(repair=True))
    assert repaired.corrupt_count == 2
    assert cache.entry(name, 4) == cache.entry(name, 9) == (0, 0)
    assert cache.rows(name) == set(range(10)) - {4, 9}
    again = check_cache(cache.dir)
    assert again.ok and again.blocks == 8, again.summary()


def test_blocks_of_other_versions_are_stale_unless_they_lie(cache: Cache) -> None:
    old = cache.add("https://h.example/a", 4, etag="e0")
    new = cache.add("https://h.example/a", 3, etag="e1")  # meta.json now names e1
    report = check_cache(cache.dir)
    assert report.ok and report.stale == 4, report.summary()
    assert (report.objects, report.blocks) == (1, 7)

    cache.flip(old, 0)  # a stale block is still checked: corrupt, not stale
    report = check_cache(cache.dir)
    assert (report.corrupt_count, report.stale) == (1, 3)
    assert report.corrupt[0].startswith(f"{old} block 0: ")

    # The current version's map replaced by the old version's: its header says so.
    shutil.copy(cache.map(old), cache.map(new))
    report = check_cache(cache.dir)
    assert report.corrupt_count == 2
    assert f"{new}.map: the map is not meta.json's version's" in report.corrupt
    repaired = check_cache(cache.dir, CheckOptions(repair=True))
    assert not cache.map(new).exists() and not cache.data(new).exists()
    assert (repaired.versions_without_dir, repaired.rows_dropped) == (1, 3)
    assert cache.rows(new) == set() and cache.rows(old) == {1, 2, 3}
    again = check_cache(cache.dir)
    assert again.ok and (again.blocks, again.stale) == (3, 3), again.summary()


def test_a_misplaced_meta_json_is_trusted_for_no_block(cache: Cache) -> None:
    a = cache.add("https://h.example/a", 3)
    b = cache.add("https://h.example/b", 3)
    shutil.copy(cache.layout.meta_path_of_version(a), cache.layout.meta_path_of_version(b))
    report = check_cache(cache.dir)
    assert report.ok and report.stale == 3, report.summary()
    assert report.corrupt == []


# -- format 3's own damage ------------------------------------------------------------


def test_incomplete_versions_are_found_and_dropped(cache: Cache) -> None:
    lone_map = cache.add("https://h.example/a", 4)
    lone_data = cache.add("https://h.example/b", 5)
    whole = cache.add("https://h.example/c", 6)
    cache.data(lone_map).unlink()  # a crash between creating (or removing) the two
    cache.map(lone_data).unlink()

    found = check_cache(cache.dir)
    assert not found.ok
    assert found.incomplete == 2 and found.blocks == 6
    assert "versions missing their data file or map: 2" in found.summary()
    for name in (lone_map, lone_data):  # each named once, by its files' path
        assert sum(p.startswith(f"{name}.") for p in found.corrupt) == 1, found.corrupt
    assert cache.map(lone_map).exists() and cache.data(lone_data).exists()  # only found

    repaired = check_cache(cache.dir, CheckOptions(repair=True))
    assert repaired.incomplete == 2 and "(removed)" in repaired.summary()
    for name in (lone_map, lone_data):
        assert not cache.map(name).exists() and not cache.data(name).exists()
        assert cache.rows(name) == set()
    assert cache.rows(whole) == set(range(6))
    assert cache.read(whole, 5) == cache.expected(whole, 5)
    again = check_cache(cache.dir)
    assert again.ok and again.blocks == 6, again.summary()


def test_bytes_without_map_entries_are_reclaimed_by_repair(cache: Cache) -> None:
    bs = 4096  # a filesystem block: a punch frees it
    name = cache.add("https://h.example/a", 8, bs=bs, cached=range(4))
    # A crash between a group's bytes and its entries: blocks 6 and 7 written, unmapped.
    fd = os.open(cache.data(name), os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(2 * bs), 6 * bs)
        os.fsync(fd)
    finally:
        os.close(fd)
    before = allocated(cache.data(name))
    assert before >= 6 * bs

    looked = check_cache(cache.dir)
    assert looked.ok and looked.blocks == 4 and looked.reclaimed_bytes == 0
    assert looked.unmapped_bytes == 2 * bs  # counted, and said, by a check too
    assert f"--repair punches them out): {2 * bs}" in looked.summary()
    assert allocated(cache.data(name)) == before  # a check without --repair changes nothing

    repaired = check_cache(cache.dir, CheckOptions(repair=True))
    assert repaired.ok and repaired.reclaimed_bytes == 2 * bs, repaired.summary()
    assert f"punched out: {2 * bs}" in repaired.summary()
    assert allocated(cache.data(name)) <= before - 2 * bs
    for i in range(4):
        assert cache.read(name, i) == cache.expected(name, i)
    assert check_cache(cache.dir, CheckOptions(repair=True)).reclaimed_bytes == 0
    assert check_cache(cache.dir).unmapped_bytes == 0


def test_a_check_counts_bytes_without_map_entries_to_the_byte(cache: Cache) -> None:
    """Only the unmapped blocks' bytes on disk count, in a block half written and
    in a short last block too; a mapped block beside them never does."""
    bs, tail = 8192, 1000  # a block is two filesystem blocks
    name = cache.add("https://h.example/b", 8, bs=bs, tail=tail, cached=[0, 1, 2, 4, 6])
    fd = os.open(cache.data(name), os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(4096), 5 * bs)  # the first half of block 5
        os.pwrite(fd, os.urandom(tail), 7 * bs)  # the last block, whole
        os.fsync(fd)
    finally:
        os.close(fd)
    looked = check_cache(cache.dir)
    assert looked.ok and looked.blocks == 5
    assert looked.unmapped_bytes == 4096 + tail, looked.summary()
    repaired = check_cache(cache.dir, CheckOptions(repair=True))
    assert repaired.reclaimed_bytes >= 4096 + tail and repaired.unmapped_bytes == 0
    assert check_cache(cache.dir).unmapped_bytes == 0
    for i in (0, 1, 2, 4, 6):
        assert cache.read(name, i) == cache.expected(name, i)


def _half_moved(cache: Cache) -> tuple[str, str, list[Path]]:
    """Two versions a daemon's reconciler is yet to finish moving, their rows in the
    index: one half moved (blocks 0-3 in its data file, 4 and 5 still in format 2's
    shard dir), one not moved at all (format 1's flat files, no map yet)."""
    half = cache.add("https://h.example/a", 6, cached=range(4))
    sharded = cache.add_legacy(half, [4, 5])
    flat_name = cache.add("https://h.example/b", 3, cached=[])
    cache.drop_files(flat_name)
    flat = cache.add_legacy(flat_name, range(3), flat=True)
    return half, flat_name, sharded + flat


def test_format1_and_2_block_files_are_counted_unmoved_and_left_alone(cache: Cache) -> None:
    half, _, legacy = _half_moved(cache)
    report = check_cache(cache.dir, CheckOptions(repair=True))
    assert report.unmoved == 5 and report.blocks == 4
    assert "format-1 and -2 block files a daemon is yet to move: 5" in report.summary()
    assert report.corrupt_count == report.incomplete == 0
    assert all(p.exists() for p in legacy)  # the reconciler's to move, not check's
    assert cache.read(half, 3) == cache.expected(half, 3)


def test_rows_of_unmoved_block_files_are_not_rows_without_a_block(cache: Cache) -> None:
    half, flat_name, _ = _half_moved(cache)
    report = check_cache(cache.dir)
    assert report.unmoved == 5
    # Their rows are not rows without a block, their version not one without a map:
    # a cache a daemon is still moving into format 3 is sound.
    assert (report.index_without_file, report.versions_without_dir) == (0, 0), report.summary()
    assert report.ok
    repaired = check_cache(cache.dir, CheckOptions(repair=True))
    assert repaired.rows_dropped == 0
    assert cache.rows(half) == set(range(6)) and cache.rows(flat_name) == set(range(3))


def test_a_block_being_written_is_busy_not_corrupt(cache: Cache) -> None:
    name = cache.add("https://h.example/a", 6)
    cache.flip(name, 2)  # what a writer may be in the middle of
    with cache.opened(name) as writer:
        assert writer.try_lock(2, 1)  # a second open: a writer of another process
        try:
            report = check_cache(cache.dir)
            assert (report.busy, report.corrupt_count) == (1, 0), report.summary()
            assert (report.blocks, report.verified) == (6, 5)
            assert "(not read): 1" in report.summary()
            repaired = check_cache(cache.dir, CheckOptions(repair=True))
            assert (repaired.busy, repaired.corrupt_count) == (1, 0)
            assert cache.entry(name, 2) != (0, 0)  # not removed while locked
        finally:
            writer.unlock(2, 1)
    report = check_cache(cache.dir)
    assert (report.busy, report.corrupt_count) == (0, 1)
    assert report.corrupt[0].startswith(f"{name} block 2: ")


# -- limits --------------------------------------------------------------------------


def test_a_sample_reads_fewer_blocks_but_compares_every_row(cache: Cache) -> None:
    name = cache.add("https://h.example/a", 400)
    cache.execute("DELETE FROM blocks WHERE idx = 17")
    cache.record(name, [(400, 100, 1.0)])  # past the last block

    report = check_cache(cache.dir, CheckOptions(sample=0.25, seed=7))
    assert report.blocks == 400
    assert 50 < report.verified < 150
    assert report.missing_from_index == 1 and report.index_without_file == 1
    assert "(a 0.25 sample, --seed 7)" in report.summary()
    same = check_cache(cache.dir, CheckOptions(sample=0.25, seed=7))
    assert same.verified == report.verified and same.verified_bytes == report.verified_bytes
    unseeded = check_cache(cache.dir, CheckOptions(sample=0.25))
    assert unseeded.seed is not None  # chosen, and reported to reproduce the run


def test_a_seed_picks_the_same_blocks(cache: Cache) -> None:
    name = cache.add("https://h.example/a", 300)
    for i in range(0, 300, 3):
        cache.flip(name, i)  # a third of the blocks: the sample's picks show
    picks = [
        sorted(check_cache(cache.dir, CheckOptions(sample=0.3, seed=s)).corrupt) for s in (5, 5, 6)
    ]
    assert picks[0] and picks[0] == picks[1]
    assert picks[0] != picks[2]


def test_prefix_selects_objects_by_their_cache_key(cache: Cache) -> None:
    cache.add("https://h.example/x/1", 3)
    cache.add("https://h.example/x/2", 4)
    cache.add("https://h.example/y/1", 5)
    cache.add("https://other.example/x/1", 6)
    report = check_cache(
        cache.dir, CheckOptions(prefix=url_key("HTTPS://H.example:443/x/", prefix=True))
    )
    assert (report.objects, report.blocks) == (2, 7)
    assert report.scope == "cache keys starting with https://h.example/x/"
    host = check_cache(cache.dir, CheckOptions(prefix=url_key("https://h.example", prefix=True)))
    assert (host.objects, host.blocks) == (3, 12)


def test_prefix_and_object_urls_are_normalised_like_cache_keys() -> None:
    assert url_key("s3://dandiarchive", prefix=True) == "https://dandiarchive.s3.amazonaws.com/"
    assert url_key("s3://dandiarchive/blobs/ab", prefix=True) == (
        "https://dandiarchive.s3.amazonaws.com/blobs/ab"
    )
    assert url_key("https://H.example/o?X-Amz-Signature=s&b=2&a=1") == "https://h.example/o?a=1&b=2"
    with pytest.raises(CheckError, match="--object"):
        url_key("not a url")
    with pytest.raises(CheckError, match="--prefix"):
        url_key("ftp://h.example/", prefix=True)


def test_object_checks_one_object_and_only_its_versions(cache: Cache) -> None:
    mine = cache.add("https://h.example/mine", 5)
    damaged = cache.add("https://h.example/damaged", 7)
    vanished = cache.add("https://h.example/vanished", 2)
    cache.flip(damaged, 0)
    cache.drop_files(vanished)  # rows of a version without a map, not mine
    report = check_cache(cache.dir, CheckOptions(key=url_key("https://H.example/mine")))
    assert report.ok, report.summary()
    assert (report.objects, report.blocks) == (1, 5)
    assert report.index_phase == "its versions"
    cache.drop_files(mine)
    report = check_cache(cache.dir, CheckOptions(key=url_key("https://h.example/mine")))
    assert (report.objects, report.versions_without_dir) == (1, 1)
    absent = check_cache(cache.dir, CheckOptions(key=url_key("https://h.example/absent")))
    assert absent.ok and absent.objects == 0
    everything = check_cache(cache.dir)
    assert (everything.corrupt_count, everything.versions_without_dir) == (1, 2)


# -- resume ----------------------------------------------------------------------------


class Stop:
    """An on_object callback: Ctrl-C after ``after`` objects."""

    def __init__(self, after: int) -> None:
        self.after, self.seen = after, 0

    def __call__(self, position: str, report: CheckReport) -> None:
        self.seen += 1
        if self.seen >= self.after:
            raise KeyboardInterrupt


@pytest.mark.parametrize("options", [CheckOptions(), CheckOptions(sample=0.5, seed=3)])
def test_interrupted_and_resumed_gives_the_same_report(cache: Cache, options: CheckOptions) -> None:
    names = [cache.add(f"https://h.example/{i}", 30 + i) for i in range(7)]
    cache.flip(names[2], 1)
    cache.flip(names[5], 0)
    cache.data(names[3]).unlink()  # incomplete
    cache.execute("DELETE FROM blocks WHERE idx = 4")
    cache.drop_files(names[6])
    whole = check_cache(cache.dir, options)
    assert not whole.ok and whole.versions_without_dir == 1 and whole.incomplete == 1

    first = check_cache(cache.dir, options, on_object=Stop(2))
    assert first.interrupted and first.objects == 2
    assert cache.layout.check_cursor.exists()
    second = check_cache(cache.dir, options, resume=True, on_object=Stop(3))
    assert second.interrupted and second.objects == 5 and second.resumed
    last = check_cache(cache.dir, options, resume=True)
    assert not last.interrupted and last.resumed
    assert _comparable(last) == _comparable(whole)
    assert not cache.layout.check_cursor.exists()


def test_resume_needs_a_cursor_and_the_same_options(cache: Cache) -> None:
    for i in range(3):
        cache.add(f"https://h.example/{i}", 3)
    with pytest.raises(CheckError, match="no interrupted check"):
        check_cache(cache.dir, resume=True)
    check_cache(cache.dir, CheckOptions(sample=0.5), on_object=Stop(1))
    with pytest.raises(CheckError, match="other options"):
        check_cache(cache.dir, CheckOptions(repair=True), resume=True)
    done = check_cache(cache.dir, CheckOptions(sample=0.5), resume=True)  # the seed is kept
    assert done.objects == 3 and not done.interrupted


# -- the index's own rows ----------------------------------------------------------------


def test_rows_of_a_version_without_a_map_are_found_and_dropped(cache: Cache) -> None:
    name = cache.add("https://h.example/a", 9)
    cache.add("https://h.example/b", 2)
    cache.drop_files(name)
    found = check_cache(cache.dir)
    assert found.versions_without_dir == 1 and not found.ok
    assert "index versions without a map: 1" in found.summary()
    repaired = check_cache(cache.dir, CheckOptions(repair=True))
    assert repaired.rows_dropped == 9
    assert "dropped with 9 rows" in repaired.summary()
    assert schema.totals(cache.conn) == (2 * BS, 2)
    assert check_cache(cache.dir).ok


def test_no_index_counts_every_block_missing_and_skips_the_version_phase(tmp_path: Path) -> None:
    c = Cache(tmp_path / "cache")
    try:
        c.add("https://h.example/a", 4)
    finally:
        c.close()
    for leftover in c.layout.root.glob("index.sqlite3*"):
        leftover.unlink()
    report = check_cache(c.dir)
    assert report.missing_from_index == 4 and report.verified == 4
    assert report.index_phase.startswith("skipped")
    assert not c.layout.index_path.exists()  # a check without --repair creates nothing


# -- memory and progress ---------------------------------------------------------------


def test_memory_does_not_grow_with_the_cache(cache: Cache) -> None:
    names = [cache.add(f"https://h.example/{i}", 12_000, bs=4) for i in range(2)]
    tracemalloc.start()
    try:  # a small sample: every map entry and row is walked, a few blocks read
        report = check_cache(cache.dir, CheckOptions(sample=0.01, seed=1))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        blocks = {f"{n}/{i}" for n in names for i in range(12_000)}
        _, held = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.blocks == len(blocks) == 24_000
    assert 0 < report.verified < 1_000
    # A check holding every block's name would take this much, twice over; one
    # chunk of a map (4096 entries and their rows) is what it holds (the bound
    # leaves room for the interpreter's own growth).
    assert peak < min(held / 2, 20 * 1024 * 1024), (peak, held)


def test_progress_shows_blocks_and_bytes_per_second(
    cache: Cache, capsys: pytest.CaptureFixture[str]
) -> None:
    cache.add("https://h.example/a", 50)
    check_cache(cache.dir, progress=True)
    err = capsys.readouterr().err
    assert "blk/s" in err and "B/s read" in err and "/50" in err


# -- the command line --------------------------------------------------------------------


def test_the_command_line(cache: Cache, capsys: pytest.CaptureFixture[str]) -> None:
    name = cache.add("https://h.example/a", 5)
    cache.add("https://h.example/b", 3)
    args = ["check", "--cache-dir", str(cache.dir)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "8 blocks" in out and "corrupt blocks: 0" in out

    cache.flip(name, 2)
    assert main([*args, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["corrupt_count"] == 1 and report["ok"] is False
    assert report["corrupt"][0].startswith(f"{name} block 2: ")

    assert main([*args, "--object", "https://H.EXAMPLE/b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blocks"] == 3
    sampled = check_cache(
        cache.dir, CheckOptions(sample=0.5, seed=1, prefix="https://h.example/")
    )  # what the command line must say
    code = main([*args, "--prefix", "https://h.example/", "--sample", "0.5", "--seed", "1"])
    assert code == (0 if sampled.ok else 1)
    out = capsys.readouterr().out
    assert "--seed 1" in out and f"{sampled.verified} blocks" in out
    assert main([*args, "--repair"]) == 0
    assert "corrupt blocks: 1 (removed)" in capsys.readouterr().out
    assert main(args) == 0
    assert "7 blocks" in capsys.readouterr().out

    assert main([*args, "--sample", "0"]) == 2
    assert main([*args, "--resume"]) == 2
    assert "no interrupted check" in capsys.readouterr().err
    assert main([*args, "--object", "ftp://x/y"]) == 2
    with pytest.raises(SystemExit) as exc:
        main([*args, "--object", "https://h.example/a", "--prefix", "https://h.example/"])
    assert exc.value.code == 2
