"""Versions kept open between requests (openversions.py) and the format-3 hit path using them.

Unit tests of the table (bounded, LRU, refcounted retirement, idle closing,
closing versions unlinked elsewhere) on real version files, of
``pread_nowait`` and the fd limit; integration tests through a real daemon
and a real origin: warm hits need no open and no thread, dropped versions
are closed, a block is never served unless its map says it is there (a
block unmapped or locked by another opener, a corrupt block, a block being
evicted under a stream of reads), and a publish into a version unlinked
meanwhile makes its files again.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
import requests

from nwbcache_proxy import blockio, cache, mapfile, openversions, wholeversions
from nwbcache_proxy.mapfile import MapHeader
from nwbcache_proxy.openversions import OpenVersions, SharedVersion, pread_nowait
from nwbcache_proxy.version import Version
from nwbcache_proxy.versionfile import VersionFiles
from tests.support.daemons import DaemonThread
from tests.support.helpers import get_range, proxied, wait_until
from tests.support.s3emu import S3Emulator

BS = 16 * 1024
BLOCKS = 8
T = TypeVar("T")
MakeDaemon = Callable[..., DaemonThread]


# -- helpers -------------------------------------------------------------------


def _fd_is_open_on(fd: int, path: Path) -> bool:
    """Whether fd ``fd`` of this process is open on ``path``, named or unlinked."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return False
    return target in (str(path), f"{path} (deleted)")


def _file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)  # not its ctime: an unlink changes it
    return st.st_dev, st.st_ino


def _fds_on(file_id: tuple[int, int]) -> list[int]:
    """This process's fds open on the file ``_file_id`` described (named or not)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if _file_id(Path(f"/proc/self/fd/{name}")) == file_id:
                found.append(int(name))
        except OSError:
            continue
    return found


def _block(name: str, i: int) -> bytes:
    return random.Random(f"{name}/{i}").randbytes(BS)


class Made:
    """A version's files, opened as the daemon opens them, two blocks written."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.data, self.map = directory / f"{name}.data", directory / f"{name}.map"
        header = MapHeader(BS, 2 * BS, bytes(32))
        files = VersionFiles.open(self.data, self.map, header, create=True)
        assert files is not None
        files.write_group(0, [[_block(name, 0)], [_block(name, 1)]])
        self.files = files
        self.fds = ((files.data_fd, self.data), (files.map_fd, self.map))

    @property
    def open(self) -> bool:
        return all(_fd_is_open_on(fd, path) for fd, path in self.fds)

    @property
    def shut(self) -> bool:
        return not any(_fd_is_open_on(fd, path) for fd, path in self.fds)

    def drop(self) -> None:  # as another process's eviction or drop would
        wholeversions.drop(self.data, self.map)


@pytest.fixture
def versions(tmp_path: Path) -> Iterator[Callable[[str], Made]]:
    """Make versions' files; those the table did not close are closed at teardown."""
    made: list[Made] = []

    def make(name: str) -> Made:
        made.append(Made(tmp_path, name))
        return made[-1]

    yield make
    for m in made:
        m.files.close()  # a no-op for those closed already (their fds are -1)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """openversions.py's view of time.monotonic (only that module's): ``clock.now``."""
    fake = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(openversions, "time", SimpleNamespace(monotonic=lambda: fake.now))
    return fake


def _closed(shared: SharedVersion) -> bool:
    """``shared.closed``, read afresh (mypy would keep a narrowed property)."""
    return shared.closed


def _adopt(table: OpenVersions, m: Made) -> SharedVersion:
    """Adopt and release at once: held by the table only."""
    shared = table.adopt(m.name, m.files)
    shared.release()
    return shared


def _holds(table: OpenVersions, name: str) -> SharedVersion | None:
    """The table's version (it counts as a use: moves it to the end)."""
    shared = table.get(name)
    if shared is not None:
        shared.release()
    return shared


# -- the table -----------------------------------------------------------------


def test_table_is_bounded_and_closes_the_least_recently_used_first(
    versions: Callable[[str], Made],
) -> None:
    table = OpenVersions(capacity=3)
    made = [versions(f"v{n}") for n in range(5)]
    shared = [_adopt(table, m) for m in made[:3]]
    assert len(table) == 3
    assert _holds(table, "v0") is shared[0]  # v0 becomes the most recently used

    fourth = _adopt(table, made[3])
    assert len(table) == 3
    assert _closed(shared[1]) and made[1].shut, "the least recently used (v1) goes, not v0"
    assert not _closed(shared[0]) and made[0].open
    assert table.get("v1") is None

    _adopt(table, made[4])  # order now v2 v0 v3 v4: v2 goes
    assert _closed(shared[2]) and made[2].shut
    assert not _closed(fourth) and not _closed(shared[0]) and len(table) == 3
    assert all(_holds(table, f"v{n}") is not None for n in (0, 3, 4))


def test_a_retired_version_stays_open_while_readers_hold_it_and_close_all(
    versions: Callable[[str], Made],
) -> None:
    table = OpenVersions(capacity=1)
    zero = versions("zero")
    _adopt(table, zero)
    first, second = table.get("zero"), table.get("zero")
    assert first is not None and first is second

    _adopt(table, versions("one"))  # pushes "zero" out of the table
    assert table.get("zero") is None
    assert not _closed(first) and first.files is zero.files
    zero.drop()  # unlinked elsewhere: the open files still read the version
    assert first.files.read_block(1) == _block("zero", 1)

    first.release()
    assert not _closed(first) and zero.open, "a reader still holds it"
    assert second is not None
    second.release()
    assert _closed(first) and zero.shut

    table = OpenVersions()  # shutting down: close_all leaves a held version to its reader
    ma, mb = versions("a"), versions("b")
    a, held = _adopt(table, ma), table.adopt("b", mb.files)
    table.close_all()
    assert len(table) == 0 and _closed(a) and ma.shut
    assert not _closed(held) and mb.open
    held.release()
    assert _closed(held) and mb.shut
    table.close_all()  # again, on an empty table: harmless


def test_adopting_a_version_already_open_keeps_the_first_and_forget_retires_it(
    versions: Callable[[str], Made],
) -> None:
    """Two requests opened one version at once: one set of files is kept. A
    publish that made the files again (they were unlinked) forgets the old
    ones first: those close when their last reader is done, the others stay."""
    table = OpenVersions()
    first, second, similar = versions("v"), versions("w"), versions("v2")
    kept, other = _adopt(table, first), _adopt(table, similar)
    for _ in range(3):  # releasing what the table still holds closes nothing
        assert _holds(table, "v") is kept and first.open
    again = table.adopt("v", second.files)
    assert again is kept and again.files is first.files
    again.release()
    assert second.shut and first.open and len(table) == 2

    held = table.get("v")
    assert held is kept
    third = versions("x")
    table.forget("v")
    table.forget("missing")  # not there: nothing happens
    assert table.get("v") is None and len(table) == 1 and not _closed(other) and similar.open
    replacing = table.adopt("v", third.files)
    replacing.release()
    assert not _closed(held) and first.open, "its reader still holds it"
    held.release()
    assert _closed(held) and first.shut
    assert _holds(table, "v") is replacing and third.open


def test_close_idle_closes_only_versions_unused_for_longer_than_the_threshold(
    versions: Callable[[str], Made], clock: SimpleNamespace
) -> None:
    table = OpenVersions()
    ma, mb, mc = versions("a"), versions("b"), versions("c")
    a = _adopt(table, ma)  # used at t=1000
    reader = table.get("a")  # a long read in a disk thread: acquired at t=1000, then silent
    assert reader is a
    clock.now = 1030.0
    b, c = _adopt(table, mb), _adopt(table, mc)  # t=1030
    clock.now = 1050.0
    assert _holds(table, "c") is c  # a read counts as a use: c last used at t=1050

    clock.now = 1059.0
    assert table.close_idle(60.0) == 0 and len(table) == 3 and not _closed(a)

    clock.now = 1070.0  # a idle 70 s, b 40 s, c 20 s
    assert table.close_idle(60.0) == 1 and table.get("a") is None
    assert not _closed(a) and a.files.read_span(0, 2) == _block("a", 0) + _block("a", 1)
    reader.release()  # the reader is done: now it closes
    assert _closed(a) and ma.shut and not _closed(b) and not _closed(c)
    assert table.close_idle(30.0) == 1
    assert _closed(b) and mb.shut and not _closed(c) and mc.open and len(table) == 1


def test_close_unlinked_closes_versions_dropped_elsewhere_a_slice_at_a_time(
    versions: Callable[[str], Made],
) -> None:
    """Another process dropped (unlinked) versions this one holds open: their
    space comes back as soon as a sweep reaches them, not after 60 s idle."""
    table = OpenVersions()
    made = [versions(f"v{n}") for n in range(10)]
    shared = [_adopt(table, m) for m in made]
    for n in (1, 4, 8):
        made[n].drop()
    reader = table.get("v4")  # being read right now (and now the most recent)
    assert reader is not None
    assert table.close_unlinked(limit=5) == 1  # the least recent five: 0 1 2 3 5
    assert table.close_unlinked(limit=5) == 2  # the next: 7 8 9 4 (6 moved up a place)
    assert table.close_unlinked(limit=5) == 0  # round again: nothing left
    assert all(table.get(f"v{n}") is None for n in (1, 4, 8)) and len(table) == 7
    assert _closed(shared[1]) and made[1].shut and _closed(shared[8]) and made[8].shut
    assert not _closed(reader) and reader.files.read_block(0) == _block("v4", 0)  # until released
    reader.release()
    assert _closed(shared[4]) and made[4].shut
    assert all(not _closed(shared[n]) and made[n].open for n in (0, 2, 3, 5, 6, 7, 9))


# -- pread_nowait, the fd limit ------------------------------------------------------


def _nowait(fd: int, length: int, offset: int) -> bytes | None:
    got = pread_nowait(fd, length, offset)
    return None if got is None else bytes(got)


def test_pread_nowait_reads_the_page_cache_is_none_for_a_short_read_and_raises_errors(
    versions: Callable[[str], Made],
) -> None:
    m = versions("v")
    fd, data = m.files.data_fd, _block("v", 0) + _block("v", 1)
    # Just written, so every page is cached, and tmp_path is on ext4 (or
    # tmpfs), which support RWF_NOWAIT for buffered reads. (Elsewhere it
    # would be None, and the cache would read in a thread instead.)
    assert _nowait(fd, 4096, 100) == data[100:4196]
    assert _nowait(fd, len(data), 0) == data
    assert _nowait(fd, 1, len(data) - 1) == data[-1:]
    assert _nowait(fd, 0, 0) == b""
    assert _nowait(fd, 100, len(data) - 10) is None  # only 10 bytes left
    assert _nowait(fd, 100, len(data)) is None  # at EOF
    assert _nowait(fd, 100, len(data) + 4096) is None  # past EOF
    m.files.close()
    with pytest.raises(OSError) as caught:  # a bug (a closed fd) must not pass as a cache miss
        pread_nowait(fd, 3, 0)
    assert caught.value.errno == errno.EBADF


def test_pread_nowait_is_none_once_the_page_cache_dropped_the_file(
    versions: Callable[[str], Made],
) -> None:
    fd, data = versions("v").files.data_fd, _block("v", 0) + _block("v", 1)
    os.fsync(fd)  # clean pages: DONTNEED only drops pages already written back
    # DONTNEED skips pages the kernel holds at that moment (locked, on an LRU
    # batch of another CPU): under a loaded suite one call left the page
    # cached about one run in ten, so the drop is asked up to 20 times.
    for _ in range(20):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if pread_nowait(fd, 4096, 8192) is None:
            break
        time.sleep(0.05)
    else:
        pytest.fail("pread_nowait kept finding the bytes cached after 20 drops")
    assert os.pread(fd, 4096, 8192) == data[8192:12288]  # a blocking read caches it
    assert _nowait(fd, 4096, 8192) == data[8192:12288]


def test_the_fd_limit_is_raised_and_the_table_leaves_most_of_it_to_sockets() -> None:
    # systemd's default soft limit: a quarter of it, three fds a version.
    capacity = openversions.table_capacity
    assert capacity(1024) == 1024 // 4 // openversions.FDS_PER_VERSION == 85
    assert capacity(65536) == openversions.OPEN_VERSIONS
    assert capacity(10) == 16  # never unusably small
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(before, 512)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # as a stingy shell would
        got = openversions.raise_fd_limit()
        after = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert after >= low
        assert got == after or after == resource.RLIM_INFINITY
        assert after >= min(openversions.WANTED_NOFILE, hard) or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (before, hard))


# -- through the daemon ------------------------------------------------------------


def _in_loop(daemon: DaemonThread, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the daemon's loop (the table belongs to that thread)."""

    async def run() -> T:
        return fn()

    result: T = daemon.call(run())
    return result


def _held(daemon: DaemonThread, v: Version) -> SharedVersion | None:
    """The daemon's open files of this version (the table keeps them)."""
    return _in_loop(daemon, lambda: _holds(daemon.cache.open_versions, v.name))


def _mapped(v: Version, first: int, count: int) -> list[bool]:
    """What the version's map on disk says, through an open of this test's own."""
    files = VersionFiles.open_existing(v.data_path, v.map_path)
    if files is None:
        return [False] * count
    try:
        return files.mapped(first, count)
    finally:
        files.close()


def _gets(origin: S3Emulator) -> list[str | None]:
    origin.wait_idle()
    return [r.range for r in origin.log if r.method == "GET"]


RANGES = [(i * BS + 100, i * BS + 4195) for i in range(BLOCKS)]


def _hit(url: str, data: bytes, a: int, b: int) -> str:
    """GET bytes a..b: exact bytes; returns X-Cache."""
    r = get_range(url, a, b)
    assert r.content == data[a : b + 1]
    return r.headers["X-Cache"]


def _cached_object(origin: S3Emulator, daemon: DaemonThread, key: str) -> tuple[str, bytes]:
    """An object of BLOCKS blocks read through the daemon, cold then warm."""
    data = os.urandom(BLOCKS * BS)
    origin.put(key, data)
    url = proxied(daemon.url, origin, key)
    for a, b in RANGES + RANGES:  # cold, then warm
        _hit(url, data, a, b)
    return url, data


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The versions the daemon's Blocks open (blockio.open_version), by name."""
    opened: list[str] = []
    real = blockio.open_version

    def counting(v: Version, *, create: bool, fsync: bool = False) -> VersionFiles | None:
        opened.append(v.name)
        return real(v, create=create, fsync=fsync)

    monkeypatch.setattr(blockio, "open_version", counting)
    return opened


def test_warm_hits_need_no_open_and_no_thread(
    origin: S3Emulator,
    make_daemon: MakeDaemon,
    monkeypatch: pytest.MonkeyPatch,
    opens: list[str],
) -> None:
    daemon = make_daemon(block_size=BS)
    url, data = _cached_object(origin, daemon, "/b/warm")
    fetched = len(_gets(origin))
    v = daemon.version_of(url)
    shared = _held(daemon, v)
    assert shared is not None

    opens.clear()
    hops: list[Callable[[], Any]] = []  # jobs Blocks hands to its disk threads
    disk = daemon.cache.blocks.disk

    def start(fn: Callable[[], Any]) -> Any:
        hops.append(fn)
        return disk.start(fn)

    async def run(fn: Callable[[], T]) -> T:
        hops.append(fn)
        return await disk.run(fn)

    monkeypatch.setattr(daemon.cache.blocks, "disk", SimpleNamespace(start=start, run=run))
    for _round in range(2):  # every block verified by this process, in the page cache
        for a, b in reversed(RANGES):
            assert _hit(url, data, a, b) == "HIT"
        assert _hit(url, data, BS - 7, 5 * BS + 6) == "HIT"  # several blocks, one copy
    assert opens == [] and hops == [], "a warm hit opened files or went to a thread"
    assert _held(daemon, v) is shared and not _closed(shared)
    assert len(_gets(origin)) == fetched  # and nothing more from the origin

    daemon.stop()  # shutting down closes every version of the table
    assert _closed(shared)


def test_the_table_is_bounded_in_the_daemon_and_closed_versions_are_opened_again(
    origin: S3Emulator,
    make_daemon: MakeDaemon,
    monkeypatch: pytest.MonkeyPatch,
    opens: list[str],
) -> None:
    monkeypatch.setattr(cache, "table_capacity", lambda _limit: 2)
    daemon = make_daemon(block_size=BS)
    objects = [_cached_object(origin, daemon, f"/b/many{n}") for n in range(5)]
    table = daemon.cache.open_versions
    assert _in_loop(daemon, lambda: len(table)) == 2
    resolved = [daemon.version_of(url) for url, _ in objects]
    assert [_held(daemon, v) is not None for v in resolved] == [False] * 3 + [True] * 2
    inodes = [_file_id(v.data_path) for v in resolved[:3]]
    assert all(_fds_on(i) == [] for i in inodes), "a version out of the table kept its fds"

    fetched = len(_gets(origin))
    opens.clear()
    for url, data in objects:  # opened again from disk: still hits, exact
        for a, b in RANGES:
            assert _hit(url, data, a, b) == "HIT"
    assert len(_gets(origin)) == fetched
    assert {v.name for v in resolved[:3]} <= set(opens)
    assert _in_loop(daemon, lambda: len(table)) == 2


@pytest.mark.parametrize("found_by", ["a drop", "revalidation"])
def test_a_new_version_closes_the_old_versions_files(
    origin: S3Emulator, make_daemon: MakeDaemon, found_by: str
) -> None:
    # revalidate_after 0: every request asks upstream first, and finds the change.
    reval = {"revalidate_after": 0.0, "stale_if_error": 0.0} if found_by == "revalidation" else {}
    daemon = make_daemon(block_size=BS, **reval)
    url, _ = _cached_object(origin, daemon, "/b/ver")
    old_v = daemon.version_of(url)
    old = _held(daemon, old_v)
    assert old is not None
    fds = [(old.files.data_fd, old_v.data_path), (old.files.map_fd, old_v.map_path)]
    assert all(_fd_is_open_on(fd, path) for fd, path in fds)

    new = os.urandom(BLOCKS * BS)
    origin.put("/b/ver", new)  # a new version upstream, same size
    if found_by == "a drop":
        daemon.call(daemon.cache.drop_version(old_v))
        assert _closed(old) and _held(daemon, old_v) is None
    for _round in ("cold", "warm: the new version's files"):
        for a, b in RANGES:
            _hit(url, new, a, b)
        assert get_range(url, 0, len(new) - 1).content == new
    assert _closed(old) and _held(daemon, old_v) is None
    assert not any(_fd_is_open_on(fd, path) for fd, path in fds)
    assert not old_v.data_path.exists() and not old_v.map_path.exists()
    new_v = daemon.version_of(url)
    assert new_v.name != old_v.name and _held(daemon, new_v) is not None


def test_a_version_dropped_by_another_process_is_closed_within_a_sweep(
    origin: S3Emulator, make_daemon: MakeDaemon
) -> None:
    """Its fds would keep its space allocated: the upkeep's sweep (every 0.25 s)
    closes it, and the next reads fetch it again, exact."""
    daemon = make_daemon(block_size=BS)
    url, data = _cached_object(origin, daemon, "/b/gone")
    v = daemon.version_of(url)
    shared = _held(daemon, v)
    assert shared is not None
    inode = _file_id(v.data_path)
    assert _fds_on(inode)

    wholeversions.drop(v.data_path, v.map_path)  # as another process's eviction or drop
    wait_until(lambda: _closed(shared), 5, "the sweep closing the dropped version")
    assert _fds_on(inode) == [], "an fd still holds the dropped version's space"
    assert _held(daemon, v) is None

    fetched = len(_gets(origin))
    for a, b in RANGES:  # the files are gone: fetched again, still exact
        assert _hit(url, data, a, b) != "HIT"
    assert len(_gets(origin)) > fetched
    wait_until(lambda: all(_mapped(v, 0, BLOCKS)), 5, "the blocks cached again")
    fetched = len(_gets(origin))
    for a, b in RANGES:
        assert _hit(url, data, a, b) == "HIT"
    assert len(_gets(origin)) == fetched


@pytest.mark.parametrize("how", ["dropped", "emptied and pruned"])
def test_a_publish_into_a_version_unlinked_meanwhile_makes_its_files_again(
    origin: S3Emulator, make_daemon: MakeDaemon, how: str
) -> None:
    """The daemon holds a version open (no sweep closes it here) when another
    process unlinks its files; a block published then must not go into the
    unlinked inode (VersionDropped): its files are made again, and the bytes
    are there after a restart."""
    data = os.urandom(BLOCKS * BS)
    origin.put("/b/again", data)
    daemon = make_daemon(block_size=BS)
    url = proxied(daemon.url, origin, "/b/again")
    for _round in ("cold", "warm"):
        _hit(url, data, 100, 4 * BS - 1)
    v = daemon.version_of(url)
    # The client has its bytes before the last group's entries are written,
    # and the files are held once the write's bookkeeping has run on the loop.
    wait_until(
        lambda: all(_mapped(v, 0, 4)) and _held(daemon, v) is not None, 5, "blocks 0-3 cached"
    )
    old = _held(daemon, v)
    assert old is not None
    old_id = _file_id(v.data_path)
    daemon.call(daemon.cache.upkeep.close())  # no sweep: the unlinked files stay held

    if how == "dropped":
        wholeversions.drop(v.data_path, v.map_path)
        # Held open, the unlinked files still have the version's bytes.
        assert _hit(url, data, 100, 4 * BS - 1) == "HIT"
    else:  # another process's eviction took every block, then the files
        other = VersionFiles.open_existing(v.data_path, v.map_path)
        assert other is not None
        assert other.remove(0, BLOCKS)
        other.close()
        assert wholeversions.prune(v.data_path, v.map_path)
    assert not v.data_path.exists() and not v.map_path.exists()
    assert not _closed(old) and _fds_on(old_id), "the daemon holds the unlinked files"

    assert _hit(url, data, 6 * BS + 10, 6 * BS + 5000) == "MISS"
    wait_until(lambda: _mapped(v, 6, 1) == [True], 5, "block 6 published into new files")
    # The write's bookkeeping (the new files adopted) runs on the loop after it.
    wait_until(lambda: _held(daemon, v) is not old, 5, "the new files held")
    new = _held(daemon, v)
    assert new is not None and _closed(old)
    assert os.fstat(new.files.data_fd).st_ino == os.stat(v.data_path).st_ino
    assert _hit(url, data, 0, len(data) - 1) != "HIT"  # blocks 0-3 went with the old files
    wait_until(lambda: all(_mapped(v, 0, BLOCKS)), 5, "every block in the new files")

    daemon.stop()
    origin.wait_idle()
    origin.clear_log()
    again = make_daemon(block_size=BS)
    url = proxied(again.url, origin, "/b/again")
    assert _hit(url, data, 6 * BS + 10, 6 * BS + 5000) == "HIT"
    assert _hit(url, data, 0, len(data) - 1) == "HIT"
    assert _gets(origin) == []


def test_a_block_another_opener_unmaps_or_locks_is_not_served_from_the_page_cache(
    origin: S3Emulator, make_daemon: MakeDaemon
) -> None:
    """The warm-hit path takes the read lock and reads the map: a block another
    process is evicting (write-locked) or has evicted (unmapped, punched: its
    pages read as zeros) is fetched again, never served from the page cache."""
    daemon = make_daemon(block_size=BS)
    url, data = _cached_object(origin, daemon, "/b/other")
    v = daemon.version_of(url)
    assert _hit(url, data, *RANGES[3]) == "HIT"
    fetched = len(_gets(origin))
    other = VersionFiles.open_existing(v.data_path, v.map_path)
    assert other is not None
    try:
        assert other.try_lock(3, 1)  # an eviction under way
        assert _hit(url, data, *RANGES[3]) == "MISS"
        assert _hit(url, data, *RANGES[2]) == "HIT"
        assert len(_gets(origin)) == fetched + 1
        other.unlock(3, 1)
        wait_until(lambda: _hit(url, data, *RANGES[3]) == "HIT", 8, "a hit once unlocked")
        assert len(_gets(origin)) == fetched + 1

        assert other.remove(3, 1) and other.remove(5, 1)  # an eviction done
    finally:
        other.close()
    assert _mapped(v, 2, 5) == [True, False, True, False, True]
    assert _hit(url, data, *RANGES[3]) == "MISS"
    assert _hit(url, data, *RANGES[2]) == "HIT" and _hit(url, data, *RANGES[4]) == "HIT"
    assert _hit(url, data, 4 * BS + 100, 6 * BS + 99) == "PARTIAL"  # blocks 4 (cached) 5 6
    assert len(_gets(origin)) > fetched + 1
    wait_until(lambda: all(_mapped(v, 0, BLOCKS)), 5, "blocks 3 and 5 cached again")
    fetched = len(_gets(origin))
    assert _hit(url, data, 0, len(data) - 1) == "HIT"
    assert len(_gets(origin)) == fetched


@pytest.mark.parametrize(
    ("where", "pages"),
    [
        ("data byte", "cached"),
        ("data byte", "not cached"),
        ("entry checksum", "not cached"),
        ("entry length", "not cached"),
    ],
)
def test_a_corrupt_block_is_never_served_but_dropped_and_fetched_again(
    origin: S3Emulator,
    make_daemon: MakeDaemon,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    pages: str,
) -> None:
    """Found when a process first serves the block (it checks the whole block's
    CRC-32C once), read on the loop from the page cache or, when the page
    cache lacks it (after a reboot; or no RWF_NOWAIT), in a disk thread."""
    first = make_daemon(block_size=BS)
    url, data = _cached_object(origin, first, "/b/corrupt")
    v = first.version_of(url)
    first.stop()
    k = 5
    if where == "data byte":
        path, at = v.data_path, k * BS + 1234
    else:
        path, at = v.map_path, mapfile.entry_offset(k) + (0 if where == "entry checksum" else 4)
    with path.open("r+b") as f:
        os.pwrite(f.fileno(), bytes([os.pread(f.fileno(), 1, at)[0] ^ 0x01]), at)
    if pages == "not cached":  # every read on the loop misses: read in a thread
        monkeypatch.setattr(blockio, "pread_nowait", lambda fd, length, offset: None)

    origin.wait_idle()
    origin.clear_log()
    daemon = make_daemon(block_size=BS)  # a new daemon: no block verified yet
    url = proxied(daemon.url, origin, "/b/corrupt")
    assert _hit(url, data, *RANGES[k]) == "MISS"
    assert _hit(url, data, *RANGES[k - 1]) == "HIT"
    assert _gets(origin) == [f"bytes={k * BS}-{(k + 1) * BS - 1}"]
    wait_until(lambda: _mapped(v, k, 1) == [True], 5, "the block cached again")
    files = VersionFiles.open_existing(v.data_path, v.map_path)
    assert files is not None
    try:
        assert files.read_block(k) == data[k * BS : (k + 1) * BS]
    finally:
        files.close()
    assert _hit(url, data, 0, len(data) - 1) == "HIT"
    assert len(_gets(origin)) == 1


@pytest.mark.parametrize("corrupt", [3, 70, 159])
def test_a_long_range_read_in_spans_after_a_start_checks_every_block(
    origin: S3Emulator, make_daemon: MakeDaemon, corrupt: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A range longer than BODY_MAX of blocks nobody has verified since the
    start is read a span at a time, each block's CRC-32C checked: a corrupt
    block anywhere in a span is never served, but dropped and fetched again
    (it alone), and the body is the origin's. Its headers said HIT (they went
    out before the span with the corrupt block was read); its log line and
    the request metrics say PARTIAL."""
    blocks_n = 160  # 2.5 MiB: spans of 64 blocks
    data = os.urandom(blocks_n * BS)
    origin.put("/b/long", data)
    first = make_daemon(block_size=BS)
    url = proxied(first.url, origin, "/b/long")
    assert get_range(url, 0, len(data) - 1).content == data
    v = first.version_of(url)
    wait_until(lambda: all(_mapped(v, 0, blocks_n)), 5, "every block cached")
    first.stop()
    at = corrupt * BS + 777
    with v.data_path.open("r+b") as f:
        os.pwrite(f.fileno(), bytes([os.pread(f.fileno(), 1, at)[0] ^ 0x40]), at)

    origin.wait_idle()
    origin.clear_log()
    daemon = make_daemon(block_size=BS)
    url = proxied(daemon.url, origin, "/b/long")
    caplog.set_level(logging.INFO, logger="nwbcache.access")
    assert _hit(url, data, 0, len(data) - 1) == "HIT"  # the bytes are the origin's
    assert _gets(origin) == [f"bytes={corrupt * BS}-{(corrupt + 1) * BS - 1}"]
    lines = [r.getMessage() for r in caplog.records if r.name == "nwbcache.access"]
    assert [line.split()[4] for line in lines if " 206 " in line] == ["PARTIAL"], lines
    assert 'cache="partial"' in requests.get(f"{daemon.url}/metrics", timeout=10).text
    wait_until(lambda: _mapped(v, corrupt, 1) == [True], 5, "the block cached again")
    assert _hit(url, data, 100, len(data) - 101) == "HIT"
    assert len(_gets(origin)) == 1


def test_reads_during_eviction_never_see_zeros_or_wrong_bytes(
    origin: S3Emulator, make_daemon: MakeDaemon
) -> None:
    """Eviction unmaps and punches holes while readers copy bytes out: every body
    read while the version is evicted and filled again, round after round, is
    the origin's (small hits on the loop, and ranges too large for them)."""
    blocks_n = 24  # a slice of 24 blocks is removed in this process (no helper)
    data = os.urandom(blocks_n * BS)
    origin.put("/b/evicted", data)
    daemon = make_daemon(block_size=BS)
    url = proxied(daemon.url, origin, "/b/evicted")
    assert get_range(url, 0, len(data) - 1).content == data
    stop = threading.Event()
    wrong: list[str] = []
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def read(seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as session:
            while not stop.is_set():
                size = rng.choice([1, 100, 4096, BS, 3 * BS, 10 * BS, len(data)])
                a = rng.randrange(0, len(data) - size + 1)
                try:
                    r = session.get(url, headers={"Range": f"bytes={a}-{a + size - 1}"}, timeout=30)
                except requests.RequestException as exc:  # a response cut short
                    wrong.append(f"{a}+{size}: {exc!r}")
                    continue
                with lock:
                    if r.status_code != 206 or r.content != data[a : a + size]:
                        wrong.append(_how_wrong(a, r, data[a : a + size], data))
                    outcomes[r.headers.get("X-Cache", "?")] += 1

    readers = [threading.Thread(target=read, args=(n,)) for n in range(4)]
    for t in readers:
        t.start()
    evicted = rounds = 0
    try:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline or rounds < 5:
            evicted += daemon.call(daemon.cache.index.evict_to(0)).blocks
            rounds += 1
            time.sleep(0.05)
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    assert wrong == [], f"{len(wrong)} wrong bodies, first: {wrong[:3]}"
    assert evicted > blocks_n, "the version was evicted more than once"
    assert outcomes["HIT"] > 0 and outcomes["MISS"] + outcomes["PARTIAL"] > 0, outcomes
    assert len(_gets(origin)) > 1  # filled again from the origin
    assert get_range(url, 0, len(data) - 1).content == data


def _how_wrong(a: int, r: requests.Response, want: bytes, data: bytes) -> str:
    """What a wrong body got wrong, for the failure message: the first and last
    differing byte (object offsets), whether the bytes there are zeros (a
    hole read) or another part of the object (a misplaced block), X-Cache."""
    body = r.content
    size = len(want)
    head = f"{a}+{size}: {r.status_code}, {len(body)} B, {r.headers.get('X-Cache')}"
    if len(body) != size:
        return head
    differ = [k for k in range(size) if body[k] != want[k]]
    first, last = differ[0], differ[-1]
    sample = body[first : first + 64]
    found = data.find(sample) if len(sample) == 64 else -1
    return (
        f"{head}: bytes {a + first}-{a + last} differ, zeros={sample == bytes(len(sample))}, "
        f"found at {found}"
    )


def test_the_maintenance_loop_closes_idle_versions(
    origin: S3Emulator, make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    offset = [0.0]
    monkeypatch.setattr(
        openversions, "time", SimpleNamespace(monotonic=lambda: time.monotonic() + offset[0])
    )
    daemon = make_daemon(block_size=BS)
    url, data = _cached_object(origin, daemon, "/b/idle")
    v = daemon.version_of(url)
    shared = _held(daemon, v)
    assert shared is not None

    _in_loop(daemon, daemon.cache.upkeep.wake)  # a maintenance pass now
    time.sleep(0.3)
    assert not _closed(shared), "closed before it was idle"

    offset[0] = openversions.IDLE_SECONDS + 1  # a minute later, nobody read it
    _in_loop(daemon, daemon.cache.upkeep.wake)
    wait_until(lambda: _closed(shared), 5, "the idle version closed")
    assert _in_loop(daemon, lambda: len(daemon.cache.open_versions)) == 0
    assert _hit(url, data, *RANGES[2]) == "HIT"  # opened again on demand


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_with_fsync_a_new_versions_names_and_map_header_are_made_durable(
    origin: S3Emulator, make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    """--fsync makes each block durable; a version's first write also makes its
    files' names durable (its object dir, the shard dir, ``objects``) and its
    map's header, or a power cut could lose a version whose blocks were
    fsynced. Without --fsync nothing is. What was fsynced: the real calls,
    told by the paths of their fds."""
    synced: list[str] = []
    blocks_synced: list[int] = []  # where in ``synced`` each fdatasync came
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def recording_data(fd: int) -> None:
        blocks_synced.append(len(synced))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    monkeypatch.setattr(os, "fdatasync", recording_data)
    data = os.urandom(3 * BS)
    origin.put("/b/durable", data)
    daemon = make_daemon(block_size=BS, fsync=fsync)
    url = proxied(daemon.url, origin, "/b/durable")
    assert get_range(url, 0, len(data) - 1).content == data
    v = daemon.version_of(url)
    wait_until(lambda: _mapped(v, 0, 3) == [True] * 3, 5, "the blocks written")
    objects = daemon.cache.layout.objects
    wanted = [str(v.map_path), str(v.map_path.parent), str(v.map_path.parent.parent), str(objects)]
    if fsync:
        assert set(wanted) <= set(synced), synced
        # The names before any block: a block fsynced into a file a power cut
        # could unname would be lost all the same.
        assert blocks_synced and synced.index(str(objects)) < blocks_synced[0]
    else:
        assert not set(wanted) & set(synced), synced
        assert blocks_synced == []
