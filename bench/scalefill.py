"""Fill a cache directory with N valid blocks quickly, for bench/scale.py.

The cache written is what a daemon would have written, through the
project's own formats (format 3, docs/format-3-design.md): meta.json from
ObjectMeta (written by store.write_meta), each version's sparse data file
and map through versionfile.VersionFiles (``open(..., create=True)``, then
``write_group`` in runs of up to ``RUN_BLOCKS`` blocks: one ``pwritev`` of
the run's bytes and one write of its map entries), paths from
layout/version, index rows through schema. The objects ("bulk" objects)
need not exist upstream: their metadata is fresh and the daemon is told
they are immutable, so a hit never asks upstream.

The data files are written by a pool of processes, one span of one version
per task (``TASK_BLOCKS`` blocks; the spans' write locks never overlap);
the index rows go in from this process at the same time, in large
transactions, each row counting its block's own bytes as the daemon's do.
The data of block ``i`` of object ``o`` is a cheap pattern,
``block_data(o, i, block_size)``, so a test can tell any block served later
is exactly the one written.
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
from nwbcache_proxy import schema, store
from nwbcache_proxy.layout import Layout
from nwbcache_proxy.mapfile import MapHeader
from nwbcache_proxy.objectmeta import ObjectMeta, ObjectVersion
from nwbcache_proxy.staging import Staging
from nwbcache_proxy.version import Version
from nwbcache_proxy.versionfile import VersionFiles

# URL path prefix of the bulk objects on the (emulated) upstream host.
BULK_PREFIX = "/bulk"
# Blocks per bulk object.
PER_OBJECT = 10_000
# Blocks per write_group: one pwritev (at most IOV_MAX parts, a block each) of
# at most RUN_BYTES, and one write of the run's map entries.
RUN_BYTES = 8 << 20
RUN_BLOCKS = min(1024, os.sysconf("SC_IOV_MAX"))
# Blocks per pool task: a span of one version, written through one open of its files.
TASK_BLOCKS = 8192
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
    bytes: int  # by the index's count (each block's own bytes)
    seconds: float
    files_seconds: float  # the data files and maps alone
    index_seconds: float  # the index rows alone (in parallel with the files)

    @property
    def blocks_per_second(self) -> float:
        return self.blocks / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class _Span:
    """Blocks [start, stop) of bulk object ``obj``'s version, for one pool task."""

    data_path: str
    map_path: str
    obj: int
    start: int
    stop: int
    size: int  # the object's bytes
    digest: bytes
    block_size: int


def run_blocks(block_size: int) -> int:
    """Blocks per write_group at this block size."""
    return max(1, min(RUN_BLOCKS, RUN_BYTES // block_size))


def _write_span(task: _Span) -> int:
    """Write one span of a version's data file and map (in a pool process)."""
    header = MapHeader(task.block_size, task.size, task.digest)
    files = VersionFiles.open(Path(task.data_path), Path(task.map_path), header, create=True)
    assert files is not None  # create=True makes them or raises
    try:
        run = run_blocks(task.block_size)
        bs = task.block_size
        for first in range(task.start, task.stop, run):
            last = min(first + run, task.stop)
            files.write_group(first, [(block_data(task.obj, i, bs),) for i in range(first, last)])
    finally:
        files.close()
    return task.stop - task.start


def _spans(v: Version, obj: int) -> Iterator[_Span]:
    for start in range(0, v.block_count, TASK_BLOCKS):
        stop = min(start + TASK_BLOCKS, v.block_count)
        yield _Span(
            str(v.data_path), str(v.map_path), obj, start, stop, v.size, v.digest, v.block_size
        )


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
            store.write_meta(staging, layout.meta_path(v.stem.parent.name), meta.to_json())
            # The version's files, made here once: the tasks then only open them.
            files = VersionFiles.open(v.data_path, v.map_path, v.header, create=True)
            assert files is not None
            files.close()
            metas.append(meta)
            versions.append(v)
    finally:
        staging.close()

    tasks = [task for n, v in enumerate(versions) for task in _spans(v, first_object + n)]
    context = multiprocessing.get_context("spawn")
    finished: list[float] = []
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        files_started = time.perf_counter()
        futures = [pool.submit(_write_span, task) for task in tasks]
        for f in futures:
            f.add_done_callback(lambda _f: finished.append(time.perf_counter()))
        index_started = time.perf_counter()
        row_bytes = _fill_index(layout, versions, now - ATIME_AGE)
        index_seconds = time.perf_counter() - index_started
        written = sum(f.result() for f in futures)
    seconds = time.perf_counter() - started
    if written != blocks:
        raise RuntimeError(f"wrote {written} blocks of {blocks}")
    files_seconds = max(finished, default=files_started) - started
    filled = Filled(len(metas), blocks, row_bytes, seconds, files_seconds, index_seconds)
    return filled, metas


def _fill_index(layout: Layout, versions: list[Version], atime0: float) -> int:
    """One row per block through schema.add_found (the reconciler's way in for
    rows of blocks on disk), its bytes the block's own (no header, as format 3
    counts them), atimes increasing in fill order; the reconcile a new index
    is marked for is cleared (the rows are exactly the maps' entries).
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
                        (i, v.block_length(i), atime0 + (base + i) * ATIME_STEP)
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
