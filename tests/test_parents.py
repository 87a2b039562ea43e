"""Parent choice, health and Via (parents.py): pure, table-tested."""

from __future__ import annotations

from collections import Counter

import pytest

from nwbcache.urls import parse_upstream_url
from nwbcache_proxy.config import Settings
from nwbcache_proxy.parents import (
    INBOUND_VIA,
    MAX_HOPS,
    Parents,
    loops,
    new_node_id,
    rank,
    via_ids,
)

PARENTS = ["http://p0:8080", "http://p1:8080", "http://p2:8080"]
URL = parse_upstream_url("https://dandiarchive.s3.amazonaws.com/blobs/abc/def")


@pytest.mark.parametrize(
    ("via", "ids"),
    [
        ("", []),
        ("1.1 a-1", ["a-1"]),
        ("1.1 a-1, 1.1 b-2", ["a-1", "b-2"]),
        ("1.1 a-1,1.1 b-2 (comment)", ["a-1", "b-2"]),
        ("HTTP/1.1 proxy.example, 1.0 fred", ["proxy.example", "fred"]),
        ("garbage", []),
    ],
)
def test_via_ids(via: str, ids: list[str]) -> None:
    assert via_ids(via) == ids


@pytest.mark.parametrize(
    ("via", "looped"),
    [
        ("", False),
        ("1.1 other-1", False),
        ("1.1 other-1, 1.1 me-1", True),
        ("1.1 me-1", True),
        ("1.1 me-10", False),  # a prefix is not the id
        (", ".join(f"1.1 n{i}" for i in range(MAX_HOPS - 1)), False),
        (", ".join(f"1.1 n{i}" for i in range(MAX_HOPS)), True),
    ],
)
def test_loops(via: str, looped: bool) -> None:
    assert loops(via, "me-1") is looped


def test_node_ids_are_new_at_every_start() -> None:
    assert new_node_id("cache-1").startswith("cache-1-")
    assert new_node_id().startswith("nwbcache-")
    assert new_node_id("x") != new_node_id("x")


def test_rank_is_stable_and_spreads_groups_evenly() -> None:
    key = "https://dandiarchive.s3.amazonaws.com/blobs/abc/def"
    firsts = Counter(rank(PARENTS, key, group)[0] for group in range(3000))
    assert rank(PARENTS, key, 7) == rank(PARENTS, key, 7)
    assert sorted(rank(PARENTS, key, 7)) == [0, 1, 2]
    assert all(900 <= n <= 1100 for n in firsts.values()), firsts


def test_losing_a_parent_moves_only_its_groups() -> None:
    """Rendezvous hashing: without p1, p1's groups go elsewhere, the rest stay."""
    key = "k"
    for group in range(500):
        before = [PARENTS[i] for i in rank(PARENTS, key, group)]
        fewer = [p for p in PARENTS if p != PARENTS[1]]
        after = [fewer[i] for i in rank(fewer, key, group)]
        if before[0] != PARENTS[1]:
            assert after[0] == before[0]
        else:
            assert after[0] == before[1]  # its next-ranked parent


def test_choose_skips_failed_parents_then_goes_upstream() -> None:
    results: list[tuple[str, bool]] = []
    parents = Parents(
        PARENTS, "me-1", group_bytes=1 << 20, on_result=lambda p, ok: results.append((p, ok))
    )
    first = parents.choose(URL, 0)
    assert first is not None
    assert parents.choose(URL, (1 << 20) - 1) == first  # same group
    parents.record(str(first), ok=False)
    second = parents.choose(URL, 0)
    assert second is not None and second != first
    parents.record(str(second), ok=False)
    third = parents.choose(URL, 0)
    assert third not in (None, first, second)
    assert third is not None
    parents.record(str(third), ok=False)
    assert parents.choose(URL, 0) is None  # every parent down: ask upstream
    assert sorted(parents.down()) == sorted(PARENTS)
    assert results == [(str(first), False), (str(second), False), (str(third), False)]


def test_no_parents_means_upstream() -> None:
    parents = Parents([], "me-1", group_bytes=1)
    assert not parents
    assert parents.choose(URL, 0) is None


def test_target_keeps_query_and_signature() -> None:
    parents = Parents(["http://p0:8080/", "https://p1/cache"], "me-1", group_bytes=1)
    signed = parse_upstream_url("https://bucket.s3.amazonaws.com/a/b?versionId=3&X-Amz-Signature=s")
    assert parents.target(0, signed) == (
        "http://p0:8080/https/bucket.s3.amazonaws.com/a/b?versionId=3&X-Amz-Signature=s"
    )
    assert parents.target(1, URL).startswith("https://p1/cache/https/dandiarchive")


def test_via_carries_the_served_requests_chain() -> None:
    parents = Parents(PARENTS, "me-1", group_bytes=1)
    assert parents.via() == "1.1 me-1"
    token = INBOUND_VIA.set("1.1 child-9")
    try:
        assert parents.via() == "1.1 child-9, 1.1 me-1"
    finally:
        INBOUND_VIA.reset(token)


@pytest.mark.parametrize(
    ("parent", "ok"),
    [
        ("http://labcache:8080", True),
        ("https://labcache.example.org/cache", True),
        ("http://10.0.0.5:8080/", True),
        ("labcache:8080", False),
        ("http://labcache:8080?x=1", False),
        ("http://user:pw@labcache:8080", False),
        ("ftp://labcache", False),
    ],
)
def test_parent_urls_are_checked(parent: str, ok: bool) -> None:
    settings = Settings(parent=(parent,))
    if ok:
        settings.validate()
    else:
        with pytest.raises(ValueError, match="--parent"):
            settings.validate()


def test_parent_group_is_at_least_a_block() -> None:
    with pytest.raises(ValueError, match="--parent-group"):
        Settings(block_size=1 << 20, parent_group=1 << 19).validate()
