"""Format 2's block publishing (nwbcache up to 0.x's daemon, ``publish.py``), kept for
``bench/layouts.py``'s comparison: a block file appears at its path whole or
not at all.

Written unnamed (O_TMPFILE, in its shard dir) and linked in when whole, or,
where the filesystem or a sandbox refuses that, written as a temp file in
the process's staging dir and renamed into place. Blocking: called in the
disk threads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from nwbcache_proxy import blockfile
from nwbcache_proxy.blockfile import HEADER_SIZE, Buffer, Parts
from nwbcache_proxy.staging import Staging

log = logging.getLogger(__name__)
T = TypeVar("T")

_IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one writev takes at most


def publish_blocks(
    staging: Staging,
    blocks: Sequence[tuple[str | Path, int, Parts]],
    digest: bytes,
    *,
    fsync: bool,
) -> list[tuple[int, int] | OSError]:
    """publish_block for each (target, index, parts), in one call: a fill hands a
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
    target: str | Path,
    index: int,
    data: Parts,
    digest: bytes,
    *,
    fsync: bool,
) -> tuple[int, int]:
    """Write a block (its bytes in parts, in order) so that it appears at
    ``target`` whole or not at all. Returns the file size and an fd of the
    published file, open for reading: the caller owns it (the first reader of
    a block just fetched, often a moment away, then needs no open in a
    thread: 80 % of a cold fill's blocks go out that way).

    The file is written unnamed (O_TMPFILE, in the target's dir) and linked
    in whole: one directory entry per block instead of a temp name made in
    the staging dir and renamed away from it (a fifth less system time in a
    cold fill, measured), and a crash mid-write leaves nothing to sweep. A
    file already at ``target`` (a block fetched again after failing a check)
    is replaced atomically: the new one is linked under a temp name, then
    renamed over it. Where the filesystem has no O_TMPFILE, a named temp file
    in the staging dir is renamed into place.

    Raises OSError (ENOSPC...) without leaving anything visible at ``target``.
    """
    header = blockfile.encode_header(index, data, digest)
    size = HEADER_SIZE + sum(len(part) for part in data)
    fd = _unnamed_file(os.path.dirname(target))
    if fd is not None:
        try:
            _write_all(fd, header, *data)
            if fsync:
                os.fsync(fd)
            linked = _link(staging, fd, target)
            if linked and fsync:
                os.fsync(fd)  # its link count too: btrfs has lost links to O_TMPFILE inodes
                _fsync_dir(Path(target).parent)
        except BaseException:
            os.close(fd)
            raise
        if linked:
            return size, fd
        os.close(fd)  # linking refused here: the named way, from now on
    return size, _publish_named(staging, target, header, data, fsync=fsync)


def _publish_named(
    staging: Staging, target: str | Path, header: bytes, data: Parts, *, fsync: bool
) -> int:
    """publish_block through a temp file in the staging dir, renamed into place;
    the published file's fd."""
    tmp = staging.temp_path()
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        _write_all(fd, header, *data)
        if fsync:
            os.fsync(fd)
        _replace(tmp, target)
        if fsync:
            _fsync_dir(Path(target).parent)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def _link(staging: Staging, fd: int, target: str | Path) -> bool:
    """Give the unnamed file ``fd`` the name ``target`` (replacing a file there,
    atomically); False, and O_TMPFILE off for this process, where the system
    refuses to link it (an LSM, a sandbox)."""
    global _tmpfile_ok
    name = str(fd)  # in /proc/self/fd: linkat(AT_SYMLINK_FOLLOW) names the open file
    try:
        # Its shard dir, empty (an unnamed file does not count), may have
        # been pruned meanwhile by another process's eviction.
        _making_dir(
            os.path.dirname(target),
            lambda: os.link(name, target, src_dir_fd=_own_fds(), follow_symlinks=True),
        )
    except FileExistsError:
        tmp = staging.temp_path()
        os.link(name, tmp, src_dir_fd=_own_fds(), follow_symlinks=True)
        try:
            _replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        if exc.errno not in _REFUSED:
            raise
        log.warning("cannot link unnamed files in %s (%s): temp files from now on", target, exc)
        _tmpfile_ok = False
        return False
    return True


def _replace(tmp: Path, target: str | Path) -> None:
    # The version's first block in this shard, or its dir pruned meanwhile.
    _making_dir(os.path.dirname(target), lambda: os.replace(tmp, target))


def _making_dir(directory: str, op: Callable[[], T]) -> T:
    """``op()``, once more after making ``directory`` if it was missing."""
    try:
        return op()
    except FileNotFoundError:
        os.makedirs(directory, exist_ok=True)
        return op()


def _unnamed_file(directory: str) -> int | None:
    """An O_TMPFILE fd in ``directory`` (made if missing); None where the
    filesystem (or /proc, needed to link it) does not allow one."""
    global _tmpfile_ok
    if not _tmpfile_ok or _own_fds() < 0:
        return None
    try:
        return _making_dir(directory, lambda: os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o644))
    except OSError as exc:
        if exc.errno not in _REFUSED and exc.errno != errno.EISDIR:  # EISDIR: Linux < 3.11
            raise
        _tmpfile_ok = False
        return None


# What a filesystem or sandbox without O_TMPFILE (or links to it) answers:
# NFS, CIFS, FUSE, older overlayfs (EOPNOTSUPP), gVisor and seccomp (ENOSYS).
_REFUSED = frozenset(
    (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EXDEV)
)
_tmpfile_ok = True
_fds_dir: tuple[int, int] = (-1, -1)  # (pid, fd of its /proc/self/fd)
_fds_dir_lock = threading.Lock()


def _own_fds() -> int:
    """An fd of this process's /proc/self/fd dir, or -1 without /proc. Opened
    again in a forked child: the parent's would name the parent's fds."""
    global _fds_dir
    pid = os.getpid()
    if _fds_dir[0] != pid:
        with _fds_dir_lock:
            if _fds_dir[0] != pid:
                try:
                    _fds_dir = (pid, os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY))
                except OSError:
                    return -1  # not remembered: it may be a passing EMFILE
    return _fds_dir[1]


def _after_fork_in_child() -> None:
    global _fds_dir_lock
    _fds_dir_lock = threading.Lock()  # a thread of the parent may have held it


os.register_at_fork(after_in_child=_after_fork_in_child)


def _write_all(fd: int, *parts: Buffer) -> None:
    """All of ``parts``, in one writev where the kernel takes it all (and
    IOV_MAX allows: a block gathers small pieces, so it has few parts)."""
    views = [memoryview(p) for p in parts]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
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
