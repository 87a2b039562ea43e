"""Format 3's files of one version: its sparse data file and its map, written, read, locked
and punched (docs/format-3-design.md). Blocking: called in disk threads.

Not used by the daemon yet, which writes format 2 (a file per block); this
is the storage layer the format-3 sessions build on, tested on its own.

Order and locks are what make it safe without a file per block. Locks are
open file description locks (``F_OFD_SETLK``) on spans of the data file:
released by the kernel when a process dies, and, unlike ``lockf``,
conflicting between two opens of the file in one process too (but never
between two locks taken through one open: each party opens the files itself).

- A writer holds the write lock of its group's span, writes the bytes, then
  the map entries: a crash between the two leaves blocks unmapped (absent),
  never mapped and unwritten.
- An evictor holds the write lock of the span, unmaps it, then punches it:
  no writer puts a block back between the two, and no reader is reading.
- A reader holds a read lock while it looks at the entries and copies the
  bytes out (``read_span``). Never ``sendfile`` from a data file: a hole
  punched later changes bytes already handed to a socket (measured on Linux
  6.18, ``bench/layouts.py``'s hazard check), where an unlinked block file,
  in format 2, keeps its pages for whoever holds them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import mapfile
from .blockfile import CorruptBlock, Parts
from .mapfile import MapHeader

DATA_SUFFIX = ".data"
MAP_SUFFIX = ".map"
# struct flock on Linux (64-bit off_t): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhxxxxqqi4x")
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_IOV_MAX = os.sysconf("SC_IOV_MAX")
# How long a writer waits for the write lock of its group (an eviction of the
# span, or a reader copying a block of it out: milliseconds) before giving up
# on caching the group; its bytes are still served from memory.
WRITE_LOCK_PATIENCE = 5.0


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the disk space of a byte range of ``fd``, its size unchanged; the
    range reads as zeros. OSError (EOPNOTSUPP) where the filesystem cannot."""
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def paths(directory: Path, stem: str) -> tuple[Path, Path]:
    """The data and map files of the version ``stem`` (``<vd>.<bs>``) in its object's dir."""
    return directory / f"{stem}{DATA_SUFFIX}", directory / f"{stem}{MAP_SUFFIX}"


class VersionFiles:
    """A version's data and map files, open for reading and writing."""

    def __init__(self, data_fd: int, map_fd: int, header: MapHeader) -> None:
        self.data_fd = data_fd
        self.map_fd = map_fd
        self.header = header
        # Read locks held through this open: readers per block (lock_shared).
        self._readers: dict[int, int] = {}
        self._readers_mutex = threading.Lock()

    @classmethod
    def open(
        cls, directory: Path, stem: str, header: MapHeader, *, create: bool
    ) -> VersionFiles | None:
        """Open the version's files: None if they are not there (or their map has
        no header yet) and ``create`` is false. CorruptMap if the map is another
        version's, or not a map: the caller drops both files. Creating is safe
        against another process creating them at the same moment: both write
        the same header."""
        data_path, map_path = paths(directory, stem)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            map_fd = os.open(map_path, flags, 0o644)
        except FileNotFoundError:
            return None
        try:
            raw = os.pread(map_fd, mapfile.HEADER_SIZE, 0)
            if not raw:  # just created, by this open or another process's
                if not create:
                    os.close(map_fd)
                    return None  # its header is on its way: not there yet
                os.pwrite(map_fd, mapfile.encode_header(header), 0)
                raw = os.pread(map_fd, mapfile.HEADER_SIZE, 0)
            mapfile.check_header(mapfile.decode_header(raw), header)
            data_fd = os.open(data_path, flags, 0o644)
        except BaseException:
            os.close(map_fd)
            raise
        return cls(data_fd, map_fd, header)

    def close(self) -> None:
        for fd in (self.data_fd, self.map_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.data_fd = self.map_fd = -1

    # -- writing -----------------------------------------------------------
    def write_group(self, first: int, blocks: Sequence[Parts], *, fsync: bool = False) -> None:
        """Blocks ``first``, ``first + 1``... (each its bytes in parts): their bytes,
        then their entries. On an error (ENOSPC) the group's entries are not
        written, so none of it is present, and the space it took is given back."""
        for n, parts in enumerate(blocks):
            want = self.header.length_of(first + n)
            if sum(len(p) for p in parts) != want:
                raise ValueError(f"block {first + n} must be {want} bytes")
        offset = self.header.offset_of(first)
        views = [memoryview(p).cast("B") for parts in blocks for p in parts]
        length = sum(len(v) for v in views)
        self._wait_lock(first, len(blocks))
        try:
            try:
                _pwritev_all(self.data_fd, views, offset)
                if fsync:
                    os.fdatasync(self.data_fd)
            except OSError:
                with contextlib.suppress(OSError):
                    punch_hole(self.data_fd, offset, length)
                raise
            os.pwrite(self.map_fd, mapfile.encode_entries(blocks), mapfile.entry_offset(first))
            if fsync:
                os.fdatasync(self.map_fd)
        finally:
            self.unlock(first, len(blocks))

    def _wait_lock(self, first: int, count: int) -> None:
        deadline = time.monotonic() + WRITE_LOCK_PATIENCE
        pause = 0.001
        while not self.try_lock(first, count):
            if time.monotonic() > deadline:
                raise OSError(errno.EAGAIN, f"blocks {first}-{first + count - 1} stay locked")
            time.sleep(pause)
            pause = min(0.05, pause * 2)

    # -- reading -----------------------------------------------------------
    def entries(self, first: int, count: int) -> list[tuple[int, int]]:
        """The map's entries of blocks [first, first + count); absent past its end."""
        raw = os.pread(self.map_fd, count * mapfile.ENTRY_SIZE, mapfile.entry_offset(first))
        found = mapfile.decode_entries(raw)
        return found + [(0, 0)] * (count - len(found))

    def mapped(self, first: int, count: int) -> list[bool]:
        """Whether the map says each of blocks [first, first + count) is there."""
        return mapfile.mapped(self.header, first, self.entries(first, count))

    def read_block(self, index: int) -> bytes:
        """Block ``index``'s bytes, checked against its entry: CorruptBlock if the
        map does not have it or its bytes do not match (a torn write after a
        power cut, a disk error). None of it while the block is being removed
        or written: a read lock on it, without waiting (CorruptBlock if taken)."""
        if not self.lock_shared(index, 1):
            raise CorruptBlock(f"block {index} is being removed or written")
        try:
            (entry,) = self.entries(index, 1)
            if not mapfile.mapped(self.header, index, [entry])[0]:
                raise CorruptBlock(f"block {index} is not in the map")
            data = os.pread(self.data_fd, entry[1], self.header.offset_of(index))
        finally:
            self.unlock_shared(index, 1)
        mapfile.check_block(entry, data, index)
        return data

    def read_span(self, first: int, count: int) -> bytes | None:
        """The bytes of blocks [first, first + count), copied out under a read
        lock, if the map has every one of them (their checksums unchecked: the
        caller checks a block the first time it serves it); None if not, or
        while any of them is being removed or written."""
        if not self.lock_shared(first, count):
            return None
        try:
            if not all(self.mapped(first, count)):
                return None
            start = self.header.offset_of(first)
            end = min(self.header.size, self.header.offset_of(first + count))
            data = os.pread(self.data_fd, end - start, start)
        finally:
            self.unlock_shared(first, count)
        return data if len(data) == end - start else None

    # -- removing ----------------------------------------------------------
    def remove(self, first: int, count: int) -> None:
        """Blocks [first, first + count) out of the map, then their space freed.
        The caller holds the write lock of the span (``try_lock``), taken
        through this open before it looked at what to remove."""
        os.pwrite(self.map_fd, bytes(count * mapfile.ENTRY_SIZE), mapfile.entry_offset(first))
        self._punch(self.header.offset_of(first), self.header.offset_of(first + count))

    def _punch(self, start: int, end: int) -> int:
        """Punch [start, end) of the data file, through the end of the file's last
        filesystem block when ``end`` reaches the object's end (a partial block
        is only zeroed, never freed). Returns the bytes punched."""
        if end >= self.header.size:
            fs_block = os.fstat(self.data_fd).st_blksize or 4096
            end = -(-self.header.size // fs_block) * fs_block
        if end > start:
            punch_hole(self.data_fd, start, end - start)
        return max(0, end - start)

    def reclaim(self, first: int, count: int) -> tuple[int, int]:
        """Punch out the bytes of blocks [first, first + count) that the map does
        not have: a crash between a group's bytes and its entries left them, and
        no row counts their space (reconcile calls this in bounded spans). A
        span being written is locked: left for a later pass. Returns (bytes
        punched, blocks left because locked). Where blocks do not end on a
        filesystem block, a punch zeroes what it cannot free, and a later
        pass punches those bytes again: harmless."""
        h = self.header
        start, end = h.offset_of(first), min(h.size, h.offset_of(first + count))
        freed = skipped = 0
        for a, b in list(_data_extents(self.data_fd, start, end)):
            lo, hi = a // h.block_size, -(-b // h.block_size)
            mapped = self.mapped(lo, hi - lo)
            for run_first, run_count in _runs(lo, [not m for m in mapped]):
                if not self.try_lock(run_first, run_count):
                    skipped += run_count
                    continue
                try:  # looked at again under the lock: a writer may have mapped some
                    again = self.mapped(run_first, run_count)
                    for gone_first, gone_count in _runs(run_first, [not m for m in again]):
                        lo_b = max(a, h.offset_of(gone_first))
                        hi_b = min(b, h.offset_of(gone_first + gone_count))
                        freed += self._punch(lo_b, hi_b)
                finally:
                    self.unlock(run_first, run_count)
        return freed, skipped

    # -- locks on spans of the data file -------------------------------------
    def lock_shared(self, first: int, count: int) -> bool:
        """A read lock on blocks [first, first + count), without waiting: False
        while another open holds a write lock on any of them. Counted per block,
        so that the readers of a process can share this open: the kernel's lock
        is taken for the blocks no reader holds yet, and ``unlock_shared`` lets
        go only of those no reader holds any more (one unlock of an open
        releases every lock of that open on the range)."""
        with self._readers_mutex:
            new = [i for i in range(first, first + count) if i not in self._readers]
            taken: list[tuple[int, int]] = []
            for run in _runs_of(new):
                if not self._lock(fcntl.F_RDLCK, *run):
                    for done in taken:
                        self._lock(fcntl.F_UNLCK, *done)
                    return False
                taken.append(run)
            for i in range(first, first + count):
                self._readers[i] = self._readers.get(i, 0) + 1
            return True

    def unlock_shared(self, first: int, count: int) -> None:
        with self._readers_mutex:
            free = []
            for i in range(first, first + count):
                left = self._readers[i] - 1
                if left:
                    self._readers[i] = left
                else:
                    del self._readers[i]
                    free.append(i)
            for run in _runs_of(free):
                self._lock(fcntl.F_UNLCK, *run)

    def try_lock(self, first: int, count: int) -> bool:
        """A write lock on blocks [first, first + count), without waiting: False
        while another open (a reader) holds a lock on any of them. Take it
        through an open no reader of this process uses: locks of one open never
        conflict with each other, and its unlock would drop theirs."""
        return self._lock(fcntl.F_WRLCK, first, count)

    def unlock(self, first: int, count: int) -> None:
        """Let go of a write lock (``try_lock``)."""
        self._lock(fcntl.F_UNLCK, first, count)

    def _lock(self, kind: int, first: int, count: int) -> bool:
        start = self.header.offset_of(first)
        length = self.header.block_size * count
        request = _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)
        try:
            fcntl.fcntl(self.data_fd, fcntl.F_OFD_SETLK, request)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True


def drop(directory: Path, stem: str) -> None:
    """Remove a version's files (the whole version at once: two unlinks)."""
    for path in paths(directory, stem):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
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


def _data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
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


def _runs_of(indices: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of consecutive numbers in sorted ``indices``."""
    n = 0
    while n < len(indices):
        m = n + 1
        while m < len(indices) and indices[m] == indices[m - 1] + 1:
            m += 1
        yield indices[n], m - n
        n = m


def _runs(first: int, flags: Sequence[bool]) -> Iterator[tuple[int, int]]:
    """(first index, count) of each run of true flags, the first flag's index ``first``."""
    n = 0
    while n < len(flags):
        if not flags[n]:
            n += 1
            continue
        m = n
        while m < len(flags) and flags[m]:
            m += 1
        yield first + n, m - n
        n = m
