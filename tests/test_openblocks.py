"""Block files kept open between requests (openblocks.py) and the cache using them.

Unit tests of the table (bounded, LRU, refcounted retirement, idle closing,
per-version dropping), of ``pread_nowait``, and integration tests through a
real daemon: warm hits reuse the open fds without opening the block files
again, a new version retires the old version's fds, and fds of unlinked block
files keep serving exact bytes until they are closed.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from nwbcache.urls import UpstreamURL, upstream_from_proxy_path
from nwbcache_proxy import openblocks, store
from nwbcache_proxy.openblocks import IDLE_SECONDS, OpenBlocks, SharedFd, pread_nowait
from nwbcache_proxy.version import Version
from tests.support.daemons import DaemonThread
from tests.support.helpers import get_range, proxied, wait_until
from tests.support.s3emu import S3Emulator

BS = 16 * 1024
BLOCKS = 8
T = TypeVar("T")


# -- helpers -------------------------------------------------------------------


def _fd_is_open_on(fd: int, path: Path) -> bool:
    """Whether fd number ``fd`` of this process is open on ``path``.

    Fd numbers are reused at once by the next open (the daemon thread opens
    files too), so "fstat raises EBADF" alone could be fooled; /proc names
    the file an fd is open on, also after it was unlinked.
    """
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return False
    return target in (str(path), f"{path} (deleted)")


def _file_id(path: str | Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _fd_is_open_on_file(fd: int, file_id: tuple[int, int, int]) -> bool:
    """Whether fd number ``fd`` is open on the file ``_file_id`` described.
    For the daemon's own block files: it writes them unnamed (O_TMPFILE) and
    links them in, so /proc names them ``#<inode> (deleted)`` all along."""
    try:
        return _file_id(f"/proc/self/fd/{fd}") == file_id
    except FileNotFoundError:
        return False


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Callable[[bytes], tuple[int, Path]]]:
    """Open fresh files read-only: (fd, path). Fds the table did not close are
    closed at teardown (the table owns the others)."""
    opened: list[tuple[int, Path]] = []
    counter = iter(range(1_000_000))

    def make(content: bytes = b"x" * 100) -> tuple[int, Path]:
        path = tmp_path / f"f{next(counter)}.blk"
        path.write_bytes(content)
        fd = os.open(path, os.O_RDONLY)
        opened.append((fd, path))
        return fd, path

    yield make
    for fd, path in opened:
        if _fd_is_open_on(fd, path):
            os.close(fd)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """openblocks.py's view of time.monotonic (only that module's)."""
    fake = FakeClock()
    monkeypatch.setattr(openblocks, "time", fake)
    return fake


def _closed(shared: SharedFd) -> bool:
    """``shared.closed``, read afresh (mypy would keep a narrowed property)."""
    return shared.closed


def _adopt(table: OpenBlocks, vkey: str, index: int, fd: int) -> SharedFd:
    """Adopt and release at once: held by the table only."""
    shared = table.adopt(vkey, index, fd, os.fstat(fd).st_size)
    shared.release()
    return shared


# -- the table -----------------------------------------------------------------


def test_table_is_bounded_and_retires_least_recently_used_first(
    files: Callable[[bytes], tuple[int, Path]],
) -> None:
    table = OpenBlocks(capacity=3)
    made = [files(b"x" * 100) for _ in range(5)]
    shared = [_adopt(table, "v", i, fd) for i, (fd, _) in enumerate(made[:3])]
    assert len(table) == 3
    got = table.get("v", 0)  # block 0 becomes the most recently used
    assert got is shared[0]
    got.release()

    fourth = _adopt(table, "v", 3, made[3][0])
    assert len(table) == 3
    assert not table.holds("v", 1), "the least recently used (1) goes first, not 0"
    assert _closed(shared[1]) and not _fd_is_open_on(made[1][0], made[1][1])
    assert table.holds("v", 0) and table.holds("v", 2) and table.holds("v", 3)
    assert not _closed(shared[0]) and _fd_is_open_on(made[0][0], made[0][1])
    assert table.get("v", 1) is None

    _adopt(table, "v", 4, made[4][0])
    assert not table.holds("v", 2) and _closed(shared[2])
    assert not _fd_is_open_on(made[2][0], made[2][1])
    assert not _closed(fourth) and not _closed(shared[0])
    assert len(table) == 3


def test_a_retired_fd_stays_open_while_readers_hold_it(
    files: Callable[[bytes], tuple[int, Path]],
) -> None:
    table = OpenBlocks(capacity=1)
    fd, path = files(b"block zero")
    _adopt(table, "v", 0, fd)
    first = table.get("v", 0)
    second = table.get("v", 0)
    assert first is not None and second is not None and first is second

    other_fd, _ = files(b"block one")
    _adopt(table, "v", 1, other_fd)  # pushes block 0 out of the table
    assert not table.holds("v", 0)
    assert not _closed(first) and first.fd == fd
    path.unlink()  # eviction may unlink it too: the open fd still reads it
    assert os.pread(first.fd, 10, 0) == b"block zero"

    first.release()
    assert not _closed(first) and _fd_is_open_on(fd, path), "a reader still holds it"
    second.release()
    assert _closed(first) and first.fd == -1
    assert not _fd_is_open_on(fd, path)


def test_releasing_a_shared_fd_the_table_still_holds_does_not_close_it(
    files: Callable[[bytes], tuple[int, Path]],
) -> None:
    table = OpenBlocks()
    fd, path = files(b"abc")
    shared = table.adopt("v", 0, fd, 3)  # acquired for the caller
    shared.release()
    for _ in range(3):
        again = table.get("v", 0)
        assert again is shared
        again.release()
    assert not _closed(shared) and _fd_is_open_on(fd, path)


def test_adopting_the_same_block_again_retires_the_old_fd(
    files: Callable[[bytes], tuple[int, Path]],
) -> None:
    table = OpenBlocks()
    fd_a, path_a = files(b"old")
    fd_b, path_b = files(b"new")
    old = _adopt(table, "v", 0, fd_a)
    new = _adopt(table, "v", 0, fd_b)
    assert len(table) == 1
    assert _closed(old) and not _fd_is_open_on(fd_a, path_a)
    got = table.get("v", 0)
    assert got is new and got.fd == fd_b
    got.release()
    assert _fd_is_open_on(fd_b, path_b)

    # The same while a reader holds the old one: it closes on its release.
    fd_c, path_c = files(b"newer")
    held = table.get("v", 0)
    assert held is new
    newer = _adopt(table, "v", 0, fd_c)
    assert not _closed(held) and _fd_is_open_on(fd_b, path_b)
    held.release()
    assert _closed(held) and not _fd_is_open_on(fd_b, path_b)
    assert not _closed(newer) and _fd_is_open_on(fd_c, path_c)
    last = table.get("v", 0)
    assert last is newer
    last.release()


def test_forget_retires_one_block(files: Callable[[bytes], tuple[int, Path]]) -> None:
    table = OpenBlocks()
    (fd0, p0), (fd1, p1) = files(b"a"), files(b"b")
    s0, s1 = _adopt(table, "v", 0, fd0), _adopt(table, "v", 1, fd1)
    table.forget("v", 0)
    table.forget("v", 7)  # not there: nothing happens
    assert _closed(s0) and not _fd_is_open_on(fd0, p0)
    assert not _closed(s1) and _fd_is_open_on(fd1, p1)
    assert table.holds("v", 1) and len(table) == 1


def test_drop_version_retires_only_that_versions_fds(
    files: Callable[[bytes], tuple[int, Path]],
) -> None:
    table = OpenBlocks()
    old = [
        (_adopt(table, "old", i, fd), fd, p)
        for i, (fd, p) in enumerate(files(b"o") for _ in range(3))
    ]
    new = [
        (_adopt(table, "new", i, fd), fd, p)
        for i, (fd, p) in enumerate(files(b"n") for _ in range(3))
    ]
    # A key that merely starts like the dropped one is another version.
    similar_fd, similar_path = files(b"s")
    similar = _adopt(table, "old2", 0, similar_fd)
    held = table.get("old", 2)
    assert held is not None

    table.drop_version("old")
    assert len(table) == 4
    for i, (shared, fd, path) in enumerate(old):
        assert not table.holds("old", i)
        if i == 2:
            assert not _closed(shared) and _fd_is_open_on(fd, path), "held by a reader"
        else:
            assert _closed(shared) and not _fd_is_open_on(fd, path)
    for i, (shared, fd, path) in enumerate(new):
        assert table.holds("new", i) and not _closed(shared) and _fd_is_open_on(fd, path)
    assert not _closed(similar) and _fd_is_open_on(similar_fd, similar_path)

    held.release()
    assert _closed(held) and not _fd_is_open_on(old[2][1], old[2][2])


def test_close_idle_closes_only_fds_unused_for_longer_than_the_threshold(
    files: Callable[[bytes], tuple[int, Path]], clock: FakeClock
) -> None:
    table = OpenBlocks()
    (fd_a, pa), (fd_b, pb), (fd_c, pc) = files(b"a"), files(b"b"), files(b"c")
    a = _adopt(table, "v", 0, fd_a)  # used at t=1000
    clock.now = 1030.0
    b = _adopt(table, "v", 1, fd_b)  # used at t=1030
    c = _adopt(table, "v", 2, fd_c)
    clock.now = 1050.0
    got = table.get("v", 2)  # a read counts as a use: c last used at t=1050
    assert got is c
    got.release()

    clock.now = 1059.0
    assert table.close_idle(60.0) == 0
    assert len(table) == 3 and not _closed(a)

    clock.now = 1070.0  # a idle 70 s, b 40 s, c 20 s
    assert table.close_idle(60.0) == 1
    assert _closed(a) and not _fd_is_open_on(fd_a, pa)
    assert not table.holds("v", 0) and table.holds("v", 1) and table.holds("v", 2)
    assert not _closed(b) and not _closed(c)

    assert table.close_idle(30.0) == 1
    assert _closed(b) and not _fd_is_open_on(fd_b, pb)
    assert not _closed(c) and _fd_is_open_on(fd_c, pc) and len(table) == 1


def test_close_unlinked_closes_fds_of_evicted_files_a_slice_at_a_time(
    files: Callable[[bytes], tuple[int, Path]],
) -> None:
    """Another process evicted (unlinked) some blocks this one holds open: their
    space comes back as soon as a sweep reaches them, not after 60 s idle."""
    table = OpenBlocks()
    made = [files(bytes([n])) for n in range(10)]
    shared = [_adopt(table, "v", n, fd) for n, (fd, _) in enumerate(made)]
    for n in (1, 4, 8):
        made[n][1].unlink()  # evicted elsewhere
    reader = table.get("v", 4)  # being sent right now (and now the most recent)
    assert reader is not None
    assert table.close_unlinked(limit=5) == 1  # the least recent five: 0 1 2 3 5
    assert table.close_unlinked(limit=5) == 2  # the next five: 6 7 8 9 4
    assert table.close_unlinked(limit=5) == 0  # round again: nothing left
    assert not table.holds("v", 1) and not table.holds("v", 4) and not table.holds("v", 8)
    assert len(table) == 7 and _closed(shared[1]) and _closed(shared[8])
    assert not _closed(reader) and os.pread(reader.fd, 1, 0) == b"\x04"  # until released
    reader.release()
    assert _closed(shared[4])
    assert all(not _closed(shared[n]) for n in (0, 2, 3, 5, 6, 7, 9))


def test_close_idle_leaves_a_held_fd_open_until_its_reader_is_done(
    files: Callable[[bytes], tuple[int, Path]], clock: FakeClock
) -> None:
    table = OpenBlocks()
    fd, path = files(b"sendfile me")
    _adopt(table, "v", 0, fd)
    reader = table.get("v", 0)  # a long sendfile: acquired, then silent
    assert reader is not None
    clock.now += IDLE_SECONDS + 1
    assert table.close_idle() == 1
    assert not table.holds("v", 0) and len(table) == 0
    assert not _closed(reader) and os.pread(reader.fd, 11, 0) == b"sendfile me"
    reader.release()
    assert _closed(reader) and not _fd_is_open_on(fd, path)


def test_close_all_closes_every_fd_not_held(
    files: Callable[[bytes], tuple[int, Path]],
) -> None:
    table = OpenBlocks()
    made = [files(b"z") for _ in range(4)]
    shared = [_adopt(table, f"v{i % 2}", i, fd) for i, (fd, _) in enumerate(made)]
    held = table.get("v1", 3)
    assert held is not None
    table.close_all()
    assert len(table) == 0
    for i, (fd, path) in enumerate(made[:3]):
        assert shared[i].closed and not _fd_is_open_on(fd, path)
    assert not _closed(held) and _fd_is_open_on(*made[3])
    held.release()
    assert _closed(held) and not _fd_is_open_on(*made[3])
    table.close_all()  # again, on an empty table: harmless


# -- pread_nowait ----------------------------------------------------------------


def test_pread_nowait_reads_a_freshly_written_file_from_the_page_cache(
    files: Callable[[bytes], tuple[int, Path]],
) -> None:
    data = os.urandom(64 * 1024)
    fd, _ = files(data)
    # Just written, so every page is in the page cache, and tmp_path here is
    # on ext4 (or tmpfs), which support RWF_NOWAIT for buffered reads: the
    # read succeeds without waiting. (On a filesystem without RWF_NOWAIT it
    # would be None, and the cache would read in a thread instead.)
    assert pread_nowait(fd, 4096, 100) == data[100:4196]
    assert pread_nowait(fd, len(data), 0) == data
    assert pread_nowait(fd, 1, len(data) - 1) == data[-1:]
    assert pread_nowait(fd, 0, 0) == b""


def test_pread_nowait_is_none_for_a_short_read(
    files: Callable[[bytes], tuple[int, Path]],
) -> None:
    data = os.urandom(10_000)
    fd, _ = files(data)
    assert pread_nowait(fd, 100, len(data) - 10) is None  # only 10 bytes left
    assert pread_nowait(fd, 100, len(data)) is None  # at EOF
    assert pread_nowait(fd, 100, len(data) + 4096) is None  # past EOF


def test_pread_nowait_is_none_once_the_page_cache_dropped_the_file(
    files: Callable[[bytes], tuple[int, Path]],
) -> None:
    data = os.urandom(64 * 1024)
    fd, path = files(data)
    wfd = os.open(path, os.O_WRONLY)
    try:
        os.fsync(wfd)  # clean pages: DONTNEED only drops pages already written back
    finally:
        os.close(wfd)
    # Nothing cached: RWF_NOWAIT fails with EAGAIN instead of waiting for the
    # disk. DONTNEED skips pages the kernel holds at that moment (locked, on
    # an LRU batch of another CPU): under a loaded suite one call left the
    # page cached about one run in ten, so the drop is asked up to 20 times.
    for _ in range(20):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if pread_nowait(fd, 4096, 8192) is None:
            break
        time.sleep(0.05)
    else:
        pytest.fail("pread_nowait kept finding the bytes cached after 20 drops")
    assert os.pread(fd, 4096, 8192) == data[8192:12288]  # a blocking read caches it
    assert pread_nowait(fd, 4096, 8192) == data[8192:12288]


def test_pread_nowait_raises_errors_other_than_would_block(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError) as caught:  # a bug (a closed fd) must not pass as a cache miss
        pread_nowait(fd, 3, 0)
    assert caught.value.errno == errno.EBADF


# -- through the daemon ------------------------------------------------------------


def _upstream(url: str) -> UpstreamURL:
    return upstream_from_proxy_path("/" + url.split("/", 3)[3], "")


def _in_loop(daemon: DaemonThread, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the daemon's loop (the table belongs to that thread)."""

    async def run() -> T:
        return fn()

    result: T = daemon.call(run())
    return result


def _resolve(daemon: DaemonThread, url: str) -> Version:
    meta: Version = daemon.call(daemon.cache.resolve(_upstream(url))).version
    return meta


def _held(daemon: DaemonThread, meta: Version) -> dict[int, SharedFd]:
    """The daemon's open fds of this version, by block index."""

    def look() -> dict[int, SharedFd]:
        vkey = meta.name
        out: dict[int, SharedFd] = {}
        for i in range(BLOCKS):
            shared = daemon.cache.open_blocks.get(vkey, i)
            if shared is not None:
                shared.release()  # the table keeps it: this does not close it
                out[i] = shared
        return out

    return _in_loop(daemon, look)


class OpenCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[Path] = []
        real = store.open_block

        def counting(path: Path, **kwargs: Any) -> store.OpenBlock | None:
            self.paths.append(path)
            return real(path, **kwargs)

        monkeypatch.setattr(store, "open_block", counting)


RANGES = [(i * BS + 100, i * BS + 4195) for i in range(BLOCKS)]


def _read_twice(url: str, data: bytes) -> None:
    """Every range of RANGES, cold then warm (the warm pass keeps the fds)."""
    for _round in ("cold", "warm: fds kept"):
        for a, b in RANGES:
            assert get_range(url, a, b).content == data[a : b + 1]


def test_warm_hits_reuse_open_fds_without_opening_block_files(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = os.urandom(BLOCKS * BS)
    origin.put("/b/fds", data)
    daemon = make_daemon(block_size=BS, cache_dir=tmp_path / "cache")
    url = proxied(daemon.url, origin, "/b/fds")
    opens = OpenCounter(monkeypatch)
    for a, b in RANGES:  # cold: fetched from the origin
        assert get_range(url, a, b).content == data[a : b + 1]
    origin.wait_idle()
    fetched = len(origin.log)

    opens.paths.clear()
    for a, b in RANGES:  # warm: from disk, each block file opened (once) and kept
        # X-Cache not checked on this pass: a block a cold read streamed from
        # its in-flight fetch may still count as "unserved" (InflightBlock.served
        # is set when streaming starts, _publish may look before), and its first
        # read from disk then says MISS. Not what this file tests.
        assert get_range(url, a, b).content == data[a : b + 1]
    # Blocks this daemon published are held open from the publish on: none
    # needs opening (a block published by another process is opened once).
    assert len(opens.paths) <= BLOCKS
    assert len(set(opens.paths)) == len(opens.paths), "a block file opened twice"
    meta = _resolve(daemon, url)
    held = _held(daemon, meta)
    assert sorted(held) == list(range(BLOCKS))
    assert _in_loop(daemon, lambda: len(daemon.cache.open_blocks)) >= BLOCKS

    opens.paths.clear()
    for _round in range(2):  # warm again: the same fds, no open() at all
        for a, b in RANGES:
            r = get_range(url, a, b)
            assert r.content == data[a : b + 1]
            assert r.headers["X-Cache"] == "HIT"
        # A range over several blocks goes out with sendfile from the held fds.
        r = get_range(url, BS - 7, 5 * BS + 6)
        assert r.content == data[BS - 7 : 5 * BS + 7]
        assert r.headers["X-Cache"] == "HIT"
    assert opens.paths == []
    assert _held(daemon, meta) == held  # the very same SharedFd objects
    assert not any(_closed(s) for s in held.values())
    origin.wait_idle()
    assert len(origin.log) == fetched  # and nothing more from the origin

    daemon.stop()  # shutting down closes every fd of the table
    assert all(_closed(s) for s in held.values())


def test_a_new_version_retires_the_old_versions_fds(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    data = os.urandom(BLOCKS * BS)
    origin.put("/b/ver", data)
    daemon = make_daemon(block_size=BS, cache_dir=tmp_path / "cache")
    url = proxied(daemon.url, origin, "/b/ver")
    _read_twice(url, data)
    old_meta = _resolve(daemon, url)
    old = _held(daemon, old_meta)
    assert len(old) == BLOCKS
    old_files = {i: _file_id(old_meta.block_path(i)) for i in old}
    old_fds = {i: s.fd for i, s in old.items()}
    assert all(_fd_is_open_on_file(old_fds[i], old_files[i]) for i in old)

    new = os.urandom(len(data))
    origin.put("/b/ver", new)  # a new version upstream, same size
    daemon.call(daemon.cache.drop_version(old_meta))
    assert all(_closed(s) for s in old.values())
    assert not any(_fd_is_open_on_file(old_fds[i], old_files[i]) for i in old)
    assert _held(daemon, old_meta) == {}

    for _round in ("cold", "warm: the new version's fds"):
        for a, b in RANGES:
            assert get_range(url, a, b).content == new[a : b + 1]
        r = get_range(url, 0, len(new) - 1)
        assert r.content == new
    new_meta = _resolve(daemon, url)
    assert not new_meta.remote.same_version(old_meta.remote)
    assert len(_held(daemon, new_meta)) == BLOCKS
    assert _held(daemon, old_meta) == {}


def test_a_version_change_found_by_revalidation_retires_the_old_fds(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    data = os.urandom(BLOCKS * BS)
    origin.put("/b/reval", data)
    # Every request revalidates before it is served (no stale serving):
    # the daemon itself finds the new version.
    daemon = make_daemon(
        block_size=BS, cache_dir=tmp_path / "cache", revalidate_after=0.0, stale_if_error=0.0
    )
    url = proxied(daemon.url, origin, "/b/reval")
    _read_twice(url, data)
    old_meta = _resolve(daemon, url)
    old = _held(daemon, old_meta)
    assert len(old) == BLOCKS

    new = os.urandom(len(data))
    origin.put("/b/reval", new)
    for _round in ("after the change", "again"):
        for a, b in RANGES:
            assert get_range(url, a, b).content == new[a : b + 1]
    assert all(_closed(s) for s in old.values())
    assert _held(daemon, old_meta) == {}


def test_fds_of_unlinked_block_files_serve_exact_bytes_until_closed(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    data = os.urandom(BLOCKS * BS)
    origin.put("/b/gone", data)
    daemon = make_daemon(block_size=BS, cache_dir=tmp_path / "cache")
    url = proxied(daemon.url, origin, "/b/gone")
    _read_twice(url, data)
    meta = _resolve(daemon, url)
    held = _held(daemon, meta)
    assert len(held) == BLOCKS

    # The upkeep's sweep closes fds of unlinked files every 0.25 s (their
    # space must be freed); stopped here, so that what this test reads is
    # what the held fds serve, not what a sweep left (it failed under load).
    daemon.call(daemon.cache.upkeep.close())
    blk = list((tmp_path / "cache").rglob("*.blk"))
    assert len(blk) == BLOCKS
    for path in blk:  # as eviction would, while the fds are held
        path.unlink()
    origin.wait_idle()
    origin.clear_log()
    for a, b in RANGES:  # the version is immutable: the open fds still have its bytes
        r = get_range(url, a, b)
        assert r.content == data[a : b + 1]
        assert r.headers["X-Cache"] == "HIT"
    r = get_range(url, BS - 7, 5 * BS + 6)  # sendfile from unlinked files
    assert r.content == data[BS - 7 : 5 * BS + 7]
    assert r.headers["X-Cache"] == "HIT"
    origin.wait_idle()
    assert origin.log == []

    # Every reader released its share: closing the idle fds closes them all.
    closed = _in_loop(daemon, lambda: daemon.cache.open_blocks.close_idle(0))
    assert closed >= BLOCKS
    assert all(_closed(s) for s in held.values()), "a reader leaked its share of an fd"
    assert _held(daemon, meta) == {}

    for a, b in RANGES:  # the files are gone: fetched again, still exact
        assert get_range(url, a, b).content == data[a : b + 1]
    origin.wait_idle()
    fetched = len(origin.log)
    assert fetched > 0
    assert len(list((tmp_path / "cache").rglob("*.blk"))) == BLOCKS
    for _round in ("from the new files", "from their fds"):  # cached again
        for a, b in RANGES:
            assert get_range(url, a, b).content == data[a : b + 1]
    r = get_range(url, 2 * BS + 5, 2 * BS + 4100)
    assert r.content == data[2 * BS + 5 : 2 * BS + 4101]
    assert r.headers["X-Cache"] == "HIT"
    origin.wait_idle()
    assert len(origin.log) == fetched
    assert sorted(_held(daemon, meta)) == list(range(BLOCKS))


def test_the_maintenance_loop_closes_idle_fds(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    offset = [0.0]
    monkeypatch.setattr(
        openblocks, "time", SimpleNamespace(monotonic=lambda: time.monotonic() + offset[0])
    )
    data = os.urandom(BLOCKS * BS)
    origin.put("/b/idle", data)
    daemon = make_daemon(block_size=BS, cache_dir=tmp_path / "cache")
    url = proxied(daemon.url, origin, "/b/idle")
    _read_twice(url, data)
    held = _held(daemon, _resolve(daemon, url))
    assert len(held) == BLOCKS

    _in_loop(daemon, daemon.cache.upkeep.wake)  # a maintenance pass now
    time.sleep(0.3)
    assert not any(_closed(s) for s in held.values()), "closed before they were idle"

    offset[0] = IDLE_SECONDS + 1  # a minute later, nobody read them
    _in_loop(daemon, daemon.cache.upkeep.wake)
    wait_until(lambda: all(_closed(s) for s in held.values()), 5)
    assert all(_closed(s) for s in held.values())
    assert _in_loop(daemon, lambda: len(daemon.cache.open_blocks)) == 0


def test_table_capacity_leaves_most_of_the_fd_limit_to_sockets() -> None:
    from nwbcache_proxy.openblocks import OPEN_BLOCKS, table_capacity

    assert table_capacity(1024) == 256  # systemd's default soft limit
    assert table_capacity(65536) == OPEN_BLOCKS
    assert table_capacity(10) == 16  # never unusably small


def test_raise_fd_limit_never_lowers_the_soft_limit() -> None:
    import resource

    from nwbcache_proxy.openblocks import WANTED_NOFILE, raise_fd_limit

    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        got = raise_fd_limit()
        after = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert after >= before
        assert got == after or after == resource.RLIM_INFINITY
        assert after >= min(WANTED_NOFILE, hard) or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (before, hard))
