"""Upstream misbehaving on purpose: the answer is the right bytes or an error,
never a wrong byte. Every body is compared with the origin's bytes."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

import pytest
import requests

from tests.support.daemons import DaemonThread
from tests.support.helpers import get_range, proxied, wait_until
from tests.support.s3emu import Fault, S3Emulator

KEY = "/bucket/blobs/faulty"
BS = 16 * 1024
DATA = os.urandom(10 * BS + 123)


@pytest.fixture
def setup(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> tuple[S3Emulator, DaemonThread, str]:
    origin.put(KEY, DATA)
    daemon = make_daemon(block_size=BS, readahead=4 * BS)
    return origin, daemon, proxied(daemon.url, origin, KEY)


@pytest.mark.parametrize(
    "fault", [Fault.SLOWDOWN, Fault.INTERNAL_ERROR, Fault.THROTTLE_429, Fault.WRONG_CONTENT_RANGE]
)
def test_retryable_faults_are_retried_and_bytes_exact(
    setup: tuple[S3Emulator, DaemonThread, str], fault: Fault
) -> None:
    origin, _daemon, url = setup
    origin.inject(fault, count=2, method="GET")
    r = requests.get(url, timeout=60)
    assert r.status_code == 200
    assert r.content == DATA
    statuses = [e.status for e in origin.requests(KEY)]
    assert (
        len([s for s in statuses if s not in (200, 206)])
        + (2 if fault is Fault.WRONG_CONTENT_RANGE else 0)
        >= 2
    )
    assert [e.fault for e in origin.requests(KEY)].count(fault) == 2


def test_retry_after_is_honoured(setup: tuple[S3Emulator, DaemonThread, str]) -> None:
    origin, _daemon, url = setup
    origin.inject(Fault.SLOWDOWN, count=1, method="GET", retry_after=1)
    r = get_range(url, 0, 99, check=False)
    assert r.content == DATA[:100]
    log = origin.requests(KEY)
    assert log[0].status == 503
    assert log[1].started - log[0].finished >= 0.95  # Retry-After: 1, not the ~10 ms backoff


@pytest.mark.parametrize("fault", [Fault.RESET_MID_BODY, Fault.SHORT_BODY])
def test_cut_body_resumes_from_last_byte(
    setup: tuple[S3Emulator, DaemonThread, str], fault: Fault
) -> None:
    origin, _daemon, url = setup
    get_range(url, 0, 0, check=False)  # discover first, so the next fetch is a multi-block run
    origin.clear_log()
    origin.inject(fault, count=1, method="GET", after_bytes=BS + 1000)
    r = get_range(url, BS, 4 * BS - 1, check=False)
    assert r.status_code == 206
    assert r.content == DATA[BS : 4 * BS]
    origin.wait_idle()  # a request is logged once its response is sent: after the client has it
    log = origin.requests(KEY)
    cut = next(e for e in log if e.fault is fault)
    assert cut.range is not None and cut.range.startswith(f"bytes={BS}-")
    assert cut.bytes_sent > 0
    # resumed where the cut happened, not from the start of the run
    resumed = f"bytes={BS + cut.bytes_sent}-"
    assert any(e.range is not None and e.range.startswith(resumed) for e in log), [
        e.range for e in log
    ]


def get_range_or_none(url: str, first: int, last: int) -> requests.Response | None:
    """The response, or None when the connection broke mid-body."""
    with contextlib.suppress(requests.RequestException):
        return get_range(url, first, last, check=False)
    return None


def test_blocks_whole_before_a_failed_run_stay_cached(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """A run whose upstream fails for good mid-body still keeps the blocks it
    received whole (they are written in groups, the last one on the way out)."""
    origin.put(KEY, DATA)
    daemon = make_daemon(block_size=BS, readahead=8 * BS, retry_attempts=2)
    url = proxied(daemon.url, origin, KEY)
    get_range(url, 0, 0)  # discover first, so the next fetch is one multi-block run
    origin.inject(Fault.RESET_MID_BODY, count=1, method="GET", after_bytes=2 * BS + 100)
    origin.inject(Fault.INTERNAL_ERROR, count=100, method="GET")
    failed = get_range_or_none(url, BS, 6 * BS - 1)  # blocks 1-5: 1 and 2 arrive whole
    assert failed is None or failed.content != DATA[BS : 6 * BS]  # the run did fail
    origin.wait_idle()
    assert Fault.RESET_MID_BODY in [e.fault for e in origin.requests(KEY)]
    origin.clear_faults()
    origin.clear_log()
    r = get_range(url, BS, 3 * BS - 1, check=False)
    assert r.status_code == 206 and r.content == DATA[BS : 3 * BS]
    assert r.headers["X-Cache"] == "HIT"
    origin.wait_idle()
    fetched = [e.range for e in origin.requests(KEY)]
    assert not any(
        rng is not None and rng.startswith((f"bytes={BS}-", f"bytes={2 * BS}-")) for rng in fetched
    ), fetched


def test_full_answer_to_range_request_yields_exact_bytes(
    setup: tuple[S3Emulator, DaemonThread, str],
) -> None:
    origin, _daemon, url = setup
    origin.inject(Fault.FULL_FOR_RANGE, count=3, method="GET")
    r = get_range(url, 2 * BS + 5, 2 * BS + 50, check=False)
    assert r.status_code == 206
    assert r.content == DATA[2 * BS + 5 : 2 * BS + 51]
    # and what got cached from those answers is right too
    assert requests.get(url, timeout=60).content == DATA


def test_persistent_failure_is_a_truthful_5xx(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put(KEY, DATA)
    daemon = make_daemon(block_size=BS, retry_attempts=3)
    origin.inject(Fault.INTERNAL_ERROR, count=100, method="GET")
    r = requests.get(proxied(daemon.url, origin, KEY), timeout=60)
    assert r.status_code == 502
    assert "retries exhausted" in r.text
    origin.wait_idle()
    assert len(origin.requests(KEY)) == 3  # --retry-attempts 3, not one more


def test_stalled_upstream_times_out_and_retries(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put(KEY, DATA)
    daemon = make_daemon(block_size=BS, read_timeout=0.3, first_byte_timeout=2.0)
    origin.inject(Fault.STALL, count=1, method="GET", stall_seconds=3)
    started = time.monotonic()
    r = get_range(proxied(daemon.url, origin, KEY), 0, 99, check=False)
    assert r.content == DATA[:100]
    # answered before the stall ended: the idle read timed out and was retried
    assert time.monotonic() - started < 3
    wait_until(lambda: len(origin.requests(KEY)) >= 2, 10)  # logged when the stall ends
    assert [e.fault for e in origin.requests(KEY)].count(Fault.STALL) == 1


def test_upstream_not_found_fault_passes_404(setup: tuple[S3Emulator, DaemonThread, str]) -> None:
    origin, _daemon, url = setup
    origin.inject(Fault.NOT_FOUND, count=1, method="GET")
    assert requests.get(url, timeout=60).status_code == 404


def test_head_to_daemon_works_when_upstream_refuses_head(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put(KEY, DATA)
    daemon = make_daemon(block_size=BS)
    origin.inject(Fault.HEAD_REFUSED, count=100)
    url = proxied(daemon.url, origin, KEY, "X-Amz-Signature=abc&X-Amz-Expires=10")
    head = requests.head(url, timeout=30)
    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(len(DATA))
    assert {e.method for e in origin.requests(KEY)} == {"GET"}


def test_etag_change_between_blocks_never_mixes_versions(
    setup: tuple[S3Emulator, DaemonThread, str],
) -> None:
    origin, _daemon, url = setup
    get_range(url, 0, 0, check=False)  # block 0 of version A cached
    new = os.urandom(len(DATA))
    origin.put(KEY, new)  # upstream now has version B; the daemon still believes A
    try:
        r = requests.get(url, timeout=60)
        body = r.content
        ok = r.status_code in (200, 206) and len(body) == len(DATA)
    except requests.exceptions.RequestException:
        ok, body = False, b""
    if ok:
        assert body in (DATA, new)
    # the old version's blocks are gone: the next read is all version B
    assert requests.get(url, timeout=60).content == new


def test_object_replaced_mid_read_gives_one_version_or_an_error(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    # Over sending.PACED_BYTES: a plain GET of it is fetched as it is read, in
    # several upstream requests (a smaller one comes in one, consistent, and a
    # change after it is seen when the version is revalidated).
    data = os.urandom(96 * BS)
    origin.put(KEY, data)
    daemon = make_daemon(block_size=BS, readahead=2 * BS)
    url = proxied(daemon.url, origin, KEY)
    origin.bandwidth = 2_000_000  # ~0.8 s for the object: time to replace it mid-read
    new = os.urandom(len(data))
    timer = threading.Timer(0.2, origin.put, args=(KEY, new))
    timer.start()
    try:
        r = requests.get(url, timeout=60)
        body = r.content
        complete = len(body) == len(data)
    except requests.exceptions.RequestException:
        complete, body = False, b""
    timer.join()
    origin.bandwidth = None
    if complete:
        assert body in (data, new), "a response mixed two versions"
    assert requests.get(url, timeout=60).content == new


def test_wrong_etag_header_mid_read_is_detected(
    setup: tuple[S3Emulator, DaemonThread, str],
) -> None:
    origin, _daemon, url = setup
    get_range(url, 0, 0, check=False)
    origin.inject(Fault.WRONG_ETAG, count=1, method="GET")
    try:
        r = requests.get(url, timeout=60)
        if r.status_code == 200 and len(r.content) == len(DATA):
            assert r.content == DATA
    except requests.exceptions.RequestException:
        pass
    assert requests.get(url, timeout=60).content == DATA


def test_failure_before_any_byte_is_a_status_not_a_cut_body(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    origin.put(KEY, DATA)
    daemon = make_daemon(block_size=BS, retry_attempts=2)
    url = proxied(daemon.url, origin, KEY)
    assert get_range(url, 0, 0, check=False).status_code == 206  # object known, block 0 cached
    origin.inject(Fault.INTERNAL_ERROR, count=100, method="GET")
    r = get_range(url, 5 * BS, 5 * BS + 99, check=False)
    assert r.status_code == 502
    assert r.text.startswith("nwbcache:")


def test_version_change_before_headers_restarts_on_the_new_version(
    setup: tuple[S3Emulator, DaemonThread, str],
) -> None:
    origin, _daemon, url = setup
    assert get_range(url, 0, 0, check=False).content == DATA[:1]  # version A known
    new = os.urandom(len(DATA))
    new_etag = origin.put(KEY, new)
    r = get_range(url, 3 * BS, 3 * BS + 99, check=False)  # a cold block: If-Match fails with 412
    assert r.status_code == 206
    assert r.content == new[3 * BS : 3 * BS + 100]
    assert r.headers["ETag"] == new_etag
    assert 412 in [e.status for e in origin.requests(KEY)]
