"""The status page rendered by a real browser (Debian's headless Chromium):
the figures a phone would show are the ones of the workload."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.support.daemons import DaemonThread
from tests.support.helpers import proxied, status_with_top
from tests.support.s3emu import S3Emulator

# Slow (not in make test-fast): headless Chromium.
pytestmark = pytest.mark.slow

BS = 64 * 1024
DATA = os.urandom(6 * BS)
ARTIFACTS = Path(__file__).resolve().parent.parent / ".artifacts"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("no chromium: run scripts/install-test-deps.sh (make test does)")


def _run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", *args,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_status_page_in_headless_chromium(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    origin.put("/bucket/shown", DATA)
    daemon = make_daemon(block_size=BS)
    url = proxied(daemon.url, origin, "/bucket/shown")
    for _ in range(3):
        assert requests.get(url, timeout=30).content == DATA
    time.sleep(1.5)  # cache gauges refreshed by a maintenance pass
    status_with_top(daemon.url)  # found once: the page shows the last found (TOP_WAIT)
    dom = _run_chromium(["--dump-dom", f"{daemon.url}/"], tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    # 6 blocks of 64 KiB, as the browser renders it
    assert 'id="cache-size">384 KiB<' in page
    assert "6 blocks" in page
    assert "/bucket/shown" in page
    assert "66.7 %" in page  # hit ratio, by bytes and by requests: 2 warm reads of 3
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    result = _run_chromium(
        [f"--screenshot={shot}", "--window-size=412,915", f"{daemon.url}/"], tmp_path / "profile2"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000  # a rendered page, not a blank one
