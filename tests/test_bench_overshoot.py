"""The overshoot benchmark (bench/overshoot.py) runs end to end at a tiny size.

What is asserted is what a broken harness would get wrong (no timing): every
object came back with the origin's bytes, the disk was sampled during the
fill, and the figures are the cache dir's own use against the size given.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.helpers import run_bench


@pytest.mark.slow  # the S3 emulator and a daemon as processes
def test_overshoot_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = ["--objects", "200", "--cache-size", "1M", "--runs", "2", "--work", str(tmp_path / "w")]
    report = run_bench("bench.overshoot", *args, out=out, timeout=180)
    assert len(report["runs"]) == 2
    for run in report["runs"]:
        assert run["wrong_objects"] == []
        assert run["samples"] >= 1
        # ~900 KB of blocks and 200 versions' files through a 1 MiB cache: the
        # disk held something, and at the end no more than the bound and the
        # index beside it (schema.WAL_LIMIT, 4 MiB, at most).
        assert run["peak_bytes"] > 0
        assert 0 < run["final_bytes"] <= 1024 * 1024 + 4 * 1024 * 1024
        assert run["peak_ratio"] == run["peak_bytes"] / (1024 * 1024)
    assert "| run | objects/s |" in out.with_suffix(".md").read_text()
