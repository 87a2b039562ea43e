"""Property-based byte-exactness: random objects, random ranges, tiny blocks.

With blocks of a few bytes every boundary case (first/last byte of a block,
ranges inside one block, spanning many, the short last block) comes up in a
few hundred examples. Expected answers come from a model written here from
RFC 9110, and bytes from the origin's data, never from the daemon.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nwbcache_proxy.config import Settings
from tests.support.daemons import DaemonThread
from tests.support.helpers import origin_host, proxied
from tests.support.s3emu import Fault, S3Emulator

BLOCK = 7
SIZES = [0, 1, 6, 7, 8, 13, 14, 15, 49, 50, 97, 211]
OBJECTS = {f"/bucket/obj-{n}": os.urandom(n) for n in SIZES}


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[S3Emulator, DaemonThread]]:
    origin = S3Emulator()
    origin.start_in_thread()
    for key, data in OBJECTS.items():
        origin.put(key, data)
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonThread(
            Settings(
                port=0,
                cache_dir=Path(tmp),
                block_size=BLOCK,
                cache_size=1024 * 1024,
                readahead=3 * BLOCK,
                allow_upstream=(origin_host(origin),),
                retry_base_delay=0.001,
                s3_listen="off",
            )
        ).start()
        try:
            yield origin, daemon
        finally:
            daemon.stop()
            origin.stop_thread()


# A range spec as structure: ("ab", a, b), ("from", a), ("suffix", n).
specs = st.one_of(
    st.tuples(st.just("ab"), st.integers(0, 230), st.integers(0, 230)).filter(
        lambda t: t[1] <= t[2]
    ),
    st.tuples(st.just("from"), st.integers(0, 230)),
    st.tuples(st.just("suffix"), st.integers(0, 230)),
)


def render(spec: tuple[object, ...]) -> str:
    if spec[0] == "ab":
        return f"bytes={spec[1]}-{spec[2]}"
    if spec[0] == "from":
        return f"bytes={spec[1]}-"
    return f"bytes=-{spec[1]}"


def expected(spec: tuple[object, ...], size: int) -> tuple[int, int, int]:
    """(status, start, end) per RFC 9110 §14.1.2/§14.3, and the documented
    choice that an empty object answers any valid range with 200."""
    if size == 0:
        return 200, 0, 0
    kind = spec[0]
    if kind == "suffix":
        n = int(spec[1])  # type: ignore[call-overload]
        if n == 0:
            return 416, 0, 0
        return 206, max(0, size - n), size
    first = int(spec[1])  # type: ignore[call-overload]
    if first >= size:
        return 416, 0, 0
    last = size - 1 if kind == "from" else min(int(spec[2]), size - 1)  # type: ignore[call-overload]
    return 206, first, last + 1


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.sampled_from(sorted(OBJECTS)), spec=specs)
def test_random_ranges_are_byte_exact(
    world: tuple[S3Emulator, DaemonThread], key: str, spec: tuple[object, ...]
) -> None:
    origin, daemon = world
    data = OBJECTS[key]
    r = requests.get(proxied(daemon.url, origin, key), headers={"Range": render(spec)}, timeout=30)
    status, start, end = expected(spec, len(data))
    assert r.status_code == status
    if status == 206:
        assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
        assert r.content == data[start:end]
    elif status == 416:
        assert r.headers["Content-Range"] == f"bytes */{len(data)}"
    else:
        assert r.content == data


RETRYABLE = [
    Fault.SLOWDOWN,
    Fault.INTERNAL_ERROR,
    Fault.THROTTLE_429,
    Fault.RESET_MID_BODY,
    Fault.SHORT_BODY,
    Fault.WRONG_CONTENT_RANGE,
    Fault.FULL_FOR_RANGE,
]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(1, 300),
    spec=specs,
    faults=st.lists(st.sampled_from(RETRYABLE), min_size=1, max_size=3),
    seed=st.integers(0, 2**32),
)
def test_random_ranges_with_faults_are_byte_exact(
    world: tuple[S3Emulator, DaemonThread],
    size: int,
    spec: tuple[object, ...],
    faults: list[Fault],
    seed: int,
) -> None:
    """A fresh object per example (cold), retryable faults on its fetches."""
    origin, daemon = world
    data = random.Random(seed).randbytes(size)
    key = f"/bucket/faulty-{seed}-{size}"
    origin.put(key, data)
    for fault in faults:
        origin.inject(fault, count=1, path=key, method="GET")
    r = requests.get(proxied(daemon.url, origin, key), headers={"Range": render(spec)}, timeout=60)
    status, start, end = expected(spec, size)
    assert r.status_code == status, r.text
    if status == 206:
        assert r.content == data[start:end]
    # whatever was cached along the way is right: a full warm read is exact
    assert requests.get(proxied(daemon.url, origin, key), timeout=60).content == data
    origin.clear_faults()


async def test_stampede_costs_one_upstream_fetch_per_block(
    world: tuple[S3Emulator, DaemonThread],
) -> None:
    """100 concurrent cold readers of one object: every byte fetched once."""
    origin, daemon = world
    data = os.urandom(3000)  # 429 blocks of 7 bytes
    key = "/bucket/stampede"
    origin.put(key, data)
    origin.clear_log()
    url = proxied(daemon.url, origin, key)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def read() -> bytes:
            async with session.get(url) as resp:
                assert resp.status == 200
                return await resp.read()

        bodies = await asyncio.gather(*(read() for _ in range(100)))
    assert all(body == data for body in bodies)
    origin.wait_idle()
    fetched = origin.requests(key)
    assert sum(e.bytes_sent for e in fetched) == len(data)
    # runs of consecutive blocks: far fewer requests than blocks, let alone readers
    assert len(fetched) < 429
