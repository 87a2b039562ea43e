"""readahead: the sequential detector and a response's fetch window, as tables."""

from __future__ import annotations

import pytest

from nwbcache_proxy.readahead import SequentialDetector, StreamWindow

BS = 100


@pytest.mark.parametrize(
    ("reads", "expected"),
    [
        # one read: nothing known about what comes next
        ([(0, 100)], [0]),
        # back to back: the window doubles with each read in a row
        ([(0, 100), (100, 200), (200, 300), (300, 400)], [0, 1, 2, 4]),
        # capped at the read-ahead (8 blocks here)
        ([(i * 100, i * 100 + 100) for i in range(7)], [0, 1, 2, 4, 8, 8, 8]),
        # a small gap (h5py chunk scans) still continues: up to one block
        ([(0, 100), (150, 250), (350, 450)], [0, 1, 2]),
        # a gap of more than a block breaks the streak
        ([(0, 100), (201, 300), (300, 400)], [0, 0, 1]),
        # re-reading the same bytes does not count as sequential
        ([(0, 100), (0, 100), (0, 100)], [0, 0, 0]),
        # reading backwards neither
        ([(500, 600), (400, 500), (300, 400)], [0, 0, 0]),
        # a jump resets, then a new streak starts from there
        ([(0, 100), (100, 200), (900, 1000), (1000, 1100)], [0, 1, 0, 1]),
    ],
)
def test_sequential_detector(reads: list[tuple[int, int]], expected: list[int]) -> None:
    detector = SequentialDetector(BS, max_blocks=8)
    assert [detector.blocks_after("k", a, b) for a, b in reads] == expected


def test_no_readahead_fetches_nothing_past_a_sequential_read() -> None:
    detector = SequentialDetector(BS, 0)  # --readahead 0
    assert [detector.blocks_after("a", i * 100, i * 100 + 100) for i in range(4)] == [0] * 4


def test_sequential_detector_keeps_objects_apart() -> None:
    detector = SequentialDetector(BS, max_blocks=8)
    assert detector.blocks_after("a", 0, 100) == 0
    assert detector.blocks_after("b", 100, 200) == 0  # continues a, not b
    assert detector.blocks_after("a", 100, 200) == 1
    assert detector.blocks_after("b", 200, 300) == 1


def test_sequential_detector_forgets_least_recent_objects() -> None:
    detector = SequentialDetector(BS, max_blocks=8, remembered=2)
    detector.blocks_after("a", 0, 100)
    detector.blocks_after("b", 0, 100)
    detector.blocks_after("c", 0, 100)  # a is forgotten
    assert detector.blocks_after("a", 100, 200) == 0
    assert detector.blocks_after("c", 100, 200) == 1


def _walk(window: StreamWindow) -> list[tuple[int, int, tuple[int, int] | None]]:
    """(block, wanted_end when acquiring it, blocks prefetched after it) for each block."""
    out = []
    for i in range(window.first, window.stop):
        wanted = window.wanted_end(i)
        todo = window.after(i)
        out.append((i, wanted, (todo.start, todo.stop) if todo else None))
    return out


@pytest.mark.parametrize(
    ("first", "stop", "eager", "limit", "expected"),
    [
        # a ranged read: the whole range up to the read-ahead at once, topped
        # up when half the window is consumed
        (
            0,
            6,
            True,
            4,
            [(0, 4, None), (1, 5, (4, 6)), (2, 6, None), (3, 6, None), (4, 6, None), (5, 6, None)],
        ),
        # a plain GET: one block first, no growth until the second block, then
        # the window doubles (2, 4, 8) and stays ahead of the reader
        (
            0,
            8,
            False,
            8,
            [
                (0, 1, None),
                (1, 2, (1, 4)),
                (2, 4, (4, 7)),
                (3, 7, (7, 8)),
                (4, 8, None),
                (5, 8, None),
                (6, 8, None),
                (7, 8, None),
            ],
        ),
        # a plain GET of one block: nothing beyond it, ever
        (3, 4, False, 8, [(3, 4, None)]),
        # a range starting mid-object: offsets follow its first block
        (10, 13, True, 2, [(10, 12, None), (11, 13, (12, 13)), (12, 13, None)]),
    ],
)
def test_stream_window(
    first: int,
    stop: int,
    eager: bool,
    limit: int,
    expected: list[tuple[int, int, tuple[int, int] | None]],
) -> None:
    assert _walk(StreamWindow.open(first, stop, eager=eager, limit=limit)) == expected


def test_a_plain_get_abandoned_after_its_first_block_asked_for_one_block() -> None:
    """remfile's size probe: GET, read the headers, hang up."""
    window = StreamWindow.open(0, 1000, eager=False, limit=64)
    assert window.wanted_end(0) == 1
    assert window.after(0) == range(0)


def test_a_long_plain_get_reaches_the_full_window_and_never_passes_it() -> None:
    window = StreamWindow.open(0, 1000, eager=False, limit=64)
    asked_until = 1
    for i in range(1000):
        asked_until = max(asked_until, window.wanted_end(i))
        todo = window.after(i)
        if todo:
            assert todo.start <= asked_until + 1  # no holes between top-ups
            asked_until = max(asked_until, todo.stop)
        assert asked_until - (i + 1) <= 64  # never more than a window ahead
    assert window.size == 64
    assert asked_until == 1000
