"""The warm-up benchmark (bench/warm.py) on three smoke files: every phase runs, the
warm-up job finishes, and no io.read() after it reaches the origin (no timing is
asserted: that is the benchmark's to report)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.helpers import run_bench

pytestmark = pytest.mark.slow  # the emulator, daemons, the CLI and readers as processes


def test_warm_bench_runs_on_smoke_files(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = ["--scale", "smoke", "--files", "3", "--runs", "1", "--jobs", "2"]
    report = run_bench("bench.warm", *args, out=out, timeout=600)
    assert report["problems"] == []
    summary = report["summary"]
    assert summary["read_upstream_requests"] == 0
    assert summary["cold_opens_seconds"] > 0 and summary["warm_seconds"] > 0
    assert summary["cold_read_bytes"] > 0 and summary["warm_bytes"] > 0
    [run] = report["runs"]
    assert len(run["cold"]["per_file"]) == 3 and len(run["warm"]["after"]) == 3
    assert set(summary["by_kind"]) == {"ecephys", "imaging", "icephys"}
    assert out.with_suffix(".md").read_text().startswith("# Warm-up against cold opens")
