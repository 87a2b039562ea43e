"""bench/buffermemory.py at a tiny size: it runs, measures every setting both ways, and reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.helpers import run_bench, system_tool


@pytest.mark.slow  # the emulator, wrk and daemons of two workers as processes
def test_buffermemory_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    system_tool("wrk")
    out = tmp_path / "results.json"
    report = run_bench(
        "bench.buffermemory",
        *("--workers", "2", "--buffer-memory", "32M,auto", "--size", "8M", "--seconds", "1"),
        out=out,
        timeout=240,
    )
    rows = report["rows"]
    assert [(r["buffer_memory"], r["temp"]) for r in rows] == [
        ("32M", "cold"),
        ("32M", "warm"),
        ("auto", "cold"),
        ("auto", "warm"),
    ]
    for r in rows:
        assert r["errors"] == 0, r
        assert 0 < r["rest_bytes"] <= r["peak_bytes"], r  # two workers' interpreters at least
        assert r["kept_bytes"] > 0, r
    assert report["settings"]["workers"] == 2
    md = out.with_suffix(".md").read_text()
    assert "| 32M | cold |" in md and "| auto | warm |" in md
