"""The sharing benchmark (bench/sharing.py) at a tiny size: every figure measured, every
body the origin's, and sharing working (no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.helpers import run_bench, system_tool

pytestmark = pytest.mark.slow  # the emulator, nginx, wrk and daemons as processes


def test_sharing_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    system_tool("nginx")
    system_tool("wrk")
    out = tmp_path / "results.json"
    args = ["--size", "8M", "--small-max", "256K", "--seconds", "1", "--runs", "1"]
    args += ["--groups", "1M,4M"]
    report = run_bench("bench.sharing", *args, out=out, timeout=300)
    assert report["problems"] == []
    s = report["stampede"]
    assert s["object_bytes"] > 8 * 1024 * 1024
    # Every byte came from the origin at least once, and sharing kept it near once.
    assert s["object_bytes"] <= s["upstream_bytes"] <= 1.05 * s["object_bytes"], s
    assert s["awaited_blocks"] + s["awaited_discoveries"] > 0, s
    for workers in ("1", "auto"):
        row = report["warm"][workers]
        assert row["nginx"] > 0 and row["nwbcache"] > 0
        assert row["ratio"] == pytest.approx(row["nwbcache"] / row["nginx"])
    t = report["parents"]
    assert t["direct_upstream_bytes"] >= t["size"] and t["direct_seconds"] > 0
    for group in ("1 MiB", "4 MiB"):
        row = t[group]
        # Each byte once from the origin (and a first block per parent's discovery);
        # the second child costs the origin nothing.
        assert t["size"] <= row["child1_upstream_bytes"] <= t["size"] + 2 * 256 * 1024, row
        assert row["child2_upstream_bytes"] == row["child1_upstream_bytes"], row
        assert sum(row["parent_upstream_bytes"]) == row["child2_upstream_bytes"], row
        assert row["child1_seconds"] > 0 and row["child2_seconds"] > 0
    # 8 groups over two parents (the bench picks a name of the object they split)
    assert min(t["1 MiB"]["parent_upstream_bytes"]) > 0
    md = out.with_suffix(".md").read_text()
    assert "| auto |" in md and "ratio (target <= 1.05)" in md
