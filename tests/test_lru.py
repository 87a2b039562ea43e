"""Tests of nwbcache_proxy.lru.BoundedLRU: the bound, recency, and a model check.

Each table case is a sequence of operations on a fresh map with the outcome
of each; the property runs random sequences against a list-based reference.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nwbcache_proxy.lru import BoundedLRU

# An operation: ("put", key, value) -> None, ("get", key) / ("pop", key) -> value
# or None, ("in", key) -> bool, ("len",) -> int.
Op = tuple[Any, ...]


def run(lru: BoundedLRU[str, int], op: Op) -> object:
    match op:
        case ("put", key, value):
            lru.put(key, value)
            return None
        case ("get", key):
            return lru.get(key)
        case ("pop", key):
            return lru.pop(key)
        case ("in", key):
            return key in lru
        case ("len",):
            return len(lru)
    raise AssertionError(f"unknown operation {op!r}")


CASES: list[Any] = [
    # (id, capacity, [(operation, result), ...])
    ("empty", 2, [(("len",), 0), (("get", "a"), None), (("in", "a"), False), (("pop", "a"), None)]),
    ("put then get", 2, [(("put", "a", 1), None), (("get", "a"), 1), (("len",), 1)]),
    (
        "fills to capacity",
        3,
        [
            (("put", "a", 1), None),
            (("put", "b", 2), None),
            (("put", "c", 3), None),
            (("len",), 3),
            (("in", "a"), True),
            (("in", "c"), True),
        ],
    ),
    (
        "the oldest goes first",
        2,
        [
            (("put", "a", 1), None),
            (("put", "b", 2), None),
            (("put", "c", 3), None),
            (("len",), 2),
            (("in", "a"), False),
            (("get", "a"), None),
            (("get", "b"), 2),
            (("get", "c"), 3),
        ],
    ),
    (
        "get makes an entry recent",
        2,
        [
            (("put", "a", 1), None),
            (("put", "b", 2), None),
            (("get", "a"), 1),
            (("put", "c", 3), None),
            (("in", "a"), True),
            (("in", "b"), False),
        ],
    ),
    (
        "a get that misses changes nothing",
        2,
        [
            (("put", "a", 1), None),
            (("put", "b", 2), None),
            (("get", "z"), None),
            (("put", "c", 3), None),
            (("in", "a"), False),
            (("in", "b"), True),
            (("len",), 2),
        ],
    ),
    (
        "put of a present key replaces it and makes it recent",
        2,
        [
            (("put", "a", 1), None),
            (("put", "b", 2), None),
            (("put", "a", 10), None),
            (("len",), 2),
            (("put", "c", 3), None),
            (("get", "a"), 10),
            (("in", "b"), False),
        ],
    ),
    (
        "'in' does not make an entry recent",
        2,
        [
            (("put", "a", 1), None),
            (("put", "b", 2), None),
            (("in", "a"), True),
            (("put", "c", 3), None),
            (("in", "a"), False),
        ],
    ),
    (
        "pop removes and returns",
        2,
        [
            (("put", "a", 1), None),
            (("pop", "a"), 1),
            (("pop", "a"), None),
            (("in", "a"), False),
            (("len",), 0),
        ],
    ),
    (
        "pop frees a place",
        2,
        [
            (("put", "a", 1), None),
            (("put", "b", 2), None),
            (("pop", "a"), 1),
            (("put", "c", 3), None),
            (("in", "b"), True),
            (("in", "c"), True),
            (("len",), 2),
        ],
    ),
    (
        "pop of the newest leaves the order of the rest",
        3,
        [
            (("put", "a", 1), None),
            (("put", "b", 2), None),
            (("put", "c", 3), None),
            (("pop", "c"), 3),
            (("put", "d", 4), None),
            (("put", "e", 5), None),
            (("in", "a"), False),
            (("in", "b"), True),
        ],
    ),
    (
        "capacity 1 keeps the last put",
        1,
        [
            (("put", "a", 1), None),
            (("put", "b", 2), None),
            (("get", "a"), None),
            (("get", "b"), 2),
            (("len",), 1),
        ],
    ),
    (
        "capacity 0 keeps nothing",
        0,
        [(("put", "a", 1), None), (("len",), 0), (("get", "a"), None), (("in", "a"), False)],
    ),
    (
        "falsy values are values",
        2,
        [(("put", "a", 0), None), (("get", "a"), 0), (("in", "a"), True), (("pop", "a"), 0)],
    ),
]


@pytest.mark.parametrize(
    ("capacity", "steps"),
    [pytest.param(capacity, steps, id=name) for name, capacity, steps in CASES],
)
def test_operations(capacity: int, steps: list[tuple[Op, object]]) -> None:
    lru: BoundedLRU[str, int] = BoundedLRU(capacity)
    for number, (op, want) in enumerate(steps):
        assert run(lru, op) == want, f"step {number}: {op!r}"


def test_keys_are_compared_by_equality() -> None:
    lru: BoundedLRU[tuple[str, int], str] = BoundedLRU(2)
    lru.put(("k", 1), "v")
    assert lru.get(("k", 1)) == "v"
    assert ("k", 2) not in lru
    assert "not a key of this type" not in lru


def test_values_are_not_copied() -> None:
    value: list[int] = []
    lru: BoundedLRU[str, list[int]] = BoundedLRU(1)
    lru.put("a", value)
    assert lru.get("a") is value
    assert lru.pop("a") is value


def test_a_negative_capacity_is_refused() -> None:
    with pytest.raises(ValueError):
        BoundedLRU[str, int](-1).put("a", 1)


# -- model check ------------------------------------------------------------------------


class Reference:
    """The LRU rule spelled out: a list of (key, value), least recent first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: list[tuple[str, int]] = []

    def find(self, key: str) -> int | None:
        return next((i for i, (k, _) in enumerate(self.items) if k == key), None)

    def get(self, key: str) -> int | None:
        i = self.find(key)
        if i is None:
            return None
        item = self.items.pop(i)
        self.items.append(item)
        return item[1]

    def put(self, key: str, value: int) -> None:
        i = self.find(key)
        if i is not None:
            del self.items[i]
        self.items.append((key, value))
        del self.items[: max(0, len(self.items) - self.capacity)]

    def pop(self, key: str) -> int | None:
        i = self.find(key)
        return None if i is None else self.items.pop(i)[1]


def run_reference(ref: Reference, op: Op) -> object:
    match op:
        case ("put", key, value):
            ref.put(key, value)
            return None
        case ("get", key):
            return ref.get(key)
        case ("pop", key):
            return ref.pop(key)
        case ("in", key):
            return ref.find(key) is not None
        case ("len",):
            return len(ref.items)
    raise AssertionError(f"unknown operation {op!r}")


keys = st.sampled_from("abcdef")
ops = st.one_of(
    st.tuples(st.just("put"), keys, st.integers(-3, 100)),
    st.tuples(st.just("get"), keys),
    st.tuples(st.just("pop"), keys),
    st.tuples(st.just("in"), keys),
    st.tuples(st.just("len")),
)


@given(st.integers(0, 5), st.lists(ops, max_size=60))
def test_behaves_as_the_reference(capacity: int, operations: list[Op]) -> None:
    lru: BoundedLRU[str, int] = BoundedLRU(capacity)
    ref = Reference(capacity)
    for op in operations:
        assert run(lru, op) == run_reference(ref, op), op
        assert len(lru) == len(ref.items) <= capacity
    # The same contents, nothing more.
    assert all(key in lru for key, _ in ref.items)
    for key, value in ref.items:
        assert lru.pop(key) == value
    assert len(lru) == 0


@given(st.integers(1, 8), st.lists(st.tuples(keys, st.integers()), max_size=100))
def test_never_holds_more_than_its_capacity_and_keeps_the_newest(
    capacity: int, puts: list[tuple[str, int]]
) -> None:
    lru: BoundedLRU[str, int] = BoundedLRU(capacity)
    for key, value in puts:
        lru.put(key, value)
        assert len(lru) <= capacity
        assert lru.get(key) == value  # what was just put is never the one evicted
