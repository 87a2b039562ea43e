"""Durability of the shared on-disk cache: restarts, kill -9, shared directories, eviction.

Every daemon here is a real process (``python -m nwbcache_proxy serve``) and
every client a real HTTP client (``requests``, threads for concurrency). Every
body is compared byte for byte with the bytes put into the origin, never with
what the daemon says; the origin's request log is the source of truth for
what was fetched. Block files left on disk are checked with the daemon's own
reader (``store.open_block(..., verify=True)``) against the version digest
derived from their object's ``meta.json``, and their bytes against the origin's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import requests

from nwbcache_proxy.blockfile import HEADER_SIZE, CorruptBlock, check_data, decode_header
from nwbcache_proxy.layout import BLOCKS_PER_DIR, Layout
from nwbcache_proxy.objectmeta import ObjectMeta, block_count, block_span
from nwbcache_proxy.staging import Staging
from nwbcache_proxy.store import open_block
from tests.support.daemons import Spawn
from tests.support.helpers import (
    REPO,
    get_range,
    origin_host,
    proxied,
    scrape,
    value,
    wait_until,
)
from tests.support.s3emu import LoggedRequest, S3Emulator

# Slow (not in make test-fast): daemon processes (restarts, kill -9, workers, two
# daemons on one cache).
pytestmark = pytest.mark.slow

K64 = 64 * 1024
TIMEOUT = 30  # per HTTP request: generous, only there so a hang fails instead of blocking

_BLOCK_NAME = re.compile(r"(\d+)\.blk")
_VERSION_DIR = re.compile(r"([0-9a-f]{32})\.(\d+)")
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


# --------------------------------------------------------------------------- helpers


def put_objects(origin: S3Emulator, prefix: str, sizes: Sequence[int]) -> dict[str, bytes]:
    """Random objects in the origin, by key."""
    objects = {f"/dandiarchive/blobs/{prefix}/{i:03d}": os.urandom(n) for i, n in enumerate(sizes)}
    for key, data in objects.items():
        origin.put(key, data)
    return objects


def by_cache_key(origin: S3Emulator, objects: dict[str, bytes]) -> dict[str, bytes]:
    """The same objects keyed as meta.json names them (the upstream URL)."""
    return {origin.url + key: data for key, data in objects.items()}


def get_all(url: str) -> tuple[bytes, str]:
    r = requests.get(url, timeout=TIMEOUT)
    assert r.status_code == 200, (r.status_code, r.text[:200])
    return r.content, r.headers["X-Cache"]


def random_ranges(rng: random.Random, size: int, count: int, block: int) -> list[tuple[int, int]]:
    """[start, end) ranges: small, block-crossing, long, the last byte, the whole object."""
    ranges = [(0, size), (size - 1, size), (block - 1, block + 1)]
    while len(ranges) < count:
        start = rng.randrange(size)
        length = rng.choice([1, rng.randrange(1, 512), rng.randrange(1, 3 * block)])
        ranges.append((start, min(size, start + length)))
    rng.shuffle(ranges)
    return ranges


def blk_files(cache_dir: Path) -> list[Path]:
    return sorted((Layout(cache_dir).root / "objects").rglob("*.blk"))


def blk_bytes(cache_dir: Path) -> int:
    """Total size of the block files on disk (files may vanish while we look)."""
    total = 0
    for path in blk_files(cache_dir):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def staging_dirs(cache_dir: Path, pid: int) -> list[str]:
    staging = Layout(cache_dir).root / "staging"
    if not staging.is_dir():
        return []
    return [p.name for p in staging.iterdir() if p.name.startswith(f"{pid}-")]


def _index_rows(cache_dir: Path) -> int | None:
    """Rows in the index, read-only; None while it is busy or absent."""
    uri = f"file:{Layout(cache_dir).index_path}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
            return int(conn.execute("SELECT count(*) FROM blocks").fetchone()[0])
    except sqlite3.Error:
        return None


def _reconcile_due(cache_dir: Path) -> bool:
    uri = f"file:{Layout(cache_dir).index_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
        return conn.execute("SELECT 1 FROM state WHERE key = 'reconcile'").fetchone() is not None


@pytest.mark.parametrize("stop", ["clean", "kill9"])
def test_only_an_unclean_stop_makes_the_next_start_reconcile(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path, stop: str
) -> None:
    """A daemon killed leaves its staging dir: the next start reconciles, so rows
    lost with it come back. A clean stop leaves none, and the next start walks
    nothing (here: rows deleted behind the daemons' backs stay missing)."""
    cache_dir = tmp_path / "cache"
    objects = put_objects(origin, "unclean", [300_000])
    first = spawn(cache_dir, "--block-size", "16K")
    key, data = next(iter(objects.items()))
    _read_exact(proxied(first.url, origin, key), data)
    blocks = block_count(len(data), 16 * 1024)
    wait_until(lambda: _index_rows(cache_dir) == blocks, 10, f"{blocks} rows flushed")
    wait_until(lambda: not _reconcile_due(cache_dir), 10, "the first start's reconcile")
    if stop == "clean":
        assert first.terminate() == 0
    else:
        first.kill9()
        assert list(Layout(cache_dir).staging.iterdir()), "a killed daemon leaves its staging dir"
    with contextlib.closing(sqlite3.connect(Layout(cache_dir).index_path)) as conn:
        conn.execute("DELETE FROM blocks WHERE idx % 2 = 0")  # rows lost with the process
        conn.commit()
    lost = blocks - blocks // 2
    second = spawn(cache_dir, "--block-size", "16K")
    if stop == "kill9":
        wait_until(lambda: _index_rows(cache_dir) == blocks, 20, "the lost rows reconciled")
    else:
        time.sleep(1.5)  # a sweep and a reconcile, if one were started, are done by now
        assert _index_rows(cache_dir) == blocks - lost
        assert not _reconcile_due(cache_dir)
    r = requests.get(proxied(second.url, origin, key), timeout=TIMEOUT)
    assert r.content == data and r.headers["X-Cache"] == "HIT"
    walked = value(scrape(second.url), "nwbcache_reconciled_files_total")
    assert walked == (blocks if stop == "kill9" else 0)
    assert second.terminate() == 0


def object_dir(cache_dir: Path, origin: S3Emulator, key: str) -> Path:
    """Where an object's meta.json and version dirs live (by the hash of its cache key)."""
    kh = hashlib.sha256((origin.url + key).encode()).hexdigest()
    return Layout(cache_dir).root / "objects" / kh[:2] / kh


def current_blocks(cache_dir: Path, origin: S3Emulator, key: str) -> set[int]:
    """Indices of the block files of the version its meta.json names."""
    obj_dir = object_dir(cache_dir, origin, key)
    meta = _meta_of(obj_dir)
    if meta is None:
        return set()
    found = set()
    for path in obj_dir.glob(f"{meta.digest.hex()[:32]}.*/*/*.blk"):
        m = _BLOCK_NAME.fullmatch(path.name)
        assert m is not None, path
        found.add(int(m[1]))
    return found


@dataclass
class BlockCheck:
    verified: int = 0  # blocks of a known version, checked with open_block and against the origin
    orphans: int = 0  # blocks whose version has no matching meta.json: header + CRC only


def verify_blocks(cache_dir: Path, originals: dict[str, bytes]) -> BlockCheck:
    """Check every block file under the cache dir; fail on the first bad one.

    ``originals`` maps cache keys (upstream URLs) to the origin's bytes. Call
    only when no daemon uses the directory (open_block deletes a corrupt block).
    """
    result = BlockCheck()
    for path in blk_files(cache_dir):
        name = _BLOCK_NAME.fullmatch(path.name)
        # <object dir>/<vd>.<bs>/<shard>/<n>.blk
        vdir = _VERSION_DIR.fullmatch(path.parent.parent.name)
        assert name is not None and vdir is not None, f"unexpected block path {path}"
        index, vd, bs = int(name[1]), vdir[1], int(vdir[2])
        assert path.parent.name == str(index // BLOCKS_PER_DIR), f"wrong shard: {path}"
        obj_dir = path.parent.parent.parent
        raw_file = path.read_bytes()  # kept for the failure message: open_block deletes
        meta = _meta_of(obj_dir)
        if meta is not None and meta.digest.hex()[:32] == vd:
            assert meta.cache_key in originals, f"block of an unknown object: {path}"
            start, end = block_span(index, meta.version.size, bs)
            assert start < end, f"block {index} past the end of its object: {path}"
            opened = open_block(
                path, index=index, length=end - start, digest=meta.digest, verify=True
            )
            assert opened is not None, f"block fails verification: {path} {_describe(raw_file)}"
            try:
                assert opened.data is not None
                data = bytes(opened.data)
            finally:
                opened.close()
            assert data == originals[meta.cache_key][start:end], f"wrong bytes in {path}"
            result.verified += 1
        else:
            try:
                header = decode_header(raw_file[:HEADER_SIZE])
                check_data(header, raw_file[HEADER_SIZE:])
            except CorruptBlock as exc:
                pytest.fail(f"orphan block with a bad header or checksum: {path}: {exc}")
            assert header.index == index, f"{path} holds block {header.index}"
            assert header.length <= bs and len(raw_file) == HEADER_SIZE + header.length, path
            result.orphans += 1
    return result


def _meta_of(obj_dir: Path) -> ObjectMeta | None:
    try:
        raw = json.loads((obj_dir / "meta.json").read_text())
    except FileNotFoundError:
        return None
    assert isinstance(raw, dict), obj_dir
    cache_key = raw.get("cache_key")
    assert isinstance(cache_key, str), obj_dir
    # meta.json lives under the hash of its own cache key, or it is misplaced.
    assert hashlib.sha256(cache_key.encode()).hexdigest() == obj_dir.name, obj_dir
    meta = ObjectMeta.from_json(raw, cache_key)
    assert meta is not None, f"unreadable meta.json in {obj_dir}"
    return meta


def _describe(raw: bytes) -> str:
    try:
        header = decode_header(raw[:HEADER_SIZE])
    except CorruptBlock as exc:
        return f"({len(raw)} B: {exc})"
    return f"({len(raw)} B, header index {header.index} length {header.length})"


def requests_since(origin: S3Emulator, since: float, key: str | None = None) -> list[LoggedRequest]:
    """Origin requests (of key) that started after time.monotonic() was `since`.

    By start time, not by position in the log: the log gets an entry when a
    request finishes, so a request of a killed daemon may be logged later.
    """
    return [r for r in origin.requests(key) if r.started >= since]


def run_threads(jobs: Sequence[Callable[[], None]]) -> None:
    """Run each job in its own thread; re-raise the first failure."""
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def random_readers(
    urls: Sequence[str], objects: dict[str, bytes], threads: int, reads: int, seed: int
) -> list[Callable[[], None]]:
    """Jobs doing random range reads of every object, spread over the daemons in urls."""
    keys = sorted(objects)

    def reader(n: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(seed * 1000 + n)
            for i in range(reads):
                key = rng.choice(keys)
                data = objects[key]
                start = rng.randrange(len(data))
                end = min(len(data), start + rng.randrange(1, 3 * K64))
                url = urls[(n + i) % len(urls)] + key
                body = get_range(url, start, end - 1, timeout=TIMEOUT).content
                assert body == data[start:end], f"{key} [{start}, {end}) differs"

        return run

    return [reader(n) for n in range(threads)]


# --------------------------------------------------------------------------- tests


def test_restart_serves_warm_cache_without_upstream(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """A cache filled by one daemon is served by the next, byte-exact, with no upstream GET."""
    cache_dir = tmp_path / "cache"
    [(key, data)] = put_objects(origin, "warm", [3_000_017]).items()
    nblocks = block_count(len(data), K64)

    first = spawn(cache_dir, "--block-size", "64K")
    body, _ = get_all(proxied(first.url, origin, key))
    assert body == data
    assert origin.requests(key, method="GET"), "the first read must come from the origin"
    # The response may end before the last block's rename: wait for the files.
    wait_until(lambda: len(blk_files(cache_dir)) == nblocks, 10, f"{nblocks} blocks on disk")
    pid = first.proc.pid if first.proc else -1
    assert first.terminate() == 0
    assert staging_dirs(cache_dir, pid) == [], "a clean shutdown leaves no staging dir"

    since = time.monotonic()
    second = spawn(cache_dir, "--block-size", "64K")
    rng = random.Random(1)
    for start, end in random_ranges(rng, len(data), 40, K64):
        r = get_range(proxied(second.url, origin, key), start, end - 1, timeout=TIMEOUT)
        body, outcome = r.content, r.headers["X-Cache"]
        assert body == data[start:end], f"[{start}, {end}) differs"
        assert outcome == "HIT", f"[{start}, {end}) was {outcome} after a restart"
    assert requests_since(origin, since, key) == [], "a warm restart asked the origin again"
    assert second.terminate() == 0
    check = verify_blocks(cache_dir, by_cache_key(origin, {key: data}))
    assert (check.verified, check.orphans) == (nblocks, 0)


def _as_format_1(path: Path) -> None:
    """Rewrite a block file as a daemon before block format 2 wrote it: the same
    header but for the version (1) and the checksum (zlib's CRC-32); see the
    pinned format-1 header in test_blockfile.py."""
    raw = bytearray(path.read_bytes())
    raw[8:10] = (1).to_bytes(2, "little")
    raw[28:32] = zlib.crc32(raw[HEADER_SIZE:]).to_bytes(4, "little")
    path.write_bytes(raw)


def test_a_cache_of_block_format_1_is_served_and_checked(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """Blocks written before CRC-32C (format 1) are served as they are, byte-exact
    and without asking upstream; one of them rotted is caught by its own CRC-32,
    dropped and fetched again; ``nwbcache check`` finds the rest sound."""
    cache_dir = tmp_path / "cache"
    [(key, data)] = put_objects(origin, "old", [1_000_003]).items()
    nblocks = block_count(len(data), K64)
    first = spawn(cache_dir, "--block-size", "64K")
    assert get_all(proxied(first.url, origin, key))[0] == data
    wait_until(lambda: len(blk_files(cache_dir)) == nblocks, 10, f"{nblocks} blocks on disk")
    assert first.terminate() == 0
    files = sorted(blk_files(cache_dir), key=lambda p: int(p.stem))
    for path in files:
        _as_format_1(path)
    assert {decode_header(p.read_bytes()).version for p in files} == {1}
    rotted = files[3]
    raw = bytearray(rotted.read_bytes())
    raw[HEADER_SIZE + 100] ^= 0x01
    rotted.write_bytes(raw)

    since = time.monotonic()
    second = spawn(cache_dir, "--block-size", "64K")
    url = proxied(second.url, origin, key)
    for index in range(nblocks):
        start, end = block_span(index, len(data), K64)
        r = get_range(url, start, end - 1, timeout=TIMEOUT)
        assert r.content == data[start:end], f"block {index} differs"
        assert r.headers["X-Cache"] == ("MISS" if index == 3 else "HIT"), index
    start, end = block_span(3, len(data), K64)
    asked = requests_since(origin, since, key)
    assert [(r.method, r.range) for r in asked] == [("GET", f"bytes={start}-{end - 1}")]
    assert second.terminate() == 0
    assert decode_header(rotted.read_bytes()).version == 2, "fetched again: the new format"
    check = verify_blocks(cache_dir, by_cache_key(origin, {key: data}))
    assert (check.verified, check.orphans) == (nblocks, 0)
    done = subprocess.run(
        [sys.executable, "-m", "nwbcache_proxy", "check", "--cache-dir", str(cache_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_kill9_during_fetches_leaves_only_whole_blocks(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """kill -9 with fetches in flight: no torn block, the dead staging dir is swept,
    the next daemon serves everything exact and never re-fetches a surviving block."""
    cache_dir = tmp_path / "cache"
    objects = put_objects(origin, "kill", [1_500_000 + i * 4099 for i in range(4)])
    total_blocks = sum(block_count(len(d), K64) for d in objects.values())
    origin.bandwidth = 2_000_000  # bytes/s per response: fetches last ~0.75 s each
    daemon = spawn(cache_dir, "--block-size", "64K")
    stop = threading.Event()
    complete: list[str] = []

    def full_reader(key: str) -> Callable[[], None]:
        def run() -> None:
            try:
                r = requests.get(proxied(daemon.url, origin, key), timeout=TIMEOUT)
            except requests.RequestException:
                return  # cut by the kill
            if r.status_code == 200:
                assert r.content == objects[key], f"{key}: a completed body differs"
                complete.append(key)

        return run

    def range_reader(key: str, seed: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(seed)
            data = objects[key]
            url = proxied(daemon.url, origin, key)
            while not stop.is_set():
                start = rng.randrange(len(data))
                end = min(len(data), start + rng.randrange(1, 2 * K64))
                try:
                    body = get_range(url, start, end - 1, timeout=TIMEOUT).content
                except requests.RequestException:
                    return
                assert body == data[start:end], f"{key} [{start}, {end}) differs"

        return run

    jobs = [full_reader(k) for k in objects] + [range_reader(k, i) for i, k in enumerate(objects)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(job) for job in jobs]
        wait_until(lambda: len(blk_files(cache_dir)) >= 8, 15, "8 blocks published")
        pid = daemon.proc.pid if daemon.proc else -1
        daemon.kill9()
        stop.set()
        for future in futures:
            future.result()
    survivors = blk_files(cache_dir)
    assert len(survivors) < total_blocks, "the kill came too late to interrupt any fetch"
    assert len(complete) < len(objects), "every full read finished before the kill"
    assert staging_dirs(cache_dir, pid), "kill -9 should leave the staging dir behind"

    originals = by_cache_key(origin, objects)
    verify_blocks(cache_dir, originals)  # as the crash left them
    warm = {key: current_blocks(cache_dir, origin, key) for key in objects}

    origin.bandwidth = None
    since = time.monotonic()
    again = spawn(cache_dir, "--block-size", "64K")
    wait_until(lambda: not staging_dirs(cache_dir, pid), 5, "the dead daemon's staging swept")
    for n, (key, data) in enumerate(objects.items()):
        url = proxied(again.url, origin, key)
        body, _ = get_all(url)
        assert body == data, f"{key} differs after the crash"
        for start, end in random_ranges(random.Random(n), len(data), 10, K64):
            body = get_range(url, start, end - 1, timeout=TIMEOUT).content
            assert body == data[start:end], f"{key} [{start}, {end}) differs after the crash"
    # Blocks that survived the crash are served from disk, never fetched again.
    for r in requests_since(origin, since):
        m = _RANGE.fullmatch(r.range or "")
        assert r.method == "GET" and m is not None, (r.method, r.path, r.range)
        fetched = set(range(int(m[1]) // K64, int(m[2]) // K64 + 1))
        assert not fetched & warm[r.path], f"{r.path}: cached blocks fetched again: {r.range}"
    assert again.terminate() == 0
    assert verify_blocks(cache_dir, originals).verified > len(survivors)


def test_two_daemons_share_one_cache_dir(origin: S3Emulator, spawn: Spawn, tmp_path: Path) -> None:
    """Two processes on one directory, read at once: every byte exact, every block whole."""
    cache_dir = tmp_path / "cache"
    objects = put_objects(origin, "shared", [1_000_003 + i * 7919 for i in range(4)])
    a = spawn(cache_dir, "--block-size", "64K")
    b = spawn(cache_dir, "--block-size", "64K")
    urls = [f"{d.url}/http/{origin_host(origin)}" for d in (a, b)]
    run_threads(random_readers(urls, objects, threads=8, reads=25, seed=3))
    for url in urls:
        for key, data in objects.items():
            body, _ = get_all(url + key)
            assert body == data, f"{key} via {url} differs"
    assert a.terminate() == 0
    assert b.terminate() == 0
    check = verify_blocks(cache_dir, by_cache_key(origin, objects))
    assert check.verified >= len(objects)


def test_two_workers_serve_exact_bytes(origin: S3Emulator, spawn: Spawn, tmp_path: Path) -> None:
    """--workers 2: concurrent random reads exact, upstream reads by the daemon, blocks whole."""
    cache_dir = tmp_path / "cache"
    objects = put_objects(origin, "workers", [900_001 + i * 6151 for i in range(4)])
    daemon = spawn(cache_dir, "--block-size", "64K", "--workers", "2")
    url = f"{daemon.url}/http/{origin_host(origin)}"
    run_threads(random_readers([url], objects, threads=8, reads=25, seed=4))
    for key, data in objects.items():
        body, _ = get_all(url + key)
        assert body == data
        seen = origin.requests(key)
        assert seen, f"{key} never reached the origin"
        assert all((r.user_agent or "").startswith("nwbcache/") for r in seen), {
            r.user_agent for r in seen
        }
    assert daemon.terminate() == 0
    check = verify_blocks(cache_dir, by_cache_key(origin, objects))
    assert check.verified >= len(objects)


def test_workers_share_keep_alive_connections(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """--workers 2: many keep-alive connections are spread over both workers.

    With one listening socket shared by the workers, a burst of connections
    went to whichever worker woke first, and keep-alive clients then stayed
    there (two workers served no more than one). Request ids start with a
    per-process prefix, so they tell which worker answered.
    """
    origin.put("/b/spread", os.urandom(100_000))
    daemon = spawn(tmp_path / "cache", "--workers", "2")
    target = urllib.parse.urlsplit(proxied(daemon.url, origin, "/b/spread"))
    # A burst of 16 connections, all connected before any request (as wrk or
    # a pool of readers starting together do), then one request on each.
    conns = [http.client.HTTPConnection(target.netloc, timeout=TIMEOUT) for _ in range(16)]
    prefixes = set()
    try:
        for conn in conns:
            conn.connect()
        for conn in conns:
            conn.request("GET", target.path, headers={"Range": "bytes=0-99"})
            r = conn.getresponse()
            assert r.status == 206 and len(r.read()) == 100
            prefixes.add(r.headers["X-Request-Id"][:6])
    finally:
        for conn in conns:
            conn.close()
    # The kernel hashes each connection to one of the two sockets: all 16 on
    # one worker would happen with probability 2**-15.
    assert len(prefixes) == 2
    assert daemon.terminate() == 0


def test_eviction_keeps_cache_bounded_and_lru(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """12 MB read through a 2 MiB cache: the disk usage comes back under the bound,
    the oldest object is fetched again and the newest one is still a hit."""
    cache_dir = tmp_path / "cache"
    capacity = 2 * 1024 * 1024
    objects = put_objects(origin, "evict", [1_000_000 + i * 1021 for i in range(12)])
    keys = sorted(objects)
    daemon = spawn(cache_dir, "--block-size", "64K", "--cache-size", "2M")
    for key in keys:
        body, _ = get_all(proxied(daemon.url, origin, key))
        assert body == objects[key]

    # No overshoot is allowed once the reads have stopped. The documented one
    # (what is written between two passes, plus blocks in flight) exists only
    # while blocks are being written. The index counts each block file at its
    # size on disk, header included (meta.json is not counted, and neither is it
    # here), and a pass runs at least once a second whenever the indexed total
    # exceeds the capacity, so at rest the files total <= capacity.
    wait_until(lambda: blk_bytes(cache_dir) <= capacity, 10, f"block files <= {capacity} B")

    newest, oldest = keys[-1], keys[0]
    since = time.monotonic()
    body, outcome = get_all(proxied(daemon.url, origin, newest))
    assert body == objects[newest]
    assert outcome == "HIT", "the most recently read object was evicted"
    assert requests_since(origin, since, newest) == []

    oldest_left = current_blocks(cache_dir, origin, oldest)
    assert len(oldest_left) < block_count(len(objects[oldest]), K64), "nothing was evicted"
    since = time.monotonic()
    body, outcome = get_all(proxied(daemon.url, origin, oldest))
    assert body == objects[oldest]
    assert outcome != "HIT"
    refetched = [r for r in requests_since(origin, since, oldest) if r.method == "GET"]
    assert refetched, "evicted blocks were not fetched again"
    assert daemon.terminate() == 0
    verify_blocks(cache_dir, by_cache_key(origin, objects))


def test_start_with_many_blocks_and_lost_index(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """~5000 blocks and no index: serves at once, exact; the index is rebuilt from the files."""
    cache_dir = tmp_path / "cache"
    block = 4 * 1024
    objects = put_objects(origin, "many", [10_000_000, 10_000_001])
    expected = sum(block_count(len(d), block) for d in objects.values())
    first = spawn(cache_dir, "--block-size", "4K")
    run_threads([partial(_read_exact, proxied(first.url, origin, k), objects[k]) for k in objects])
    wait_until(lambda: len(blk_files(cache_dir)) == expected, 20, f"{expected} blocks on disk")
    assert first.terminate() == 0

    index = Layout(cache_dir).root / "index.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    on_disk = blk_files(cache_dir)
    assert len(on_disk) == expected
    disk_bytes = sum(p.stat().st_size for p in on_disk)

    since = time.monotonic()
    daemon = spawn(cache_dir, "--block-size", "4K")
    health = requests.get(f"{daemon.url}/healthz", timeout=5)
    assert health.status_code == 200
    key = sorted(objects)[0]
    data = objects[key]
    r = get_range(proxied(daemon.url, origin, key), 5000, 19999, timeout=TIMEOUT)
    body, outcome = r.content, r.headers["X-Cache"]
    assert body == data[5000:20000]
    assert outcome == "HIT"

    def totals() -> tuple[int, int] | None:
        try:
            uri = f"file:{index}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
                row = conn.execute("SELECT blocks, bytes FROM totals WHERE id = 0").fetchone()
        except sqlite3.Error:
            return None  # not created yet, or busy
        return None if row is None else (int(row[0]), int(row[1]))

    wait_until(lambda: totals() == (expected, disk_bytes), 30, f"index totals {expected} blocks")
    for key, data in objects.items():
        body, outcome = get_all(proxied(daemon.url, origin, key))
        assert body == data
        assert outcome == "HIT"
    assert requests_since(origin, since) == [], "blocks on disk were fetched again without an index"
    assert daemon.terminate() == 0


def _read_exact(url: str, data: bytes) -> None:
    body, _ = get_all(url)
    assert body == data


# --------------------------------------------------------------------------- regressions


def test_staging_dir_survives_a_daemon_starting_while_it_is_created(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deterministic replay of the race between two daemons starting on one cache dir."""
    cache_dir = tmp_path / "cache"
    real_flock = fcntl.flock
    raced: list[int] = []

    def flock_after_another_daemon_started(fd: int, operation: int) -> None:
        if not raced:  # the first lock taken: this process's own staging dir
            raced.append(fd)
            spawn(cache_dir).terminate()  # another daemon starts (and sweeps) right now
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_another_daemon_started)
    staging = Staging(Layout(cache_dir))
    monkeypatch.undo()
    try:
        assert raced, "Staging took no lock"
        assert staging.path.is_dir(), "the staging dir of a live process was swept"
        staging.temp_path().write_bytes(b"block")  # what publish_block and write_meta do next
    finally:
        staging.close()


def test_eviction_stops_at_the_low_water_mark(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    """Just over capacity: a pass frees what is needed to reach 95 %, not everything."""
    cache_dir = tmp_path / "cache"
    capacity = 2 * 1024 * 1024
    # 3 x 12 blocks = 2 222 304 B on disk: over capacity even while the last
    # block is still being renamed, so the poll below waits for a real pass.
    objects = put_objects(origin, "lowwater", [740_000] * 3)
    daemon = spawn(cache_dir, "--block-size", "64K", "--cache-size", "2M")
    for key, data in objects.items():
        body, _ = get_all(proxied(daemon.url, origin, key))
        assert body == data
    wait_until(lambda: blk_bytes(cache_dir) <= capacity, 10, "an eviction pass")
    # Evicting LRU blocks until the total is <= 95 % overshoots by less than one block.
    low_water = int(capacity * 0.95) - (K64 + HEADER_SIZE)
    assert blk_bytes(cache_dir) >= low_water, "eviction went far below its low-water mark"


def test_sigterm_while_a_worker_is_being_restarted_stops_the_daemon(tmp_path: Path) -> None:
    """The first workers die at start-up (staging is a file); SIGTERM lands in the restart pause."""
    cache_dir = tmp_path / "cache"
    staging = Layout(cache_dir).root / "staging"
    staging.parent.mkdir(parents=True)
    staging.write_text("")  # not a directory: Staging() fails, so the worker exits
    cmd = [sys.executable, "-m", "nwbcache_proxy", "serve", "--port", "0", "--s3-listen", "off"]
    cmd += ["--cache-dir", str(cache_dir), "--allow-upstream", "127.0.0.1:9", "--workers", "2"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    restarting = threading.Event()

    def watch() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "restarting" in line:
                restarting.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert restarting.wait(20), "no worker died at start-up"
        staging.unlink()  # the re-spawned worker will start fine
        os.killpg(proc.pid, signal.SIGTERM)  # the parent logs, then sleeps 0.5 s: we are in it
        try:
            code: int | None = proc.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, "the daemon did not exit within 10 s of SIGTERM"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        watcher.join(5)
