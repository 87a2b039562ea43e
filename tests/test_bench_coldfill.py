"""The cold-fill benchmark (bench/coldfill.py): its reader, its report, and a tiny run.

No timing is asserted: what a broken harness would get wrong is checked
(every figure measured, every byte read the origin's, both caches filled).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from bench import coldfill
from tests.support.helpers import REPO, run_bench, system_tool, wait_until
from tests.support.s3emu import S3Emulator

MIB = 1024 * 1024


@pytest.mark.parametrize("streams", [1, 3])
def test_read_ranges_reads_the_object_byte_exact(origin: S3Emulator, streams: int) -> None:
    data = os.urandom(5 * MIB + 123)  # the last range is a short one
    origin.put("/bucket/obj", data)
    buf = memoryview(bytearray(len(data)))
    coldfill.read_ranges(origin.url_for("/bucket/obj"), buf, 1 * MIB, streams)
    assert buf == data
    coldfill.zero(buf)
    assert buf == bytes(len(data))


def test_read_ranges_refuses_a_wrong_answer(origin: S3Emulator) -> None:
    origin.put("/bucket/obj", b"x" * 1000)
    buf = memoryview(bytearray(2000))  # larger than the object: Content-Range differs
    with pytest.raises(RuntimeError, match="bytes 0-999/2000"):
        coldfill.read_ranges(origin.url_for("/bucket/obj"), buf, 1000, 1)
    with pytest.raises(RuntimeError, match="404"):
        coldfill.read_ranges(origin.url_for("/bucket/missing"), buf, 1000, 1)


def test_a_slow_reader_asks_ranges_of_the_warm_object_until_stopped(
    origin: S3Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--slow-readers' client: ranges of SLOW_RANGE within the warm object, one
    after another, until told to stop (then it ends within a pause)."""
    monkeypatch.setattr(coldfill, "WARM_SIZE", 4 * MIB)
    monkeypatch.setattr(coldfill, "SLOW_RANGE", MIB)
    monkeypatch.setattr(coldfill, "SLOW_PAUSE", 0.0)
    origin.put("/bucket/warm", os.urandom(4 * MIB))
    stop = threading.Event()
    reader = threading.Thread(
        target=coldfill._read_slowly, args=(origin.url_for("/bucket/warm"), stop)
    )
    reader.start()
    try:
        wait_until(lambda: len(origin.log) >= 3, 10, "three ranges asked")
    finally:
        stop.set()
        reader.join(10)
    assert not reader.is_alive()
    for r in list(origin.log):
        assert r.method == "GET" and r.range is not None, r
        lo, hi = map(int, r.range.removeprefix("bytes=").split("-"))
        assert lo >= 0 and hi - lo + 1 == MIB and hi < 4 * MIB, r.range


def _run(system: str, run: int, mb_per_s: float, cpu: float | None) -> coldfill.Run:
    return coldfill.Run(
        system=system,
        streams=4,
        run=run,
        order=0,
        seconds=1.0,
        mb_per_s=mb_per_s,
        server_cpu_s=cpu,
        server_user_s=None if cpu is None else cpu / 2,
        server_sys_s=None if cpu is None else cpu / 2,
        server_cpu_s_per_gib=None if cpu is None else cpu * 4,
        origin_cpu_s_per_gib=1.0,
        client_cpu_s_per_gib=0.5,
        upstream_bytes=256 * MIB,
        upstream_requests=16,
        cached_bytes=None if system == "origin" else 257 * MIB,
        sha256="ab",
        sha_ok=True,
    )


def test_summary_medians_ratios_and_targets() -> None:
    runs = [
        _run("origin", 0, 1000, None),
        _run("nginx", 0, 400, 0.25),
        _run("nwbcache", 0, 500, 0.5),
        _run("origin", 1, 1200, None),
        _run("nginx", 1, 600, 0.25),
        _run("nwbcache", 1, 500, 1.0),
        _run("origin", 2, 1100, None),
        _run("nginx", 2, 500, 0.25),
        _run("nwbcache", 2, 450, 1.0),
    ]
    summary = coldfill.summarize(runs, [4])
    row = summary["4"]
    assert row["nginx"]["mb_per_s"] == 500 and row["nwbcache"]["mb_per_s"] == 500
    assert row["ratio_mb_per_s"] == 1.0
    assert row["nwbcache"]["server_cpu_s_per_gib"] == 4.0
    assert row["ratio_cpu_per_gib"] == 4.0
    assert row["nwbcache_faster_runs"] == 1 and row["paired_runs"] == 3
    assert row["origin"]["server_cpu_s_per_gib"] is None
    found = coldfill.targets(summary)
    assert [(t["met"], t["value"]) for t in found] == [(True, 1.0), (False, 4.0)]
    report = {
        "command": "python -m bench.coldfill",
        "machine": {"cpu": "x", "cores": 2, "memory_gib": 1.0},
        "versions": {"nginx": "1.22.1", "python": "3.11", "nwbcache_commit": None},
        "settings": {
            "size": 256 * MIB,
            "range": 16 * MIB,
            "block_size": "256K",
            "workers": 1,
            "runs": 3,
        },
        "summary": summary,
        "targets": found,
        "problems": [],
    }
    md = coldfill.markdown(report)
    assert "| 4 | nwbcache | 500 | 1.00 | 4.00 (0.50 + 0.50) | 4.00 |" in md
    assert "| 4 stream(s): nwbcache daemon CPU s/GiB | 4.00 | ≤ 3 | MISSED |" in md
    assert "in 1 of 3 paired runs" in md


def test_a_baseline_is_compared_run_by_run() -> None:
    """Per-run ratios, not ratios of medians: each run is one sitting."""
    runs = [
        _run("nginx", 0, 400, 0.25),
        _run("nwbcache", 0, 300, 0.5),
        _run("baseline", 0, 200, 1.0),
        _run("nginx", 1, 800, 0.25),
        _run("nwbcache", 1, 600, 1.0),
        _run("baseline", 1, 500, 1.0),
        _run("nginx", 2, 600, 0.25),
        _run("nwbcache", 2, 100, 2.0),  # a slow moment for both
        _run("baseline", 2, 100, 2.5),
        _run("origin", 0, 1000, None),
        _run("origin", 1, 1000, None),
        _run("origin", 2, 1000, None),
    ]
    summary = coldfill.summarize(runs, [4], (*coldfill.SYSTEMS, coldfill.BASELINE))
    row = summary["4"]
    assert row["vs_baseline"] == {"pairs": 3, "mb_per_s": 1.2, "cpu_per_gib": 0.8}
    assert row["baseline"]["mb_per_s"] == 200
    assert "vs_baseline" not in coldfill.summarize(runs, [4])["4"]
    report = {
        "summary": summary,
        "settings": {"baseline": "abc1234"},
    }
    assert any(
        line.startswith("| 4 | nwbcache at abc1234 | 200 | 0.33 |")
        for line in coldfill.table(report)
    )
    assert coldfill.baseline_lines(report) == [
        "This checkout against nwbcache at abc1234 (4 stream(s), medians of 3 per-run "
        "ratios): MB/s × 1.20, server CPU per GiB × 0.80."
    ]


def _bench(tmp_path: Path, *args: str, timeout: float) -> dict[str, Any]:
    """A quick one-stream run of the bench in ``tmp_path``; its report
    (results.json there, with results.md beside it)."""
    system_tool("nginx")
    flags = ["--quick", "--streams", "1", "--settle", "0.1", *args, "--work", str(tmp_path)]
    return run_bench("bench.coldfill", *flags, out=tmp_path / "results.json", timeout=timeout)


@pytest.mark.slow  # the emulator, nginx and two daemons as processes
def test_coldfill_bench_runs_a_baseline_from_a_worktree(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    report = _bench(
        tmp_path, "--size", "8M", "--runs", "2", "--no-warmup", "--baseline", "HEAD", timeout=180
    )
    want = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert report["settings"]["baseline"] == want
    baseline = [r for r in report["runs"] if r["system"] == "baseline"]
    assert len(baseline) == 2 and all(
        r["sha_ok"] and r["cached_bytes"] >= 8 * MIB for r in baseline
    )
    # The runs took coldfill.orderings in turn.
    orders = {(r["run"], r["system"]): r["order"] for r in report["runs"]}
    assert [orders[(0, s)] for s in ("nginx", "nwbcache", "baseline")] == [1, 2, 3]
    assert [orders[(1, s)] for s in ("nwbcache", "baseline", "nginx")] == [1, 2, 3]
    assert report["summary"]["1"]["vs_baseline"]["pairs"] == 2
    assert "This checkout against nwbcache at" in out.with_suffix(".md").read_text()
    worktrees = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert str(tmp_path) not in worktrees, "the baseline's worktree is removed"


@pytest.mark.parametrize("systems", [["a", "b"], ["a", "b", "c"]], ids=["two", "three"])
def test_orderings_balance_who_goes_first_and_who_follows_whom(systems: list[str]) -> None:
    """A run pays for the deletion of the cache before it: with the order only
    rotated, the same system always came right after nginx."""
    turns = coldfill.orderings(systems)
    n = len(systems)
    assert sorted(t[0] for t in turns[:n]) == systems  # the first n runs: each first once
    assert all(sorted(t) == systems for t in turns)
    follows = collections.Counter(pair for t in turns for pair in itertools.pairwise(t))
    assert set(follows) == set(itertools.permutations(systems, 2))
    assert len(set(follows.values())) == 1


@pytest.mark.slow  # the emulator, nginx and the daemon as processes
def test_coldfill_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    report = _bench(tmp_path, "--size", "16M", "--runs", "1", timeout=120)
    assert report["problems"] == []
    size = 16 * MIB
    assert report["settings"]["size"] == size
    runs = report["runs"]
    assert sorted(r["system"] for r in runs) == ["nginx", "nwbcache", "origin"]
    for r in runs:
        assert r["sha_ok"] and r["sha256"] == report["origin_sha256"], r
        assert r["mb_per_s"] > 0 and r["origin_cpu_s_per_gib"] >= 0
        assert r["upstream_bytes"] >= size, r  # cold: everything came from the origin
        if r["system"] != "origin":
            # Measured (clock ticks of 10 ms: nginx can fill 16 MiB in less than one).
            assert r["server_cpu_s"] is not None and r["server_cpu_s"] >= 0, r
            assert r["system"] == "nginx" or r["server_cpu_s"] > 0, r
            assert r["cached_bytes"] >= size, r  # and the cache holds it
    row = report["summary"]["1"]
    for system in coldfill.SYSTEMS:
        assert row[system]["runs"] == 1 and row[system]["sha_ok"] == 1
        assert row[system]["mb_per_s"] > 0
    for key in ("ratio_mb_per_s", "ratio_cpu_per_gib"):
        assert row[key] is not None and row[key] > 0
    assert [t["met"] is not None for t in report["targets"]] == [True, True]
    md = out.with_suffix(".md").read_text()
    assert "| 1 | nwbcache |" in md and "| 1 | nginx slice cache |" in md
    assert hashlib.sha256(b"").hexdigest() != report["origin_sha256"]
    assert not list(tmp_path.glob("coldfill-*"))  # the scratch dir is gone


@pytest.mark.slow  # the emulator, nginx and the daemon as processes
def test_a_primed_server_has_filled_the_second_object_before_the_timed_fill(
    tmp_path: Path,
) -> None:
    """--primed: the timed fill is still cold (all of it from the origin, in
    the timed window), and each cache holds the second object besides."""
    out = tmp_path / "results.json"
    report = _bench(
        tmp_path, "--size", "16M", "--runs", "1", "--no-warmup", "--primed", timeout=180
    )
    assert report["problems"] == [] and report["settings"]["primed"] is True
    size = 16 * MIB
    caching = [r for r in report["runs"] if r["system"] != "origin"]
    assert sorted(r["system"] for r in caching) == ["nginx", "nwbcache"]
    for r in caching:
        assert r["sha_ok"], r
        assert size <= r["upstream_bytes"] < size + MIB, r  # the timed fill's alone
        assert r["cached_bytes"] >= size + coldfill.WARM_SIZE, r  # and the primed object
    assert (
        "Before it, each server filled a second 64 MiB object" in out.with_suffix(".md").read_text()
    )
