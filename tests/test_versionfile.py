"""Format 3's files of one version (versionfile.py), on a real filesystem: bytes read back
as written, a crash or a failed write never maps a block it did not write whole, removal
frees the space and is kept from a reader's span by locks."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwbcache_proxy import versionfile
from nwbcache_proxy.blockfile import CorruptBlock
from nwbcache_proxy.layout import DATA_SUFFIX, MAP_SUFFIX
from nwbcache_proxy.mapfile import CorruptMap, MapHeader, encode_header
from nwbcache_proxy.spanlocks import runs_of
from nwbcache_proxy.versionfile import VersionFiles
from nwbcache_proxy.wholeversions import drop
from tests.support.helpers import REPO, allocated

BS = 4096
DIGEST = bytes(range(32))
STEM = f"{'ab' * 16}.{BS}"


def paths(directory: Path, stem: str = STEM) -> tuple[Path, Path]:
    """The version's data file and map in ``directory``."""
    return directory / f"{stem}{DATA_SUFFIX}", directory / f"{stem}{MAP_SUFFIX}"


def block(i: int, length: int = BS) -> bytes:
    return random.Random(i).randbytes(length)


def header(blocks: int = 20, tail: int = 100) -> MapHeader:
    return MapHeader(BS, (blocks - 1) * BS + tail, DIGEST)


def expected(h: MapHeader, i: int) -> bytes:
    return block(i, h.length_of(i))


@contextlib.contextmanager
def opened(tmp_path: Path, h: MapHeader, *, create: bool = True) -> Iterator[VersionFiles]:
    v = VersionFiles.open(*paths(tmp_path), h, create=create)
    assert v is not None
    try:
        yield v
    finally:
        v.close()


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` fail (EFBIG after a partial write, as a disk that
    fills midway fails them): Python ignores SIGXFSZ."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_blocks_read_back_as_written_and_the_rest_are_absent(tmp_path: Path) -> None:
    h = header()
    with opened(tmp_path, h) as v:
        v.write_group(2, [[expected(h, i)] for i in range(2, 6)])
        last = expected(h, 19)
        v.write_group(19, [[last[:10], last[10:]]])  # a short last block, in parts
        assert v.mapped(0, 20) == [i in (2, 3, 4, 5, 19) for i in range(20)]
        for i in (2, 3, 4, 5, 19):
            assert v.read_block(i) == expected(h, i)
        with pytest.raises(CorruptBlock, match="not in the map"):
            v.read_block(0)
        # Sparse: the data file holds what was written, not the object's size.
        data_path, _ = paths(tmp_path, STEM)
        assert os.path.getsize(data_path) == h.size
        assert allocated(data_path) <= 6 * BS


def test_a_block_whose_bytes_came_without_its_entry_is_absent(tmp_path: Path) -> None:
    """A crash between the bytes and the map: the block is not there."""
    h = header()
    with opened(tmp_path, h) as v:
        os.pwrite(v.data_fd, expected(h, 3), h.offset_of(3))
        assert v.mapped(3, 1) == [False]
        with pytest.raises(CorruptBlock):
            v.read_block(3)


def test_a_block_whose_bytes_changed_on_disk_is_refused(tmp_path: Path) -> None:
    h = header()
    with opened(tmp_path, h) as v:
        v.write_group(0, [[expected(h, 0)], [expected(h, 1)]])
        os.pwrite(v.data_fd, b"\x00", h.offset_of(1) + 77)  # a torn or rotten byte
        assert v.read_block(0) == expected(h, 0)
        with pytest.raises(CorruptBlock, match="checksum"):
            v.read_block(1)


def test_a_group_of_the_wrong_length_writes_nothing(tmp_path: Path) -> None:
    h = header()
    with opened(tmp_path, h) as v:
        with pytest.raises(ValueError, match="must be 4096 bytes"):
            v.write_group(0, [[expected(h, 0)], [b"short"]])
        assert v.mapped(0, 2) == [False, False]


def test_a_write_that_fails_midway_maps_nothing_and_gives_the_space_back(
    tmp_path: Path,
) -> None:
    """A disk that fills mid-group (here the file-size limit: EFBIG after a
    partial write, as ENOSPC would come): no entry of the group is written,
    and the bytes that did land are punched out."""
    h = header()
    with opened(tmp_path, h) as v:
        with file_size_limit(5 * BS + 10):
            failed = v.write_group(0, [[expected(h, i)] for i in range(8)])
        assert all(isinstance(f, OSError) and f.errno == errno.EFBIG for f in failed)
        assert v.mapped(0, 8) == [False] * 8
        assert allocated(paths(tmp_path, STEM)[0]) == 0
        v.write_group(0, [[expected(h, i)] for i in range(8)])  # and later it works
        assert [v.read_block(i) for i in range(8)] == [expected(h, i) for i in range(8)]


def test_removing_blocks_unmaps_them_frees_their_space_and_keeps_the_others(
    tmp_path: Path,
) -> None:
    h = header()
    data_path, _ = paths(tmp_path, STEM)
    with opened(tmp_path, h) as v:
        v.write_group(0, [[expected(h, i)] for i in range(20)])
        before = allocated(data_path)
        assert v.remove(4, 8)
        assert before - allocated(data_path) >= 8 * BS
        assert v.mapped(0, 20) == [not 4 <= i < 12 for i in range(20)]
        for i in (3, 12, 19):
            assert v.read_block(i) == expected(h, i)
        assert os.pread(v.data_fd, BS, h.offset_of(5)) == bytes(BS)  # a hole reads as zeros
        before = allocated(data_path)
        assert v.remove(19, 1)  # the short last block: its page is freed, not only zeroed
        assert v.mapped(19, 1) == [False]
        assert before - allocated(data_path) == BS


def test_a_span_being_read_cannot_be_removed_until_the_reader_lets_go(tmp_path: Path) -> None:
    """Two opens of the version (two processes, or two in one): the one serving
    blocks 4-7 holds a read lock; the evicting one's write lock on a span that
    overlaps fails without waiting, and a span beside it does not."""
    h = header()
    with opened(tmp_path, h) as reader, opened(tmp_path, h, create=False) as evictor:
        reader.write_group(0, [[expected(h, i)] for i in range(20)])
        assert reader.lock_shared(4, 4)
        assert not evictor.try_lock(7, 2)
        assert not evictor.try_lock(0, 20)
        assert not evictor.remove(6, 4)  # nothing of it is removed
        assert reader.read_block(9) == expected(h, 9)
        assert evictor.try_lock(8, 4)  # beside it
        assert not reader.lock_shared(8, 1)  # and a write-locked span cannot be read-locked
        evictor.unlock(8, 4)
        assert evictor.remove(8, 4)
        reader.unlock_shared(4, 4)
        assert evictor.try_lock(4, 4)
        evictor.unlock(4, 4)
        assert reader.read_block(7) == expected(h, 7)


def test_opening(tmp_path: Path) -> None:
    h = header()
    assert VersionFiles.open(*paths(tmp_path), h, create=False) is None  # not there
    _, map_path = paths(tmp_path, STEM)
    map_path.touch()  # created by another process, its header not written yet
    assert VersionFiles.open(*paths(tmp_path), h, create=False) is None
    with opened(tmp_path, h) as v:
        v.write_group(0, [[expected(h, 0)]])
    with opened(tmp_path, h, create=False) as again:
        assert again.read_block(0) == expected(h, 0)
    with pytest.raises(CorruptMap, match="another object version"):
        VersionFiles.open(*paths(tmp_path), MapHeader(BS, h.size, bytes(32)), create=True)
    map_path.write_bytes(b"not a map" + bytes(100))
    with pytest.raises(CorruptMap):
        VersionFiles.open(*paths(tmp_path), h, create=True)
    drop(*paths(tmp_path))
    assert list(tmp_path.iterdir()) == []
    drop(*paths(tmp_path))  # already gone: no error


def test_two_creators_at_once_write_the_same_header(tmp_path: Path) -> None:
    h = header()
    with opened(tmp_path, h) as first, opened(tmp_path, h) as second:
        first.write_group(0, [[expected(h, 0)]])
        second.write_group(1, [[expected(h, 1)]])
        assert paths(tmp_path, STEM)[1].read_bytes()[:64] == encode_header(h)
        assert first.read_block(1) == expected(h, 1) and second.read_block(0) == expected(h, 0)


WRITER = textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    from nwbcache_proxy.mapfile import MapHeader
    from nwbcache_proxy.versionfile import VersionFiles
    BS, BLOCKS = 4096, 4096
    h = MapHeader(BS, BS * BLOCKS, bytes(range(32)))
    d = Path(sys.argv[1])
    v = VersionFiles.open(d / (sys.argv[2] + ".data"), d / (sys.argv[2] + ".map"), h, create=True)
    print("ready", flush=True)
    while True:
        for first in range(0, BLOCKS, 16):
            group = [[random.Random(i).randbytes(BS)] for i in range(first, first + 16)]
            v.write_group(first, group)
        for first in range(0, BLOCKS, 64):
            v.remove(first, 64)
    """
)


@pytest.mark.slow  # a writer process killed with SIGKILL
def test_kill_9_while_writing_never_maps_a_wrong_byte(tmp_path: Path) -> None:
    """A process writing and removing groups in a loop is killed at random
    moments; every block the map then has reads back exactly as written."""
    h = MapHeader(BS, BS * 4096, DIGEST)
    mapped_seen = 0
    for attempt in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), STEM],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.2 + 0.15 * attempt)
        proc.kill()
        proc.wait(10)
        v = VersionFiles.open(*paths(tmp_path), h, create=False)
        assert v is not None
        try:
            present = v.mapped(0, 4096)
            mapped_seen += sum(present)
            for i, there in enumerate(present):
                if there:
                    assert v.read_block(i) == block(i), i
            # A group cut between its bytes and its entries left space that
            # nothing maps: reconcile's reclaim gives it back, exactly.
            assert v.reclaim(0, 4096)[1] == 0
            assert allocated(paths(tmp_path, STEM)[0]) == sum(present) * BS
        finally:
            v.close()
    assert mapped_seen > 0  # the kills did not all land before the first group


def test_a_span_reads_whole_or_not_at_all(tmp_path: Path) -> None:
    h = header()
    with opened(tmp_path, h) as v:
        v.write_group(16, [[expected(h, i)] for i in range(16, 20)])
        assert v.read_span(16, 4) == b"".join(expected(h, i) for i in range(16, 20))
        assert v.read_span(15, 2) is None  # block 15 is not there


@pytest.mark.parametrize(
    ("first", "count", "within"),
    [
        (16, 4, None),  # the short last block (100 bytes) included
        (16, 4, (16 * BS + 5, 19 * BS + 50)),  # from mid-block to mid-last-block
        (3, 5, (3 * BS + 4095, 4 * BS + 1)),  # two bytes across a boundary
        (0, 20, (0, 19 * BS + 100)),  # the whole object
    ],
)
def test_a_checked_span_is_exact_and_any_corrupt_block_fails_it(
    tmp_path: Path, first: int, count: int, within: tuple[int, int] | None
) -> None:
    """read_span(verify=True) reads every block of the span whole and checks
    it against its entry; the bytes asked for come back exact, and a flipped
    byte in any block of the span (not only in the part asked for) fails the
    whole read."""
    h = header()
    with opened(tmp_path, h) as v:
        v.write_group(0, [[expected(h, i)] for i in range(20)])
        obj = b"".join(expected(h, i) for i in range(20))
        lo, hi = within or (first * BS, min(h.size, (first + count) * BS))
        got = v.read_span(first, count, within, verify=True)
        assert got is not None and bytes(got) == obj[lo:hi]
        for bad in (first, first + count // 2, first + count - 1):
            at = bad * BS + h.length_of(bad) - 1  # a block's last byte
            good = os.pread(v.data_fd, 1, at)
            os.pwrite(v.data_fd, bytes([good[0] ^ 0x80]), at)
            with pytest.raises(CorruptBlock, match=f"block {bad}"):
                v.read_span(first, count, within, verify=True)
            assert v.read_span(first, count, within) is not None  # unchecked: read
            os.pwrite(v.data_fd, good, at)
        assert bytes(v.read_span(first, count, within, verify=True) or b"") == obj[lo:hi]


def test_nothing_is_read_or_written_in_a_span_being_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an evictor holds a span's write lock (between unmapping and
    punching), a reader gets nothing from it and a writer waits, then gives
    up on caching its group: it could otherwise map bytes the punch zeroes."""
    monkeypatch.setattr(versionfile, "WRITE_LOCK_PATIENCE", 0.2)
    h = header()
    with opened(tmp_path, h) as v, opened(tmp_path, h, create=False) as evictor:
        v.write_group(0, [[expected(h, i)] for i in range(4)])
        assert evictor.try_lock(0, 8)
        with pytest.raises(CorruptBlock, match="being removed"):
            v.read_block(1)
        assert v.read_span(0, 2) is None
        with pytest.raises(OSError) as caught:
            v.write_group(4, [[expected(h, i)] for i in range(4, 8)])
        assert caught.value.errno == errno.EAGAIN
        assert not evictor.remove(0, 8)  # a removal of its own waits for the other
        evictor.unlock(0, 8)
        assert evictor.remove(0, 8)
        assert v.mapped(0, 8) == [False] * 8
        v.write_group(4, [[expected(h, i)] for i in range(4, 8)])
        assert v.read_span(4, 4) == b"".join(expected(h, i) for i in range(4, 8))


def test_reclaim_punches_out_bytes_the_map_does_not_have(tmp_path: Path) -> None:
    """What a crash between a group's bytes and its entries leaves: space no
    row counts. Reclaim frees it, keeps every mapped block, stays within the
    span it is given, and leaves a span being written (locked) for later."""
    h = header()
    data_path, _ = paths(tmp_path, STEM)
    with opened(tmp_path, h) as v, opened(tmp_path, h, create=False) as writer:
        v.write_group(0, [[expected(h, i)] for i in range(4)])
        for i in (5, 6, 7, 12, 19):  # bytes without entries
            os.pwrite(v.data_fd, expected(h, i), h.offset_of(i))
        assert v.reclaim(0, 10) == (3 * BS, 0)
        assert allocated(data_path) == 4 * BS + BS + 4096  # 12, and 19's page, still there
        assert writer.try_lock(12, 1)  # a writer between its bytes and its entries
        # 19 is the short last block: its whole page goes, not just its 100 bytes.
        assert v.reclaim(10, 10) == (BS, 1)
        assert allocated(data_path) == 5 * BS
        writer.unlock(12, 1)
        assert v.reclaim(0, 20) == (BS, 0)
        assert allocated(data_path) == 4 * BS
        assert [v.read_block(i) for i in range(4)] == [expected(h, i) for i in range(4)]


@pytest.mark.parametrize(
    ("indices", "runs"),
    [
        ([], []),
        ([10], [(10, 1)]),
        ([11, 12, 14], [(11, 2), (14, 1)]),
        ([10, 11, 12], [(10, 3)]),
        ([3, 7, 8, 9, 20], [(3, 1), (7, 3), (20, 1)]),
    ],
)
def test_runs_of(indices: list[int], runs: list[tuple[int, int]]) -> None:
    assert list(runs_of(indices)) == runs


def test_readers_sharing_an_open_keep_their_own_locks(tmp_path: Path) -> None:
    """Two readers of one process share its open: one letting go of blocks 4-7
    must not let go of the blocks 6-9 the other still reads (the kernel
    releases every lock of an open on a range it unlocks)."""
    h = header()
    with opened(tmp_path, h) as shared, opened(tmp_path, h, create=False) as evictor:
        shared.write_group(0, [[expected(h, i)] for i in range(20)])
        assert shared.lock_shared(4, 4)  # reader A
        assert shared.lock_shared(6, 4)  # reader B
        shared.unlock_shared(4, 4)  # A is done
        assert not evictor.try_lock(6, 1) and not evictor.try_lock(9, 1)  # B's still
        assert evictor.try_lock(4, 2)  # A's alone are free
        evictor.unlock(4, 2)
        shared.unlock_shared(6, 4)
        assert evictor.try_lock(0, 20)
        evictor.unlock(0, 20)


def test_a_read_lock_refused_in_part_holds_nothing(tmp_path: Path) -> None:
    h = header()
    with opened(tmp_path, h) as shared, opened(tmp_path, h, create=False) as evictor:
        assert evictor.try_lock(8, 1)
        assert not shared.lock_shared(4, 8)  # 8 is being removed
        evictor.unlock(8, 1)
        assert evictor.try_lock(4, 4)  # nothing of 4-7 was kept
        evictor.unlock(4, 4)


def test_a_failed_write_leaves_the_blocks_mapped_before_as_they_were(tmp_path: Path) -> None:
    """A group written again (another fetch of it) that fails: the blocks the
    map already had keep their bytes; only what this write added goes."""
    h = header()
    with opened(tmp_path, h) as v:
        v.write_group(0, [[expected(h, i)] for i in range(8)])
        with file_size_limit(12 * BS + 10):
            results = v.write_group(0, [[expected(h, i)] for i in range(16)])
        assert results[:8] == [None] * 8  # there already, as they are
        assert all(isinstance(r, OSError) for r in results[8:])
        assert v.mapped(0, 16) == [True] * 8 + [False] * 8
        assert v.read_span(0, 8) == b"".join(expected(h, i) for i in range(8))
        assert allocated(paths(tmp_path, STEM)[0]) == 8 * BS


def test_a_writer_and_the_readers_of_one_process_keep_each_others_locks(
    tmp_path: Path,
) -> None:
    h = header()
    with opened(tmp_path, h) as v, opened(tmp_path, h, create=False) as other:
        v.write_group(0, [[expected(h, i)] for i in range(8)])
        assert v.lock_shared(4, 4)  # a reader of this process
        assert not v.try_lock(4, 1)  # this process's writer cannot take its blocks
        v.write_group(8, [[expected(h, i)] for i in range(8, 12)])  # beside them
        assert not other.try_lock(4, 4)  # the reader's lock survived the writer's
        assert not other.remove(7, 2)
        v.unlock_shared(4, 4)
        assert other.remove(4, 8)


def test_spans_of_no_blocks_lock_nothing(tmp_path: Path) -> None:
    """A lock of length 0 would reach the end of the file."""
    h = header()
    with opened(tmp_path, h) as v, opened(tmp_path, h, create=False) as other:
        assert other.try_lock(5, 1)
        started = time.monotonic()
        v.write_group(3, [])
        assert time.monotonic() - started < 1  # it did not wait for block 5
        assert v.lock_shared(3, 0) and v.try_lock(3, 0)
        v.unlock_shared(3, 0)
        v.unlock(3, 0)
        assert not v.try_lock(5, 1)  # other's lock still there
        other.unlock(5, 1)


def test_letting_go_of_blocks_not_held_changes_nothing(tmp_path: Path) -> None:
    h = header()
    with opened(tmp_path, h) as v, opened(tmp_path, h, create=False) as other:
        assert v.lock_shared(4, 2)
        with pytest.raises(ValueError, match="not all read-locked"):
            v.unlock_shared(4, 4)
        assert not other.try_lock(4, 2)  # still held
        v.unlock_shared(4, 2)
        assert other.try_lock(4, 2)
        with pytest.raises(ValueError, match="not all write-locked"):
            other.unlock(4, 3)
        other.unlock(4, 2)


def test_half_a_version_is_no_version(tmp_path: Path) -> None:
    """A creator between its two files, or a drop between its two unlinks."""
    h = header()
    data_path, map_path = paths(tmp_path, STEM)
    with opened(tmp_path, h) as v:
        v.write_group(0, [[expected(h, 0)]])
    data_path.rename(tmp_path / "aside")
    assert VersionFiles.open(*paths(tmp_path), h, create=False) is None  # a map, no data
    (tmp_path / "aside").rename(data_path)
    map_path.unlink()
    assert VersionFiles.open(*paths(tmp_path), h, create=False) is None  # data, no map


@pytest.mark.parametrize("block_size", [1000, 6000])
def test_blocks_that_do_not_end_on_a_page_keep_their_neighbours(
    tmp_path: Path, block_size: int
) -> None:
    """Punches zero what they cannot free: never a byte of a mapped neighbour."""
    h = MapHeader(block_size, 20 * block_size - 7, DIGEST)
    want = {i: random.Random(i).randbytes(h.length_of(i)) for i in range(20)}
    with opened(tmp_path, h) as v:
        v.write_group(0, [[want[i]] for i in range(20)])
        assert v.remove(5, 1) and v.remove(12, 3) and v.remove(19, 1)
        for i in (5, 13):  # bytes without entries again, beside mapped blocks
            os.pwrite(v.data_fd, want[i], h.offset_of(i))
        assert v.reclaim(0, 20)[1] == 0
        v.reclaim(0, 20)  # again: zeroes the same partial pages again, harmlessly
        kept = [i for i in range(20) if i not in (5, 12, 13, 14, 19)]
        assert v.mapped(0, 20) == [i in kept for i in range(20)]
        for i in kept:
            assert v.read_block(i) == want[i], i


def test_a_locked_block_across_two_extents_is_left_once(tmp_path: Path) -> None:
    h = MapHeader(4 * BS, 4 * 4 * BS, DIGEST)  # 16 KiB blocks
    with opened(tmp_path, h) as v, opened(tmp_path, h, create=False) as writer:
        os.pwrite(v.data_fd, b"x" * BS, h.offset_of(1))  # block 1's first page
        os.pwrite(v.data_fd, b"y" * BS, h.offset_of(1) + 3 * BS)  # and its last
        assert writer.try_lock(1, 1)
        assert v.reclaim(0, 4) == (0, 1)
        writer.unlock(1, 1)
        assert v.reclaim(0, 4) == (4 * BS, 0)


def test_a_mapped_block_whose_bytes_were_lost_is_written_again(tmp_path: Path) -> None:
    """A power cut kept a block's entry but not its bytes: a write of the same
    bytes reads the block back, finds it wrong and writes it, where a mere
    look at the map would have skipped it (and left it torn)."""
    h = header()
    with opened(tmp_path, h) as v:
        assert v.write_group(0, [[expected(h, i)] for i in range(4)]) == [None] * 4
        data_path, _ = paths(tmp_path)
        with open(data_path, "r+b") as fh:  # what the disk kept of block 2
            fh.seek(2 * BS + 100)
            fh.write(b"\0" * 50)
        with pytest.raises(CorruptBlock):
            v.read_block(2)
        assert v.write_group(0, [[expected(h, i)] for i in range(4)]) == [None] * 4
        assert [v.read_block(i) for i in range(4)] == [expected(h, i) for i in range(4)]


def test_a_new_map_never_pairs_with_a_data_file_already_there(tmp_path: Path) -> None:
    """A drop killed between unlinking the map and the data file: a reader still
    holds both, through its old map. A creator must not take that data file
    into its new version (its later writes and punches would change bytes the
    reader's map vouches for): it makes a new one, and the reader's files
    say they were dropped."""
    h = header()
    with opened(tmp_path, h) as old:
        old.write_group(0, [[expected(h, 0)]])
        _, map_path = paths(tmp_path)
        map_path.unlink()  # the drop's first unlink, and then it died
        assert old.dropped()
        with opened(tmp_path, h) as new:
            assert new.mapped(0, 1) == [False]
            new.write_group(0, [[bytes(BS)]])  # whatever the new one writes there...
            new.remove(0, 1)  # ...or punches
        assert old.read_block(0) == expected(h, 0)  # ...the old one's bytes stand


def test_creators_racing_write_one_header(tmp_path: Path) -> None:
    """Processes (here threads, each its own opens) creating one version at once."""
    h = header()
    for attempt in range(20):
        where = tmp_path / str(attempt)
        barrier = threading.Barrier(4)
        opened_files: list[VersionFiles] = []

        def create(
            where: Path = where,
            barrier: threading.Barrier = barrier,
            opened_files: list[VersionFiles] = opened_files,
        ) -> None:
            barrier.wait()
            v = VersionFiles.open(*paths(where), h, create=True)
            assert v is not None
            opened_files.append(v)

        threads = [threading.Thread(target=create) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(opened_files) == 4
        for n, v in enumerate(opened_files):
            v.write_group(n, [[expected(h, n)]])
        for v in opened_files:
            assert v.read_span(0, 4) == b"".join(expected(h, i) for i in range(4))
            v.close()
        assert paths(where, STEM)[1].read_bytes()[:64] == encode_header(h)
