"""Many buffered writes in one system call: Linux AIO's ``io_submit``, from a disk thread.

Why: sparse.WRITE_PIECE caps a write call at 32 KiB (the page cache's folio
sizes follow the call). A group (filling.py) is then a call per 32 KiB, and
each call's return takes the GIL back from the event loop, which is itself
between two system calls: with 1 MiB groups on two cores that measured ~16
thread switches per group and 0.5 s of CPU per GiB of cold fill, a fifth of
the machine idle in the hand-offs (bench/coldfill.py --size 1G; writing the
groups on the loop instead, as an experiment, took both away). ``io_submit`` runs the writes
of a file opened without O_DIRECT one after another, each its own write as
far as the page cache is concerned, before it returns (Linux performs
buffered AIO synchronously), so a group costs one release of the GIL.

Written by hand over ``ctypes`` (as sparse.py's ``fallocate``): no kept
library wraps ``io_submit``. Where AIO is not there (another machine than
x86_64, seccomp, aio-max-nr reached, a read-only buffer) ``submit`` says so
and the caller writes call by call.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# System call numbers: x86_64's (elsewhere AIO is not used: _MACHINES).
_SYS_IO_SETUP = 206
_SYS_IO_DESTROY = 207
_SYS_IO_GETEVENTS = 208
_SYS_IO_SUBMIT = 209
_MACHINES = ("x86_64", "amd64")
_IOCB_CMD_PWRITEV = 8
# struct iocb (linux/aio_abi.h, little-endian): data, key, rw_flags, opcode,
# reqprio, fildes, buf, nbytes, offset, reserved2, flags, resfd.
_IOCB = struct.Struct("<QIIhhIQQqQII")
_EVENT = struct.Struct("<QQqq")  # struct io_event: data, obj, res, res2
_IOVEC = struct.Struct("<QQ")  # struct iovec: base, length
# Writes one context takes at once (its ring's size; more go in turns): a
# 4 MiB group (filling.py) of 32 KiB pieces.
RING = 128
# Buffers one write gathers at most (a piece of small blocks' buffers).
SEGMENTS = 64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# A write: its buffers' (address, length), and the file offset it starts at.
Piece = tuple[list[tuple[int, int]], int]


class _Context:
    """One thread's AIO context and the memory its submissions are built in."""

    # Set once the context exists: __del__ also runs when __init__ failed.
    _destroy: tuple[Callable[[], int], Callable[[], Any]] | None = None

    def __init__(self) -> None:
        self.pid = os.getpid()  # a context does not survive a fork
        self.ctx = ctypes.c_ulong(0)
        if _libc.syscall(ctypes.c_long(_SYS_IO_SETUP), ctypes.c_long(RING), ctypes.byref(self.ctx)):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.iocbs = ctypes.create_string_buffer(_IOCB.size * RING)
        self.iovecs = ctypes.create_string_buffer(_IOVEC.size * SEGMENTS * RING)
        base = ctypes.addressof(self.iocbs)
        self.pointers = (ctypes.c_void_p * RING)(*(base + _IOCB.size * k for k in range(RING)))
        self.events = ctypes.create_string_buffer(_EVENT.size * RING)
        # Bound now: at interpreter exit the module's globals may go first.
        destroy = functools.partial(_libc.syscall, ctypes.c_long(_SYS_IO_DESTROY), self.ctx)
        self._destroy = (os.getpid, destroy)

    def __del__(self) -> None:
        if self._destroy is not None:
            pid, destroy = self._destroy
            if self.pid == pid():
                destroy()

    def run(self, fd: int, pieces: Sequence[Piece]) -> list[int]:
        """Write pieces (at most RING, of at most SEGMENTS buffers each); per
        piece, the bytes written or -errno."""
        vectors = ctypes.addressof(self.iovecs)
        for k, (segments, offset) in enumerate(pieces):
            first = SEGMENTS * k
            for j, (address, length) in enumerate(segments):
                _IOVEC.pack_into(self.iovecs, _IOVEC.size * (first + j), address, length)
            _IOCB.pack_into(
                self.iocbs, _IOCB.size * k,
                k, 0, 0, _IOCB_CMD_PWRITEV, 0, fd,
                vectors + _IOVEC.size * first, len(segments), offset, 0, 0, 0,
            )  # fmt: skip
        results = [-errno.EIO] * len(pieces)
        submitted = 0
        while submitted < len(pieces):
            n = _libc.syscall(
                ctypes.c_long(_SYS_IO_SUBMIT),
                self.ctx,
                ctypes.c_long(len(pieces) - submitted),
                ctypes.byref(self.pointers, submitted * ctypes.sizeof(ctypes.c_void_p)),
            )
            if n <= 0:
                err = ctypes.get_errno() if n < 0 else errno.EAGAIN
                if n < 0 and err == errno.EINTR:
                    continue
                results[submitted:] = [-err] * (len(pieces) - submitted)
                break
            self._reap(n, results)
            submitted += n
        return results

    def _reap(self, n: int, results: list[int]) -> None:
        """Collect ``n`` completions (done already: the writes were buffered;
        waited for all the same, since the buffers are the caller's)."""
        got = 0
        while got < n:
            r = _libc.syscall(
                ctypes.c_long(_SYS_IO_GETEVENTS),
                self.ctx,
                ctypes.c_long(n - got),
                ctypes.c_long(n - got),
                ctypes.byref(self.events, _EVENT.size * got),
                None,
            )
            if r < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                raise OSError(err, "io_getevents: " + os.strerror(err))
            got += r
        for k in range(n):
            index, _obj, res, _res2 = _EVENT.unpack_from(self.events, _EVENT.size * k)
            results[index] = res


_local = threading.local()
_unavailable = os.uname().machine not in _MACHINES
# After io_setup failed otherwise (EAGAIN: the system's aio-max-nr reached),
# a thread writes call by call this long before it tries again.
RETRY_AFTER = 60.0


def _context() -> _Context | None:
    global _unavailable
    if _unavailable:
        return None
    ctx: _Context | None = getattr(_local, "ctx", None)
    if ctx is not None and ctx.pid == os.getpid():
        return ctx
    if time.monotonic() < getattr(_local, "retry_at", 0.0):
        return None
    try:
        ctx = _Context()
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            _unavailable = True  # not on this system, or not for this process
        else:
            _local.retry_at = time.monotonic() + RETRY_AFTER
        return None
    _local.ctx = ctx
    return ctx


def pieces_of(addressed: Sequence[tuple[int, int]], offset: int, piece: int) -> list[Piece]:
    """Cut buffers (address, length), written one after another from ``offset``,
    into writes of ``piece`` bytes at most (and SEGMENTS buffers)."""
    out: list[Piece] = []
    segments: list[tuple[int, int]] = []
    room = piece
    start = pos = offset
    for address, length in addressed:
        at = 0
        while at < length:
            take = min(room, length - at)
            segments.append((address + at, take))
            at += take
            pos += take
            room -= take
            if not room or len(segments) == SEGMENTS:
                out.append((segments, start))
                segments, room, start = [], piece, pos
    if segments:
        out.append((segments, start))
    return out


def submit(fd: int, views: Sequence[memoryview], offset: int, piece: int) -> int | None:
    """Write ``views`` one after another from ``offset``, ``piece`` bytes a write
    at most. Returns how many bytes from the start are surely written (the
    caller writes the rest, and so meets any error itself), or None if AIO
    cannot be used here (nothing written)."""
    ctx = _context()
    if ctx is None:
        return None
    views = [v for v in views if len(v)]
    try:
        # Each keeps its buffer exported (so in place) until deleted below.
        anchors = [ctypes.c_char.from_buffer(v) for v in views]
    except (TypeError, ValueError, BufferError):  # read-only, or not contiguous
        return None
    addressed = [(ctypes.addressof(a), len(v)) for a, v in zip(anchors, views, strict=True)]
    done = 0
    try:
        pieces = pieces_of(addressed, offset, piece)
        for first in range(0, len(pieces), RING):
            batch = pieces[first : first + RING]
            try:
                results = ctx.run(fd, batch)
            except BaseException:
                # Completions may be left unreaped: a later run must never take
                # one for its own. This thread makes a new context next time.
                _local.ctx = None
                raise
            for (segments, _), result in zip(batch, results, strict=True):
                length = sum(n for _, n in segments)
                if result != length:
                    return done + max(result, 0)
                done += length
        return done
    finally:
        del anchors  # the exports end: a pooled buffer is free again (inflight.py)
