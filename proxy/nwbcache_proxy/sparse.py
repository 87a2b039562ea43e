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


# The most bytes one write call puts into the page cache. A buffered write
# gets page-cache folios sized to the call (ext4 on Linux 6.x): 1 MiB calls
# want 1 MiB folios, which memory freed in small pieces (a cache of small
# files deleted, pages reclaimed one by one) cannot give; on this project's
# VM they seem to come from memory the host must back again. 1 GiB by four
# threads in 1 MiB calls ran at 2.3 GB/s on 0.74 s of system CPU per GiB, in
# 128 KiB calls at 4.1 GB/s on 0.43 s (bench/results-writesize.md); a 1 GiB
# cold fill through the daemon at 1.65x the MB/s on 0.55x the CPU. The price
# is the extra calls when large folios are at hand: a 256 MiB fill ran at
# 0.91x (bench/results-coldfill.md). nginx writes its cache in
# proxy-buffer-sized calls and never meets it.
WRITE_PIECE = 128 * 1024


def pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    """All of ``views`` at ``offset``, WRITE_PIECE bytes a call at most."""
    views = [v for v in views if len(v)]
    while views:
        batch: list[memoryview] = []
        room = WRITE_PIECE
        for view in views[:_IOV_MAX]:
            batch.append(view[:room])
            room -= len(batch[-1])
            if not room:
                break
        written = os.pwritev(fd, batch, offset)
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
