"""sparse.pwritev_all: every byte where it belongs, however the views are cut,
in writes of WRITE_PIECE bytes at most (all in one io_submit for writable
buffers, else call by call), resuming after short writes."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwbcache_proxy import aiowrite
from nwbcache_proxy.sparse import WRITE_PIECE, pwritev_all


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The byte counts each real os.pwritev call was asked to write."""
    asked: list[int] = []
    real = os.pwritev

    def recording(fd: int, buffers: list[memoryview], offset: int) -> int:
        asked.append(sum(len(b) for b in buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", recording)
    yield asked


@pytest.fixture
def submitted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The byte counts of each write handed to io_submit (aiowrite.py)."""
    asked: list[int] = []
    real = aiowrite._Context.run

    def recording(self: aiowrite._Context, fd: int, pieces: list[aiowrite.Piece]) -> list[int]:
        asked.extend(sum(n for _, n in segments) for segments, _ in pieces)
        return real(self, fd, pieces)

    monkeypatch.setattr(aiowrite._Context, "run", recording)
    yield asked


def _views(
    sizes: list[int], seed: int, *, writable: bool = False
) -> tuple[list[memoryview], bytes]:
    """Views of random bytes; read-only ones (bytes) go call by call."""
    rng = random.Random(seed)
    parts = [rng.randbytes(n) for n in sizes]
    if writable:
        return [memoryview(bytearray(p)) for p in parts], b"".join(parts)
    return [memoryview(p) for p in parts], b"".join(parts)


@pytest.mark.parametrize(
    "sizes",
    [
        [256 * 1024],  # one block
        [256 * 1024] * 4,  # a group of four blocks
        [WRITE_PIECE],
        [WRITE_PIECE - 1, 2, WRITE_PIECE],  # a piece boundary inside a view
        [1, 0, 7, 100_000, 0, 300_000, 3],  # empty views, odd sizes
        [16] * 3000,  # more views than IOV_MAX (1024) in one piece
    ],
    ids=["block", "group", "piece", "straddle", "odd", "many"],
)
@pytest.mark.parametrize("how", ["call by call", "io_submit"])
def test_every_byte_lands_at_its_offset_in_writes_of_a_piece_at_most(
    tmp_path: Path, calls: list[int], submitted: list[int], sizes: list[int], how: str
) -> None:
    views, expected = _views(sizes, seed=len(sizes), writable=how == "io_submit")
    offset = 3 * 4096 + 17
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        pwritev_all(fd, views, offset)
        assert os.pread(fd, len(expected) + 10, offset) == expected
        assert os.fstat(fd).st_size == offset + len(expected)
    finally:
        os.close(fd)
    if how == "io_submit":
        assert calls == []
        calls = submitted
    else:
        assert submitted == []
    assert sum(calls) == len(expected)
    assert max(calls) <= WRITE_PIECE
    # No more writes than the pieces (or IOV_MAX views, or the views) need.
    gathered = aiowrite.SEGMENTS if how == "io_submit" else 1024  # IOV_MAX
    assert len(calls) <= -(-len(expected) // WRITE_PIECE) + len(sizes) // gathered


def test_short_writes_are_resumed_where_they_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that writes less than asked (a signal, a full quota) goes on from
    the first byte not written, mid-view included."""
    real = os.pwritev
    shorts = iter([1, 4095, 70_001, 5])

    def short(fd: int, buffers: list[memoryview], offset: int) -> int:
        n = next(shorts, None)
        if n is None:
            return real(fd, buffers, offset)
        cut: list[memoryview] = []
        for b in buffers:
            cut.append(b[:n])
            n -= len(cut[-1])
            if not n:
                break
        return real(fd, cut, offset)

    monkeypatch.setattr(os, "pwritev", short)
    views, expected = _views([3000, 200_000, 1, 90_000], seed=7)
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        pwritev_all(fd, views, 0)
        assert os.pread(fd, len(expected) + 1, 0) == expected
    finally:
        os.close(fd)


def test_a_call_that_writes_nothing_is_an_error_not_a_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "pwritev", lambda fd, buffers, offset: 0)
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError, match="wrote nothing"):
            pwritev_all(fd, [memoryview(b"abc")], 0)
    finally:
        os.close(fd)
