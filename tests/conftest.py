"""Fixtures: a real S3 emulator on port 0 and the real daemon in front of it."""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemons import DaemonThread
from nwbcache_proxy.config import Settings
from s3emu import S3Emulator

# Fixtures of the client tests (a fake DANDI archive, a dead daemon URL) and
# their autouse isolation: no NWBCACHE_* of the developer's leaks into a test.
pytest_plugins = ["client_support"]

SHARED_NWB = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "nwb"


def system_tool(name: str) -> str:
    """Path of a system tool a test drives (curl, promtool, chromium...); the
    test fails, never skips, without it: scripts/install-test-deps.sh installs
    them (make test runs it)."""
    path = shutil.which(name)
    for folder in ("/usr/bin", "/usr/sbin"):  # sbin: nginx, when PATH lacks it
        if path is None and os.access(f"{folder}/{name}", os.X_OK):
            path = f"{folder}/{name}"
    if path is None:
        pytest.fail(f"{name} not found: run scripts/install-test-deps.sh", pytrace=False)
    return path


@pytest.fixture
def gc_in_main_thread_only() -> Iterator[None]:
    """Keep the cyclic garbage collector out of the server threads.

    h5py/hdmf objects have finalizers that take h5py's global lock. If a
    collection triggered in the daemon's or the emulator's thread runs one
    while the main thread holds that lock and waits for an HTTP answer from
    that very thread, the test deadlocks. (In production the daemon is its
    own process and this cannot happen.) So: no automatic collection while a
    test that mixes h5py with in-process servers runs; collect afterwards.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


@pytest.fixture
def origin() -> Iterator[S3Emulator]:
    emu = S3Emulator()
    emu.start_in_thread()
    try:
        yield emu
    finally:
        emu.stop_thread()


def origin_host(emu: S3Emulator) -> str:
    return emu.url.removeprefix("http://")


def proxied(daemon_url: str, emu: S3Emulator, key: str, query: str = "") -> str:
    """The daemon URL for object ``key`` of the emulator."""
    url = f"{daemon_url}/http/{origin_host(emu)}{key}"
    return f"{url}?{query}" if query else url


@pytest.fixture
def make_daemon(origin: S3Emulator, tmp_path: Path) -> Iterator[Callable[..., DaemonThread]]:
    """Start daemons (in threads) in front of ``origin``; all stopped at teardown."""
    started: list[DaemonThread] = []

    def make(**overrides: Any) -> DaemonThread:
        base = Settings(
            port=0,
            cache_dir=tmp_path / "cache",
            allow_upstream=(origin_host(origin),),
            retry_base_delay=0.01,
            first_byte_timeout=5.0,
            read_timeout=5.0,
        )
        daemon = DaemonThread(dataclasses.replace(base, **overrides)).start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()
