"""Tests of nwbcache_proxy.marks.BlockMarks: bits per block, chunks forgotten
least recently used first, and a model check against a set of (version,
block) pairs with the same chunk bound.

Each table case is a sequence of operations on fresh marks with the outcome
of each; the property runs random sequences against a reference built of a
plain set and a list of chunks in recency order.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nwbcache_proxy.marks import CHUNK_BLOCKS, BlockMarks

C = CHUNK_BLOCKS
# An operation: ("add", version, block) -> None, ("has", version, block) and
# ("discard", version, block) -> bool, ("len",) -> chunks held.
Op = tuple[Any, ...]


def run(marks: BlockMarks, op: Op) -> object:
    match op:
        case ("add", version, block):
            marks.add(version, block)
            return None
        case ("has", version, block):
            return marks.has(version, block)
        case ("discard", version, block):
            return marks.discard(version, block)
        case ("has_all", version, lo, hi):
            return marks.has_all(version, range(lo, hi))
        case ("add_all", version, lo, hi):
            marks.add_all(version, range(lo, hi))
            return None
        case ("len",):
            return len(marks)
    raise AssertionError(f"unknown operation {op!r}")


CASES: list[Any] = [
    # (id, chunks, [(operation, result), ...])
    ("empty", 2, [(("has", "a", 0), False), (("discard", "a", 0), False), (("len",), 0)]),
    (
        "a mark is its block's alone",
        2,
        [
            (("add", "a", 5), None),
            (("has", "a", 5), True),
            (("has", "a", 4), False),
            (("has", "a", 6), False),
            (("has", "b", 5), False),
            (("has", "a", 5 + C), False),
            (("len",), 1),
        ],
    ),
    (
        "every bit of a byte and of a chunk's ends",
        1,
        [
            *[(("add", "a", i), None) for i in (0, 1, 7, 8, C - 1)],
            *[(("has", "a", i), True) for i in (0, 1, 7, 8, C - 1)],
            *[(("has", "a", i), False) for i in (2, 6, 9, C - 2)],
            (("len",), 1),
        ],
    ),
    (
        "discard takes one mark and says whether it was there",
        2,
        [
            (("add", "a", 3), None),
            (("add", "a", 4), None),
            (("discard", "a", 3), True),
            (("discard", "a", 3), False),
            (("has", "a", 3), False),
            (("has", "a", 4), True),
            (("len",), 1),
        ],
    ),
    (
        "a chunk emptied by discard is let go",
        2,
        [
            (("add", "a", 3), None),
            (("discard", "a", 3), True),
            (("len",), 0),
        ],
    ),
    (
        "the least recently used chunk goes first",
        2,
        [
            (("add", "a", 1), None),
            (("add", "a", C + 1), None),
            (("add", "b", 1), None),
            (("len",), 2),
            (("has", "a", 1), False),
            (("has", "a", C + 1), True),
            (("has", "b", 1), True),
        ],
    ),
    (
        "has makes a chunk recent",
        2,
        [
            (("add", "a", 1), None),
            (("add", "b", 1), None),
            (("has", "a", 1), True),
            (("add", "c", 1), None),
            (("has", "a", 1), True),
            (("has", "b", 1), False),
        ],
    ),
    (
        "a miss in a held chunk makes it recent too",
        2,
        [
            (("add", "a", 1), None),
            (("add", "b", 1), None),
            (("has", "a", 2), False),
            (("add", "c", 1), None),
            (("has", "a", 1), True),
            (("has", "b", 1), False),
        ],
    ),
    (
        "a miss of an absent chunk changes nothing",
        2,
        [
            (("add", "a", 1), None),
            (("add", "b", 1), None),
            (("has", "z", 1), False),
            (("add", "c", 1), None),
            (("has", "a", 1), False),
            (("has", "b", 1), True),
            (("len",), 2),
        ],
    ),
    (
        "a run across chunks, bit by bit",
        3,
        [
            (("add_all", "a", C - 3, C + 2), None),
            (("len",), 2),
            *[(("has", "a", i), True) for i in range(C - 3, C + 2)],
            (("has", "a", C - 4), False),
            (("has", "a", C + 2), False),
            (("has_all", "a", C - 3, C + 2), True),
            (("has_all", "a", C - 4, C + 2), False),
            (("has_all", "a", C - 3, C + 3), False),
            (("has_all", "a", 5, 5), True),
            (("discard", "a", C), True),
            (("has_all", "a", C - 3, C + 2), False),
            (("has_all", "a", C + 1, C + 2), True),
        ],
    ),
    (
        "a second mark in a chunk makes it recent",
        2,
        [
            (("add", "a", 1), None),
            (("add", "b", 1), None),
            (("add", "a", 2), None),
            (("add", "c", 1), None),
            (("has", "a", 1), True),
            (("has", "b", 1), False),
        ],
    ),
]


@pytest.mark.parametrize(("chunks", "steps"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_marks(chunks: int, steps: list[tuple[Op, object]]) -> None:
    marks = BlockMarks(chunks)
    for op, want in steps:
        assert run(marks, op) == want, op


def test_no_chunks_is_refused() -> None:
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        BlockMarks(0)


class Model:
    """The reference: a set of marks, and chunks in recency order."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.marks: set[tuple[str, int]] = set()
        self.order: list[tuple[str, int]] = []  # least recent first

    def _touch(self, key: tuple[str, int]) -> None:
        self.order.remove(key)
        self.order.append(key)

    def run(self, op: Op) -> object:
        if op[0] == "len":
            return len(self.order)
        if op[0] == "has_all":  # all(has(...)): stops at the first unmarked block
            return all(self.run(("has", op[1], i)) for i in range(op[2], op[3]))
        if op[0] == "add_all":
            for i in range(op[2], op[3]):
                self.run(("add", op[1], i))
            return None
        version, block = op[1], op[2]
        key = (version, block // C)
        if op[0] == "add":
            if key in self.order:
                self._touch(key)
            else:
                self.order.append(key)
                if len(self.order) > self.chunks:
                    gone = self.order.pop(0)
                    self.marks = {m for m in self.marks if (m[0], m[1] // C) != gone}
            self.marks.add((version, block))
            return None
        if op[0] == "has":
            if key in self.order:
                self._touch(key)
            return (version, block) in self.marks
        if (version, block) not in self.marks:  # discard
            return False
        self.marks.discard((version, block))
        if not any((m[0], m[1] // C) == key for m in self.marks):
            self.order.remove(key)
        return True


BLOCKS = st.integers(0, 3).flatmap(lambda c: st.integers(c * C, c * C + 9))
RUNS = st.tuples(st.integers(0, 4 * C), st.integers(0, 2 * C + 20)).map(
    lambda t: (t[0], t[0] + t[1])
)
OPS = st.one_of(
    st.tuples(st.sampled_from(["add", "has", "discard"]), st.sampled_from("ab"), BLOCKS),
    st.builds(
        lambda op, v, r: (op, v, *r),
        st.sampled_from(["add_all", "has_all"]),
        st.sampled_from("ab"),
        RUNS,
    ),
    st.just(("len",)),
)


@given(st.integers(1, 4), st.lists(OPS, max_size=60))
def test_marks_agree_with_a_model(chunks: int, ops: list[Op]) -> None:
    marks, model = BlockMarks(chunks), Model(chunks)
    for op in ops:
        assert run(marks, op) == model.run(op), op


def test_a_million_marks_cost_bits_not_objects() -> None:
    # The reason for this module: a scan of 1M blocks over 64 versions held in
    # well under a megabyte (the per-block LRU it replaced: ~190 MB).
    names = [f"{i:02x}/{i:064x}" for i in range(64)]
    tracemalloc.start()
    try:
        marks = BlockMarks(4096)
        for i in range(1_000_000):
            marks.add(names[i % 64], i // 64)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(marks.has(names[i % 64], i // 64) for i in range(0, 1_000_000, 997))
    assert not marks.has(names[0], 1_000_000)
    assert held < 1_000_000
