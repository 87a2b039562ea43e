"""``nwbcache check`` end to end, on format-3 caches a real daemon filled through HTTP:
damage in a data file and its map, incomplete versions and lost rows are found (and
with --repair, removed), and a daemon then serves exact bytes, fetching again only
what was removed. tests/test_check_stream.py checks the rest in-process."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from nwbcache_proxy.check import CheckOptions, check_cache
from nwbcache_proxy.layout import Layout
from nwbcache_proxy.versionfile import VersionFiles
from tests.support.daemons import DaemonThread
from tests.support.helpers import proxied, wait_until
from tests.support.s3emu import S3Emulator
from tests.test_check_stream import Cache

BS = 16 * 1024
DATA = os.urandom(20 * BS)
OTHER = os.urandom(7 * BS + 123)


def _check(cache_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nwbcache_proxy", "check", "--cache-dir", str(cache_dir), *extra],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _fill(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], cache_dir: Path,
    objects: dict[str, bytes],
) -> dict[str, str]:  # fmt: skip
    """The objects put upstream and read whole through a daemon, which is then
    stopped (its index flushed); each object's version name."""
    layout = Layout(cache_dir)
    daemon = make_daemon(block_size=BS, cache_dir=cache_dir)
    names: dict[str, str] = {}
    for path, data in objects.items():
        origin.put(path, data)
        before = set(layout.objects.rglob("*.map")) if layout.objects.exists() else set()
        assert requests.get(proxied(daemon.url, origin, path), timeout=30).content == data
        (made,) = set(layout.objects.rglob("*.map")) - before
        names[path] = layout.relative(made.with_suffix(""))
    daemon.stop()
    return names


def _entry(layout: Layout, name: str, index: int) -> tuple[int, int]:
    files = VersionFiles.open_existing(layout.data_path(name), layout.map_path(name))
    assert files is not None
    try:
        (entry,) = files.entries(index, 1)
    finally:
        files.close()
    return entry


def _served_again(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], cache_dir: Path,
    objects: dict[str, bytes],
) -> int:  # fmt: skip
    """A fresh daemon on the cache serves every object exactly; the bytes it fetched
    from upstream for that. The daemon is stopped (its rows flushed) after."""
    origin.clear_log()
    fresh = make_daemon(block_size=BS, cache_dir=cache_dir)
    for path, data in objects.items():
        assert requests.get(proxied(fresh.url, origin, path), timeout=30).content == data
    origin.wait_idle()
    fresh.stop()
    return sum(origin.bytes_sent(path) for path in objects)


@pytest.mark.slow  # runs `python -m nwbcache_proxy check` in a child interpreter
def test_check_finds_and_repairs_damage(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    (name,) = _fill(origin, make_daemon, cache_dir, {"/b/obj": DATA}).values()
    clean = _check(cache_dir)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "20 blocks" in clean.stdout and "corrupt blocks: 0" in clean.stdout

    layout = Layout(cache_dir)
    data = layout.data_path(name)
    with data.open("r+b") as fh:  # bit rot in block 3
        fh.seek(3 * BS + 100)
        byte = fh.read(1)
        fh.seek(3 * BS + 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.truncate(data, 19 * BS + 5000)  # a torn write: block 19 is 5000 bytes
    with sqlite3.connect(layout.index_path) as conn:
        conn.execute("DELETE FROM blocks WHERE idx = 1")  # a lost index row

    found = _check(cache_dir)
    assert found.returncode == 1, found.stdout + found.stderr
    assert "corrupt blocks: 2" in found.stdout
    assert f"corrupt: {name} block 3: " in found.stdout and "checksum mismatch" in found.stdout
    assert f"corrupt: {name} block 19: " in found.stdout
    assert f"5000 bytes where the map says {BS}" in found.stdout
    assert "index rows missing: 1" in found.stdout
    one = _check(cache_dir, "--object", origin.url_for("/b/obj"), "--json")
    assert one.returncode == 1, one.stderr
    report = json.loads(one.stdout)
    assert (report["objects"], report["blocks"], report["corrupt_count"]) == (1, 20, 2)
    assert report["ok"] is False and report["missing_from_index"] == 1

    repaired = _check(cache_dir, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "corrupt blocks: 2 (removed)" in repaired.stdout
    assert _entry(layout, name, 3) == _entry(layout, name, 19) == (0, 0)
    again = _check(cache_dir)
    assert again.returncode == 0, again.stdout
    assert "18 blocks" in again.stdout

    fetched = _served_again(origin, make_daemon, cache_dir, {"/b/obj": DATA})
    assert fetched == 2 * BS  # only the two removed
    whole = _check(cache_dir, "--json")
    assert whole.returncode == 0, whole.stdout
    assert json.loads(whole.stdout)["blocks"] == 20


def test_incomplete_versions_are_dropped_and_fetched_again(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    objects = {"/b/one": DATA, "/b/two": OTHER, "/b/three": DATA[: 5 * BS]}
    names = _fill(origin, make_daemon, cache_dir, objects)
    layout = Layout(cache_dir)
    layout.data_path(names["/b/one"]).unlink()  # a map without its data file
    layout.map_path(names["/b/two"]).unlink()  # a data file without its map

    found = check_cache(cache_dir)
    assert not found.ok and found.incomplete == 2
    assert found.blocks == 5  # /b/three's, intact
    repaired = check_cache(cache_dir, CheckOptions(repair=True))
    assert repaired.incomplete == 2
    for gone in ("/b/one", "/b/two"):
        assert not layout.map_path(names[gone]).exists()
        assert not layout.data_path(names[gone]).exists()
    assert check_cache(cache_dir).ok

    fetched = _served_again(origin, make_daemon, cache_dir, objects)
    assert fetched == len(DATA) + len(OTHER)  # /b/three came from the cache
    after = check_cache(cache_dir)
    assert after.ok and after.blocks == 20 + 8 + 5, after.summary()


def test_a_damaged_map_entry_is_never_served_and_the_daemon_maps_the_block_again(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    (name,) = _fill(origin, make_daemon, cache_dir, {"/b/obj": DATA}).values()
    layout = Layout(cache_dir)
    crc, length = _entry(layout, name, 7)
    assert length == BS
    with layout.map_path(name).open("r+b") as fh:  # block 7's entry: a wrong length
        fh.seek(64 + 8 * 7 + 4)
        fh.write((5000).to_bytes(4, "little"))

    found = check_cache(cache_dir)
    assert not found.ok, found.summary()
    assert (found.blocks, found.verified) == (19, 19)  # it is not taken for a block

    fetched = _served_again(origin, make_daemon, cache_dir, {"/b/obj": DATA})
    assert fetched == BS  # block 7 came from upstream, never from its bytes on disk
    assert _entry(layout, name, 7) == (crc, BS)
    after = check_cache(cache_dir)
    assert after.ok and after.blocks == 20, after.summary()


@pytest.mark.slow  # a child interpreter, interrupted with SIGINT
def test_ctrl_c_saves_a_cursor_and_resume_finishes(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    try:
        for i in range(300):
            cache.add(f"https://h.example/{i}", 100, bs=1024)
    finally:
        cache.close()
    cmd = [sys.executable, "-m", "nwbcache_proxy", "check", "--cache-dir", str(cache.dir)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _objects_done(cache.layout.check_cursor) >= 5, 60, "a cursor")
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, out + err
    assert "--resume" in err
    assert cache.layout.check_cursor.exists()
    assert 5 <= _objects_done(cache.layout.check_cursor) < 300
    done = subprocess.run([*cmd, "--resume", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["objects"], report["blocks"], report["resumed"]) == (300, 30_000, True)
    assert report["verified"] == 30_000 and report["ok"] is True
    assert not cache.layout.check_cursor.exists()


def _objects_done(cursor: Path) -> int:
    try:
        return int(json.loads(cursor.read_text())["report"]["objects"])
    except (FileNotFoundError, ValueError):
        return 0  # not written yet, or caught between write and rename
