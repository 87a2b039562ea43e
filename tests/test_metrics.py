"""/metrics agrees with what a workload of known shape did, and stays safe:
bounded labels, no URLs or secrets, correct across --workers."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemons import DaemonProcess, DaemonThread
from tests.support.helpers import origin_host, proxied, scrape, value, wait_until
from tests.support.s3emu import Fault, S3Emulator

BS = 64 * 1024
DATA = os.urandom(10 * BS)
KEY = "/dandiarchive/blobs/me/tr/ics"


def test_counters_match_a_known_workload(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put(KEY, DATA)
    daemon = make_daemon(block_size=BS, cache_size=64 * BS)
    url = proxied(daemon.url, origin, KEY)
    cold = requests.get(url, timeout=30)  # one cold full read
    assert cold.content == DATA
    warm_bytes = 0
    for start in range(0, len(DATA), 100_000):  # warm ranged reads
        r = requests.get(url, headers={"Range": f"bytes={start}-{start + 49_999}"}, timeout=30)
        assert r.headers["X-Cache"] == "HIT"
        warm_bytes += len(r.content)
    requests.get(f"{daemon.url}/http/not-allowed.example/x", timeout=30)  # a 403
    time.sleep(1.5)  # one maintenance pass: cache size gauges
    origin.wait_idle()
    m = scrape(daemon.url)

    assert value(m, "nwbcache_served_bytes_total", source="cache") == warm_bytes
    assert value(m, "nwbcache_served_bytes_total", source="upstream") == len(DATA)
    served = value(m, "nwbcache_served_bytes_total", source="cache") + value(
        m, "nwbcache_served_bytes_total", source="upstream"
    )
    assert served == len(DATA) + warm_bytes
    assert value(m, "nwbcache_upstream_bytes_total") == origin.bytes_sent(KEY)
    assert value(m, "nwbcache_requests_total", method="GET", status="206", cache="hit") == 7
    misses = value(m, "nwbcache_requests_total", method="GET", status="200", cache="miss") + value(
        m, "nwbcache_requests_total", method="GET", status="200", cache="partial"
    )
    assert misses == 1
    assert value(m, "nwbcache_requests_total", method="GET", status="403", cache="bypass") == 1
    assert value(m, "nwbcache_request_duration_seconds_count") == 9
    assert value(m, "nwbcache_upstream_requests_total", outcome="ok") == len(origin.requests(KEY))
    assert value(m, "nwbcache_cache_capacity_bytes") == 64 * BS
    assert value(m, "nwbcache_cache_blocks") == 10
    assert value(m, "nwbcache_cache_size_bytes") == 10 * BS
    assert value(m, "nwbcache_inflight_requests") == 0


def test_retries_and_evictions_are_counted(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put(KEY, DATA)
    daemon = make_daemon(block_size=BS, cache_size=4 * BS)  # holds 4 of the 10 blocks
    origin.inject(Fault.SLOWDOWN, count=2, method="GET")
    assert requests.get(proxied(daemon.url, origin, KEY), timeout=30).content == DATA
    time.sleep(2.5)
    m = scrape(daemon.url)
    assert value(m, "nwbcache_upstream_retries_total", reason="throttled") == 2
    assert value(m, "nwbcache_upstream_requests_total", outcome="throttled") == 2
    evicted = {q: value(m, "nwbcache_cache_evictions_total", queue=q) for q in ("small", "main")}
    assert sum(evicted.values()) >= 6 and evicted["small"] >= 5  # a scan leaves by the small queue
    assert value(m, "nwbcache_cache_evictions_recent_total") >= 6  # all were just read
    assert value(m, "nwbcache_cache_size_bytes") <= 4 * BS
    # S3-FIFO: block 0 enters main, the other nine the small queue.
    assert value(m, "nwbcache_cache_admissions_total", queue="main") == 1
    # (At least: read-ahead can outrun a 4-block cache, and a block evicted
    # before its reader got to it is fetched and admitted again.)
    assert value(m, "nwbcache_cache_admissions_total", queue="small") >= 9
    queued = sum(value(m, "nwbcache_cache_queue_bytes", queue=q) for q in ("small", "main"))
    assert queued == value(m, "nwbcache_cache_size_bytes")
    # Block 0 is kept in main; a block read-ahead fetched and the tiny cache
    # evicted before the reader got to it comes back from the ghost list into
    # main too.
    ghosts = value(m, "nwbcache_cache_admissions_total", queue="ghost")
    assert BS <= value(m, "nwbcache_cache_queue_bytes", queue="main") <= (1 + ghosts) * BS


def test_labels_never_carry_urls_or_secrets(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put(KEY, DATA)
    daemon = make_daemon(block_size=BS)
    secret = "SIGNATURESECRET42"
    requests.get(proxied(daemon.url, origin, KEY, f"X-Amz-Signature={secret}"), timeout=30)
    text = requests.get(f"{daemon.url}/metrics", timeout=30).text
    assert secret not in text
    assert "dandiarchive" not in text
    assert "127.0.0.1" not in text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            for label, v in s.labels.items():
                assert "/" not in v, (s.name, label, v)


def test_json_access_log_has_one_line_per_request(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], caplog: pytest.LogCaptureFixture
) -> None:
    from nwbcache_proxy.logs import JsonFormatter

    caplog.set_level(logging.INFO, logger="nwbcache.access")
    origin.put(KEY, DATA)
    daemon = make_daemon(block_size=BS)
    r = requests.get(proxied(daemon.url, origin, KEY, "X-Amz-Signature=TOPSECRET"), timeout=30)
    # Logged when the handler returns, just after the last byte.
    wait_until(
        lambda: any(rec.name == "nwbcache.access" for rec in caplog.records),
        5,
        "an access-log line",
        interval=0.02,
    )
    time.sleep(0.1)
    records = [rec for rec in caplog.records if rec.name == "nwbcache.access"]
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == r.headers["X-Request-Id"]
    assert line["status"] == 200
    assert line["bytes"] == len(DATA)
    assert line["cache"] in ("MISS", "PARTIAL")
    assert line["duration_ms"] > 0
    assert "TOPSECRET" not in json.dumps(line)
    assert "X-Amz-Signature=REDACTED" in line["path"]


def test_access_log_counts_the_bytes_of_hits_answered_from_memory(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], caplog: pytest.LogCaptureFixture
) -> None:
    """A warm range small enough to go out in one write (from a block kept in
    memory, or read whole from the page cache) logged 0 bytes."""
    caplog.set_level(logging.INFO, logger="nwbcache.access")
    origin.put(KEY, DATA)
    daemon = make_daemon(block_size=BS)
    url = proxied(daemon.url, origin, KEY)
    assert requests.get(url, timeout=30).content == DATA
    # All on disk: the ranges are then answered in one write (the path that logged 0).
    wait_until(lambda: daemon.cache.fetcher.fetching == 0, 5, "the blocks written")
    ranges = [(0, 99), (BS - 10, BS + 9), (3, 3 * BS + 2)]
    ids = []
    for lo, hi in ranges:
        r = requests.get(url, headers={"Range": f"bytes={lo}-{hi}"}, timeout=30)
        assert r.status_code == 206 and r.content == DATA[lo : hi + 1]
        assert r.headers["X-Cache"] == "HIT"
        ids.append(r.headers["X-Request-Id"])

    def logged() -> dict[str, int]:
        records = [rec for rec in caplog.records if rec.name == "nwbcache.access"]
        return {rec.request["request_id"]: rec.request["bytes"] for rec in records}  # type: ignore[attr-defined]

    wait_until(lambda: all(i in logged() for i in ids), 5, "the hits' log lines", interval=0.02)
    assert [logged()[i] for i in ids] == [hi - lo + 1 for lo, hi in ranges]


@pytest.mark.slow
def test_metrics_sum_over_workers(origin: S3Emulator, tmp_path: Path) -> None:
    origin.put(KEY, DATA)
    daemon = DaemonProcess(
        [
            "--cache-dir",
            str(tmp_path / "cache"),
            "--block-size",
            "64K",
            "--workers",
            "2",
            "--allow-upstream",
            origin_host(origin),
        ]
    ).start()
    try:
        url = proxied(daemon.url, origin, KEY)
        n = 40
        for _ in range(n):  # new connections: the kernel spreads them over both workers
            with requests.Session() as s:
                assert s.get(url, headers={"Range": "bytes=0-99"}, timeout=30).content == DATA[:100]
        time.sleep(0.3)  # a request is counted as its handler returns, just after its last byte
        totals = []
        for _ in range(10):  # whichever worker answers, the sum is the same
            m = scrape(daemon.url)
            totals.append(
                sum(
                    v
                    for (name, labels), v in m.items()
                    if name == "nwbcache_requests_total" and ("method", "GET") in labels
                )
            )
        assert totals == [n] * 10
    finally:
        daemon.terminate()
