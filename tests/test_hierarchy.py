"""A cache hierarchy: a child daemon fetching its misses from parent daemons (--parent).

Daemons in threads of this process, each with its own cache dir and its own
node id; the origin's log counts what reached upstream, each daemon's
/metrics what it asked of its parents. A parent killed with SIGKILL is in
the process test at the end.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from nwbcache.urls import cache_key, upstream_from_proxy_path
from nwbcache_proxy.appkeys import NODE_ID_KEY
from nwbcache_proxy.parents import rank
from nwbcache_proxy.server import only_if_cached, wants_upstream
from tests.support.daemons import DaemonThread, Spawn
from tests.support.helpers import free_port, get_range, origin_host, proxied, scrape, value
from tests.support.s3emu import S3Emulator

KEY = "/bucket/blobs/tiered"
BS = 64 * 1024
GROUP = 4 * BS

MakeDaemon = Callable[..., DaemonThread]


@pytest.mark.parametrize(
    ("cache_control", "upstream", "offline"),
    [
        (None, False, False),
        ("", False, False),
        ("no-cache", True, False),
        ("No-Cache", True, False),
        ("max-age=0", True, False),
        ('max-age="0"', True, False),
        ("max-age=60", False, False),
        ("no-store", False, False),
        ("only-if-cached", False, True),
        ("max-age=0, only-if-cached", True, True),
        ("no-cache=x-foo", True, False),
    ],
)
def test_cache_control_directives(cache_control: str | None, upstream: bool, offline: bool) -> None:
    assert wants_upstream(cache_control) is upstream
    assert only_if_cached(cache_control) is offline


def _upstream_bytes(daemon: DaemonThread) -> float:
    return value(scrape(daemon.url), "nwbcache_upstream_bytes_total")


def _parent_requests(daemon: DaemonThread, parent: int, outcome: str) -> float:
    return value(
        scrape(daemon.url), "nwbcache_parent_requests_total", parent=str(parent), outcome=outcome
    )


def _origin_bytes(origin: S3Emulator, key: str = KEY) -> int:
    origin.wait_idle()
    return sum(e.bytes_sent for e in origin.requests(key, method="GET"))


def _tiers(make_daemon: MakeDaemon, tmp_path: Path) -> tuple[DaemonThread, list[DaemonThread]]:
    parents = [
        make_daemon(cache_dir=tmp_path / f"parent-{i}", block_size=BS, readahead=4 * BS)
        for i in range(2)
    ]
    child = make_daemon(
        cache_dir=tmp_path / "child",
        block_size=BS,
        readahead=4 * BS,
        parent=tuple(p.url for p in parents),
        parent_group=GROUP,
    )
    return child, parents


def test_a_child_reads_through_two_parents_each_group_from_one(
    origin: S3Emulator, make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    data = os.urandom(16 * GROUP + 1234)
    origin.put(KEY, data)
    child, parents = _tiers(make_daemon, tmp_path)
    url = proxied(child.url, origin, KEY)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda _n: requests.get(url, timeout=60).content, range(4)))
    assert all(body == data for body in bodies)
    # Every byte reached the origin once, asked by a parent, never by the child;
    # beside it, each parent discovers the object once: a GET of block 0.
    from_origin = _origin_bytes(origin)
    by_parents = [_upstream_bytes(p) for p in parents]
    assert len(data) <= from_origin <= len(data) + (len(parents) - 1) * BS
    assert sum(by_parents) == from_origin
    assert all(n >= 3 * GROUP for n in by_parents), by_parents  # both hold a share
    assert _upstream_bytes(child) == len(data)  # the child's bytes all came from parents
    assert _parent_requests(child, 0, "failed") + _parent_requests(child, 1, "failed") == 0
    # A second child (a new cache) costs the origin nothing: the parents have it all.
    second = make_daemon(
        cache_dir=tmp_path / "child-2",
        block_size=BS,
        parent=tuple(p.url for p in parents),
        parent_group=GROUP,
    )
    assert requests.get(proxied(second.url, origin, KEY), timeout=60).content == data
    assert _origin_bytes(origin) == from_origin


def test_with_every_parent_down_the_child_asks_upstream(
    origin: S3Emulator, make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    data = os.urandom(5 * GROUP)
    origin.put(KEY, data)
    dead = (f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}")
    child = make_daemon(
        cache_dir=tmp_path / "child",
        block_size=BS,
        parent=dead,
        parent_group=GROUP,
        retry_attempts=1,  # a failed parent costs no attempt: it is passed over at once
    )
    url = proxied(child.url, origin, KEY)
    assert requests.get(url, timeout=60).content == data
    assert _origin_bytes(origin) == len(data)
    failed = _parent_requests(child, 0, "failed") + _parent_requests(child, 1, "failed")
    assert 1 <= failed <= 4  # each tried, then skipped while backed off
    assert get_range(url, 100, 199).content == data[100:200]  # warm now: no parent asked


def test_a_parent_that_refuses_the_upstream_is_skipped(
    origin: S3Emulator, make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """A parent whose allow-list lacks the host answers 403 of its own: not
    upstream's answer (the object is not private), so the child goes direct."""
    data = os.urandom(3 * BS)
    origin.put(KEY, data)
    narrow = make_daemon(cache_dir=tmp_path / "parent", allow_upstream=("example.org",))
    child = make_daemon(cache_dir=tmp_path / "child", block_size=BS, parent=(narrow.url,))
    r = requests.get(proxied(child.url, origin, KEY), timeout=60)
    assert r.status_code == 200 and r.content == data
    assert _parent_requests(child, 0, "refused") >= 1
    # A refusal is about one request: the parent stays in rotation for others.
    assert _parent_requests(child, 0, "failed") == 0
    assert _origin_bytes(origin) == len(data)


def test_a_loop_of_parents_is_refused_and_still_serves_exact_bytes(
    origin: S3Emulator, make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """A's parent is B and B's parent is A: A asks B, B asks A, A finds itself
    in Via and refuses (508); B goes upstream. One fetch, exact bytes."""
    data = os.urandom(4 * BS)
    origin.put(KEY, data)
    port_a = free_port()
    b = make_daemon(cache_dir=tmp_path / "b", block_size=BS, parent=(f"http://127.0.0.1:{port_a}",))
    a = make_daemon(cache_dir=tmp_path / "a", block_size=BS, parent=(b.url,), port=port_a)
    r = requests.get(proxied(a.url, origin, KEY), timeout=60)
    assert r.status_code == 200 and r.content == data
    assert _origin_bytes(origin) == len(data)
    assert _parent_requests(b, 0, "refused") >= 1  # A refused B
    # A request that names A in its Via is refused by A, with why.
    assert a._app is not None
    node_a = a._app[NODE_ID_KEY]
    looped = requests.get(
        proxied(a.url, origin, KEY), headers={"Via": f"1.1 x-1, 1.1 {node_a}"}, timeout=60
    )
    assert looped.status_code == 508
    assert looped.headers["X-Nwbcache-Error"] == "LoopDetected"
    assert "passed this daemon" in looped.text


def test_private_objects_stay_private_across_tiers(
    origin: S3Emulator, make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """The child's request carries its signature to the parent, which has it
    checked upstream: signed reads get the bytes, unsigned ones upstream's 403."""
    key = "/private/blobs/secret"
    data = os.urandom(3 * BS)
    origin.put(key, data)
    origin.require_signature("/private/")
    child, parents = _tiers(make_daemon, tmp_path)
    signed = origin.presign(key)
    r = requests.get(proxied(child.url, origin, key, signed), timeout=60)
    assert r.status_code == 200 and r.content == data
    anonymous = requests.get(proxied(child.url, origin, key), timeout=60)
    assert anonymous.status_code == 403
    assert data[:100] not in anonymous.content
    fresh = make_daemon(
        cache_dir=tmp_path / "child-2", block_size=BS, parent=tuple(p.url for p in parents)
    )
    assert requests.get(proxied(fresh.url, origin, key), timeout=60).status_code == 403


def test_parents_that_disagree_on_the_version_never_mix_bytes(
    origin: S3Emulator, make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """One parent holds the old version, the other finds the new one: the
    child's If-Match makes the second refuse (412), so a read is one version
    whole, or a truthful error; never bytes of both. The child then asks for
    upstream's word (no-cache), the stale parent revalidates, and the tiers
    agree on the new version."""
    old, new = os.urandom(8 * BS), os.urandom(8 * BS)
    origin.put(KEY, old)
    parents = [
        make_daemon(cache_dir=tmp_path / f"parent-{i}", block_size=BS, readahead=BS)
        for i in range(2)
    ]
    child = make_daemon(
        cache_dir=tmp_path / "child",
        block_size=BS,
        readahead=BS,
        parent=tuple(p.url for p in parents),
        parent_group=BS,  # groups alternate between the parents
    )
    url = proxied(child.url, origin, KEY)
    assert get_range(url, 0, 9).content == old[:10]  # the child and one parent know `old`
    origin.put(KEY, new)  # the other parent will discover `new`
    outcomes = []
    for _ in range(3):
        try:
            r = requests.get(url, timeout=60)
        except requests.exceptions.ChunkedEncodingError:
            outcomes.append("cut short")  # a started response is cut, never completed wrongly
            continue
        assert r.status_code in (200, 502, 503), r.status_code
        if r.status_code == 200:
            assert r.content in (old, new)
            outcomes.append("old" if r.content == old else "new")
        else:
            assert old[:1000] not in r.content and new[:1000] not in r.content
            outcomes.append(str(r.status_code))
    assert outcomes[-1] == "new", outcomes  # converged
    assert "old" not in outcomes[1:], outcomes


def test_a_parent_behind_on_the_version_is_passed_for_upstream(
    origin: S3Emulator, make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """The parent of group 0 knows the new version, another parent still holds
    the old one: that parent's 412 sends the child upstream (If-Match the new
    version) for those groups, and the read is the new version, whole."""
    old, new = os.urandom(8 * BS), os.urandom(8 * BS)
    parents = [
        make_daemon(cache_dir=tmp_path / f"parent-{i}", block_size=BS, readahead=BS)
        for i in range(2)
    ]
    urls = tuple(p.url for p in parents)

    def split(name: str) -> tuple[int, list[int]]:
        """The parent of group 0, and the groups another parent has."""
        key = cache_key(upstream_from_proxy_path(f"/http/{origin_host(origin)}{name}", ""))
        first = rank(list(urls), key, 0)[0]
        return first, [g for g in range(8) if rank(list(urls), key, g)[0] != first]

    # An object whose 8 groups are not all on one parent (1 name in 128 is:
    # the ports, hence the hashes, differ from run to run).
    name = next(f"{KEY}-{n}" for n in range(100) if split(f"{KEY}-{n}")[1])
    first = split(name)[0]
    origin.put(name, old)

    def child(label: str) -> DaemonThread:
        return make_daemon(
            cache_dir=tmp_path / label, block_size=BS, readahead=BS, parent=urls, parent_group=BS
        )

    assert requests.get(proxied(child("child-1").url, origin, name), timeout=60).content == old
    origin.put(name, new)
    confirm = {"Range": "bytes=0-0", "Cache-Control": "no-cache"}
    assert (
        requests.get(proxied(urls[first], origin, name), headers=confirm, timeout=60).content
        == new[:1]
    )
    origin.clear_log()
    r = requests.get(proxied(child("child-2").url, origin, name), timeout=60)
    assert r.status_code == 200 and r.content == new
    # Every block but 0 (the confirmation's) came from upstream once: the
    # groups of the parent that is behind by the child itself, the others by
    # their parent; no read failed over a version and started again.
    origin.wait_idle()
    asked = sorted(
        int((e.range or "").removeprefix("bytes=").split("-")[0]) // BS
        for e in origin.requests(name)
    )
    assert asked == list(range(1, 8)), asked


@pytest.mark.slow  # daemon processes
def test_a_parent_killed_mid_read_costs_exact_bytes(
    origin: S3Emulator, spawn: Spawn, tmp_path: Path
) -> None:
    data = os.urandom(24 * 1024 * 1024)
    key = "/bucket/blobs/tiered-kill"
    origin.put(key, data)
    origin.bandwidth = 8e6
    parents = [spawn(tmp_path / f"parent-{i}") for i in range(2)]
    child = spawn(
        tmp_path / "child",
        *[arg for p in parents for arg in ("--parent", p.url)],
        "--parent-group",
        "4M",
    )
    url = f"{child.url}/http/{origin_host(origin)}{key}"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reader = pool.submit(requests.get, url, timeout=120)
        time.sleep(1.0)
        parents[0].kill9()
        r = reader.result()
    assert r.status_code == 200
    assert r.content == data
    fetched = _origin_bytes(origin, key)
    assert fetched <= len(data) + 8 * 1024 * 1024, (fetched, len(data))  # lost: what was in flight
