"""Fixtures: a real S3 emulator on port 0 and the real daemon in front of it.

Helpers (URLs, polling, ports) are in tests.support.helpers, imported like code.
"""

from __future__ import annotations

import dataclasses
import gc
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nwbcache_proxy.config import Settings
from tests.support.daemons import DaemonProcess, DaemonThread, Spawn
from tests.support.helpers import origin_host
from tests.support.s3emu import S3Emulator

# Fixtures of the client tests (a fake DANDI archive, a dead daemon URL) and
# their autouse isolation: no NWBCACHE_* of the developer's leaks into a test.
pytest_plugins = ["tests.support.client_support"]


@pytest.fixture(autouse=True)
def _fast_tests_start_no_programs(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only tests marked ``slow`` start other programs, so that ``make test-fast``
    (``-m "not slow"``) needs no system tools and no child interpreters."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(self: subprocess.Popen[Any], args: Any, *rest: Any) -> None:
        raise AssertionError(f"starts {args!r}: mark the test @pytest.mark.slow")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


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
            s3_listen="off",  # tests of the S3 endpoint ask for 127.0.0.1:0
        )
        daemon = DaemonThread(dataclasses.replace(base, **overrides)).start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def spawn(origin: S3Emulator) -> Iterator[Spawn]:
    """Start daemon processes in front of ``origin`` (slow tests only); any still
    alive at teardown (a test failed before stopping it) is killed: the tests
    assert clean exits."""
    started: list[DaemonProcess] = []

    def start(cache_dir: Path, *extra: str) -> DaemonProcess:
        args = [
            "--cache-dir",
            str(cache_dir),
            "--allow-upstream",
            origin_host(origin),
            "--retry-base-delay",
            "0.01",
            "--log-level",
            "warning",
            *extra,
        ]
        daemon = DaemonProcess(args)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill9()
