"""Fill a cache directory with N valid blocks quickly, for bench/scale.py.

The cache written is what a daemon would have written, through the
project's own formats: meta.json from ObjectMeta (written by
store.write_meta), block files with blockfile.encode_header, paths from
layout/version, index rows through schema. The objects ("bulk" objects)
need not exist upstream: their metadata is fresh and the daemon is told
they are immutable, so a hit never asks upstream.

Block files are written directly (os.open/os.write, no temp file and no
rename: nothing else runs on the cache meanwhile) by a pool of processes,
one shard dir per task; the index rows go in from this process at the same
time, in large transactions. The data of block ``i`` of object ``o`` is a
cheap pattern, ``block_data(o, i, block_size)``, so a test can tell any
block served later is exactly the one written.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from nwbcache.urls import cache_key, parse_upstream_url
from nwbcache_proxy import blockfile, schema, store
from nwbcache_proxy.blockfile import HEADER_SIZE
from nwbcache_proxy.layout import BLOCKS_PER_DIR, Layout, block_relpath, shard_of
from nwbcache_proxy.objectmeta import ObjectMeta, ObjectVersion
from nwbcache_proxy.staging import Staging
from nwbcache_proxy.version import Version

# URL path prefix of the bulk objects on the (emulated) upstream host.
BULK_PREFIX = "/bulk"
# Blocks per bulk object: big enough to span several shard dirs.
PER_OBJECT = 10_000
# Index rows per transaction.
ROWS_PER_COMMIT = 200_000
# Access times of the bulk blocks: this far in the past, one millisecond apart
# in fill order, so they are older than anything a daemon touches later.
ATIME_AGE = 86_400.0
ATIME_STEP = 0.001


def block_data(obj: int, index: int, block_size: int) -> bytes:
    """The bytes of block ``index`` of bulk object ``obj``: (obj, index) repeated."""
    unit = struct.pack("<QQ", obj, index)
    return (unit * (block_size // len(unit) + 1))[:block_size]


def bulk_url(upstream: str, obj: int) -> str:
    """Upstream URL of bulk object ``obj`` (``upstream``: http://host:port)."""
    return f"{upstream}{BULK_PREFIX}/obj-{obj:06d}"


def bulk_key(upstream: str, obj: int) -> str:
    """The cache key the daemon derives for that URL."""
    return cache_key(parse_upstream_url(bulk_url(upstream, obj)))


def bulk_meta(upstream: str, obj: int, blocks: int, block_size: int, now: float) -> ObjectMeta:
    version = ObjectVersion(size=blocks * block_size, etag=f'"bulk-{obj}"', last_modified=None)
    return ObjectMeta(bulk_key(upstream, obj), version, now, private=False)


def object_sizes(total: int, per_object: int) -> list[int]:
    """Blocks of each bulk object for ``total`` blocks in all."""
    full, rest = divmod(total, per_object)
    return [per_object] * full + ([rest] if rest else [])


@dataclasses.dataclass(frozen=True, slots=True)
class Filled:
    objects: int
    blocks: int
    bytes: int  # on disk by the index's count (header included)
    seconds: float
    files_seconds: float  # the block files alone
    index_seconds: float  # the index rows alone (in parallel with the files)

    @property
    def blocks_per_second(self) -> float:
        return self.blocks / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class _Shard:
    shard_dir: str
    obj: int
    start: int
    stop: int
    digest: bytes
    block_size: int


def _write_shard(task: _Shard) -> int:
    """Write the block files of one shard dir (in a pool process)."""
    os.makedirs(task.shard_dir, exist_ok=True)
    flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
    for index in range(task.start, task.stop):
        data = block_data(task.obj, index, task.block_size)
        raw = blockfile.encode_header(index, data, task.digest) + data
        fd = os.open(f"{task.shard_dir}/{index}.blk", flags, 0o644)
        try:
            os.write(fd, raw)
        finally:
            os.close(fd)
    return task.stop - task.start


def _shards(v: Version, obj: int, blocks: int) -> Iterator[_Shard]:
    for start in range(0, blocks, BLOCKS_PER_DIR):
        stop = min(start + BLOCKS_PER_DIR, blocks)
        shard_dir = v.dir / block_relpath(start)
        assert shard_of(stop - 1) == shard_of(start)
        yield _Shard(str(shard_dir.parent), obj, start, stop, v.digest, v.block_size)


def fill(
    cache_dir: Path,
    upstream: str,
    blocks: int,
    block_size: int,
    *,
    per_object: int = PER_OBJECT,
    workers: int = 2,
    first_object: int = 1,
) -> tuple[Filled, list[ObjectMeta]]:
    """Write ``blocks`` blocks of bulk objects into the cache at ``cache_dir``.

    Returns what was done and the metadata of every object written.
    """
    started = time.perf_counter()
    layout = Layout(cache_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    now = time.time()
    metas: list[ObjectMeta] = []
    versions: list[Version] = []
    staging = Staging(layout)
    try:
        for n, count in enumerate(object_sizes(blocks, per_object)):
            meta = bulk_meta(upstream, first_object + n, count, block_size, now)
            v = Version.of(layout, meta, block_size)
            v.dir.mkdir(parents=True, exist_ok=True)
            store.write_meta(staging, layout.meta_path(v.dir.parent.name), meta.to_json())
            metas.append(meta)
            versions.append(v)
    finally:
        staging.close()

    tasks = [
        task for n, v in enumerate(versions) for task in _shards(v, first_object + n, v.block_count)
    ]
    context = multiprocessing.get_context("spawn")
    finished: list[float] = []
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        files = [pool.submit(_write_shard, task) for task in tasks]
        for f in files:
            f.add_done_callback(lambda _f: finished.append(time.perf_counter()))
        index_started = time.perf_counter()
        row_bytes = _fill_index(layout, versions, now - ATIME_AGE)
        index_seconds = time.perf_counter() - index_started
        written = sum(f.result() for f in files)
    seconds = time.perf_counter() - started
    if written != blocks:
        raise RuntimeError(f"wrote {written} blocks of {blocks}")
    files_seconds = max(finished, default=started) - started
    filled = Filled(len(metas), blocks, row_bytes, seconds, files_seconds, index_seconds)
    return filled, metas


def _fill_index(layout: Layout, versions: list[Version], atime0: float) -> int:
    """One row per block through schema.add_found (the reconciler's way in for
    rows of files on disk), atimes increasing in fill order; the reconcile a
    new index is marked for is cleared (the rows are exactly the files).
    Returns the index's total bytes."""
    conn = schema.connect(layout.index_path)
    try:
        seq = 0
        in_tx = 0
        conn.execute("BEGIN IMMEDIATE")
        for v in versions:
            vid = schema.version_id(conn, v.name, create=True)
            assert vid is not None
            start = 0
            while start < v.block_count:
                stop = min(v.block_count, start + ROWS_PER_COMMIT - in_tx)
                base = seq - start
                schema.add_found(
                    conn,
                    vid,
                    (
                        (i, HEADER_SIZE + v.block_length(i), atime0 + (base + i) * ATIME_STEP)
                        for i in range(start, stop)
                    ),
                )
                seq += stop - start
                in_tx += stop - start
                start = stop
                if in_tx >= ROWS_PER_COMMIT:
                    conn.execute("COMMIT")
                    conn.execute("BEGIN IMMEDIATE")
                    in_tx = 0
        conn.execute(schema.CLEAR_STATE, (schema.RECONCILE,))
        conn.execute("COMMIT")
        return schema.totals(conn)[0]
    finally:
        conn.close()
