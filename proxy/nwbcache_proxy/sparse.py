"""Sparse-file system calls: punch a hole, write a list of buffers whole, list the data extents.

Blocking; what versionfile.py builds a version's data file on.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_IOV_MAX = os.sysconf("SC_IOV_MAX")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the disk space of a byte range of ``fd``, its size unchanged; the
    range reads as zeros. OSError (EOPNOTSUPP) where the filesystem cannot."""
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    """All of ``views`` at ``offset``, however many calls it takes."""
    while views:
        written = os.pwritev(fd, views[:_IOV_MAX], offset)
        if written == 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The byte ranges of ``fd`` within [start, end) that hold data (not holes)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past pos
                return
            raise
        if data >= end:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, end)
        pos = hole
