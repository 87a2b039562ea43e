"""The S3 clients benchmark (bench/s3clients.py) on one small file: every method runs and
reads the same bytes, warm runs cost the origin nothing (no timing is asserted)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.s3clients import METHODS
from tests.support.helpers import run_bench

pytestmark = pytest.mark.slow  # the emulator, a daemon and the clients as processes


def test_s3clients_bench_runs_on_a_smoke_file(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = ["--scale", "smoke", "--kinds", "imaging", "--runs", "1"]
    report = run_bench("bench.s3clients", *args, out=out, timeout=300)
    assert report["problems"] == [] and report["not_applicable"] == []
    for phase in ("warm", "cold"):
        rows = report[phase]["imaging"]
        assert set(rows) == set(METHODS)
        for row in rows.values():
            assert row["seconds"] > 0 and math.isfinite(row["ratio"])
        assert rows["nwbcache-remfile"]["ratio"] == 1.0
    for row in report["cold"]["imaging"].values():
        assert row["upstream_bytes"] > 0
    assert set(report["setup_seconds"]) == set(METHODS)
