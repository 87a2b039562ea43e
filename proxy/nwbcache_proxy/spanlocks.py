"""Locks on spans of blocks of a format-3 data file, shared by a process's threads and kept
between processes (versionfile.py; docs/format-3-design.md).

Open file description locks (``F_OFD_SETLK``): the kernel releases them when
a process dies, and two opens conflict even within one process. But two
locks taken through one open never conflict, a lock request through it
converts the lock already there, and an unlock releases every lock of that
open on the range. So the readers of a process share one open, and their
locks are counted per block (the kernel's lock taken for the first reader of
a block, released with the last); writers and evictors lock through a second
open, so that they conflict with this process's readers as with anyone's,
and hold their blocks in a set, so that two threads of this process never
write-lock one block at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator

# struct flock on Linux (64-bit off_t): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhxxxxqqi4x")


class SpanLocks:
    def __init__(self, read_fd: int, write_fd: int, block_size: int) -> None:
        """``read_fd`` and ``write_fd``: two opens of one data file."""
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._block_size = block_size
        self._mutex = threading.Lock()
        self._readers: dict[int, int] = {}  # block -> readers holding it
        self._written: set[int] = set()  # blocks write-locked by this process

    # -- readers --------------------------------------------------------------
    def shared(self, first: int, count: int) -> bool:
        """A read lock on blocks [first, first + count), without waiting: False,
        holding nothing, while anyone (this process too) write-locks one."""
        if count <= 0:
            return True
        with self._mutex:
            if not self._written.isdisjoint(range(first, first + count)):
                return False
            new = [i for i in range(first, first + count) if i not in self._readers]
            taken: list[tuple[int, int]] = []
            try:
                for run in runs_of(new):
                    if not self._lock(self._read_fd, fcntl.F_RDLCK, *run):
                        break
                    taken.append(run)
                else:
                    for i in range(first, first + count):
                        self._readers[i] = self._readers.get(i, 0) + 1
                    return True
            except BaseException:
                self._unlock_runs(self._read_fd, taken)
                raise
            self._unlock_runs(self._read_fd, taken)
            return False

    def release_shared(self, first: int, count: int) -> None:
        """One reader lets go of blocks [first, first + count)."""
        if count <= 0:
            return
        with self._mutex:
            span = range(first, first + count)
            if any(i not in self._readers for i in span):
                raise ValueError(f"blocks {first}+{count} are not all read-locked")
            free = []
            for i in span:
                left = self._readers[i] - 1
                if left:
                    self._readers[i] = left
                else:
                    del self._readers[i]
                    free.append(i)
            self._unlock_runs(self._read_fd, runs_of(free))

    # -- writers and evictors ---------------------------------------------------
    def exclusive(self, first: int, count: int) -> bool:
        """A write lock on blocks [first, first + count), without waiting: False
        while anyone (this process's readers and writers too) holds one."""
        if count <= 0:
            return True
        with self._mutex:
            span = range(first, first + count)
            if not self._written.isdisjoint(span) or any(i in self._readers for i in span):
                return False
            if not self._lock(self._write_fd, fcntl.F_WRLCK, first, count):
                return False
            self._written.update(span)
            return True

    def wait_exclusive(self, first: int, count: int, patience: float) -> None:
        """``exclusive``, trying for up to ``patience`` seconds; OSError EAGAIN after."""
        if not _trying(lambda: self.exclusive(first, count), patience):
            raise OSError(errno.EAGAIN, f"blocks {first}-{first + count - 1} stay locked")

    def release_exclusive(self, first: int, count: int) -> None:
        if count <= 0:
            return
        with self._mutex:
            span = range(first, first + count)
            if not self._written.issuperset(span):
                raise ValueError(f"blocks {first}+{count} are not all write-locked")
            self._written.difference_update(span)
            self._lock(self._write_fd, fcntl.F_UNLCK, first, count)

    # -- a whole private open -------------------------------------------------------
    def lock_file(self, patience: float) -> bool:
        """A write lock on the whole file, waiting up to ``patience`` seconds, with
        no per-block bookkeeping (a version of millions of blocks would cost
        seconds of it): only for an open nothing else in this process uses."""
        # A length of 0: to the end of the file, however it grows.
        return _trying(lambda: _setlk(self._write_fd, fcntl.F_WRLCK, 0, 0), patience)

    def unlock_file(self) -> None:
        _setlk(self._write_fd, fcntl.F_UNLCK, 0, 0)

    def close(self) -> None:
        """The files are being closed: from now on a lock call fails (EBADF)
        instead of acting on whatever file reuses the fd numbers."""
        with self._mutex:
            self._read_fd = self._write_fd = -1

    # -- the kernel's locks -------------------------------------------------------
    def _unlock_runs(self, fd: int, runs: Iterable[tuple[int, int]]) -> None:
        for run in runs:
            self._lock(fd, fcntl.F_UNLCK, *run)

    def _lock(self, fd: int, kind: int, first: int, count: int) -> bool:
        # count > 0: a length of 0 would mean "to the end of the file".
        return _setlk(fd, kind, first * self._block_size, count * self._block_size)


def _setlk(fd: int, kind: int, start: int, length: int) -> bool:
    """One OFD lock request, without waiting: False if another open holds a
    conflicting lock."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _trying(attempt: Callable[[], bool], patience: float) -> bool:
    """``attempt()`` until it succeeds or ``patience`` seconds have passed,
    backing off from 1 ms to 50 ms between tries."""
    deadline = time.monotonic() + patience
    pause = 0.001
    while not attempt():
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(0.05, pause * 2)
    return True


def runs_of(indices: Iterable[int]) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of consecutive numbers in ascending ``indices``."""
    run: tuple[int, int] | None = None
    for i in indices:
        if run is not None and i == run[0] + run[1]:
            run = (run[0], run[1] + 1)
            continue
        if run is not None:
            yield run
        run = (i, 1)
    if run is not None:
        yield run
