"""Block files on disk: publish atomically, open and verify, drop versions.

Every function here is blocking and is called through an executor by the
async layer. Presence of a block is the existence of its file: nothing here
keeps an in-memory belief about what is on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import itertools
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from . import blockfile
from .blockfile import HEADER_SIZE, CorruptBlock
from .layout import Layout
from .openblocks import SharedFd

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class OpenBlock:
    """An open, checked block file. ``data`` is set when it was read to verify it."""

    fd: int
    length: int
    file_size: int
    data: bytes | None
    # (start, bytes) of a small span read along with the open, so a small
    # hit needs no sendfile set-up.
    piece: tuple[int, bytes] | None = None
    # Set when the fd belongs to the table of open blocks (openblocks.py):
    # closing then releases this reader's share instead of the fd.
    owner: SharedFd | None = None
    # Where the block's data starts in its file (after the header).
    data_offset: ClassVar[int] = HEADER_SIZE

    def bytes_of(self, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of the block's data if they are in memory."""
        if self.data is not None:
            return self.data[start:end]
        if self.piece is not None and self.piece[0] == start and len(self.piece[1]) == end - start:
            return self.piece[1]
        return None

    def close(self) -> None:
        """Idempotent: a closed fd number may be reused by another open at once,
        so closing twice could close somebody else's file."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            if self.owner is not None:
                self.owner.release()
                return
            with contextlib.suppress(OSError):
                os.close(fd)


class Staging:
    """A per-process directory for temp files, alive while its flock is held.

    Temp files live on the cache's filesystem so that publishing is one
    ``os.replace``; keeping them in a per-process directory lets a starting
    daemon sweep the leftovers of dead processes without touching the temp
    files of live ones that share the cache.
    """

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        layout.staging.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        # Created and locked under a dot-name, then renamed into place: a
        # daemon sweeping at the same moment never sees it unlocked.
        nascent = layout.staging / f"{NASCENT_PREFIX}{name}"
        nascent.mkdir()
        self._lock_fd = os.open(nascent / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = layout.staging / name
        os.rename(nascent, self.path)
        # The dir is this process's alone, so a counter names temp files
        # uniquely (no getrandom per block; next() on a count is atomic).
        self._names = itertools.count()

    def temp_path(self) -> Path:
        return self.path / f"{next(self._names)}.tmp"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Let go of the lock but leave the directory: a later sweep takes it
        for a dead process's (an unclean stop)."""
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


# Staging dirs still being set up; swept only when this old (a crash mid-set-up).
NASCENT_PREFIX = "."
NASCENT_GRACE = 3600.0


@dataclasses.dataclass(frozen=True, slots=True)
class Swept:
    dead: int  # staging dirs of processes that died without closing: an unclean stop
    trash: int  # dirs left in trash by an interrupted drop


def sweep_leftovers(layout: Layout) -> Swept:
    """Remove staging dirs of dead processes and anything left in trash.

    Safe to run while other daemons use the cache: a live process holds the
    flock on its staging dir. A dead process's staging dir is the sign of an
    unclean stop (a clean one removes its own), after which the index may
    disagree with the files.
    """
    dead = 0
    for entry in _scandir(layout.staging):
        if entry.name.startswith(NASCENT_PREFIX) and not _older_than(entry, NASCENT_GRACE):
            continue
        lock = Path(entry.path) / ".lock"
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = -1  # died before taking its lock, or half-removed
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # alive
            shutil.rmtree(entry.path, ignore_errors=True)
            dead += 1
        finally:
            if fd >= 0:
                os.close(fd)
    trash = 0
    for entry in _scandir(layout.trash):
        shutil.rmtree(entry.path, ignore_errors=True)
        trash += 1
    return Swept(dead, trash)


def adopt_legacy_root(layout: Layout) -> bool:
    """Rename a format-1 root to this format's, if there is one and no new root
    yet; True if it was. The reconciler then moves its blocks into shard dirs
    (format 1 differs only in where a version's blocks sit)."""
    if layout.root.exists() or not layout.legacy_root.is_dir():
        return False
    try:
        os.rename(layout.legacy_root, layout.root)
    except FileNotFoundError:
        return False  # another daemon starting at the same moment did it
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True


def _older_than(entry: os.DirEntry[str], seconds: float) -> bool:
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > seconds
    except FileNotFoundError:
        return False


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []


def publish_blocks(
    staging: Staging,
    blocks: Sequence[tuple[Path, int, bytes | bytearray | memoryview]],
    digest: bytes,
    *,
    fsync: bool,
) -> list[tuple[int, int] | OSError]:
    """publish_block for each (target, index, data), in one call: a fill hands a
    group of blocks to one disk thread. One block failing (ENOSPC) does not
    stop the others; its entry is the error."""
    done: list[tuple[int, int] | OSError] = []
    for target, index, data in blocks:
        try:
            done.append(publish_block(staging, target, index, data, digest, fsync=fsync))
        except OSError as exc:
            done.append(exc)
    return done


def publish_block(
    staging: Staging,
    target: Path,
    index: int,
    data: bytes | bytearray | memoryview,
    digest: bytes,
    *,
    fsync: bool,
) -> tuple[int, int]:
    """Write a block to a temp file, then rename it into place. Returns the file
    size and an fd of the published file, open for reading: the caller owns it
    (the first reader of a block just fetched, often a moment away, then needs
    no open in a thread: 80 % of a cold fill's blocks go out that way).

    Raises OSError (ENOSPC...) without leaving anything visible at ``target``.
    """
    tmp = staging.temp_path()
    header = blockfile.encode_header(index, data, digest)
    fd = -1
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        _write_all(fd, header, data)
        if fsync:
            os.fsync(fd)
        try:
            os.replace(tmp, target)
        except FileNotFoundError:  # the version's first block in this shard
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        if fsync:
            _fsync_dir(target.parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return HEADER_SIZE + len(data), fd


def _write_all(fd: int, *parts: bytes | bytearray | memoryview) -> None:
    """All of ``parts``, in one writev where the kernel takes it all."""
    views = [memoryview(p) for p in parts]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_block(
    path: Path,
    *,
    index: int,
    length: int,
    digest: bytes,
    verify: bool,
    span: tuple[int, int] | None = None,
) -> OpenBlock | None:
    """Open a block and check its header; with ``verify`` also its checksum.

    Returns None when the block is absent. A corrupt block is deleted and
    reported absent, so it is fetched again instead of served.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        header = blockfile.decode_header(os.pread(fd, HEADER_SIZE, 0))
        blockfile.check_header(header, index=index, length=length, digest=digest, file_size=size)
        data: bytes | None = None
        piece: tuple[int, bytes] | None = None
        if span is not None and not verify:
            piece = (span[0], os.pread(fd, span[1] - span[0], HEADER_SIZE + span[0]))
        if verify:
            data = os.pread(fd, length, HEADER_SIZE)
            if len(data) != length:
                raise CorruptBlock("short read")
            blockfile.check_data(header, data)
    except CorruptBlock as exc:
        os.close(fd)
        log.warning("dropping corrupt block %s: %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    except BaseException:
        os.close(fd)
        raise
    return OpenBlock(fd=fd, length=length, file_size=size, data=data, piece=piece)


def read_block_data(block: OpenBlock, start: int, end: int) -> bytes:
    """Bytes [start, end) of the block's data (fallback when sendfile is unavailable)."""
    if block.data is not None:
        return block.data[start:end]
    return os.pread(block.fd, end - start, HEADER_SIZE + start)


def read_meta(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as fh:
            value = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable object metadata %s: %s", path, exc)
        return None
    return value if isinstance(value, dict) else None


@contextlib.contextmanager
def object_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on the directory holding ``path`` (an object's meta.json):
    read-modify-writes of meta.json by several processes take turns, so a
    refreshed ``validated_at`` never undoes another process's ``private``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_meta(staging: Staging, path: Path, value: dict[str, Any]) -> None:
    tmp = staging.temp_path()
    try:
        tmp.write_text(json.dumps(value, sort_keys=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def drop_dir(layout: Layout, path: Path) -> None:
    """Remove a version (or object) dir: first out of sight by rename, then rmtree."""
    layout.trash.mkdir(parents=True, exist_ok=True)
    doomed = layout.trash / secrets.token_hex(8)
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def prune_version(layout: Layout, version: str) -> bool:
    """Remove the empty dirs of a version whose last block was evicted, and its
    object's dir and meta.json when no other version is left: an object with
    nothing cached keeps nothing on disk. A block published meanwhile keeps
    its dirs (rmdir of a non-empty dir fails, and publish re-creates a dir it
    finds gone). True when the object went entirely."""
    vdir = layout.version_path(version)
    for entry in _scandir(vdir):
        _rmdir_quietly(Path(entry.path))
    _rmdir_quietly(vdir)
    obj = vdir.parent
    if [e.name for e in _scandir(obj)] != ["meta.json"]:
        return False
    with object_lock(obj / "meta.json"):
        if [e.name for e in _scandir(obj)] != ["meta.json"]:
            return False
        unlink_quietly(obj / "meta.json")
    _rmdir_quietly(obj)
    return True


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, OSError):
        os.rmdir(path)


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
