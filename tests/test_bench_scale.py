"""The scale benchmark (bench/scale.py) runs end to end at a tiny size.

What is asserted is what a broken harness or a broken filler would get
wrong (no timing): every figure of the table is measured, the filled blocks
are served byte-exact as hits, the blocks take one filesystem block each on
disk (format 3: no header), and the versions' data files and maps left on
disk hold what the filler wrote, checked against their map entries.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import scale
from bench.scalefill import BULK_PREFIX, block_data
from nwbcache_proxy import store
from nwbcache_proxy.layout import Layout, key_hash
from nwbcache_proxy.objectmeta import ObjectMeta
from nwbcache_proxy.version import Version
from nwbcache_proxy.versionfile import VersionFiles
from tests.support.helpers import run_bench

BLOCK_SIZE = 4096


def test_counts_and_labels() -> None:
    assert scale.parse_count("100k") == 100_000
    assert scale.parse_count("1M") == 1_000_000
    assert scale.parse_count("2.5M") == 2_500_000
    assert scale.parse_count("3000") == 3000
    assert [scale.count_label(n) for n in (3000, 100_000, 1_000_000, 2_500_000, 1234)] == [
        "3k",
        "100k",
        "1M",
        "2.5M",
        "1234",
    ]
    with pytest.raises(ValueError):
        scale.parse_count("lots")


def test_table_shows_growth_and_misses() -> None:
    small = {"blocks": 100_000, "startup_s": 0.5, "max_dir_entries": 4096}
    big = {"blocks": 200_000, "startup_s": 1.5, "max_dir_entries": 4096}
    lines = scale.table([small, big])
    assert lines[0] == "| figure | target | 100k | 200k (×2) |"
    startup = next(line for line in lines if line.startswith("| start-up"))
    assert "0.50" in startup and "1.50 ✗ (×3.00)" in startup
    assert scale.misses([small, big]) == [
        "200k: start-up to /healthz, s (median of 3) = 1.50 (target ≤ 1)"
    ]


@pytest.mark.slow  # the S3 emulator, several daemons and `nwbcache check` as processes
def test_scale_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    keep = tmp_path / "keep"
    args = ["--sizes", "3000", "--block-size", "4K", "--idle-seconds", "0.5", "--keep", str(keep)]
    report = run_bench("bench.scale", *args, out=out, timeout=100)
    assert report["problems"] == [] and report["skipped"] == []
    [size] = report["sizes"]
    assert size["blocks"] == 3000
    for figure in scale.FIGURES:
        if "in reconcile, ms" in figure.label or "in eviction, ms" in figure.label:
            # At this size the reconcile, or the cut (a few hundred blocks),
            # may be over before the hit client's first timed request: it
            # failed so once with the slow tests on both cores. In format 3
            # the cut is a punch per run of blocks, usually done by the
            # daemon's first maintenance pass, before /healthz answers.
            continue
        assert figure.get(size) is not None, figure.label
    # The hit client ran in the eviction run all the same, and never failed.
    assert size["evict_hits"]["error_count"] == 0
    assert size["fill_verified"] == {
        "blocks": scale.VERIFY_BLOCKS,
        "exact_hits": scale.VERIFY_BLOCKS,
    }
    assert size["index_rows"] == 3000
    assert size["reconcile_swept"] is True  # the kill -9 was seen as an unclean stop
    assert size["reconcile_files"] >= 3000
    for phase in ("idle_hits", "reconcile_hits", "evict_hits"):
        assert size[phase]["error_count"] == 0 and size[phase]["not_hits"] == 0, phase
    assert size["idle_hits"]["requests"] > 0
    assert size["evict_blocks"] > 0
    assert size["max_dir_entries"] <= 4096
    assert "| figure | target | 3k |" in out.with_suffix(".md").read_text()

    # Format 3 at rest after the fill: a block's bytes in its version's data
    # file, no header (format 2 took two filesystem blocks per 4 KiB block),
    # and a map entry.
    assert size["disk_bytes_per_block"] <= BLOCK_SIZE * 1.05

    # The blocks left on disk (after the eviction) are in their maps and hold
    # the filler's pattern, their bytes checked against their entries' CRC-32C.
    layout = Layout(keep / "n3k" / "cache")
    checked = mapped = bulk_versions = 0
    for meta_path in sorted(layout.objects.glob("*/*/meta.json")):
        raw = store.read_meta(meta_path)
        assert raw is not None
        meta = ObjectMeta.from_json(raw, raw["cache_key"])
        assert meta is not None and key_hash(meta.cache_key) == meta_path.parent.name
        if BULK_PREFIX + "/" not in meta.cache_key:
            continue  # a probe object
        obj = int(meta.cache_key.rsplit("-", 1)[1])
        v = Version.of(layout, meta, BLOCK_SIZE)
        files = VersionFiles.open(v.data_path, v.map_path, v.header, create=False)
        if files is None:
            continue  # evicted whole
        bulk_versions += 1
        try:
            there = files.mapped(0, v.block_count)
            mapped += sum(there)
            for index in range(0, v.block_count, 97):
                if not there[index]:
                    continue  # evicted
                assert files.read_block(index) == block_data(obj, index, BLOCK_SIZE)
                checked += 1
        finally:
            files.close()
    assert bulk_versions >= 1 and checked >= 20
    # The eviction took blocks out of the maps, not only out of the index.
    assert mapped < 3000 - 2 * scale.PROBE_BLOCKS
