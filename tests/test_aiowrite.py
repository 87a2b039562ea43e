"""aiowrite.submit: a group's pieces in one io_submit, every byte at its offset; what it
cannot write (read-only buffers, a bad fd, a file-size limit) it leaves to the
caller, saying exactly how far it got; and it lets go of the buffers."""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import random
import resource
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nwbcache_proxy import aiowrite
from nwbcache_proxy.sparse import pwritev_all


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o644)
    yield fd
    os.close(fd)


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[int]]]:
    """The piece lengths of each io_submit batch, as the context was asked."""
    asked: list[list[int]] = []
    real = aiowrite._Context.run

    def recording(self: aiowrite._Context, fd: int, pieces: list[aiowrite.Piece]) -> list[int]:
        asked.append([sum(n for _, n in segments) for segments, _ in pieces])
        return real(self, fd, pieces)

    monkeypatch.setattr(aiowrite._Context, "run", recording)
    yield asked


def _writable(sizes: list[int], seed: int) -> tuple[list[memoryview], bytes]:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(sum(sizes)))
    views, at = [], 0
    for n in sizes:
        views.append(memoryview(data)[at : at + n])
        at += n
    return views, bytes(data)


@pytest.mark.parametrize(
    ("sizes", "piece"),
    [
        ([256 * 1024] * 16, 32 * 1024),  # a 4 MiB group: one batch of RING
        ([256 * 1024] * 4, 4096),  # 256 pieces: batches of RING
        ([5, 0, 70_001, 1, 32 * 1024], 32 * 1024),  # odd views, an empty one
        ([4096] * 1024, 32 * 1024),  # a group of 4 KiB blocks: 8 buffers a write
        ([16] * 3000, 32 * 1024),  # tiny buffers: SEGMENTS a write
    ],
    ids=["group", "batches", "odd", "small-blocks", "tiny"],
)
def test_every_byte_lands_at_its_offset_in_one_submit_per_ring_of_pieces(
    fd: int, batches: list[list[int]], sizes: list[int], piece: int
) -> None:
    views, expected = _writable(sizes, seed=len(sizes))
    offset = 4096 + 3
    assert aiowrite.submit(fd, views, offset, piece) == len(expected)
    assert os.pread(fd, len(expected) + 1, offset) == expected
    lengths = [n for batch in batches for n in batch]
    assert sum(lengths) == len(expected)
    assert max(lengths) <= piece
    assert all(len(batch) <= aiowrite.RING for batch in batches)
    assert len(batches) == -(-len(lengths) // aiowrite.RING)
    # Full pieces, but for the last and those cut at SEGMENTS buffers.
    smallest = min(piece, aiowrite.SEGMENTS * min(n for n in sizes if n))
    assert all(n >= smallest for n in lengths[:-1])


@pytest.mark.parametrize(
    ("sizes", "piece", "expected"),
    [
        ([100], 32, [[(0, 32)], [(32, 32)], [(64, 32)], [(96, 4)]]),
        ([10, 10, 10], 16, [[(0, 10), (1000, 6)], [(1006, 4), (2000, 10)]]),
        ([0, 16], 16, [[(1000, 16)]]),
    ],
)
def test_pieces_are_cut_across_buffers_at_the_piece_size(
    sizes: list[int], piece: int, expected: list[list[tuple[int, int]]]
) -> None:
    addressed = [(1000 * k, n) for k, n in enumerate(sizes)]
    pieces = aiowrite.pieces_of(addressed, 50, piece)
    assert [segments for segments, _ in pieces] == expected
    starts = [50]
    for segments in expected[:-1]:
        starts.append(starts[-1] + sum(n for _, n in segments))
    assert [start for _, start in pieces] == starts


def test_a_piece_gathers_segments_buffers_at_most() -> None:
    pieces = aiowrite.pieces_of([(k * 100, 1) for k in range(200)], 0, 1 << 20)
    assert [len(segments) for segments, _ in pieces] == [64, 64, 64, 8]


def test_read_only_buffers_are_left_to_the_caller_untouched(fd: int) -> None:
    assert aiowrite.submit(fd, [memoryview(b"abc"), memoryview(b"def")], 0, 4096) is None
    assert os.fstat(fd).st_size == 0


def test_a_refused_submission_writes_nothing_and_the_caller_meets_the_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ro"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        views, _ = _writable([100_000], seed=1)
        assert aiowrite.submit(fd, views, 0, 32 * 1024) == 0
        with pytest.raises(OSError) as caught:
            pwritev_all(fd, views, 0)
        assert caught.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_a_write_cut_short_says_how_far_it_got(fd: int) -> None:
    """A file-size limit inside a piece: that piece writes up to it, the rest
    fail; submit counts exactly the bytes up to the limit, and pwritev_all
    then raises the limit's error itself."""
    limit = 100_000  # inside the fourth 32 KiB piece
    views, expected = _writable([256 * 1024], seed=2)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        done = aiowrite.submit(fd, views, 0, 32 * 1024)
        with pytest.raises(OSError) as caught:
            pwritev_all(fd, views, 0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert done == limit
    assert caught.value.errno == errno.EFBIG
    assert os.pread(fd, limit + 1, 0) == expected[:limit]


def test_the_buffers_are_let_go_once_written(fd: int) -> None:
    """A pooled buffer is free when no view of it lives on (inflight.py): the
    submission's own hold must end with it."""
    buf = bytearray(random.Random(3).randbytes(300_000))
    view = memoryview(buf)
    assert aiowrite.submit(fd, [view[:1000], view[1000:]], 0, 32 * 1024) == len(buf)
    view.release()
    buf.append(0)  # BufferError if an export were still held


def test_without_aio_nothing_is_written_and_pwritev_all_writes_call_by_call(
    fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aiowrite, "_unavailable", True)
    views, expected = _writable([70_000, 3], seed=4)
    assert aiowrite.submit(fd, views, 0, 32 * 1024) is None
    assert os.fstat(fd).st_size == 0
    pwritev_all(fd, views, 0)
    assert os.pread(fd, len(expected) + 1, 0) == expected


def test_each_thread_has_its_own_context() -> None:
    """Completions are reaped per context, so two threads must never share one."""
    mine = aiowrite._context()
    assert mine is not None
    theirs: list[aiowrite._Context | None] = []
    t = threading.Thread(target=lambda: theirs.append(aiowrite._context()))
    t.start()
    t.join()
    assert theirs[0] is not None and theirs[0] is not mine
    assert aiowrite._context() is mine


def test_a_forked_child_writes_through_a_context_of_its_own(tmp_path: Path) -> None:
    """A context does not survive a fork: the child makes its own, and the
    parent's goes on working."""
    assert aiowrite._context() is not None  # the parent has one before the fork
    views, expected = _writable([100_000], seed=5)
    path = tmp_path / "child"
    pid = os.fork()
    if pid == 0:  # the child: nothing but the write, then out
        code = 1
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            ok = aiowrite.submit(fd, views, 0, 32 * 1024) == len(expected)
            code = 0 if ok and os.pread(fd, len(expected), 0) == expected else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    fd = os.open(tmp_path / "parent", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert aiowrite.submit(fd, views, 0, 32 * 1024) == len(expected)
    finally:
        os.close(fd)


class FakeSyscalls:
    """aiowrite's system calls through the real ones, with faults on demand:
    ``plan[number]`` lists what each next call of that number does instead
    of the real call: ("errno", E), -1 with errno E; ("cap", n), the real
    call with its count cut to n. Calls past the plan are real."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = aiowrite._libc.syscall
        self.plan: dict[int, list[tuple[str, int]]] = {}
        self.calls: list[int] = []
        monkeypatch.setattr(aiowrite._libc, "syscall", self)

    def __call__(self, number: Any, *args: Any) -> int:
        n = int(number.value)
        self.calls.append(n)
        planned = self.plan.get(n)
        if not planned:
            return int(self.real(number, *args))
        kind, value = planned.pop(0)
        if kind == "errno":
            ctypes.set_errno(value)
            return -1
        ctx, count, rest = args[0], int(args[1].value), args[2:]
        return int(self.real(number, ctx, ctypes.c_long(min(count, value)), *rest))


def _in_a_new_thread(fn: Any) -> Any:
    """``fn()`` in a thread with no context yet; its result (or exception)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def test_a_submission_taken_in_parts_or_interrupted_goes_on(
    fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeSyscalls(monkeypatch)
    fake.plan[aiowrite._SYS_IO_SUBMIT] = [("errno", errno.EINTR), ("cap", 3), ("cap", 5)]
    fake.plan[aiowrite._SYS_IO_GETEVENTS] = [("errno", errno.EINTR)]
    views, expected = _writable([20 * 32 * 1024], seed=6)
    assert _in_a_new_thread(lambda: aiowrite.submit(fd, views, 0, 32 * 1024)) == len(expected)
    assert os.pread(fd, len(expected) + 1, 0) == expected
    assert fake.calls.count(aiowrite._SYS_IO_SUBMIT) >= 4  # interrupted, 3, 5, the rest


def test_a_failed_reaping_drops_the_context_and_the_next_write_makes_one(
    fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeSyscalls(monkeypatch)
    fake.plan[aiowrite._SYS_IO_GETEVENTS] = [("errno", errno.EFAULT)]
    views, expected = _writable([100_000], seed=7)

    def twice() -> tuple[BaseException | None, aiowrite._Context | None, int | None]:
        try:
            aiowrite.submit(fd, views, 0, 32 * 1024)
            first: BaseException | None = None
        except OSError as exc:
            first = exc
        left = getattr(aiowrite._local, "ctx", None)
        return first, left, aiowrite.submit(fd, views, 0, 32 * 1024)

    failure, left, again = _in_a_new_thread(twice)
    assert isinstance(failure, OSError) and failure.errno == errno.EFAULT
    assert left is None, "a context with completions unreaped was kept"
    assert again == len(expected)
    assert os.pread(fd, len(expected) + 1, 0) == expected


def test_io_setup_refused_for_now_means_call_by_call_for_a_while_quietly(
    fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aio-max-nr reached (EAGAIN): no traceback for the half-made context,
    and no new io_setup per write until RETRY_AFTER has passed."""
    fake = FakeSyscalls(monkeypatch)
    fake.plan[aiowrite._SYS_IO_SETUP] = [("errno", errno.EAGAIN)]
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    views, _ = _writable([50_000], seed=8)

    def writes() -> list[int | None]:
        out = [aiowrite.submit(fd, views, 0, 32 * 1024) for _ in range(3)]
        gc.collect()
        return out

    assert _in_a_new_thread(writes) == [None, None, None]
    assert fake.calls.count(aiowrite._SYS_IO_SETUP) == 1
    assert unraisable == []
    assert os.fstat(fd).st_size == 0
    assert not aiowrite._unavailable  # only for a while: not for good
