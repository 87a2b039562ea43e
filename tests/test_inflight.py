"""Tests of nwbcache_proxy.inflight: a block in flight is filled in place (a sink's
``space`` then ``advance``) or appended to; readers and the disk write see exactly
the bytes put in, in order, however they were cut; buffers are reused only once
no view of them lives on."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nwbcache_proxy import inflight
from nwbcache_proxy.blockfile import checksum
from nwbcache_proxy.inflight import POOL_MAX, POOL_MIN, POOL_TRIES, BufferPool, InflightBlock


def cuts(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of ``sizes`` (cycled), the last one what is left."""
    pieces, pos, i = [], 0, 0
    while pos < len(data):
        n = max(1, sizes[i % len(sizes)])
        pieces.append(data[pos : pos + n])
        pos, i = pos + n, i + 1
    return pieces


def fill_in_place(block: InflightBlock, piece: bytes) -> None:
    """What a connection does: receive into the block's space, then advance."""
    space = block.space()
    space[: len(piece)] = piece
    block.advance(len(piece))


async def read_all(block: InflightBlock, start: int, end: int) -> bytes:
    return b"".join([bytes(c) async for c in block.chunks(start, end)])


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param([256 * 1024], id="one piece"),
        pytest.param([100 * 1024, 156 * 1024], id="two large"),
        pytest.param([1460], id="packets"),
    ],
)
async def test_readers_and_parts_see_the_bytes_received(sizes: list[int]) -> None:
    data = os.urandom(256 * 1024)
    block = InflightBlock(0, len(data))
    for piece in cuts(data, sizes):
        fill_in_place(block, piece)
    assert await read_all(block, 0, len(data)) == data
    assert b"".join(bytes(p) for p in block.parts) == data
    assert await read_all(block, 1000, 70_000) == data[1000:70_000]


async def test_a_whole_read_only_block_is_kept_not_copied() -> None:
    """A block read from disk (another fetch published it) is appended whole."""
    data = os.urandom(10_000)
    block = InflightBlock(0, len(data))
    block.append(data)
    assert block.complete
    assert block.parts[0].obj is data


async def test_a_writable_piece_is_copied_so_later_changes_do_not_show() -> None:
    buf = bytearray(os.urandom(20_000))
    want = bytes(buf)
    block = InflightBlock(0, len(buf))
    block.append(buf)
    buf[:] = bytes(len(buf))
    assert b"".join(bytes(p) for p in block.parts) == want


async def test_views_handed_out_stay_valid_while_the_block_fills() -> None:
    """A transport may keep a view of bytes it was given: receiving more must
    not change them."""
    data = os.urandom(64 * 1024)
    block = InflightBlock(0, len(data))
    fill_in_place(block, data[:100])
    [first] = [c async for c in block.chunks(0, 100)]
    for piece in cuts(data[100:], [1448]):
        fill_in_place(block, piece)
    assert bytes(first) == data[:100]


async def test_a_reader_waits_for_bytes_still_to_come() -> None:
    data = os.urandom(48 * 1024)
    block = InflightBlock(0, len(data))
    reader = asyncio.create_task(read_all(block, 16 * 1024, len(data)))
    for piece in cuts(data, [8 * 1024]):
        await asyncio.sleep(0)
        fill_in_place(block, piece)
    assert await reader == data[16 * 1024 :]


async def test_a_failed_fill_fails_its_waiting_readers() -> None:
    block = InflightBlock(0, 20_000)
    fill_in_place(block, os.urandom(10_000))
    reader = asyncio.create_task(read_all(block, 0, 20_000))
    await asyncio.sleep(0)
    block.fail(ConnectionResetError("cut"))
    with pytest.raises(ConnectionResetError):
        await reader


def test_more_bytes_than_the_block_holds_is_a_bug() -> None:
    block = InflightBlock(0, 10)
    block.append(b"x" * 4)
    with pytest.raises(ValueError, match="11 bytes for a block of 10"):
        block.append(b"x" * 7)
    with pytest.raises(ValueError, match="4 \\+ 7 bytes for a block of 10"):
        block.advance(7)
    assert block.filled == 4


def test_the_space_offered_is_what_the_block_still_lacks() -> None:
    """A connection receives at most this much: never past the block's end,
    even when the buffer behind it is larger (a short last block)."""
    block = InflightBlock(0, 100_000)
    assert len(block.space()) == 100_000
    fill_in_place(block, b"a" * 30_000)
    assert len(block.space()) == 70_000


@settings(max_examples=60, deadline=None)
@given(
    st.binary(min_size=1, max_size=200_000),
    st.lists(st.integers(1, 70_000), min_size=1, max_size=6),
    st.booleans(),
)
def test_any_cutting_gives_the_same_block(data: bytes, sizes: list[int], in_place: bool) -> None:
    async def fill() -> tuple[bytes, list[memoryview]]:
        block = InflightBlock(3, len(data))
        for piece in cuts(data, sizes):
            if in_place:
                fill_in_place(block, piece)
            else:
                block.append(bytearray(piece))
        return await read_all(block, 0, len(data)), block.parts

    read, parts = asyncio.run(fill())
    assert read == data
    assert b"".join(bytes(p) for p in parts) == data
    assert checksum(2, parts) == checksum(2, [data])


# -- the buffer pool -----------------------------------------------------------


def test_a_buffer_is_reused_once_no_view_of_it_lives_on() -> None:
    """What a block does: keep only a view of the buffer it took."""
    pool = BufferPool()
    first = memoryview(pool.take(256 * 1024))
    second = memoryview(pool.take(256 * 1024))
    assert first.obj is not second.obj  # the first is still viewed
    first_buffer = first.obj
    del first
    assert pool.take(256 * 1024) is first_buffer
    del second


def test_a_buffer_a_transport_or_disk_job_still_views_is_not_reused() -> None:
    """A transport or a disk job may still hold a view of a block's bytes after
    the block itself is gone: those bytes must not be written over."""
    pool = BufferPool()
    block_view = memoryview(pool.take(256 * 1024))
    kept = block_view[10:20]  # a slice handed on, as a reader's chunk is
    buffer = block_view.obj
    del block_view
    taken = [memoryview(pool.take(256 * 1024)) for _ in range(3)]
    assert all(t.obj is not buffer for t in taken)
    del kept
    # Free now: the pool hands it out again within a round of its ring.
    again = [memoryview(pool.take(256 * 1024)) for _ in range(4)]
    assert buffer in [a.obj for a in again]
    del taken, again


def test_blocks_return_their_buffers_to_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks filled one after another, each dropped when done, reuse one buffer."""
    # A pool of its own: tests before this one may have left the process's
    # pool several free buffers of this size, which takes go round in turn.
    monkeypatch.setattr(inflight, "POOL", BufferPool())
    seen = set()
    for _ in range(5):
        block = InflightBlock(0, 256 * 1024)
        space = block.space()
        seen.add(id(space.obj))
        del space
        fill_in_place(block, bytes(256 * 1024))
        del block
    assert len(seen) == 1


def _counted(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """How many times inflight's function ``name`` has been called so far: ``[n]``."""
    count = [0]
    real = getattr(inflight, name)

    def counting(arg: Any) -> Any:
        count[0] += 1
        return real(arg)

    monkeypatch.setattr(inflight, name, counting)
    return count


@pytest.fixture
def looked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many buffers pools have looked at (_unviewed) so far: ``[n]``."""
    return _counted(monkeypatch, "_unviewed")


def test_a_take_looks_at_a_bounded_number_of_buffers(looked: list[int]) -> None:
    """With small blocks thousands of buffers are in flight at once: a take
    must not look at each of them (it did, and that was most of the event
    loop's time in a 4 KiB-block cold fill)."""
    pool = BufferPool()
    held = [memoryview(pool.take(4096)) for _ in range(2000)]  # all in use
    before = looked[0]
    for _ in range(10):
        held.append(memoryview(pool.take(4096)))
    assert looked[0] - before <= 10 * POOL_TRIES
    assert len({id(v.obj) for v in held}) == len(held)  # none handed out twice


def test_a_buffer_held_long_is_passed_over_not_looked_at_every_take() -> None:
    """Blocks usually finish in order, but one may be held (a slow reader):
    the buffers behind it are reused, and it is looked at once a round."""
    pool = BufferPool()
    slow = memoryview(pool.take(4096))
    quick = [memoryview(pool.take(4096)) for _ in range(3)]
    buffers = {id(q.obj) for q in quick}
    del quick
    for _ in range(20):  # blocks filled one after another, each dropped when done
        view = memoryview(pool.take(4096))
        assert view.obj is not slow.obj
        assert id(view.obj) in buffers  # no new buffer while free ones are there
        del view


@pytest.mark.parametrize(
    ("size", "capacity"),
    [
        pytest.param(1, POOL_MIN, id="tiny: the smallest class"),
        pytest.param(POOL_MIN + 1, 2 * POOL_MIN, id="the class above"),
        pytest.param(256 * 1024, 256 * 1024, id="a power of two: its own"),
        pytest.param(POOL_MAX + 1, POOL_MAX + 1, id="too large: not pooled, exact"),
    ],
)
def test_size_classes(size: int, capacity: int) -> None:
    assert len(BufferPool().take(size)) == capacity


def test_checking_a_buffer_never_moves_it() -> None:
    """The check tries a byte more: pooled buffers have room for it, so their
    memory never moves (a view taken before a check stays valid)."""
    pool = BufferPool()
    buf = pool.take(256 * 1024)
    allocated = buf.__alloc__()
    view = memoryview(buf)
    del view
    for _ in range(3):
        assert pool.take(256 * 1024) is buf
    assert buf.__alloc__() == allocated and len(buf) == 256 * 1024


def test_the_pool_keeps_at_most_its_bytes() -> None:
    pool = BufferPool(keep_bytes=2 * POOL_MIN)
    held = [memoryview(pool.take(POOL_MIN)) for _ in range(4)]  # all in use: four
    for view in held:
        view[0] = 1  # a pooled buffer keeps its content; a new one is zeroed
    del held, view
    again = [memoryview(pool.take(POOL_MIN)) for _ in range(4)]
    # Only the first two were kept; the other two were let go.
    assert sorted(b[0] for b in again) == [0, 0, 1, 1]


def test_a_pool_told_to_keep_less_lets_the_rest_go() -> None:
    """--buffer-memory sets the process's pool (cache.py): buffers kept beyond
    the new budget are let go at once; one in use stays whole for its holder."""
    pool = BufferPool(keep_bytes=4 * POOL_MIN)
    held = [memoryview(pool.take(POOL_MIN)) for _ in range(4)]  # all kept
    for k, view in enumerate(held):
        view[0] = k + 1
    in_use = held.pop()  # still viewed
    del held, view
    pool.keep(2 * POOL_MIN)
    assert pool.keep_bytes == 2 * POOL_MIN
    again = [memoryview(pool.take(POOL_MIN)) for _ in range(4)]
    # Two of the four were kept (those taken first); the others are new, and
    # the one still viewed was never handed out again.
    assert sorted(b[0] for b in again) == [0, 0, 1, 2]
    assert all(b.obj is not in_use.obj for b in again)
    del again
    pool.keep(8 * POOL_MIN)  # and more again: new buffers are kept up to it, no more
    held = [memoryview(pool.take(POOL_MIN)) for _ in range(8)]  # the two kept, six new
    kept = {id(v.obj) for v in held}
    beyond = memoryview(pool.take(POOL_MIN))  # a ninth at once: not kept
    beyond[0] = 5
    del held, beyond
    again = [memoryview(pool.take(POOL_MIN)) for _ in range(9)]
    assert {id(v.obj) for v in again[:8]} == kept
    assert again[8][0] == 0  # new: the ninth was let go
    assert pool.kept_bytes == 8 * POOL_MIN


def test_the_pool_keeps_its_bytes_for_all_size_classes_together() -> None:
    """A load whose buffers change size (1 MiB reads, then a block at a time)
    keeps the budget once, not once per class: free buffers of the class no
    longer asked for are let go to make room for the one that is."""
    pool = BufferPool(keep_bytes=4 * POOL_MIN)
    small = [memoryview(pool.take(POOL_MIN)) for _ in range(4)]  # the whole budget
    for view in small:
        view[0] = 1  # a pooled buffer keeps its content; a new one is zeroed
    del small, view
    large = [memoryview(pool.take(2 * POOL_MIN)) for _ in range(2)]  # new: the small go
    large_buffers = {id(v.obj) for v in large}
    del large
    again = [memoryview(pool.take(2 * POOL_MIN)) for _ in range(2)]
    assert {id(v.obj) for v in again} == large_buffers  # kept
    small_again = [memoryview(pool.take(POOL_MIN)) for _ in range(2)]
    for view in small_again:
        assert view[0] == 0  # new (zeroed): none of the small ones was kept
    del again, small_again


def test_a_buffer_of_another_class_in_use_is_never_let_go() -> None:
    pool = BufferPool(keep_bytes=2 * POOL_MIN)
    busy = [memoryview(pool.take(POOL_MIN)) for _ in range(2)]  # the whole budget, in use
    busy[0][0] = 7
    large = memoryview(pool.take(2 * POOL_MIN))  # no room: not kept
    large_buffer = large.obj
    del large
    assert pool.take(2 * POOL_MIN) is not large_buffer
    first = busy[0].obj
    del busy
    assert pool.take(POOL_MIN) is first  # still pooled, its bytes untouched
    assert first[0] == 7


def test_other_classes_are_not_looked_at_when_they_could_not_make_room(
    looked: list[int],
) -> None:
    """A class that fills the budget by itself keeps no more, and lets no free
    buffer of another class go for nothing."""
    pool = BufferPool(keep_bytes=5 * POOL_MIN)
    idle = pool.take(POOL_MIN)  # kept, free once the name goes
    idle_id = id(idle)
    del idle
    busy = [memoryview(pool.take(2 * POOL_MIN)) for _ in range(2)]  # 5 of 5 kept
    before = looked[0]
    busy.append(memoryview(pool.take(2 * POOL_MIN)))  # 2 + 4 + 1 > 5: not kept
    assert looked[0] - before == 2  # its own class's two, busy
    assert id(pool.take(POOL_MIN)) == idle_id  # the idle one is still pooled
    del busy


async def test_a_pool_made_ahead_serves_the_next_takes_without_new_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """make_pool fills the pool up to the limit given and never past its
    budget, with free buffers of the size asked for; takes of that size then
    make none."""
    cap = 2 * inflight.MAKE_MIN
    pool = BufferPool(keep_bytes=5 * cap + cap // 2)
    made = _counted(monkeypatch, "_new_buffer")
    assert await inflight.make_pool(pool, cap - 100, 2 * cap) == 2  # up to the limit
    assert await inflight.make_pool(pool, cap - 100, 10 * cap) == 3  # the class of cap
    assert pool.kept_bytes == 5 * cap and made[0] == 5  # the budget, not the limit
    assert await inflight.make_pool(pool, cap, 10 * cap) == 0  # full already
    held = [memoryview(pool.take(cap)) for _ in range(5)]
    assert made[0] == 5  # all five were the pool's
    assert len({id(view.obj) for view in held}) == 5
    extra = memoryview(pool.take(cap))  # a sixth, all five in use: new, not kept
    assert made[0] == 6 and pool.kept_bytes == 5 * cap
    del held, extra


async def test_making_a_pool_gives_the_event_loop_turns() -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    size = inflight.MAKE_MIN
    pool = BufferPool(keep_bytes=4 * inflight.MAKE_STEP * size)
    try:
        made = await inflight.make_pool(pool, size, pool.keep_bytes)
        assert made == 4 * inflight.MAKE_STEP
    finally:
        ticker.cancel()
    assert ticks >= 1 + made // inflight.MAKE_STEP  # a turn after each step, and one before


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(POOL_MAX + 1, id="too large to pool"),
        pytest.param(inflight.MAKE_MIN - 1, id="small: reads would find the pool full of them"),
    ],
)
async def test_no_pool_is_made_of_blocks_too_large_or_too_small(size: int) -> None:
    pool = BufferPool(keep_bytes=4 * POOL_MAX)
    assert await inflight.make_pool(pool, size, pool.keep_bytes) == 0
    assert pool.kept_bytes == 0
