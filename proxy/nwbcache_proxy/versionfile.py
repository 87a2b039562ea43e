"""Format 3's files of one version: its sparse data file and its map, written, read, locked
and punched (docs/format-3-design.md). Blocking: called in disk threads.

Order and span locks (spanlocks.py) are what make it safe without a file
per block:

- A writer holds the write lock of its group's span, writes the bytes of
  the blocks the map does not have yet, then their entries: a crash between
  the two leaves blocks unmapped (absent), never mapped and unwritten; a
  failed write punches out only what it wrote.
- An evictor holds the write lock of the span, unmaps it, then punches it:
  no writer puts a block back between the two, and no reader is reading.
- A reader holds a read lock while it looks at the entries and copies the
  bytes out (``read_span``). Never ``sendfile`` from a data file: a hole
  punched later changes bytes already handed to a socket (measured on Linux
  6.18, ``bench/layouts.py``'s hazard check), where an unlinked block file,
  in format 2, keeps its pages for whoever holds them.
- Opening and dropping a version's two files take the object dir's lock
  (``store.object_lock``; shared to open, exclusive to create or drop), so
  nobody pairs one version's map with another's data file.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from . import mapfile
from .blockfile import Buffer, CorruptBlock, Parts
from .mapfile import MapHeader
from .spanlocks import SpanLocks, runs_of
from .sparse import data_extents, punch_hole, pwritev_all
from .store import object_lock

# How long a writer waits for the write lock of its group (an eviction of the
# span, or a reader copying a block of it out: milliseconds) before giving up
# on caching the group; its bytes are still served from memory.
WRITE_LOCK_PATIENCE = 5.0


# How bytes are read: (fd, length, offset) -> the bytes (os.pread, or a read
# on the event loop that never waits for the disk).
Pread = Callable[[int, int, int], Buffer]


class Busy(Exception):
    """A block being written or removed: not read now."""


class VersionDropped(OSError):
    """The version's files were unlinked (evicted whole, or dropped as stale)
    while this process held them open: open them again."""


class VersionFiles:
    """A version's data and map files, open for reading and writing (the data
    file twice: once for readers, once for writers' locks)."""

    def __init__(self, data_fd: int, lock_fd: int, map_fd: int, header: MapHeader) -> None:
        self.data_fd = data_fd
        self.map_fd = map_fd
        self.header = header
        self._lock_fd = lock_fd
        self.locks = SpanLocks(data_fd, lock_fd, header.block_size)

    @classmethod
    def open(
        cls, data_path: Path, map_path: Path, header: MapHeader, *, create: bool
    ) -> VersionFiles | None:
        """Open the version's files: None if they are not both there with a
        header (and ``create`` is false). CorruptMap if the map is another
        version's, or not a map: the caller drops both files. A map made here
        has its full length at once (sparse: all its entries read as absent)."""
        try:
            with object_lock(map_path, shared=not create):
                return cls._open(data_path, map_path, header, create=create)
        except FileNotFoundError:  # no object dir (a reader's lock does not make it)
            if create:
                raise
            return None

    @classmethod
    def open_existing(
        cls, data_path: Path, map_path: Path, *, locked: bool = False
    ) -> VersionFiles | None:
        """Open a version's files as its map describes it (an evictor knows the
        version by name only); None if they are not both there, or the map is
        not one. ``locked``: the caller holds the object dir's lock."""
        try:
            with contextlib.nullcontext() if locked else object_lock(map_path, shared=True):
                return cls._open(data_path, map_path, None, create=False)
        except (FileNotFoundError, mapfile.CorruptMap):
            return None

    @classmethod
    def _open(
        cls, data_path: Path, map_path: Path, header: MapHeader | None, *, create: bool
    ) -> VersionFiles | None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fds: list[int] = []
        try:
            fds.append(os.open(map_path, flags, 0o644))
            raw = os.pread(fds[0], mapfile.HEADER_SIZE, 0)
            if raw and create and not data_path.exists():
                # Half a version (its data file lost): its entries would map holes.
                # Under the creator's exclusive lock, so the map is made afresh.
                os.ftruncate(fds[0], 0)
                raw = b""
            if not raw and create and header is not None:
                # A new map never pairs with a data file already there (what a
                # drop killed between its two unlinks left): another process
                # may still read that one through its old map.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(data_path)
                os.pwrite(fds[0], mapfile.encode_header(header), 0)
                os.ftruncate(fds[0], mapfile.entry_offset(header.blocks))
                raw = os.pread(fds[0], mapfile.HEADER_SIZE, 0)
            if not raw:  # a creator's header is on its way (it held the lock before us)
                raise FileNotFoundError(map_path)
            found = mapfile.decode_header(raw)
            if header is not None:
                mapfile.check_header(found, header)
            fds.append(os.open(data_path, flags, 0o644))
            fds.append(os.open(data_path, os.O_RDWR | os.O_CLOEXEC))
        except FileNotFoundError:
            _close_all(fds)
            if create:
                raise
            return None
        except BaseException:
            _close_all(fds)
            raise
        return cls(fds[1], fds[2], fds[0], found)

    def close(self) -> None:
        self.locks.close()  # its fd numbers may be another file's from now on
        _close_all([self.data_fd, self._lock_fd, self.map_fd])
        self.data_fd = self._lock_fd = self.map_fd = -1

    # -- writing -----------------------------------------------------------
    def write_group(
        self, first: int, blocks: Sequence[Parts], *, fsync: bool = False
    ) -> list[OSError | None]:
        """Blocks ``first``, ``first + 1``... (each its bytes in parts): the bytes
        of those the map does not have as they are here, then their entries;
        per block, None once it is there exactly, or why it could not be
        written. A block the map has with these bytes' entry is read back and
        checked, and written again if its bytes are not those (a power cut
        lost them). A run that fails (ENOSPC) is unmapped and its bytes
        punched out; the others are kept. VersionDropped before anything is
        written when the files were unlinked meanwhile."""
        for n, parts in enumerate(blocks):
            want = self.header.length_of(first + n)
            if sum(len(p) for p in parts) != want:
                raise ValueError(f"block {first + n} must be {want} bytes")
        results: list[OSError | None] = [None] * len(blocks)
        if not blocks:
            return results
        self.locks.wait_exclusive(first, len(blocks), WRITE_LOCK_PATIENCE)
        try:
            if self.dropped():  # checked under the lock: a drop holds all of them
                raise VersionDropped(errno.ENOENT, "the version's files were unlinked")
            new = mapfile.encode_entries(blocks)
            had = self.entries(first, len(blocks))
            todo = [
                first + n
                for n, entry in enumerate(mapfile.decode_entries(new))
                if entry != had[n] or not self._intact(first + n, entry)
            ]
            size = mapfile.ENTRY_SIZE
            for run_first, count in runs_of(todo):
                at = run_first - first
                try:
                    self._write_run(
                        run_first, blocks[at : at + count], new[at * size : (at + count) * size],
                        fsync,
                    )  # fmt: skip
                except OSError as exc:
                    results[at : at + count] = [exc] * count
        finally:
            self.locks.release_exclusive(first, len(blocks))
        return results

    def _intact(self, index: int, entry: tuple[int, int]) -> bool:
        """Whether block ``index``'s bytes on disk match ``entry`` (under the lock)."""
        data = os.pread(self.data_fd, entry[1], self.header.offset_of(index))
        try:
            mapfile.check_block(entry, data, index)
        except CorruptBlock:
            return False
        return True

    def _write_run(self, first: int, blocks: Sequence[Parts], entries: bytes, fsync: bool) -> None:
        offset = self.header.offset_of(first)
        views = [memoryview(p).cast("B") for parts in blocks for p in parts]
        try:
            pwritev_all(self.data_fd, views, offset)
            if fsync:
                os.fdatasync(self.data_fd)
            if os.pwrite(self.map_fd, entries, mapfile.entry_offset(first)) != len(entries):
                raise OSError(errno.ENOSPC, "short write of map entries")
            if fsync:
                os.fdatasync(self.map_fd)
        except OSError:
            # Unmapped first, and punched only once surely unmapped: a block must
            # never be mapped over zeros. Bytes left behind are whole where an
            # entry maps them, and reclaim() finds the others.
            zeros = bytes(len(blocks) * mapfile.ENTRY_SIZE)
            with contextlib.suppress(OSError):
                if os.pwrite(self.map_fd, zeros, mapfile.entry_offset(first)) == len(zeros):
                    self._punch(offset, self.header.offset_of(first + len(blocks)))
            raise

    def dropped(self) -> bool:
        """Whether the data file or the map was unlinked since they were opened."""
        return os.fstat(self.data_fd).st_nlink == 0 or os.fstat(self.map_fd).st_nlink == 0

    # -- reading -----------------------------------------------------------
    def entries(self, first: int, count: int, pread: Pread = os.pread) -> list[tuple[int, int]]:
        """The map's entries of blocks [first, first + count); absent past its end."""
        raw = pread(self.map_fd, count * mapfile.ENTRY_SIZE, mapfile.entry_offset(first))
        found = mapfile.decode_entries(raw)
        return found + [(0, 0)] * (count - len(found))

    def mapped(self, first: int, count: int) -> list[bool]:
        """Whether the map says each of blocks [first, first + count) is there."""
        return mapfile.mapped(self.header, first, self.entries(first, count))

    def read(
        self,
        index: int,
        lo: int = 0,
        hi: int | None = None,
        *,
        verify: bool,
        pread: Pread = os.pread,
    ) -> Buffer | None:
        """Bytes [lo, hi) of block ``index`` (all of it by default), copied out
        under a read lock: None if the map does not have it, Busy while it is
        being written or removed. With ``verify`` ([lo, hi) then the whole
        block), CorruptBlock unless its bytes match its entry (a torn write
        after a power cut, a disk error); without, unless there are as many
        as asked. ``pread``: how bytes are read (the event loop's never waits
        for the disk)."""
        hi = self.header.length_of(index) if hi is None else hi
        if not self.locks.shared(index, 1):
            raise Busy(f"block {index} is being removed or written")
        try:
            (entry,) = self.entries(index, 1, pread)
            if not mapfile.mapped(self.header, index, [entry])[0]:
                return None
            data = pread(self.data_fd, hi - lo, self.header.offset_of(index) + lo)
        finally:
            self.locks.release_shared(index, 1)
        if verify:
            mapfile.check_block(entry, data, index)
        elif len(data) != hi - lo:
            raise CorruptBlock(f"block {index}: the data file is shorter than its map says")
        return data

    def read_block(self, index: int) -> bytes:
        """Block ``index``'s bytes, checked against its entry: CorruptBlock if the
        map does not have it or its bytes do not match, or while it is being
        removed or written."""
        try:
            data = self.read(index, verify=True)
        except Busy as exc:
            raise CorruptBlock(str(exc)) from None
        if data is None:
            raise CorruptBlock(f"block {index} is not in the map")
        return bytes(data)  # os.pread's: already bytes, not copied

    def read_span(
        self,
        first: int,
        count: int,
        within: tuple[int, int] | None = None,
        pread: Pread = os.pread,
        *,
        verify: bool = False,
    ) -> Buffer | None:
        """The bytes of blocks [first, first + count) (or of the object's bytes
        ``within`` them), copied out under a read lock, if the map has every
        one of them; None if not, or while any of them is being removed or
        written. Their checksums are the caller's to check the first time it
        serves a block, or, with ``verify``, checked here: every block read
        whole, CorruptBlock unless each matches its entry."""
        h = self.header
        whole = (h.offset_of(first), min(h.size, h.offset_of(first + count)))
        start, end = whole if verify or within is None else within
        if not self.locks.shared(first, count):
            return None
        try:
            entries = self.entries(first, count, pread)
            if not all(mapfile.mapped(h, first, entries)):
                return None
            data = pread(self.data_fd, end - start, start)
        finally:
            self.locks.release_shared(first, count)
        if len(data) != end - start:
            return None
        if not verify:
            return data
        view = memoryview(data)
        for n, entry in enumerate(entries):
            lo = h.offset_of(first + n) - start
            mapfile.check_block(entry, view[lo : lo + h.length_of(first + n)], first + n)
        return view if within is None else view[within[0] - start : within[1] - start]

    # -- removing ----------------------------------------------------------
    def remove(self, first: int, count: int, *, fsync: bool = False, patience: float = 0.0) -> bool:
        """Blocks [first, first + count) out of the map (made durable first with
        ``fsync``), then their space freed. False, doing nothing, while anyone
        reads or writes any of them for longer than ``patience`` seconds."""
        if not self.locks.exclusive(first, count):
            try:
                self.locks.wait_exclusive(first, count, patience)
            except OSError:
                return False
        try:
            os.pwrite(self.map_fd, bytes(count * mapfile.ENTRY_SIZE), mapfile.entry_offset(first))
            if fsync:
                os.fdatasync(self.map_fd)
            self._punch(self.header.offset_of(first), self.header.offset_of(first + count))
        finally:
            self.locks.release_exclusive(first, count)
        return True

    def reclaim(self, first: int, count: int) -> tuple[int, int]:
        """Punch out the bytes of blocks [first, first + count) that the map does
        not have: a crash between a group's bytes and its entries left them, and
        no row counts their space (reconcile calls this in bounded spans). A
        span being written is locked: left for a later pass. Returns (bytes
        punched, blocks left because locked). Where blocks do not end on a
        filesystem block, a punch zeroes what it cannot free, and a later
        pass punches those bytes again: harmless."""
        h = self.header
        start, end = h.offset_of(first), min(h.size, h.offset_of(first + count))
        holding: set[int] = set()  # blocks with bytes on disk, each once
        for a, b in list(data_extents(self.data_fd, start, end)):
            holding.update(range(a // h.block_size, -(-b // h.block_size)))
        candidates = sorted(holding)
        mapped = dict(zip(candidates, self._mapped_at(candidates), strict=True))
        punched = skipped = 0
        for run in runs_of([i for i in candidates if not mapped[i]]):
            if not self.locks.exclusive(*run):
                skipped += run[1]
                continue
            try:  # looked at again under the lock: a writer may have mapped some
                again = self.mapped(*run)
                for gone in runs_of([run[0] + n for n, m in enumerate(again) if not m]):
                    punched += self._punch(h.offset_of(gone[0]), h.offset_of(gone[0] + gone[1]))
            finally:
                self.locks.release_exclusive(*run)
        return punched, skipped

    def _mapped_at(self, indices: list[int]) -> list[bool]:
        out: list[bool] = []
        for run in runs_of(indices):
            out += self.mapped(*run)
        return out

    def _punch(self, start: int, end: int) -> int:
        """Punch [start, end) of the data file, through the end of the file's last
        filesystem block when ``end`` reaches the object's end (a partial block
        is only zeroed, never freed). Returns the bytes punched."""
        if end >= self.header.size:
            fs_block = os.fstat(self.data_fd).st_blksize or 4096
            end = -(-self.header.size // fs_block) * fs_block
        if end > start:
            punch_hole(self.data_fd, start, end - start)
        return max(0, end - start)

    # -- locks, for callers that compose (and tests) ----------------------------
    def try_lock(self, first: int, count: int) -> bool:
        return self.locks.exclusive(first, count)

    def unlock(self, first: int, count: int) -> None:
        self.locks.release_exclusive(first, count)

    def lock_shared(self, first: int, count: int) -> bool:
        return self.locks.shared(first, count)

    def unlock_shared(self, first: int, count: int) -> None:
        self.locks.release_shared(first, count)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
