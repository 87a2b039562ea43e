"""``nwbcache check`` in-process, on caches built here with the real store and index
schema: streaming with bounded memory, sampling, --prefix/--object, resume after an
interrupt, format-1 flat blocks, rows of vanished versions, and the command line."""

from __future__ import annotations

import json
import os
import shutil
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwbcache.cli import main
from nwbcache.urls import cache_key, parse_upstream_url
from nwbcache_proxy import publish, schema, store
from nwbcache_proxy.check import CheckError, CheckOptions, CheckReport, check_cache, url_key
from nwbcache_proxy.layout import Layout, block_relpath, key_hash
from nwbcache_proxy.objectmeta import ObjectMeta, ObjectVersion
from nwbcache_proxy.staging import Staging

BS = 64


class Cache:
    """A cache dir filled the way the daemon fills it: meta.json, published blocks, rows."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = cache_dir
        self.layout = Layout(cache_dir)
        self.staging = Staging(self.layout)
        self.conn = schema.connect(self.layout.index_path)

    def close(self) -> None:
        self.staging.close()
        self.conn.close()

    def add(self, url: str, blocks: int, *, bs: int = BS, etag: str = "e1") -> str:
        """An object of ``blocks`` blocks, every one on disk and in the index; its version dir."""
        key = cache_key(parse_upstream_url(url))
        meta = ObjectMeta(key, ObjectVersion(blocks * bs, etag, None), time.time())
        kh = key_hash(key)
        with store.object_lock(self.layout.meta_path(kh)):
            store.write_meta(self.staging, self.layout.meta_path(kh), meta.to_json())
        vdir = self.layout.version_dir(kh, meta.digest, bs)
        rows = []
        for i in range(blocks):
            data = i.to_bytes(4, "big") * (bs // 4)
            size, fd = publish.publish_block(
                self.staging, vdir / block_relpath(i), i, [data], meta.digest, fsync=False
            )
            os.close(fd)
            rows.append((i, size, time.time()))
        name = self.layout.relative(vdir)
        self.record(name, rows)
        return name

    def record(self, name: str, rows: list[tuple[int, int, float]]) -> None:
        """Index rows (index, bytes, atime) of version dir ``name``, via the schema helpers."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            vid = schema.version_id(self.conn, name, create=True)
            assert vid is not None
            schema.add_found(self.conn, vid, rows)

    def block(self, name: str, index: int) -> Path:
        return self.layout.block_path(name, index)

    def execute(self, sql: str, *params: object) -> None:
        with self.conn:
            self.conn.execute(sql, params)

    def version_of(self, name: str) -> int:
        vid = schema.version_id(self.conn, name, create=False)
        assert vid is not None
        return vid


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    c = Cache(tmp_path / "cache")
    try:
        yield c
    finally:
        c.close()


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def _comparable(report: CheckReport) -> dict[str, object]:
    return {k: v for k, v in report.to_json().items() if k != "resumed"}


# -- the whole cache ---------------------------------------------------------------


def test_a_clean_cache_is_ok_and_every_block_is_read(cache: Cache) -> None:
    cache.add("https://h.example/a", 10)
    cache.add("https://h.example/b", 5000)  # two shard dirs
    report = check_cache(cache.dir)
    assert report.ok, report.summary()
    assert (report.objects, report.blocks, report.verified) == (2, 5010, 5010)
    assert report.stale == report.unmoved == 0
    assert not cache.layout.check_cursor.exists()
    assert "5010 blocks" in report.summary()


def test_damage_is_found_then_repaired(cache: Cache) -> None:
    name = cache.add("https://h.example/a", 20)
    _flip(cache.block(name, 3))  # bit rot
    torn = cache.block(name, 7)
    torn.write_bytes(torn.read_bytes()[:70])  # a torn write
    cache.execute("DELETE FROM blocks WHERE idx = 1")  # a lost row
    cache.record(name, [(9000, 100, 1.0)])  # a row of a block whose shard dir never existed

    found = check_cache(cache.dir)
    assert not found.ok
    assert found.corrupt_count == 2 and len(found.corrupt) == 2
    assert "checksum mismatch" in found.summary()
    assert "corrupt blocks: 2" in found.summary()
    assert found.missing_from_index == 1
    assert found.index_without_file == 1
    assert "index rows missing: 1" in found.summary()

    repaired = check_cache(cache.dir, CheckOptions(repair=True))
    assert repaired.corrupt_count == 2 and "(deleted)" in repaired.summary()
    assert not cache.block(name, 3).exists() and not torn.exists()
    again = check_cache(cache.dir)
    assert again.ok, again.summary()
    assert again.blocks == 18
    assert schema.totals(cache.conn)[1] == 18


def test_blocks_of_other_versions_are_stale_unless_they_lie(cache: Cache) -> None:
    old = cache.add("https://h.example/a", 4, etag="e0")
    new = cache.add("https://h.example/a", 3, etag="e1")  # meta.json now names e1
    report = check_cache(cache.dir)
    assert report.ok and report.stale == 4, report.summary()
    # A block copied into another version's dir is caught by its header alone.
    shutil.copy(cache.block(new, 0), cache.block(old, 0))
    report = check_cache(cache.dir)
    assert report.corrupt_count == 1
    assert "another object version" in report.corrupt[0]


def test_a_misplaced_meta_json_is_trusted_for_no_block(cache: Cache) -> None:
    a = cache.add("https://h.example/a", 3)
    b = cache.add("https://h.example/b", 3)
    shutil.copy(
        cache.layout.version_path(a).parent / "meta.json", cache.layout.version_path(b).parent
    )
    report = check_cache(cache.dir)
    assert report.ok and report.stale == 3, report.summary()


# -- limits --------------------------------------------------------------------------


def test_a_sample_reads_fewer_blocks_but_compares_every_row(cache: Cache) -> None:
    name = cache.add("https://h.example/a", 400)
    cache.execute("DELETE FROM blocks WHERE idx = 17")
    cache.record(name, [(400, 100, 1.0)])  # no such file

    report = check_cache(cache.dir, CheckOptions(sample=0.25, seed=7))
    assert report.blocks == 400
    assert 50 < report.verified < 150
    assert report.missing_from_index == 1 and report.index_without_file == 1
    assert "(a 0.25 sample, --seed 7)" in report.summary()
    same = check_cache(cache.dir, CheckOptions(sample=0.25, seed=7))
    assert same.verified == report.verified
    unseeded = check_cache(cache.dir, CheckOptions(sample=0.25))
    assert unseeded.seed is not None  # chosen, and reported to reproduce the run


def test_prefix_selects_objects_by_their_cache_key(cache: Cache) -> None:
    cache.add("https://h.example/x/1", 3)
    cache.add("https://h.example/x/2", 4)
    cache.add("https://h.example/y/1", 5)
    cache.add("https://other.example/x/1", 6)
    report = check_cache(
        cache.dir, CheckOptions(prefix=url_key("HTTPS://H.example:443/x/", prefix=True))
    )
    assert (report.objects, report.blocks) == (2, 7)
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
    other = cache.add("https://h.example/other", 7)
    _flip(cache.block(other, 0))
    shutil.rmtree(cache.layout.version_path(other))  # rows of a vanished version, not mine
    report = check_cache(cache.dir, CheckOptions(key=url_key("https://H.example/mine")))
    assert report.ok, report.summary()
    assert (report.objects, report.blocks) == (1, 5)
    assert report.index_phase == "its versions"
    shutil.rmtree(cache.layout.version_path(mine))
    report = check_cache(cache.dir, CheckOptions(key=url_key("https://h.example/mine")))
    assert (report.objects, report.versions_without_dir) == (1, 1)
    absent = check_cache(cache.dir, CheckOptions(key=url_key("https://h.example/absent")))
    assert absent.ok and absent.objects == 0


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
    _flip(cache.block(names[2], 1))
    _flip(cache.block(names[5], 0))
    cache.execute("DELETE FROM blocks WHERE idx = 4")
    shutil.rmtree(cache.layout.version_path(names[6]))
    whole = check_cache(cache.dir, options)
    assert not whole.ok and whole.versions_without_dir == 1

    first = check_cache(cache.dir, options, on_object=Stop(2))
    assert first.interrupted and first.objects == 2
    assert cache.layout.check_cursor.exists()
    second = check_cache(cache.dir, options, resume=True, on_object=Stop(3))
    assert second.interrupted and second.objects == 5 and second.resumed
    last = check_cache(cache.dir, options, resume=True)
    assert not last.interrupted
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


# -- format 1 and the index's own rows -------------------------------------------------


def test_a_format1_flat_block_is_counted_unmoved_and_left_alone(cache: Cache) -> None:
    name = cache.add("https://h.example/a", 6)
    flat = cache.layout.version_path(name) / "5.blk"
    os.replace(cache.block(name, 5), flat)
    report = check_cache(cache.dir, CheckOptions(repair=True))
    assert report.unmoved == 1 and report.blocks == 5
    assert report.ok, report.summary()  # its row is not taken for a row without a file
    assert flat.exists()
    assert schema.rows_in(cache.conn, cache.version_of(name), range(6)).keys() == set(range(6))


def test_rows_of_a_vanished_version_dir_are_found_and_dropped(cache: Cache) -> None:
    name = cache.add("https://h.example/a", 9)
    cache.add("https://h.example/b", 2)
    shutil.rmtree(cache.layout.version_path(name))
    found = check_cache(cache.dir)
    assert found.versions_without_dir == 1 and not found.ok
    repaired = check_cache(cache.dir, CheckOptions(repair=True))
    assert repaired.rows_dropped == 9
    assert "dropped with 9 rows" in repaired.summary()
    assert schema.totals(cache.conn)[1] == 2
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
    assert report.missing_from_index == 4
    assert report.index_phase.startswith("skipped")
    assert not c.layout.index_path.exists()  # a check without --repair creates nothing


# -- memory and progress ---------------------------------------------------------------


def test_memory_does_not_grow_with_the_cache(cache: Cache) -> None:
    names = [cache.add(f"https://h.example/{i}", 10_000, bs=4) for i in range(5)]
    tracemalloc.start()
    try:
        report = check_cache(cache.dir)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        paths = {f"{n}/{block_relpath(i)}" for n in names for i in range(10_000)}
        _, held = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.blocks == len(paths) == 50_000
    # The old check held every path (this much, twice over); one shard's listing is
    # enough (about 1 MB; the bound leaves room for the interpreter's own growth).
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

    _flip(cache.block(name, 2))
    assert main([*args, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["corrupt_count"] == 1 and report["ok"] is False

    assert main([*args, "--object", "https://H.EXAMPLE/b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blocks"] == 3
    main([*args, "--prefix", "https://h.example/", "--sample", "0.5", "--seed", "1"])
    assert "--seed 1" in capsys.readouterr().out
    assert main([*args, "--repair"]) == 0
    assert main(args) == 0
    capsys.readouterr()

    assert main([*args, "--sample", "0"]) == 2
    assert main([*args, "--resume"]) == 2
    assert "no interrupted check" in capsys.readouterr().err
    assert main([*args, "--object", "ftp://x/y"]) == 2
    with pytest.raises(SystemExit) as exc:
        main([*args, "--object", "https://h.example/a", "--prefix", "https://h.example/"])
    assert exc.value.code == 2
