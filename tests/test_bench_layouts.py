"""The layouts benchmark (bench/layouts.py): at a tiny size every figure is
measured and every block written reads back as written, in both layouts; its
check finds a block that is not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.layouts import GROUP, LAYOUTS, make_store, verify, write_all
from tests.support.helpers import run_bench


@pytest.mark.slow  # a process, and sync
def test_layouts_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = ["--bytes", "2M", "--small-bytes", "256K", "--runs", "2", "--settle", "0"]
    args += ["--work", str(tmp_path / "work")]
    report = run_bench("bench.layouts", *args, out=out, timeout=300)
    assert report["problems"] == []
    assert not (tmp_path / "work").exists()  # the runs' files are gone
    layouts = report["summary"]
    assert set(layouts) == {"file per block", "file per version"}
    for figures in layouts.values():
        for work in ("write 262144", "read 262144", "write 4096", "read 4096", "evict 4096"):
            assert figures[work]["mb_per_s"] > 0 and figures[work]["cpu_s"] >= 0, work
    # A 4 KiB block file is its 64-byte header and its bytes: two 4 KiB disk blocks.
    assert layouts["file per block"]["disk use 4096"] >= 1.5
    assert 1.0 <= layouts["file per version"]["disk use 4096"] < 1.1
    # Format 2's eviction relies on this (tests/test_kernel_assumptions.py); the
    # punch's answer is the kernel's to give, recorded either way.
    assert report["hazards"]["bytes queued by sendfile kept after unlink"] is True
    assert isinstance(report["hazards"]["bytes queued by sendfile kept after punch"], bool)
    md = out.with_suffix(".md").read_text()
    assert "| write, MB/s | 256 KiB |" in md and "| evict, 1 MiB at a time, MB/s | 4 KiB |" in md


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_check_finds_a_block_that_is_not_as_written(tmp_path: Path, layout: str) -> None:
    source = memoryview(os.urandom(GROUP))
    store = make_store(layout, tmp_path, 4096, 300)
    try:
        write_all(store, source, 4096, 300, 2)
        assert verify(store, source, 4096, 300) == []
        store.evict(7)
        assert "block 7" in verify(store, source, 4096, 300)[0]
    finally:
        store.close()
