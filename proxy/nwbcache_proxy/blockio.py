"""The blocking reads and writes behind blocks.py: a version's blocks under their span locks,
on the event loop without waiting for the disk (``nowait``) or in disk threads.

Module functions, called through the module (tests slow them down by
replacing them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from . import mapfile, wholeversions
from .blockfile import Buffer, CorruptBlock, Parts
from .openversions import SharedVersion, pread_nowait
from .spanlocks import runs_of
from .version import Version
from .versionfile import VersionDropped, VersionFiles


class Miss(Exception):
    """The page cache did not have what a read on the loop needed: read in a thread."""


def open_version(v: Version, *, create: bool) -> VersionFiles | None:
    """The version's files (wholeversions.open_or_replace)."""
    return wholeversions.open_or_replace(v.data_path, v.map_path, v.header, create=create)


def entries_nowait(files: VersionFiles, first: int, count: int) -> list[tuple[int, int]] | None:
    raw = pread_nowait(files.map_fd, count * mapfile.ENTRY_SIZE, mapfile.entry_offset(first))
    return None if raw is None else mapfile.decode_entries(raw)


def read(
    files: VersionFiles, index: int, lo: int, hi: int, verify: bool, *, nowait: bool = False
) -> Buffer | None:
    """Bytes [lo, hi) of block ``index`` under a read lock, checked against its
    entry when ``verify`` (then [lo, hi) is the whole block). None if the map
    does not have it, or while it is being written or removed. With
    ``nowait``: on the loop, Miss when the page cache lacks a byte of it."""
    if not files.lock_shared(index, 1):
        return None
    try:
        if nowait:
            entries = entries_nowait(files, index, 1)
            if entries is None:
                raise Miss
        else:
            entries = files.entries(index, 1)
        if not mapfile.mapped(files.header, index, entries)[0]:
            return None
        offset = files.header.offset_of(index) + lo
        data: Buffer | None
        if nowait:
            data = pread_nowait(files.data_fd, hi - lo, offset)
            if data is None:
                raise Miss
        else:
            data = os.pread(files.data_fd, hi - lo, offset)
    finally:
        files.unlock_shared(index, 1)
    if verify:
        mapfile.check_block(entries[0], data, index)
    elif len(data) != hi - lo:
        raise CorruptBlock(f"block {index}: the data file is shorter than its map says")
    return data


def read_span(files: VersionFiles, blocks: range, start: int, end: int) -> Buffer | None:
    """Bytes [start, end) of the object, from the page cache on the loop, if the
    map has every block of ``blocks``; else None."""
    first, count = blocks.start, len(blocks)
    if not files.lock_shared(first, count):
        return None
    try:
        entries = entries_nowait(files, first, count)
        if entries is None or not all(mapfile.mapped(files.header, first, entries)):
            return None
        return pread_nowait(files.data_fd, end - start, start)
    finally:
        files.unlock_shared(first, count)


def write(
    v: Version,
    held: SharedVersion | None,
    items: Sequence[tuple[int, Parts]],
    fsync: bool,
) -> tuple[VersionFiles | None, list[OSError | None]]:
    """Write the blocks, a run of consecutive ones at a time. Returns the files
    if opened here (for the table to adopt in place of any it holds), and per
    block None once it is on disk exactly, or why it could not be written."""
    opened: VersionFiles | None = None
    files = held.files if held is not None else None
    results: list[OSError | None] = []
    by_index = dict(items)
    for first, count in runs_of([i for i, _ in items]):
        parts = [by_index[i] for i in range(first, first + count)]
        try:
            if files is None:
                opened = files = open_version(v, create=True)
                assert files is not None
            try:
                results += files.write_group(first, parts, fsync=fsync)
            except VersionDropped:  # evicted whole, or dropped, meanwhile: made again
                if opened is not None:
                    opened.close()
                opened = files = None  # never handed on closed
                opened = files = open_version(v, create=True)
                assert files is not None
                results += files.write_group(first, parts, fsync=fsync)
        except OSError as exc:
            results += [exc] * count
    return opened, results
