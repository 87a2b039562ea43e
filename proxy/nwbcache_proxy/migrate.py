"""Moving a format-1 or format-2 version dir's block files into its format-3 data file.

Formats 1 and 2 kept a file per block (``<vd>.<bs>/<n>.blk``, or in shard
dirs ``<vd>.<bs>/<s>/<n>.blk``); format 3 keeps a version's blocks in one
sparse data file beside its map (versionfile.py). The reconciler calls this
a shard dir (or a thousand flat files) at a time: each block file is read,
checked (header, length, checksum, the version's digest), written into the
data file with its map entry, and unlinked. A block that fails its check is
unlinked, never moved. A dir of a version that meta.json no longer names
(an older version, aged out by eviction in format 2) cannot be checked
against its version and goes whole. Blocking: runs on the index's thread.

Until its turn comes, a block of a version being moved is a miss: fetched
again and written into the data file (exact bytes; the move then finds it
mapped and only unlinks its file).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from . import blockfile, store
from .blockfile import HEADER_SIZE, CorruptBlock
from .layout import Layout, key_hash
from .mapfile import MapHeader
from .objectmeta import ObjectMeta
from .staging import scandir
from .versionfile import VersionFiles

log = logging.getLogger(__name__)

# Flat (format 1) block files moved per unit of work.
FLAT_BATCH = 1024
# Bytes of block files held in memory at once: one write per run of this many.
MOVE_BUDGET = 4 * 1024 * 1024


def header_of(layout: Layout, vdir: Path) -> MapHeader | None:
    """The map header of the version a legacy dir holds, if its object's
    meta.json names that version (and block size); else None."""
    bs = Layout.block_size_of(vdir.name)
    raw = store.read_meta(vdir.parent / "meta.json")
    key = raw.get("cache_key") if raw else None
    if bs is None or raw is None or not isinstance(key, str):
        return None
    meta = ObjectMeta.from_json(raw, key)
    if meta is None or key_hash(key) != vdir.parent.name:
        return None
    if layout.version_stem(key_hash(key), meta.digest, bs) != vdir:
        return None
    return MapHeader(bs, meta.version.size, meta.digest)


def units(vdir: Path) -> list[tuple[str, list[Path]]]:
    """The dir's work in order: (unit name, block files), a shard dir or a batch
    of flat files each. Unit names sort in the order they are done."""
    flat: list[Path] = []
    shards: list[tuple[int, Path]] = []
    for entry in scandir(vdir):
        if entry.is_dir(follow_symlinks=False):
            shard = Layout.shard_of_dir(entry.name)
            if shard is not None:
                shards.append((shard, Path(entry.path)))
        elif Layout.block_index_of(entry.name) is not None:
            flat.append(Path(entry.path))
    flat.sort(key=lambda p: Layout.block_index_of(p.name) or 0)
    out = [(f"f{n:012d}", flat[n : n + FLAT_BATCH]) for n in range(0, len(flat), FLAT_BATCH)]
    for shard, path in sorted(shards):
        files = [Path(e.path) for e in scandir(path) if Layout.block_index_of(e.name) is not None]
        out.append(
            (f"s{shard:012d}", sorted(files, key=lambda p: Layout.block_index_of(p.name) or 0))
        )
    return out


def move(files: VersionFiles, paths: list[Path]) -> tuple[list[tuple[int, int]], int]:
    """Move block files (sorted by index) into the version's data file and map,
    a run of consecutive good blocks of at most MOVE_BUDGET bytes at a time,
    each file unlinked once its bytes are mapped (or found bad). Returns
    (index, length) of the blocks moved and how many files were dropped as
    corrupt. A run the disk refuses (ENOSPC) stays in its files."""
    moved: list[tuple[int, int]] = []
    run: list[tuple[int, memoryview, Path]] = []
    corrupt = 0

    def flush() -> None:
        if not run:
            return
        first = run[0][0]
        try:
            files.write_group(first, [[data] for _, data, _ in run])
        except OSError as exc:
            log.warning("could not move blocks %d-%d: %s", first, run[-1][0], exc)
        else:
            for index, data, path in run:
                moved.append((index, len(data)))
                store.unlink_quietly(path)
        run.clear()

    for path in paths:
        found = _read_block(files.header, path)
        if found is None:
            continue  # evicted meanwhile
        if isinstance(found, CorruptBlock):
            log.warning("dropping corrupt block %s instead of moving it: %s", path, found)
            corrupt += 1
            store.unlink_quietly(path)
            continue
        index, data = found
        if run and (run[-1][0] + 1 != index or sum(len(d) for _, d, _ in run) >= MOVE_BUDGET):
            flush()
        run.append((index, data, path))
    flush()
    return moved, corrupt


def _read_block(h: MapHeader, path: Path) -> tuple[int, memoryview] | CorruptBlock | None:
    """(index, bytes) of a block file checked against the version, the reason it
    is not sound, or None when it is gone."""
    index = Layout.block_index_of(path.name)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        if index is None or not 0 <= index < h.blocks:
            raise CorruptBlock("past the end of the version")
        header = blockfile.decode_header(raw)
        length = h.length_of(index)
        blockfile.check_header(
            header, index=index, length=length, digest=h.digest, file_size=len(raw)
        )
        data = memoryview(raw)[HEADER_SIZE:]
        blockfile.check_data(header, data)
    except CorruptBlock as exc:
        return exc
    return index, data


def remove_empty(vdir: Path) -> None:
    """The legacy dir's empty shard dirs, then the dir (left if anything is in it)."""
    for entry in scandir(vdir):
        if entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.rmdir(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(vdir)
