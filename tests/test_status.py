"""The status page (GET /, /status.json) against a workload of known shape."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from nwbcache_proxy import footprint, status
from nwbcache_proxy.buffers import DEFAULT_SHARE, POOL_BYTES
from nwbcache_proxy.sizes import format_size
from tests.support.daemons import DaemonThread
from tests.support.helpers import free_port, proxied, scrape, status_with_top, value, wait_until
from tests.support.s3emu import S3Emulator

BS = 64 * 1024
A, B = os.urandom(8 * BS), os.urandom(3 * BS)


@pytest.fixture
def busy_daemon(origin: S3Emulator, make_daemon: Callable[..., DaemonThread]) -> DaemonThread:
    origin.put("/bucket/a", A)
    origin.put("/bucket/b", B)
    daemon = make_daemon(block_size=BS, cache_size=100 * BS)
    assert requests.get(proxied(daemon.url, origin, "/bucket/a"), timeout=30).content == A  # cold
    assert requests.get(proxied(daemon.url, origin, "/bucket/b"), timeout=30).content == B  # cold
    for _ in range(3):  # warm: 3 × A
        assert requests.get(proxied(daemon.url, origin, "/bucket/a"), timeout=30).content == A
    time.sleep(1.5)  # a maintenance pass updates the cache size gauges
    return daemon


def report_with_top(daemon: DaemonThread) -> dict[str, Any]:
    return status_with_top(daemon.url)


def test_status_json_agrees_with_the_workload(busy_daemon: DaemonThread) -> None:
    report = report_with_top(busy_daemon)
    since = report["since_start"]
    assert since["requests"] == 5
    # exactly the warm reads: blocks fetched for a cold reader (read-ahead
    # included) count as served from upstream the first time they are read
    assert since["served_from_cache_bytes"] == 3 * len(A)
    assert since["served_from_upstream_bytes"] == len(A) + len(B)
    assert since["served_from_cache_bytes"] + since["served_from_upstream_bytes"] == 4 * len(
        A
    ) + len(B)
    assert since["upstream_bytes"] == len(A) + len(B)
    assert since["hit_ratio_requests"] == pytest.approx(3 / 5)
    assert report["cache"]["blocks"] == 11
    assert report["cache"]["capacity_bytes"] == 100 * BS
    # The fill counts the files of the 2 versions and 11 blocks (footprint.py).
    assert report["cache"]["size_bytes"] == len(A) + len(B)
    assert report["cache"]["overhead_bytes"] == footprint.overhead(2, 11)
    on_disk = len(A) + len(B) + footprint.overhead(2, 11)
    assert report["cache"]["fill"] == pytest.approx(on_disk / (100 * BS))
    # The default --buffer-memory of one worker, its pool's share, and what
    # the pool keeps: the gauges' figures.
    metrics = scrape(busy_daemon.url)
    assert report["buffers"] == {
        "kept_bytes": value(metrics, "nwbcache_buffer_pool_bytes"),
        "pool_limit_bytes": POOL_BYTES,
        "limit_bytes": DEFAULT_SHARE,
    }
    top = report["top_objects"]
    assert [o["blocks"] for o in top] == [8, 3]
    assert top[0]["url"].endswith("/bucket/a") and top[1]["url"].endswith("/bucket/b")
    # the last-hour window covers the whole workload too
    assert report["last_hour"]["requests"] == 5
    # S3-FIFO: 11 blocks cached; two blocks 0 went to main, and the 7 other
    # blocks of A, hit three times while in the small queue, wait there for a
    # promotion that comes only when the small queue must give (no eviction yet).
    assert since["admissions"] == 11 and since["promotions"] == 0
    assert report["cache"]["protected"] == pytest.approx(2 / 11)


def test_status_page_is_html_with_the_figures(busy_daemon: DaemonThread) -> None:
    report_with_top(busy_daemon)  # found: the page names them too
    r = requests.get(f"{busy_daemon.url}/", timeout=30)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    page = r.text
    assert "name=viewport" in page
    assert "Hit ratio (bytes)" in page
    assert "of at most\n96 MiB (--buffer-memory 160 MiB)" in page
    assert "/bucket/a" in page
    assert "11 blocks" in page


def test_text_rendering_has_every_row(busy_daemon: DaemonThread) -> None:
    report = report_with_top(busy_daemon)
    text = status.render_text(report)
    for label, _key, _fmt in status.ROWS:
        assert label in text
    overhead = format_size(footprint.overhead(2, 11))
    assert f"{format_size(len(A) + len(B))} of blocks and {overhead} of their files" in text
    assert "/bucket/a" in text
    assert "of at most 96 MiB (--buffer-memory 160 MiB)" in text
    del report["buffers"]  # a daemon from before --buffer-memory
    assert "buffer pools" not in status.render_text(report)


def test_text_and_html_say_when_sizes_are_approximate(busy_daemon: DaemonThread) -> None:
    report = requests.get(f"{busy_daemon.url}/status.json", timeout=30).json()
    assert report["cache"]["reconciling"] is False
    assert "reconcil" not in status.render_text(report).lower()
    report["cache"]["reconciling"] = True  # as after an unclean stop
    assert "after an unclean stop: sizes approximate" in status.render_text(report)
    assert "id=reconciling" in status.render_html(report)


def test_status_answers_while_the_index_is_busy(busy_daemon: DaemonThread) -> None:
    """Under load the index's thread is busy for long stretches (a flush of
    many versions' use, an eviction slice): the report gives the top objects
    found last rather than wait for it (it waited: 200-900 ms under hits)."""
    first = report_with_top(busy_daemon)["top_objects"]
    release = threading.Event()
    busy_daemon.cache.index._executor.submit(release.wait, 30)  # the index's one thread
    try:
        time.sleep(status.TOP_MAX_AGE + 0.1)  # those are due to be found again
        report = requests.get(f"{busy_daemon.url}/status.json", timeout=5).json()
        assert report["top_objects"] == first
        assert report["cache"]["blocks"] == 11
    finally:
        release.set()


def test_the_gauges_show_the_cache_before_a_pass_is_through(
    busy_daemon: DaemonThread, origin: S3Emulator
) -> None:
    """A daemon restarted with a cut --cache-size evicts in its first pass, for
    as long as that takes under load; the figures showed 0 blocks meanwhile
    (set at the end of a pass only). They now come first, from the totals the
    index gave last (at start, when it was opened)."""
    upkeep = busy_daemon.cache.upkeep
    url = proxied(busy_daemon.url, origin, "/bucket/a")
    assert requests.get(url, timeout=30).content == A  # use for the pass to store
    upkeep.metrics.cache_blocks.set(0)  # as in a daemon just started
    upkeep.metrics.cache_size.set(0)
    release = threading.Event()
    busy_daemon.cache.index._executor.submit(release.wait, 30)  # the pass waits on it
    done = busy_daemon.submit(upkeep.run_pass())
    try:
        wait_until(
            lambda: value(scrape(busy_daemon.url), "nwbcache_cache_blocks") == 11,
            5,
            "the cache's blocks in the gauge",
        )
        assert value(scrape(busy_daemon.url), "nwbcache_cache_size_bytes") == len(A) + len(B)
        assert not done.done()
    finally:
        release.set()
    done.result(30)


def test_summarize_reads_metrics_text() -> None:
    text = b"""# TYPE nwbcache_requests_total counter
nwbcache_requests_total{method="GET",status="200",cache="hit"} 3.0
nwbcache_requests_total{method="GET",status="502",cache="bypass"} 2.0
# TYPE nwbcache_served_bytes_total counter
nwbcache_served_bytes_total{source="cache"} 300.0
nwbcache_served_bytes_total{source="upstream"} 100.0
# TYPE nwbcache_upstream_requests_total counter
nwbcache_upstream_requests_total{outcome="ok"} 4.0
nwbcache_upstream_requests_total{outcome="throttled"} 1.0
"""
    v = status.summarize(text)
    assert v["requests"] == 5 and v["requests_hit"] == 3 and v["requests_5xx"] == 2
    assert v["served_cache"] == 300 and v["served_upstream"] == 100
    assert v["upstream_requests"] == 5 and v["upstream_errors"] == 1
    w = status.window(status.Snapshot(10, v), None)
    assert w["hit_ratio_bytes"] == 0.75
    assert w["hit_ratio_requests"] == 1.0  # 3 hits of 3 requests that could hit


def test_summarize_reads_the_sharing_figures() -> None:
    text = b"""# TYPE nwbcache_awaited_fetches_total counter
nwbcache_awaited_fetches_total{kind="block"} 7.0
nwbcache_awaited_fetches_total{kind="discovery"} 2.0
# TYPE nwbcache_parent_requests_total counter
nwbcache_parent_requests_total{parent="0",outcome="ok"} 5.0
nwbcache_parent_requests_total{parent="1",outcome="ok"} 4.0
nwbcache_parent_requests_total{parent="0",outcome="failed"} 1.0
nwbcache_parent_requests_total{parent="1",outcome="refused"} 2.0
"""
    before = status.Snapshot(0, status.summarize(text))
    later = text.replace(b'"block"} 7.0', b'"block"} 10.0').replace(b'ok"} 5.0', b'ok"} 6.0')
    w = status.window(status.Snapshot(60, status.summarize(later)), before)
    assert (w["awaited"], w["parent_ok"], w["parent_failed"]) == (3, 1, 0)
    w = status.window(status.Snapshot(60, status.summarize(later)), None)
    assert (w["awaited"], w["parent_ok"], w["parent_failed"]) == (12, 10, 3)
    text_report = {
        "version": "x",
        "uptime_seconds": 60,
        "cache": {"size_bytes": 0, "capacity_bytes": 1, "blocks": 0, "fill": 0, "protected": None},
        "inflight_requests": 0,
        "upstream_breakers_open": 0,
        "last_minute": w,
        "last_hour": w,
        "since_start": w,
        "top_objects": [],
    }
    rendered = status.render_text(text_report)
    assert (
        "Left to another worker or daemon" in rendered and "Parents failed or refused" in rendered
    )


@pytest.mark.slow
def test_nwbcache_status_prints_the_same_figures(busy_daemon: DaemonThread) -> None:
    import subprocess
    import sys

    report_with_top(busy_daemon)  # found: the command names them too
    proc = subprocess.run(
        [sys.executable, "-m", "nwbcache_proxy", "status", "--url", busy_daemon.url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Hit ratio (bytes)" in proc.stdout
    assert "11 blocks" in proc.stdout
    assert "/bucket/a" in proc.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "nwbcache_proxy", "status", "--url", busy_daemon.url, "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    import json

    assert json.loads(as_json.stdout)["since_start"]["requests"] == 5


@pytest.mark.slow
def test_nwbcache_status_with_no_daemon_fails_clearly() -> None:
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "nwbcache_proxy", "status", "--url", f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "cannot read" in proc.stderr
