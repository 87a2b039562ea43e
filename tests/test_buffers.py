"""What a daemon process keeps for bytes on their way, and --buffer-memory's shares (buffers.py)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import requests

from nwbcache_proxy.buffers import (
    AUTO_TOTAL,
    DEFAULT_SHARE,
    MIB,
    MIN_SHARE,
    POOL_BYTES,
    RECENT_BYTES,
    SEND_BYTES,
    Budget,
    share,
)
from tests.support.daemons import DaemonThread
from tests.support.helpers import proxied, scrape, value
from tests.support.s3emu import S3Emulator


def test_the_default_share_is_the_three_defaults() -> None:
    default = Budget(POOL_BYTES, RECENT_BYTES, SEND_BYTES)
    assert Budget.of(DEFAULT_SHARE) == default
    assert (default.pool, default.recent, default.send) == (96 * MIB, 32 * MIB, 32 * MIB)
    assert default.total == DEFAULT_SHARE == 160 * MIB


@pytest.mark.parametrize(
    ("each", "pool", "recent", "send"),
    [
        (16 * MIB, 10_066_329, 3_355_443, 3_355_444),
        (80 * MIB, 48 * MIB, 16 * MIB, 16 * MIB),
        (320 * MIB, 192 * MIB, 64 * MIB, 64 * MIB),
        (100_000_001, 60_000_000, 20_000_000, 20_000_001),  # the odd bytes go to send
    ],
)
def test_a_share_splits_three_to_one_to_one(each: int, pool: int, recent: int, send: int) -> None:
    budget = Budget.of(each)
    assert (budget.pool, budget.recent, budget.send) == (pool, recent, send)
    assert budget.total == each


@pytest.mark.parametrize(
    ("workers", "each"),
    [
        (1, 160 * MIB),
        (2, 160 * MIB),
        (6, 160 * MIB),  # 960 MiB in all
        (7, AUTO_TOTAL // 7),  # 1 GiB in all from here
        (16, 64 * MIB),
        (64, 16 * MIB),
        (200, MIN_SHARE),  # never less than a worker can fill with
    ],
)
def test_auto_gives_each_worker_160_mib_up_to_1_gib_in_all(workers: int, each: int) -> None:
    assert share(None, workers) == each


@pytest.mark.parametrize(
    ("total", "workers", "each"),
    [
        (16 * MIB, 1, 16 * MIB),
        (64 * MIB, 4, 16 * MIB),
        (8 * 1024 * MIB, 8, 1024 * MIB),  # more than auto would give, if asked
        (100 * MIB + 1, 2, 50 * MIB),
    ],
)
def test_a_total_given_is_shared_equally(total: int, workers: int, each: int) -> None:
    assert share(total, workers) == each


@pytest.mark.parametrize(
    ("total", "workers", "message"),
    [
        (
            32 * MIB,
            4,
            "--buffer-memory 32 MiB gives each of 4 workers 8 MiB; give at least 16 MiB "
            "per worker (64 MiB in all), or fewer --workers",
        ),
        (
            100 * MIB,
            8,
            "--buffer-memory 100 MiB gives each of 8 workers 12.5 MiB; give at least 16 MiB "
            "per worker (128 MiB in all), or fewer --workers",
        ),
        (1536 * 1024, 1, "--buffer-memory 1.5 MiB is too little: give at least 16 MiB"),
        (0, 1, "--buffer-memory 0 B is too little: give at least 16 MiB"),
        (-1, 2, "--buffer-memory must be a size or auto, got -1"),
    ],
)
def test_a_total_too_small_for_the_workers_says_what_would_do(
    total: int, workers: int, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        share(total, workers)
    assert str(info.value).startswith(message)


def test_a_daemon_keeps_no_more_buffers_than_its_share(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """A cold read of 24 MiB (read-ahead holds up to 16 MiB of it at once)
    through a daemon given 16M: its pool keeps at most its three fifths, and
    the gauges say so. Then through one with the default, which keeps more."""
    data = os.urandom(24 * MIB)
    origin.put("/b/first", data)
    origin.put("/b/second", data[::-1])
    small = make_daemon(buffer_memory=16 * MIB)
    assert requests.get(proxied(small.url, origin, "/b/first"), timeout=60).content == data
    small.call(small.cache.upkeep.run_pass())
    samples = scrape(small.url)
    budget = Budget.of(16 * MIB)
    assert value(samples, "nwbcache_buffer_memory_bytes") == 16 * MIB
    kept = value(samples, "nwbcache_buffer_pool_bytes")
    assert 0 < kept <= budget.pool
    # The other two shares reached their owners too.
    assert small.cache.blocks.recent.limit == budget.recent
    assert small.cache.reader.send_budget == budget.send
    small.stop()
    default = make_daemon(cache_dir=small.settings.cache_dir.with_name("other"))
    url = proxied(default.url, origin, "/b/second")
    assert requests.get(url, timeout=60).content == data[::-1]
    default.call(default.cache.upkeep.run_pass())
    samples = scrape(default.url)
    assert value(samples, "nwbcache_buffer_memory_bytes") == DEFAULT_SHARE
    assert value(samples, "nwbcache_buffer_pool_bytes") > Budget.of(16 * MIB).pool
    assert default.cache.blocks.recent.limit == RECENT_BYTES
    assert default.cache.reader.send_budget == SEND_BYTES
