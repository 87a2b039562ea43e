"""layout: where blocks live (format 2), and the names the walks accept. Pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from nwbcache_proxy.layout import BLOCKS_PER_DIR, Layout, block_relpath, shard_of, shard_range


@pytest.mark.parametrize(
    ("index", "relpath"),
    [
        (0, "0/0.blk"),
        (BLOCKS_PER_DIR - 1, f"0/{BLOCKS_PER_DIR - 1}.blk"),
        (BLOCKS_PER_DIR, f"1/{BLOCKS_PER_DIR}.blk"),
        (400_000, "97/400000.blk"),  # a 100 GB object in 256 KiB blocks: 98 shards
    ],
)
def test_block_paths_are_sharded(index: int, relpath: str) -> None:
    assert block_relpath(index) == relpath
    assert index in shard_range(shard_of(index))
    layout = Layout(Path("/c"))
    assert layout.block_path("objects/ab/abc/v.16", index) == Path(
        f"/c/v2/objects/ab/abc/v.16/{relpath}"
    )


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
