"""The HTTP fill benchmark (bench/httpfill.py) runs end to end at a tiny size.

What is asserted is what a broken harness would get wrong (no timing): the
daemon was killed mid-fill and started again, every object was read back
and compared with the origin's bytes, the read-back of a cache holding
everything asked nothing of the origin, and with a --cache-size below the
data the index ends within it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.helpers import run_bench


@pytest.mark.slow  # the S3 emulator and two daemons as processes
@pytest.mark.parametrize("cache_size", [None, "6M"])
def test_httpfill_bench_runs_at_a_tiny_size(tmp_path: Path, cache_size: str | None) -> None:
    out = tmp_path / "results.json"
    args = ["--blocks", "3200", "--objects", "8", "--range", "1M", "--work", str(tmp_path / "w")]
    if cache_size is not None:
        args += ["--cache-size", cache_size]
    report = run_bench("bench.httpfill", *args, out=out, timeout=120)
    result = report["result"]
    assert result["problems"] == []
    assert result["wrong_objects"] == []
    # Half the objects read, then the kill: the readers of the others are cut
    # (four streams: at most three more can finish in between).
    assert 4 <= result["killed_after_objects"] < 8
    assert result["restart_s"] > 0
    settings = report["settings"]
    assert settings["object_size"] * settings["objects"] == 3200 * 4096
    if cache_size is None:
        assert result["readback_origin_requests"] == 0
        assert result["index_bytes_at_end"] == 3200 * 4096
    else:
        assert result["readback_origin_requests"] > 0  # evicted blocks fetched again
        assert result["index_bytes_at_end"] <= 6 * 1024 * 1024
    assert "| objects read back wrong | 0 |" in out.with_suffix(".md").read_text()
