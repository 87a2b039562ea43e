"""A cluster: independent daemons, each with its own cache dir, behind the shipped balancer
configs (deploy/cluster/), run for real on loopback.

Which node answered is the daemon's X-Served-By (--node-name). Upstream bytes
are counted per object in the origin's log; bodies compared with the origin's.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.support.balancers import Balancer
from tests.support.daemons import DaemonProcess, Spawn
from tests.support.helpers import origin_host, system_tool
from tests.support.s3emu import S3Emulator

pytestmark = pytest.mark.slow  # daemons and balancers as processes

KiB = 1024
MiB = 1024 * KiB
TIMEOUT = 60

Cluster = Callable[..., tuple[Balancer, list[DaemonProcess]]]


@pytest.fixture
def cluster(spawn: Spawn, tmp_path: Path) -> Iterator[Cluster]:
    """cluster(kind, n): n daemons named n0.. (own cache dirs) behind the balancer."""
    balancers: list[Balancer] = []

    def start(kind: str, n: int, *flags: str) -> tuple[Balancer, list[DaemonProcess]]:
        system_tool(kind)
        daemons = [
            spawn(tmp_path / f"cache-n{i}", "--node-name", f"n{i}", *flags) for i in range(n)
        ]
        balancer = _balancer(kind, tmp_path / f"{kind}-{len(balancers)}", daemons)
        balancers.append(balancer)
        return balancer, daemons

    yield start
    for balancer in balancers:
        balancer.stop()


def _balancer(kind: str, work: Path, daemons: list[DaemonProcess]) -> Balancer:
    nodes = [d.url.removeprefix("http://") for d in daemons]
    return Balancer(kind, work, nodes).start()


def _put(origin: S3Emulator, count: int, sizes: tuple[int, int], seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    objects = {
        f"/dandiarchive/blobs/{seed}/{i:03d}": os.urandom(rng.randrange(*sizes))
        for i in range(count)
    }
    for key, data in objects.items():
        origin.put(key, data)
    return objects


def _path(origin: S3Emulator, key: str) -> str:
    return f"/http/{origin_host(origin)}{key}"


def _owners(balancer: Balancer, origin: S3Emulator, keys: list[str]) -> dict[str, str]:
    """Which node answers each object (a HEAD through the balancer)."""
    owners = {}
    with requests.Session() as session:
        for key in keys:
            r = session.head(balancer.url + _path(origin, key), timeout=TIMEOUT)
            assert r.status_code == 200, (key, r.status_code)
            owners[key] = r.headers["X-Served-By"]
    return owners


def _read(url: str, size: int, step: int, attempts: int = 6) -> tuple[bytes, set[str]]:
    """The object in ``step``-byte ranges, each retried on failure as remfile
    does; the nodes that answered."""
    pieces = []
    nodes = set()
    with requests.Session() as session:
        for start in range(0, size, step):
            last = min(size, start + step) - 1
            for attempt in range(attempts):
                try:
                    r = session.get(
                        url, headers={"Range": f"bytes={start}-{last}"}, timeout=TIMEOUT
                    )
                    if r.status_code == 206 and len(r.content) == last - start + 1:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.1 * 2**attempt)
            else:
                raise AssertionError(f"{url} bytes {start}-{last}: gave up")
            pieces.append(r.content)
            nodes.add(r.headers["X-Served-By"])
    return b"".join(pieces), nodes


def _fetched(origin: S3Emulator, key: str) -> int:
    return sum(e.bytes_sent for e in origin.requests(key, method="GET"))


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_every_object_has_one_node_and_every_block_is_fetched_once(
    origin: S3Emulator, cluster: Cluster, kind: str
) -> None:
    objects = _put(origin, 24, (100 * KiB, 3 * MiB), seed=1)
    balancer, _daemons = cluster(kind, 3)
    keys = sorted(objects)

    def reader(n: int) -> dict[str, set[str]]:
        order = keys[:]
        random.Random(n).shuffle(order)
        seen = {}
        for key in order:
            body, nodes = _read(balancer.url + _path(origin, key), len(objects[key]), 512 * KiB)
            assert body == objects[key], key
            seen[key] = nodes
        return seen

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        views = list(pool.map(reader, range(6)))
    origin.wait_idle()
    for key in keys:
        answered = set().union(*(view[key] for view in views))
        assert len(answered) == 1, f"{key} was served by {answered}"
        assert _fetched(origin, key) == len(objects[key]), key  # once, cluster-wide
    load = Counter(next(iter(views[0][key])) for key in keys)
    assert set(load) == {"n0", "n1", "n2"}, load  # every node holds a share


def test_a_node_killed_mid_read_costs_only_its_share(origin: S3Emulator, cluster: Cluster) -> None:
    """Readers keep going through nginx while one daemon is killed with SIGKILL:
    every reader finishes byte-exact, the dead node's objects move to the
    others (fetched again, once), and no other object is fetched twice."""
    objects = _put(origin, 18, (1 * MiB, 3 * MiB), seed=2)
    balancer, daemons = cluster("nginx", 3)
    keys = sorted(objects)
    owners = _owners(balancer, origin, keys)  # discovers each object on its node
    victim = Counter(owners.values()).most_common(1)[0][0]
    victim_keys = {k for k, node in owners.items() if node == victim}
    origin.bandwidth = 20e6  # the reads take a few seconds: the kill lands among them

    def reader(n: int) -> None:
        order = keys[:]
        random.Random(n).shuffle(order)
        for key in order:
            body, _ = _read(balancer.url + _path(origin, key), len(objects[key]), 256 * KiB)
            assert body == objects[key], key

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(reader, n) for n in range(6)]
        time.sleep(1.0)
        assert not all(f.done() for f in futures), "the reads ended before the kill"
        daemons[int(victim[1:])].kill9()
        for future in futures:
            future.result()
    origin.wait_idle()
    after = _owners(balancer, origin, keys)
    for key in keys:
        fetched = _fetched(origin, key)
        if key in victim_keys:
            assert after[key] != victim
            assert fetched <= 2 * len(objects[key]), key  # its old node's, then its new one's
        else:
            assert after[key] == owners[key], key  # survivors keep their objects
            assert fetched == len(objects[key]), key


def test_a_fourth_node_takes_about_a_quarter_and_only_from_the_others(
    origin: S3Emulator, cluster: Cluster, spawn: Spawn, tmp_path: Path
) -> None:
    objects = _put(origin, 240, (1_000, 2_000), seed=3)
    balancer, daemons = cluster("nginx", 3)
    keys = sorted(objects)
    before = _owners(balancer, origin, keys)
    balancer.stop()
    daemons.append(spawn(tmp_path / "cache-n3", "--node-name", "n3"))
    grown = _balancer("nginx", tmp_path / "nginx-grown", daemons)
    try:
        after = _owners(grown, origin, keys)
    finally:
        grown.stop()
    moved = [k for k in keys if after[k] != before[k]]
    assert all(after[k] == "n3" for k in moved), "an object moved between old nodes"
    share = len(moved) / len(keys)
    assert 0.12 <= share <= 0.36, share  # consistent hashing: ~1/4, not ~3/4


def test_haproxy_health_checks_take_a_dead_node_out(origin: S3Emulator, cluster: Cluster) -> None:
    """HAProxy asks every daemon's /healthz: after a kill, the dead node's objects
    are answered by the others without a failed request, and nothing else moves."""
    objects = _put(origin, 30, (1_000, 2_000), seed=4)
    balancer, daemons = cluster("haproxy", 3)
    keys = sorted(objects)
    before = _owners(balancer, origin, keys)
    daemons[0].kill9()
    time.sleep(3.0)  # inter 1s, fall 2
    after = _owners(balancer, origin, keys)  # asserts every HEAD succeeded
    for key in keys:
        if before[key] == "n0":
            assert after[key] in ("n1", "n2")
        else:
            assert after[key] == before[key]
    assert "n0" in before.values()
