"""A fill's groups (filling.RunFill): whole blocks go to disk in groups of
PUBLISH_GROUP_BYTES, one job at a time; a fill that ends part way publishes
the whole blocks it has."""

from __future__ import annotations

import asyncio

import pytest

from nwbcache_proxy.filling import RunFill
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
