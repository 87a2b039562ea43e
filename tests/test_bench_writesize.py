"""The write-size benchmark (bench/writesize.py): at a tiny size every call size
is measured in both states of memory and every file reads back as written;
its check finds a group that is not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.writesize import GROUP, STATES, WRITERS, verify_version, write_version
from tests.support.helpers import run_bench


@pytest.mark.slow  # a process, and sync
def test_writesize_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = ["--size", "32M", "--runs", "1", "--settle", "0", "--work", str(tmp_path / "work")]
    report = run_bench("bench.writesize", *args, out=out, timeout=300)
    assert report["problems"] == []
    assert list((tmp_path / "work").iterdir()) == []  # every file written is gone
    rows = report["summary"]
    assert {(r["state"], r["calls"]) for r in rows} == {(s, w) for s in STATES for w in WRITERS}
    for row in rows:
        assert row["gb_per_s"] > 0 and row["sys_s_per_gib"] >= 0, row
        if row["calls"] == "1 MiB":
            assert row["x_1mib_gb_per_s"] == 1.0
    assert "| after small files | 1 MiB |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("writer", list(WRITERS))
def test_each_writer_writes_every_group_and_the_check_finds_one_that_is_not(
    tmp_path: Path, writer: str
) -> None:
    data = memoryview(bytearray(os.urandom(GROUP)))
    size = 32 * 1024 * 1024
    path = tmp_path / "version"
    write_version(path, size, WRITERS[writer], data)
    assert verify_version(path, size, data) is None
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" if data[5] != 0xFF else b"\x00", 7 * GROUP + 5)
    finally:
        os.close(fd)
    wrong = verify_version(path, size, data)
    assert wrong is not None and f"at {7 * GROUP}" in wrong
