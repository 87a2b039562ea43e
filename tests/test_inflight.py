"""Tests of nwbcache_proxy.inflight: a block in flight keeps its bytes as the
pieces they arrived in; readers and the disk write see exactly the bytes appended,
in order, however they were cut."""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nwbcache_proxy.blockfile import checksum
from nwbcache_proxy.inflight import GATHER_BYTES, KEEP_MIN, InflightBlock


def cuts(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of ``sizes`` (cycled), the last one what is left."""
    pieces, pos, i = [], 0, 0
    while pos < len(data):
        n = max(1, sizes[i % len(sizes)])
        pieces.append(data[pos : pos + n])
        pos, i = pos + n, i + 1
    return pieces


async def read_all(block: InflightBlock, start: int, end: int) -> bytes:
    return b"".join([bytes(c) async for c in block.chunks(start, end)])


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param([256 * 1024], id="one piece"),
        pytest.param([100 * 1024, 156 * 1024], id="two large"),
        pytest.param([1460], id="packets"),
        pytest.param([KEEP_MIN - 1, KEEP_MIN, 1, 70_000], id="mixed"),
        pytest.param([GATHER_BYTES, 3], id="a gathering buffer exactly full"),
    ],
)
async def test_readers_and_parts_see_the_bytes_appended(sizes: list[int]) -> None:
    data = os.urandom(256 * 1024)
    block = InflightBlock(0, len(data))
    for piece in cuts(data, sizes):
        block.append(memoryview(piece))
    assert block.complete
    assert b"".join(bytes(p) for p in block.parts) == data
    assert await read_all(block, 0, len(data)) == data
    assert await read_all(block, 12_345, 200_001) == data[12_345:200_001]


async def test_large_read_only_pieces_are_kept_not_copied() -> None:
    big = os.urandom(KEEP_MIN)
    block = InflightBlock(0, 2 * KEEP_MIN)
    block.append(big)
    block.append(memoryview(b"x" + big)[1:])
    parts = block.parts
    assert len(parts) == 2
    assert parts[0].obj is big  # the caller's bytes themselves


async def test_small_pieces_are_gathered_into_few_parts() -> None:
    """A slow upstream trickles packets: a 256 KiB block in 1460-byte pieces
    is 180 pieces, held as four gathering buffers, not 180 parts."""
    data = os.urandom(256 * 1024)
    block = InflightBlock(0, len(data))
    for piece in cuts(data, [1460]):
        block.append(piece)
    assert len(block.parts) == len(data) // GATHER_BYTES
    assert b"".join(bytes(p) for p in block.parts) == data


async def test_a_writable_piece_is_copied_so_later_changes_do_not_show() -> None:
    buf = bytearray(os.urandom(KEEP_MIN * 2))
    want = bytes(buf)
    block = InflightBlock(0, len(buf))
    block.append(buf)
    buf[:] = bytes(len(buf))
    assert b"".join(bytes(p) for p in block.parts) == want


async def test_views_handed_out_stay_valid_while_the_block_fills() -> None:
    """A transport may keep a view of bytes it was given: appending more must
    not move or change them (a gathering buffer only fills its tail)."""
    data = os.urandom(GATHER_BYTES)
    block = InflightBlock(0, len(data))
    block.append(data[:100])
    early = [c async for c in block.chunks(0, 100)]
    for piece in cuts(data[100:], [1000]):
        block.append(piece)
    assert b"".join(bytes(c) for c in early) == data[:100]


async def test_a_reader_waits_for_bytes_still_to_come() -> None:
    data = os.urandom(3 * KEEP_MIN)
    block = InflightBlock(0, len(data))
    reader = asyncio.create_task(read_all(block, KEEP_MIN, 3 * KEEP_MIN))
    for piece in cuts(data, [KEEP_MIN // 2]):
        await asyncio.sleep(0)
        block.append(piece)
    assert await reader == data[KEEP_MIN:]


async def test_a_failed_fill_fails_its_waiting_readers() -> None:
    block = InflightBlock(0, 2 * KEEP_MIN)
    block.append(os.urandom(KEEP_MIN))
    reader = asyncio.create_task(read_all(block, 0, 2 * KEEP_MIN))
    await asyncio.sleep(0)
    block.fail(ConnectionResetError("cut"))
    with pytest.raises(ConnectionResetError):
        await reader


def test_more_bytes_than_the_block_holds_is_a_bug() -> None:
    block = InflightBlock(0, 10)
    block.append(b"x" * 4)
    with pytest.raises(ValueError, match="11 bytes for a block of 10"):
        block.append(b"x" * 7)
    assert block.filled == 4


def test_pieces_of_mixed_sizes_leave_little_room_unused() -> None:
    """Packets and 16 KiB reads alternating (plain HTTP on a slow link): the
    block's own buffers add at most one gathering buffer to its length."""
    data = os.urandom(256 * 1024)
    block = InflightBlock(0, len(data))
    for piece in cuts(data, [1448, KEEP_MIN]):
        block.append(piece)
    owned = sum(len(p.obj) for p in block.parts if isinstance(p.obj, bytearray))
    assert owned <= len(data) + GATHER_BYTES
    assert b"".join(bytes(p) for p in block.parts) == data


@settings(max_examples=60, deadline=None)
@given(
    st.binary(min_size=1, max_size=200_000),
    st.lists(st.integers(1, 70_000), min_size=1, max_size=6),
    st.booleans(),
)
def test_any_cutting_gives_the_same_block(data: bytes, sizes: list[int], writable: bool) -> None:
    async def fill() -> tuple[bytes, list[memoryview]]:
        block = InflightBlock(3, len(data))
        for piece in cuts(data, sizes):
            block.append(bytearray(piece) if writable else piece)
        return await read_all(block, 0, len(data)), block.parts

    read, parts = asyncio.run(fill())
    assert read == data
    assert b"".join(bytes(p) for p in parts) == data
    assert checksum(2, parts) == checksum(2, [data])
