"""Block files on disk: open and verify, read, meta.json, drop versions (publish.py writes them).

Every function here is blocking and is called through an executor by the
async layer. Presence of a block is the existence of its file: nothing here
keeps an in-memory belief about what is on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from . import blockfile
from .blockfile import HEADER_SIZE, CorruptBlock
from .layout import Layout
from .openblocks import SharedFd
from .staging import Staging, scandir

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


def open_block(
    path: str | Path,
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
def object_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """An exclusive flock on the directory holding ``path`` (an object's meta.json,
    or a format-3 version's files): read-modify-writes of meta.json by several
    processes take turns, so a refreshed ``validated_at`` never undoes another
    process's ``private``. ``shared``: a lock for reading, which only waits
    for exclusive ones; the directory is not made (FileNotFoundError)."""
    if not shared:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
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
    for entry in scandir(vdir):
        _rmdir_quietly(Path(entry.path))
    _rmdir_quietly(vdir)
    obj = vdir.parent
    if [e.name for e in scandir(obj)] != ["meta.json"]:
        return False
    with object_lock(obj / "meta.json"):
        if [e.name for e in scandir(obj)] != ["meta.json"]:
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
