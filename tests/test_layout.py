"""layout: where versions live (format 3), formats 1 and 2's names the migration reads, and the
names the walks accept. Pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from nwbcache_proxy.layout import (
    BLOCKS_PER_DIR,
    LAYOUT_VERSION,
    Layout,
    block_relpath,
    shard_of,
    shard_range,
)


def test_a_version_is_two_files_beside_its_objects_meta() -> None:
    layout = Layout(Path("/c"))
    stem = layout.version_stem("ab" + "c" * 62, bytes(range(32)), 262144)
    name = layout.relative(stem)
    assert LAYOUT_VERSION == "v3"
    assert name == f"objects/ab/ab{'c' * 62}/{bytes(range(16)).hex()}.262144"
    assert layout.data_path(name) == Path(f"/c/v3/{name}.data")
    assert layout.map_path(name) == Path(f"/c/v3/{name}.map")
    assert layout.meta_path_of_version(name) == Path(f"/c/v3/objects/ab/ab{'c' * 62}/meta.json")
    assert [r.name for r in layout.legacy_roots] == ["v2", "v1"]


@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("ab12.16.data", ("ab12.16", ".data")),
        ("ab12.16.map", ("ab12.16", ".map")),
        ("ab12.16", None),  # a format-2 version dir
        ("meta.json", None),
        (".map", None),
        ("ab12.16.map.tmp", None),
    ],
)
def test_stem_of(name: str, found: tuple[str, str] | None) -> None:
    assert Layout.stem_of(name) == found


@pytest.mark.parametrize(
    ("index", "relpath"),
    [
        (0, "0/0.blk"),
        (BLOCKS_PER_DIR - 1, f"0/{BLOCKS_PER_DIR - 1}.blk"),
        (BLOCKS_PER_DIR, f"1/{BLOCKS_PER_DIR}.blk"),
        (400_000, "97/400000.blk"),  # a 100 GB object in 256 KiB blocks: 98 shards
    ],
)
def test_format_2_block_paths_were_sharded(index: int, relpath: str) -> None:
    assert block_relpath(index) == relpath
    assert index in shard_range(shard_of(index))


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("7.blk", 7),
        ("0.blk", 0),
        ("123456.blk", 123456),
        ("007.blk", None),  # not a name this layout writes: block 7 is 7.blk
        ("٣.blk", None),  # a digit, but not ASCII
        ("7.blk.tmp", None),
        ("x.blk", None),
        ("7", None),
        (".blk", None),
    ],
)
def test_block_index_of(name: str, index: int | None) -> None:
    assert Layout.block_index_of(name) == index


@pytest.mark.parametrize(
    ("name", "shard"), [("0", 0), ("12", 12), ("012", None), ("1a", None), ("", None)]
)
def test_shard_of_dir(name: str, shard: int | None) -> None:
    assert Layout.shard_of_dir(name) == shard


@pytest.mark.parametrize(
    ("name", "size"), [("ab12.262144", 262144), ("ab12.16", 16), ("ab12", None), ("a.b", None)]
)
def test_block_size_of(name: str, size: int | None) -> None:
    assert Layout.block_size_of(name) == size
