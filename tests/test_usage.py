"""usage: what a process recorded until its flush, and a failed flush's batch put back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nwbcache_proxy.usage import Batch, Usage

V = "objects/aa/aaaa/0123.4096"


def _blocks(use: Usage) -> dict[int, tuple[int, bool]]:
    """index -> (bytes, written) of what is waiting (a take, put back)."""
    batch = use.take()
    use.put_back(batch)
    return {i: (b, w) for (_, i), (b, _, w) in batch.blocks.items()}


# Each row: records (index, bytes, written) made before a failed flush took
# them, records made after; what then waits, and its written bytes.
PUT_BACK = [
    ([(0, 10, True)], [], {0: (10, True)}, 10),
    ([(0, 10, True)], [(0, 10, False)], {0: (10, True)}, 10),  # a read after: still owed a row
    ([(0, 10, False)], [(0, 10, True)], {0: (10, True)}, 10),
    ([(0, 10, False)], [(0, 10, False)], {0: (10, False)}, 0),
    (
        [(0, 10, True), (1, 5, False)],
        [(2, 7, True)],
        {0: (10, True), 1: (5, False), 2: (7, True)},
        17,
    ),
]


@pytest.mark.parametrize(("before", "after", "waiting", "written"), PUT_BACK)
def test_a_failed_flush_puts_its_batch_back_under_newer_records(
    before: list[tuple[int, int, bool]],
    after: list[tuple[int, int, bool]],
    waiting: dict[int, tuple[int, bool]],
    written: int,
) -> None:
    use = Usage()
    for i, n, w in before:
        use.record(V, i, n, None, w)
    batch = use.take()
    assert use.empty and use.written_bytes == 0
    for i, n, w in after:
        use.record(V, i, n, None, w)
    use.put_back(batch)
    assert _blocks(use) == waiting
    assert use.written_bytes == written


def test_hits_and_keys_put_back_add_to_newer_ones() -> None:
    use = Usage()
    use.hit(V, 0)
    use.hit(V, 0)
    use.record(V, 0, 10, ("s3://b/old", 10), True)
    batch = use.take()
    use.hit(V, 0)
    use.record(V, 1, 10, ("s3://b/new", 20), True)
    use.put_back(batch)
    again = use.take()
    assert again.hits == {(V, 0): 3}
    assert again.keys == {V: ("s3://b/new", 20)}  # the newer wins


def test_forget_drops_one_version_and_its_written_bytes() -> None:
    use = Usage()
    other = "objects/bb/bbbb/4567.4096"
    use.record(V, 0, 10, None, True)
    use.record(other, 0, 7, None, True)
    use.hit(V, 0)
    use.forget(V)
    assert use.written_bytes == 7
    batch = use.take()
    assert list(batch.blocks) == [(other, 0)] and batch.hits == {}


def test_a_batch_of_keys_alone_is_empty_and_its_keys_go_back() -> None:
    """A flush with no block and no hit to store stores nothing, and keeps the
    keys it took for the rows of the next one."""
    use = Usage()
    use.hit(V, 1)
    batch = use.take()
    assert not batch.empty
    keys_only = Batch({}, {}, {V: ("s3://b/k", 10)})
    assert keys_only.empty
    use.put_back(keys_only)
    assert use.empty and use.take().keys == {V: ("s3://b/k", 10)}


VERSIONS = ["objects/aa/aaaa/0123.4096", "objects/bb/bbbb/4567.4096", "objects/cc/cccc/89ab.4096"]
# An operation: ("record", version, index, bytes, written), ("take",),
# ("put_back", which of the batches taken so far), ("forget", version).
OPERATIONS = st.one_of(
    st.tuples(
        st.just("record"),
        st.sampled_from(VERSIONS),
        st.integers(0, 3),
        st.integers(1, 9),
        st.booleans(),
    ),
    st.tuples(st.just("take")),
    st.tuples(st.just("put_back"), st.integers(0, 5)),
    st.tuples(st.just("forget"), st.sampled_from(VERSIONS)),
)


@given(st.lists(OPERATIONS, max_size=40))
def test_the_written_counts_are_those_of_the_blocks_waiting(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    """Whatever was recorded, taken, put back or forgotten, the written
    bytes, blocks and versions (the pressure check's upper bound of what the
    next flush adds on disk) are those of the written blocks waiting."""
    use, taken = Usage(), []
    for op in ops:
        if op[0] == "record":
            use.record(op[1], op[2], op[3], None, op[4])
        elif op[0] == "take":
            taken.append(use.take())
        elif op[0] == "put_back" and taken:
            use.put_back(taken.pop(op[1] % len(taken)))
        elif op[0] == "forget":
            use.forget(op[1])
        counts = use.written_bytes, use.written_blocks, use.written_versions
        batch = use.take()  # what waits, seen (and put back as it was)
        use.put_back(batch)
        written = [(key, n) for key, (n, _, w) in batch.blocks.items() if w]
        assert counts == (
            sum(n for _, n in written),
            len(written),
            len({v for (v, _), _ in written}),
        )
