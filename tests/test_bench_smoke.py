"""The benchmark suite runs end to end at a tiny size (no timing asserted).

It drives everything a real run does: generated PyNWB files, the emulator in
its own process, nginx-light, nwbcache, every client method, wrk, the RSS
probe and the block-size sweep. What it asserts is what a broken harness or
a broken daemon would get wrong: every method read the same bytes as h5py on
the local file, wrk saw no errors, and the report has every section.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from bench import clientrun
from tests.support.helpers import run_bench, system_tool

# Slow (not in make test-fast): the benchmark suite, with nginx, wrk and a child
# interpreter per client run.
pytestmark = pytest.mark.slow


# The whole suite at smoke size: ~60-100 s, past the default 120 s when the VM
# is slow (CI failed twice so). The bench's own limit is the one that counts.
@pytest.mark.timeout(660)
def test_suite_runs_end_to_end_at_smoke_size(tmp_path: Path) -> None:
    system_tool("nginx")
    system_tool("wrk")
    out = tmp_path / "results.json"
    args = ["--scale", "smoke", "--data-dir", str(tmp_path / "data")]
    report = run_bench("bench.suite", *args, out=out, timeout=600)
    assert report["problems"] == []
    for section in ("machine", "versions", "workloads", "concurrent", "raw", "rss", "sweep"):
        assert report[section], section
    assert re.fullmatch(r"\d+\.\d+\.\d+", report["versions"]["nginx"])  # e.g. 1.22.1

    # Every method, cold and warm where it caches, read the same slice as h5py
    # on the local file (the suite checks the digests; here we check it ran them).
    cells = report["workloads"]
    methods = {key.split("|")[2] for key in cells}
    assert methods == set(clientrun.METHODS) and len(methods) == 8
    digests = {run["digest"] for cell in cells.values() for run in cell["runs"]}
    assert len(digests) == 1
    # A cold nwbcache run reads through; a warm one is served from the cache.
    # (A warm run may fetch a block whose fetch the cold run abandoned when
    # its client hung up on a plain GET, so "at most two blocks", not zero.)
    warm = cells["ecephys-smoke.nwb|read+slice|nwbcache-remfile|warm"]
    cold = cells["ecephys-smoke.nwb|read+slice|nwbcache-remfile|cold"]
    assert cold["median_upstream_bytes"] > 1_000_000
    assert warm["median_upstream_bytes"] <= 2 * 256 * 1024

    for length, row in report["raw"]["1"].items():
        if length.isdigit():
            for server in ("nginx", "nwbcache"):
                assert row[server]["requests"] > 0 and row[server]["errors"] == 0
                assert not math.isnan(row[server]["p99_ms"])
    assert 0 < report["rss"]["warm"]["peak_rss_bytes"] < 1e9
    assert any(t["met"] is not None for t in report["targets"])
