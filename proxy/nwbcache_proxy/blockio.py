"""The blocking reads and writes behind blocks.py: a version's blocks under their span locks,
on the event loop without waiting for the disk (``nowait``) or in disk threads.

Module functions, called through the module (tests slow them down by
replacing them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from . import wholeversions
from .blockfile import Buffer, Parts
from .layout import VERSION_DIRS
from .openversions import SharedVersion, pread_nowait
from .spanlocks import runs_of
from .store import fsync_dirs
from .version import Version
from .versionfile import Busy, VersionDropped, VersionFiles


class Miss(Exception):
    """The page cache did not have what a read on the loop needed: read in a thread."""


def open_version(v: Version, *, create: bool, fsync: bool = False) -> VersionFiles | None:
    """The version's files (wholeversions.open_or_replace). ``fsync`` (with
    ``create``): their names and the map's header made durable first, so
    that the blocks written into them with fsync survive a power cut too. A
    process opens a version to write into it once, not once per block."""
    files = wholeversions.open_or_replace(v.data_path, v.map_path, v.header, create=create)
    if files is not None and create and fsync:
        try:
            os.fsync(files.map_fd)
            fsync_dirs(v.map_path.parent, VERSION_DIRS)
        except BaseException:
            files.close()
            raise
    return files


def nowait(fd: int, length: int, offset: int) -> Buffer:
    """A read for the event loop: from the page cache, or Miss."""
    data = pread_nowait(fd, length, offset)
    if data is None:
        raise Miss
    return data


def read(
    files: VersionFiles, index: int, lo: int, hi: int, verify: bool, *, on_loop: bool = False
) -> Buffer | None:
    """Bytes [lo, hi) of block ``index`` (VersionFiles.read): None if the map
    does not have it, or while it is being written or removed. ``on_loop``:
    Miss when the page cache lacks a byte of it."""
    try:
        return files.read(index, lo, hi, verify=verify, pread=nowait if on_loop else os.pread)
    except Busy:
        return None


def read_span(
    files: VersionFiles, blocks: range, start: int, end: int, *, verify: bool = False
) -> Buffer | None:
    """Bytes [start, end) of the object, from the page cache on the loop, if the
    map has every block of ``blocks``; else None. ``verify``: each block
    checked against its entry (CorruptBlock if one does not match)."""
    try:
        return files.read_span(blocks.start, len(blocks), (start, end), nowait, verify=verify)
    except Miss:
        return None


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
                opened = files = open_version(v, create=True, fsync=fsync)
                assert files is not None
            try:
                results += files.write_group(first, parts, fsync=fsync)
            except VersionDropped:  # evicted whole, or dropped, meanwhile: made again
                if opened is not None:
                    opened.close()
                opened = files = None  # never handed on closed
                opened = files = open_version(v, create=True, fsync=fsync)
                assert files is not None
                results += files.write_group(first, parts, fsync=fsync)
        except OSError as exc:
            results += [exc] * count
    return opened, results
