"""Versions kept open between requests, and reads that never block the loop.

A warm hit used to cost an executor hop to open a file and check its header
(~100 µs of fixed cost in Python for a 4 KiB read). A version's two files
(versionfile.py) are opened once per process and serve every later hit: its
map's entries and its bytes are read on the event loop with
``pread_nowait`` (``RWF_NOWAIT``: EAGAIN instead of waiting for the disk),
and only a page-cache miss goes to a thread. The page cache is the memory
tier, shared by all workers and processes.

The table is bounded in versions (three fds each). An open data file keeps
its space allocated after the version is dropped (evicted whole, or stale),
and a writer holding it would write into an unlinked file, so the
maintenance loop closes versions whose data file has no name left
(``close_unlinked``) and idle ones (``close_idle``).
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import time
from collections import OrderedDict

from .inflight import POOL
from .versionfile import VersionFiles

# Versions kept open per process (three fds each): far more than a lab's
# working set of files, and a tenth of the fd limit the daemon asks for.
OPEN_VERSIONS = 2048
# The file-descriptor limit the daemon raises its soft limit to (the hard
# limit permitting): sockets, version fds and SQLite need room together.
WANTED_NOFILE = 65536
# A version unused this long is closed.
IDLE_SECONDS = 60.0
# Versions checked for an unlinked data file per maintenance pass (an fstat
# each, ~1 µs, on the loop).
UNLINKED_CHECKS = 512
# fds one open version takes (versionfile.VersionFiles: data twice, map).
FDS_PER_VERSION = 3


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
    """Versions to keep open: OPEN_VERSIONS, or fewer when a quarter of the fd
    limit would not hold them."""
    return max(16, min(OPEN_VERSIONS, fd_limit // 4 // FDS_PER_VERSION))


class SharedVersion:
    """An open version shared by readers and writers: closed when the table has
    let it go and the last user has released it."""

    __slots__ = ("_refs", "_retired", "files", "last_used")

    def __init__(self, files: VersionFiles) -> None:
        self.files = files
        self.last_used = time.monotonic()
        self._refs = 0
        self._retired = False

    def acquire(self) -> SharedVersion:
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
        return self.files.data_fd < 0

    def _close_if_done(self) -> None:
        if self._retired and self._refs <= 0 and not self.closed:
            self.files.close()


class OpenVersions:
    """version name -> SharedVersion, least recently used first out. Used on the
    event loop only (disk threads get a version acquired, and release it
    through the loop)."""

    def __init__(self, capacity: int = OPEN_VERSIONS) -> None:
        self.capacity = capacity
        self._open: OrderedDict[str, SharedVersion] = OrderedDict()
        self._sweep_from = 0  # where close_unlinked goes on

    def __len__(self) -> int:
        return len(self._open)

    def get(self, name: str) -> SharedVersion | None:
        """The version, acquired (the caller releases it), or None."""
        shared = self._open.get(name)
        if shared is None:
            return None
        self._open.move_to_end(name)
        return shared.acquire()

    def current(self, name: str) -> SharedVersion | None:
        """The version's open files, not acquired (an identity to compare), or None."""
        shared = self._open.get(name)
        return None if shared is None or shared.closed else shared

    def adopt(self, name: str, files: VersionFiles) -> SharedVersion:
        """Take ownership of an open version; returns it acquired for the caller.
        One opened by two requests at once: the first one stays, the second
        is closed (when its users are done) and the first handed back."""
        old = self._open.get(name)
        if old is not None and not old.closed:
            SharedVersion(files).retire()
            return self.get(name) or old.acquire()
        shared = SharedVersion(files).acquire()
        self._open[name] = shared
        while len(self._open) > self.capacity:
            _, evicted = self._open.popitem(last=False)
            evicted.retire()
        return shared

    def forget(self, name: str) -> None:
        shared = self._open.pop(name, None)
        if shared is not None:
            shared.retire()

    def close_idle(self, older_than: float = IDLE_SECONDS) -> int:
        """Close versions unused for ``older_than`` seconds; returns how many."""
        cutoff = time.monotonic() - older_than
        stale = [k for k, v in self._open.items() if v.last_used < cutoff]
        for name in stale:
            self._open.pop(name).retire()
        return len(stale)

    def close_unlinked(self, limit: int = UNLINKED_CHECKS) -> int:
        """Close versions whose data file was unlinked (by any process), looking at
        up to ``limit`` of the least recently used per call, round-robin: their
        fds would keep the space allocated, so the cache's bound would not hold
        on the disk. Returns how many were closed."""
        closed = 0
        names = list(itertools.islice(self._open, self._sweep_from, self._sweep_from + limit))
        self._sweep_from = 0 if len(names) < limit else self._sweep_from + limit
        for name in names:
            shared = self._open.get(name)
            if shared is None or shared.closed:
                continue
            try:
                gone = shared.files.dropped()
            except OSError:
                gone = True
            if gone:
                self._open.pop(name).retire()
                closed += 1
        return closed

    def close_all(self) -> None:
        while self._open:
            _, shared = self._open.popitem()
            shared.retire()


def pread_nowait(fd: int, length: int, offset: int) -> memoryview | None:
    """``length`` bytes at ``offset`` if the page cache holds them all, else None.
    A view of a pooled buffer (inflight.POOL, the fills' own: free again
    once no view of it lives on; a response holds it until the socket has
    taken it): a fresh buffer cost its zeroing and page faults, 2.5x the read of a
    256 KiB block from the page cache.

    Never waits for the disk, so it is safe on the event loop. None also when
    the kernel or filesystem does not support RWF_NOWAIT: the caller then
    reads in a thread, as it would on a page-cache miss.
    """
    view = memoryview(POOL.take(length))[:length]
    try:
        got = os.preadv(fd, [view], offset, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None
        raise
    if got != length:  # partly cached, or a short file: let the thread read it all
        return None
    return view
