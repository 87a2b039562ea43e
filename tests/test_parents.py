"""Parent choice, health and Via (parents.py): pure, table-tested."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from nwbcache.urls import parse_upstream_url
from nwbcache_proxy.config import Settings
from nwbcache_proxy.parents import (
    INBOUND_VIA,
    MAX_HOPS,
    Parents,
    from_nwbcache,
    loops,
    new_node_id,
    parent_unwell,
    parents_own,
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
    results: list[tuple[str, str]] = []
    parents = Parents(
        PARENTS, "me-1", group_bytes=1 << 20, on_result=lambda p, ok: results.append((p, ok))
    )
    first = parents.choose(URL, 0)
    assert first is not None
    assert parents.choose(URL, (1 << 20) - 1) == first  # same group
    parents.record(first, ok=False)
    second = parents.choose(URL, 0)
    assert second is not None and second != first
    parents.record(second, ok=False)
    third = parents.choose(URL, 0)
    assert third not in (None, first, second)
    assert third is not None
    parents.record(third, ok=False)
    assert parents.choose(URL, 0) is None  # every parent down: ask upstream
    assert sorted(parents.down()) == sorted(PARENTS)
    assert results == [(str(first), "failed"), (str(second), "failed"), (str(third), "failed")]


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
    assert parents.via() == "1.1 me-1 (nwbcache)"
    assert via_ids(parents.via()) == ["me-1"] and from_nwbcache(parents.via())
    token = INBOUND_VIA.set("1.1 child-9 (nwbcache)")
    try:
        assert parents.via() == "1.1 child-9 (nwbcache), 1.1 me-1 (nwbcache)"
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


@pytest.mark.parametrize("group", [1 << 19, (1 << 20) + 4096, 3 << 19])
def test_parent_group_is_a_whole_number_of_blocks(group: int) -> None:
    with pytest.raises(ValueError, match="--parent-group must be a whole number of blocks"):
        Settings(block_size=1 << 20, parent_group=group).validate()
    Settings(block_size=1 << 20, parent_group=3 << 20).validate()


def test_a_plain_http_parent_beyond_loopback_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="nwbcache_proxy.parents"):
        Parents(
            ["http://127.0.0.1:8080", "https://lab:8443", "http://localhost:1"], "x", group_bytes=1
        )
        assert not caplog.records
        Parents(["http://labcache:8080"], "x", group_bytes=1)
    (record,) = caplog.records
    assert "http://labcache:8080" in record.getMessage() and "unencrypted" in record.getMessage()


@pytest.mark.parametrize(
    ("via", "child"),
    [
        ("", False),
        ("1.1 squid.example (squid/5.7)", False),  # another proxy: read-ahead stays
        ("1.1 lab-1a2b3c4d (nwbcache)", True),
        ("1.0 fred, 1.1 node-9 (nwbcache)", True),
    ],
)
def test_from_nwbcache(via: str, child: bool) -> None:
    assert from_nwbcache(via) is child


@pytest.mark.parametrize(
    ("status", "kind", "unwell", "own"),
    [
        (206, None, False, False),
        (304, None, False, False),
        (404, "upstream", False, False),  # upstream's 404, passed on
        (403, "upstream", False, False),
        (412, "upstream", False, False),  # the parent's version differs (exchange.py)
        (416, "upstream", False, False),
        (403, "NotAllowed", False, True),  # a host it does not allow
        (400, None, False, True),  # no kind: not upstream's (a proxy in front, aiohttp)
        (508, "LoopDetected", False, True),  # a refusal of this request, not trouble
        (502, "UpstreamUnavailable", True, True),
        (503, "UpstreamDown", True, True),
        (504, None, True, True),
        (429, None, True, True),
    ],
)
def test_whose_answer_a_parents_is(status: int, kind: str | None, unwell: bool, own: bool) -> None:
    headers = {} if kind is None else {"X-Nwbcache-Error": kind}
    assert parent_unwell(status) is unwell
    assert parents_own(status, headers) is own
