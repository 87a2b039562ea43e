"""Sparse-file system calls: punch a hole, write a list of buffers whole, list the data extents.

Blocking; what versionfile.py builds a version's data file on.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator

from . import aiowrite

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
# gets page-cache folios sized to the call (ext4 on Linux 6.x). Folios of up
# to 32 KiB (order 3 with 4 KiB pages) come from the per-CPU lists of pages
# just freed; larger ones from the buddy allocator's larger blocks, which
# memory freed in small pieces (a cache of small files deleted, page cache
# reclaimed a page at a time) does not rebuild, and which on this project's
# VM seem to be memory the host must back again. Written a 1 MiB group per
# call, a 1 GiB cold fill right after another cache was deleted spent a
# third of the machine's CPU in the copy into the page cache; 128 KiB calls
# helped in one sitting (1.65x the MB/s) and not in the next; 32 KiB calls
# ran at 1.38-1.45x 128 KiB's MB/s on 0.56-0.63x the CPU (bench/coldfill.py,
# --size 1G). The price is the calls: a 256 MiB fill into memory just freed
# ran at 0.92x 128 KiB's. nginx writes its cache in calls this size or
# smaller (its proxy buffers) and never meets the slow case. The calls of
# a group go in one io_submit where Linux AIO is there (aiowrite.py).
WRITE_PIECE = 32 * 1024


def pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    """All of ``views`` at ``offset``, WRITE_PIECE bytes a write at most: all in
    one system call where aiowrite can, else a call each (and whatever that
    one left, or failed on, call by call: its errors are raised from here)."""
    views = [v for v in views if len(v)]
    done = aiowrite.submit(fd, views, offset, WRITE_PIECE) if views else None
    if done:
        offset += done
        _consume(views, done)
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
        _consume(views, written)


def _consume(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes of ``views``, in place."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views.pop(0)
    if views and n:
        views[0] = views[0][n:]


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
