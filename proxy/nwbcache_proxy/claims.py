"""Cross-process claims on upstream work: byte-range locks on one file shared by every daemon.

A process about to fetch blocks from upstream (or to discover an object)
claims them first: a write lock on one byte of ``<root>/fetch.claims`` per
block, at an offset made from the version and the block's index. A process
that finds a claim taken does not fetch: it waits for the file the claimant
publishes (fetcher.py, versions.py). This carries single flight across the
workers of a daemon and every daemon on the cache dir.

A claim never outlives its owner: the kernel drops a process's locks when it
exits, kill -9 included, so a waiter's next poll takes the claim over.

Open file description locks (``F_OFD_SETLK``), not POSIX ``lockf``: a POSIX
lock belongs to the process and goes when the process closes *any* fd of the
file, and two OFD locks taken through one fd never conflict, which is what
one process's own claims want (single flight inside a process is
inflight.py's job). Each process opens its own description (forked workers
must not share one: their claims would not exclude each other).

Failing open: if the file cannot be opened or locked, every claim succeeds,
and processes fetch as they would without claims (exact bytes, only more
upstream traffic); one warning says so.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

# struct flock on Linux (64-bit off_t): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhxxxxqqi4x")
# A version's claims are one range of 2**31 bytes (block indices): 512 TiB of
# 256 KiB blocks. Its start comes from 31 bits of a hash of the version's
# name: two versions that share it only serialise their fetches, never mix
# bytes (a waiter re-reads the disk and fetches what it does not find).
_INDEX_BITS = 31
_INDEX_MASK = (1 << _INDEX_BITS) - 1
# Discovery claims live in their own namespace: the top bit.
_DISCOVERY = 1 << 62
_CONFLICT = (errno.EAGAIN, errno.EACCES)
# A waiter for a claim looks again after this long, doubling up to
# CLAIM_POLL_MAX while it stays taken: a fill publishes its blocks a group at
# a time (a few ms apart at link speed), and a claimant killed mid-fetch is
# taken over within CLAIM_POLL_MAX. Polling, not F_OFD_SETLKW: a thread
# blocked in the kernel could not be cancelled at shutdown.
CLAIM_POLL_FIRST = 0.002
CLAIM_POLL_MAX = 0.025
# A waiter that sees no progress for this long fetches itself, claim or not:
# a claimant that is stopped (SIGSTOP), or stuck on a dead network mount,
# holds its locks without dying. Costs a second fetch, never a hang.
CLAIM_PATIENCE = 60.0


def block_offset(version_name: str, index: int) -> int:
    """The byte of the claims file that stands for block ``index`` of a version."""
    return (_hash31(version_name) << _INDEX_BITS) | (index & _INDEX_MASK)


def discovery_offset(key_hash: str) -> int:
    """The byte that stands for a discovery of the object whose key hashes to ``key_hash``."""
    return _DISCOVERY | (int(key_hash[:15], 16) & (_DISCOVERY - 1))


@functools.lru_cache(maxsize=1024)  # a run takes and releases each block: one hash a version
def _hash31(name: str) -> int:
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF


class Claims:
    """This process's claims on one claims file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = 0
        self._disabled = False

    def _file(self) -> int | None:
        if self._disabled:
            return None
        if self._fd is None or self._pid != os.getpid():
            # A forked child gets its own description: see the module docstring.
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                self._fail(exc)
                return None
            self._pid = os.getpid()
        return self._fd

    def _fail(self, exc: OSError) -> None:
        log.warning(
            "cross-process claims off (%s: %s): processes on this cache dir may fetch "
            "the same blocks",
            self.path,
            exc,
        )
        self._disabled = True
        self.close()  # claims already held go too: nobody may wait on them

    def _lock(self, kind: int, start: int, length: int) -> bool:
        fd = self._file()
        if fd is None:
            return True
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
        except OSError as exc:
            if exc.errno in _CONFLICT:
                return False
            self._fail(exc)
        return True

    def take(self, start: int, length: int = 1) -> bool:
        """Claim bytes [start, start + length), all or none; False when another
        process holds any of them. Taking what this process holds succeeds."""
        return self._lock(fcntl.F_WRLCK, start, length)

    def release(self, start: int, length: int = 1) -> None:
        """Give up this process's claims on these bytes (none held: nothing happens)."""
        self._lock(fcntl.F_UNLCK, start, length)

    def take_blocks(self, version_name: str, first: int, count: int) -> list[bool]:
        """Claim blocks [first, first + count) of a version: which ones this
        process now holds. One lock call when none is held elsewhere."""
        start = block_offset(version_name, first)
        if first + count - 1 <= _INDEX_MASK and self.take(start, count):
            return [True] * count
        return [self.take(block_offset(version_name, i)) for i in range(first, first + count)]

    def take_block(self, version_name: str, index: int) -> bool:
        return self.take(block_offset(version_name, index))

    def release_block(self, version_name: str, index: int) -> None:
        self.release(block_offset(version_name, index))

    def release_blocks(self, version_name: str, first: int, count: int) -> None:
        """Give up blocks [first, first + count): one lock call (a fill's group
        released block by block was most of a cold fill's fcntl calls)."""
        if first + count - 1 <= _INDEX_MASK:
            self.release(block_offset(version_name, first), count)
        else:
            for i in range(first, first + count):
                self.release_block(version_name, i)

    def close(self) -> None:
        """Drop every claim (closing the description does)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
