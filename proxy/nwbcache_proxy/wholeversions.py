"""Whole versions on disk: opened (a torn map replaced), dropped, half-made ones cleared, emptied
ones pruned.

Blocking: called in disk threads, the index's thread and ``nwbcache check``.
Every step that makes or removes a version's two files holds the object
dir's ``flock`` (store.object_lock), and removes the map first, so nobody
pairs one version's map with another's data file (docs/on-disk-format.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from . import mapfile
from .mapfile import MapHeader
from .store import object_lock, unlink_quietly
from .versionfile import VersionFiles

log = logging.getLogger(__name__)

# How long removing an emptied version waits for a reader that looked at one
# of its blocks (a miss: microseconds); after that it is tried again later.
PRUNE_PATIENCE = 0.2


def open_or_replace(
    data_path: Path, map_path: Path, header: MapHeader, *, create: bool
) -> VersionFiles | None:
    """``VersionFiles.open``; a map that is not this version's (a torn header
    after a power cut) is dropped with its data, and made again if ``create``."""
    try:
        return VersionFiles.open(data_path, map_path, header, create=create)
    except mapfile.CorruptMap as exc:
        log.warning("dropping the unreadable map %s: %s", map_path, exc)
        drop(data_path, map_path)
        return VersionFiles.open(data_path, map_path, header, create=create)


def drop(data_path: Path, map_path: Path) -> None:
    """Remove a version's files, the map first: an open that comes between the
    two unlinks finds no version, never a map without its bytes."""
    with object_lock(map_path):
        _unlink_pair(data_path, map_path)


def drop_incomplete(data_path: Path, map_path: Path) -> None:
    """Remove a version's data file or map if it lacks the other (or the map its
    header): what a crash between creating or removing the two leaves."""
    with object_lock(map_path):
        files = VersionFiles.open_existing(data_path, map_path, locked=True)
        if files is not None:
            files.close()
            return
        _unlink_pair(data_path, map_path)


def prune(data_path: Path, map_path: Path, *, patience: float = PRUNE_PATIENCE) -> bool | None:
    """Remove a version's files if its map has no block left (eviction took its
    last one): True if they went, False if the version has blocks (or no
    files), None while someone still reads or writes a block of it after
    ``patience`` seconds (try again later). Under a write lock on every block,
    then the object dir's lock: a writer holding the files open finds them
    unlinked once it has its lock (``VersionDropped``) and makes them again."""
    files = VersionFiles.open_existing(data_path, map_path)
    if files is None:
        return False
    try:
        if not files.locks.lock_file(patience):
            return None
        try:
            if not _map_is_empty(files):
                return False
            with object_lock(map_path):
                try:  # still these files, not a version made again meanwhile
                    same = os.stat(data_path).st_ino == os.fstat(files.data_fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    _unlink_pair(data_path, map_path)
            return same
        finally:
            files.locks.unlock_file()
    finally:
        files.close()


def _unlink_pair(data_path: Path, map_path: Path) -> None:
    """The map, then the data file (under the caller's object lock)."""
    for path in (map_path, data_path):
        unlink_quietly(path)


def _map_is_empty(files: VersionFiles) -> bool:
    end = mapfile.entry_offset(files.header.blocks)
    at = mapfile.HEADER_SIZE
    while at < end:
        chunk = os.pread(files.map_fd, min(1 << 20, end - at), at)
        if not chunk:
            break
        if chunk != bytes(len(chunk)):
            return False
        at += len(chunk)
    return True
