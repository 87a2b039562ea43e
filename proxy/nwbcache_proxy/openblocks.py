"""Block files kept open between requests, and reads that never block the loop.

A warm hit used to cost an executor hop to open the block file, check its
header and read the span (~100 µs of fixed cost in Python for a 4 KiB read).
Block files are immutable for a version (the path holds the version digest),
so an fd opened and checked once can serve every later hit: no open, no
header, no thread. The page cache is the memory tier, shared by all workers
and processes; ``pread_nowait`` reads from it on the event loop with
``RWF_NOWAIT``, which fails with EAGAIN instead of waiting for the disk, and
only then does the read go to a thread.

The table is bounded in fds. An fd keeps its file's space allocated after
eviction unlinks it, so idle fds are closed by the maintenance loop
(``close_idle``) and a version dropped upstream closes its fds at once.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import time
from collections import OrderedDict

# Fds kept per process: the hot working set of a lab's files (4,096 x 256 KiB
# blocks = 1 GiB). With 1,024, random reads all over a 1 GB file missed the
# table three times in four and paid an open in a thread (bench raw section).
OPEN_BLOCKS = 4096
# The file-descriptor limit the daemon raises its soft limit to (the hard
# limit permitting): sockets, block fds and SQLite need room together.
WANTED_NOFILE = 65536
# An fd unused this long is closed, so space of evicted blocks comes back.
IDLE_SECONDS = 60.0
# Fds checked for an unlinked file per maintenance pass (an fstat each, ~1 µs,
# on the loop): the whole table of 4,096 every 8 s, at ~0.5 ms a pass.
UNLINKED_CHECKS = 512


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE towards WANTED_NOFILE; returns the soft limit.

    systemd and many shells start services with a soft limit of 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_NOFILE if hard == resource.RLIM_INFINITY else min(hard, WANTED_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else WANTED_NOFILE


def table_capacity(fd_limit: int) -> int:
    """Block fds to keep: OPEN_BLOCKS, or a quarter of the fd limit if lower."""
    return max(16, min(OPEN_BLOCKS, fd_limit // 4))


class SharedFd:
    """An open block file shared by readers: closed when the table has let it
    go and the last reader has released it (sendfile may still be using it)."""

    __slots__ = ("_refs", "_retired", "fd", "file_size", "last_used")

    def __init__(self, fd: int, file_size: int) -> None:
        self.fd = fd
        self.file_size = file_size
        self.last_used = time.monotonic()
        self._refs = 0
        self._retired = False

    def acquire(self) -> SharedFd:
        self._refs += 1
        self.last_used = time.monotonic()
        return self

    def release(self) -> None:
        self._refs -= 1
        self._close_if_done()

    def retire(self) -> None:
        self._retired = True
        self._close_if_done()

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def _close_if_done(self) -> None:
        if self._retired and self._refs <= 0 and self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class OpenBlocks:
    """(version key, block index) -> SharedFd, least recently used first out."""

    def __init__(self, capacity: int = OPEN_BLOCKS) -> None:
        self.capacity = capacity
        self._fds: OrderedDict[tuple[str, int], SharedFd] = OrderedDict()
        self._sweep_from = 0  # where close_unlinked goes on

    def __len__(self) -> int:
        return len(self._fds)

    def get(self, vkey: str, index: int) -> SharedFd | None:
        """The block's fd, acquired (the caller releases it), or None."""
        shared = self._fds.get((vkey, index))
        if shared is None:
            return None
        self._fds.move_to_end((vkey, index))
        return shared.acquire()

    def holds(self, vkey: str, index: int) -> bool:
        return (vkey, index) in self._fds

    def adopt(self, vkey: str, index: int, fd: int, file_size: int) -> SharedFd:
        """Take ownership of a checked fd; returns it acquired for the caller."""
        shared = SharedFd(fd, file_size).acquire()
        old = self._fds.pop((vkey, index), None)
        if old is not None:
            old.retire()
        self._fds[(vkey, index)] = shared
        while len(self._fds) > self.capacity:
            _, evicted = self._fds.popitem(last=False)
            evicted.retire()
        return shared

    def forget(self, vkey: str, index: int) -> None:
        shared = self._fds.pop((vkey, index), None)
        if shared is not None:
            shared.retire()

    def drop_version(self, vkey: str) -> None:
        for key in [k for k in self._fds if k[0] == vkey]:
            self._fds.pop(key).retire()

    def close_idle(self, older_than: float = IDLE_SECONDS) -> int:
        """Close fds unused for ``older_than`` seconds; returns how many."""
        cutoff = time.monotonic() - older_than
        stale = [k for k, v in self._fds.items() if v.last_used < cutoff]
        for key in stale:
            self._fds.pop(key).retire()
        return len(stale)

    def close_unlinked(self, limit: int = UNLINKED_CHECKS) -> int:
        """Close fds whose file was unlinked (evicted, by any process), looking at
        up to ``limit`` of the least recently used per call, round-robin: such an
        fd keeps its file's space allocated, so the cache's bound would not hold
        on the disk. Returns how many were closed."""
        closed = 0
        keys = list(itertools.islice(self._fds, self._sweep_from, self._sweep_from + limit))
        self._sweep_from = 0 if len(keys) < limit else self._sweep_from + limit
        for key in keys:
            shared = self._fds.get(key)
            if shared is None or shared.closed:
                continue
            try:
                gone = os.fstat(shared.fd).st_nlink == 0
            except OSError:
                gone = True
            if gone:
                self._fds.pop(key).retire()
                closed += 1
        return closed

    def close_all(self) -> None:
        while self._fds:
            _, shared = self._fds.popitem()
            shared.retire()


def pread_nowait(fd: int, length: int, offset: int) -> bytes | None:
    """``length`` bytes at ``offset`` if the page cache holds them all, else None.

    Never waits for the disk, so it is safe on the event loop. None also when
    the kernel or filesystem does not support RWF_NOWAIT: the caller then
    reads in a thread, as it would on a page-cache miss.
    """
    buf = bytearray(length)
    try:
        got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None
        raise
    if got != length:  # partly cached, or a short file: let the thread read it all
        return None
    return bytes(buf)
