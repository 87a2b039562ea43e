"""A fill's groups (filling.RunFill): whole blocks go to disk in groups of
PUBLISH_GROUP_BYTES, one job at a time; a fill that ends part way publishes
the whole blocks it has."""

from __future__ import annotations

import asyncio

import pytest

from nwbcache_proxy.filling import RunFill, WriteBacklog
from nwbcache_proxy.inflight import InflightBlock

BS = 1024


class Disk:
    """A publish that records the groups it is handed and finishes at once."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []

    def publish(self, group: list[InflightBlock]) -> asyncio.Future[list[bool]]:
        self.groups.append([b.index for b in group])
        done: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        done.set_result([True] * len(group))
        return done


async def _fill(fill: RunFill, nbytes: int, chunk: int) -> None:
    """Deliver ``nbytes`` as a connection would: into the sink's space, a
    chunk at a time, waiting when it asks."""
    sent = 0
    while sent < nbytes:
        n = min(chunk, len(fill.space()), nbytes - sent)
        fill.space()[:n] = bytes(n)
        sent += n
        wait = fill.received(n)
        if wait is not None:
            await wait


@pytest.mark.parametrize(
    ("blocks", "group_bytes", "delivered", "expected"),
    [
        (8, 4 * BS, 8 * BS, [[0, 1, 2, 3], [4, 5, 6, 7]]),  # groups of the size asked
        (6, 4 * BS, 6 * BS, [[0, 1, 2, 3], [4, 5]]),  # the run's last group is short
        (6, BS // 2, 6 * BS, [[0], [1], [2], [3], [4], [5]]),  # at least a block a group
        (6, 4 * BS, 5 * BS + 10, [[0, 1, 2, 3], [4]]),  # the body stopped in block 5
    ],
)
async def test_whole_blocks_go_to_disk_in_groups_of_the_size_asked(
    monkeypatch: pytest.MonkeyPatch,
    blocks: int,
    group_bytes: int,
    delivered: int,
    expected: list[list[int]],
) -> None:
    monkeypatch.setattr("nwbcache_proxy.filling.PUBLISH_GROUP_BYTES", group_bytes)
    disk = Disk()
    completed: list[int] = []
    run = [InflightBlock(i, BS) for i in range(blocks)]
    fill = RunFill(run, BS, disk.publish, lambda b: completed.append(b.index))
    await _fill(fill, delivered, chunk=700)
    await fill.close()
    assert disk.groups == expected
    assert completed == [i for g in expected for i in g]  # each told before it is handed on


async def test_a_fill_hands_on_what_is_whole_and_waits_while_writes_are_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Other runs' blocks not yet written fill the process's backlog: this
    run hands its whole blocks to disk at once, short of a group, and takes
    no more bytes until the backlog is back under its limit."""
    monkeypatch.setattr("nwbcache_proxy.filling.PUBLISH_GROUP_BYTES", 4 * BS)
    disk = Disk()
    backlog = WriteBacklog(limit=2 * BS)
    backlog.add(10 * BS)  # the other runs'
    run = [InflightBlock(i, BS) for i in range(4)]
    fill = RunFill(run, BS, disk.publish, lambda b: None, backlog)
    filling = asyncio.ensure_future(_fill(fill, 4 * BS, chunk=BS))
    await asyncio.sleep(0.05)
    assert disk.groups == [[0]] and not filling.done()  # handed on, and held
    assert run[1].filled == 0
    backlog.written(10 * BS)  # theirs are on disk
    await asyncio.wait_for(filling, 5)
    await fill.close()
    assert disk.groups == [[0], [1, 2, 3]]
    assert backlog.bytes == 0  # each block left it once written


def test_a_backlog_wakes_its_waiters_at_half_its_limit() -> None:
    loop = asyncio.new_event_loop()
    try:
        backlog = WriteBacklog(limit=100)
        assert backlog.room() is None
        backlog.add(150)
        waiter = loop.run_until_complete(_room(backlog))
        assert waiter is not None and not waiter.done()
        backlog.written(40)  # 110: still over
        assert not waiter.done()
        backlog.written(10)  # 100: at the limit, not yet room for a group
        assert not waiter.done() and backlog.room() is None
        backlog.written(50)  # 50: half
        assert waiter.done()
    finally:
        loop.close()


async def _room(backlog: WriteBacklog) -> asyncio.Future[None] | None:
    return backlog.room()


async def test_only_groups_handed_to_disk_count_so_a_cancelled_close_leaves_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Blocks count in the backlog once their group is handed to a disk job,
    whose end takes them out: groups a cancelled close never hands on never
    counted, or every later fill would wait for them."""
    monkeypatch.setattr("nwbcache_proxy.filling.PUBLISH_GROUP_BYTES", 2 * BS)
    gate: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
    groups: list[list[int]] = []

    def publish(group: list[InflightBlock]) -> asyncio.Future[list[bool]]:
        groups.append([b.index for b in group])
        return gate  # the first job never ends until the gate opens

    backlog = WriteBacklog(limit=100 * BS)
    run = [InflightBlock(i, BS) for i in range(5)]
    fill = RunFill(run, BS, publish, lambda b: None, backlog)
    waits = []
    for _ in range(4):  # blocks 0 and 1: a group, under way; 2 and 3: queued
        fill.space()[:BS] = bytes(BS)
        waits.append(fill.received(BS))
    assert waits[:3] == [None, None, None] and waits[3] is gate  # the body pauses there
    assert groups == [[0, 1]] and backlog.bytes == 2 * BS  # the queued group: not yet
    # The fetch fails meanwhile (block 4 never comes): its close hands on what is whole.
    closing = asyncio.ensure_future(fill.close())
    await asyncio.sleep(0.01)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert backlog.bytes == 2 * BS  # only the group under way is still owed
    gate.set_result([True, True])
    await asyncio.sleep(0)
    assert backlog.bytes == 0


async def test_groups_queued_behind_a_job_are_all_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A retried request's new connection does not pause where the old one
    did: a second group may come while one waits for the job before. Both
    are written (the second once replaced the first, which was never written)."""
    monkeypatch.setattr("nwbcache_proxy.filling.PUBLISH_GROUP_BYTES", 2 * BS)
    gate: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
    groups: list[list[int]] = []

    def publish(group: list[InflightBlock]) -> asyncio.Future[list[bool]]:
        groups.append([b.index for b in group])
        return gate if len(groups) == 1 else _done([True] * len(group))

    backlog = WriteBacklog(limit=100 * BS)
    run = [InflightBlock(i, BS) for i in range(6)]
    fill = RunFill(run, BS, publish, lambda b: None, backlog)
    for _ in range(6):  # no pause honoured: blocks 2-3 and 4-5 both wait for 0-1's job
        fill.space()[:BS] = bytes(BS)
        fill.received(BS)
    assert groups == [[0, 1]]
    gate.set_result([True, True])
    await fill.close()
    assert groups == [[0, 1], [2, 3, 4, 5]]
    await asyncio.sleep(0)  # the jobs' done-callbacks
    assert backlog.bytes == 0


def _done(value: list[bool]) -> asyncio.Future[list[bool]]:
    done: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
    done.set_result(value)
    return done
