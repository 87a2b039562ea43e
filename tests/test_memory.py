"""Memory stays bounded: streaming objects much larger than the daemon's
memory bound, cold and warm, never buffers them whole."""

from __future__ import annotations

import concurrent.futures
import hashlib
from pathlib import Path

import pytest
import requests

from tests.support.daemons import DaemonProcess
from tests.support.helpers import origin_host, proxied
from tests.support.s3emu import S3Emulator

# Slow (not in make test-fast): a daemon process, its RSS measured.
pytestmark = pytest.mark.slow

SIZE = 512 * 1024 * 1024


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def _digest_of_stream(url: str, headers: dict[str, str] | None = None) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with requests.get(url, headers=headers or {}, stream=True, timeout=120) as r:
        assert r.status_code in (200, 206)
        for chunk in r.iter_content(1024 * 1024):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def test_streaming_large_objects_keeps_daemon_memory_bounded(
    origin: S3Emulator, tmp_path: Path
) -> None:
    # A sparse file: 512 MiB served from disk by the emulator, costing no memory here.
    src = tmp_path / "big.bin"
    with src.open("wb") as fh:
        fh.truncate(SIZE)
        fh.seek(SIZE // 3)
        fh.write(b"marker in the middle")
    origin.put_file("/b/big", src)
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    daemon = DaemonProcess(
        [
            "--cache-dir",
            str(tmp_path / "cache"),
            "--cache-size",
            "2G",
            "--block-size",
            "1M",
            "--allow-upstream",
            origin_host(origin),
        ]
    ).start()
    try:
        url = proxied(daemon.url, origin, "/b/big")
        assert _digest_of_stream(url) == (want, SIZE)  # cold, one client
        quarter = SIZE // 4
        ranges = [f"bytes={i * quarter}-{(i + 1) * quarter - 1}" for i in range(4)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # warm, 8 concurrent
            results = list(pool.map(lambda r: _digest_of_stream(url, {"Range": r}), ranges * 2))
        data = src.read_bytes()
        for (digest, n), rng in zip(results, ranges * 2, strict=True):
            start = int(rng.split("=")[1].split("-")[0])
            assert n == quarter
            assert digest == hashlib.sha256(data[start : start + quarter]).hexdigest()
        assert daemon.proc is not None
        peak = _peak_rss_bytes(daemon.proc.pid)
        print(f"daemon peak RSS {peak / 2**20:.0f} MiB")
        # Python + aiohttp + sqlite take ~60 MB; in-flight blocks, one per
        # upstream run, add a few MiB. Nothing may scale with the object.
        assert peak < 200 * 1024 * 1024, f"peak RSS {peak / 2**20:.0f} MiB"
    finally:
        daemon.terminate()
