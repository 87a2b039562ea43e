"""Eviction's holes, punched by a helper process so they never contend for the daemon's GIL.

An evicted run of blocks is a write of zeros over its map entries and a
punch of its bytes (versionfile.VersionFiles.remove); a slice is a thousand
blocks in tens of versions. On threads of the daemon each system call hands
the GIL back and forth with the event loop: under a stream of hits that
ping-pong (context switches, futex wake-ups) cost more than the calls,
slowed the hits, and left eviction at a third of its idle rate (measured
with format 2's unlinks). The helper (``python -m nwbcache_proxy.unlinker``,
one per evicting process, started at its first slice) has a GIL of its own.

Protocol, on the helper's stdin and stdout, one slice at a time: a JSON line
per group ``[version stem, [[first block, count], ...]]``, then an empty
line; the helper removes every group (UNLINK_THREADS threads, a version
each, opened once) and answers with one line: how many blocks it had to
leave (locked past REMOVE_PATIENCE), which the parent reports so that a
reconcile frees them. The parent chooses the
next slice's rows meanwhile, and reads the answer before it hands over the
next slice. The helper exits at end of input (its parent closed the pipe,
or died) and ignores SIGINT (a Ctrl-C goes to the parent).

If the helper cannot be started or dies, the slice's blocks are removed in
this process instead, and a new helper is tried at a later slice.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from pathlib import Path

from . import wholeversions
from .layout import DATA_SUFFIX, MAP_SUFFIX, block_file_name, block_relpath
from .spanlocks import runs_of
from .versionfile import VersionFiles

log = logging.getLogger(__name__)

# (version stem, runs of blocks as (first, count)): the blocks of one version.
Group = tuple[str, list[tuple[int, int]]]
# Victims removed from one version in one go (a group).
UNLINK_GROUP = 1024
# Threads removing in parallel (in the helper, or here as the fallback): a
# version's first open may read its inodes from disk; in parallel they overlap.
UNLINK_THREADS = 8
# Smaller slices are removed in this process: a process is not worth
# starting for a few blocks (a small cache, a trickle of evictions).
HELPER_MIN_BLOCKS = 256
# After the helper failed, slices are removed here for this long before a
# new helper is tried.
RESTART_AFTER = 30.0
# How long a removal waits for readers and writers of its run (copies of a
# block out, or a group being written around it: milliseconds) before it
# leaves the run's bytes to a reconcile (their rows are gone already).
REMOVE_PATIENCE = 1.0


def groups_of(victims: Iterable[tuple[str, int, float]], stem: Callable[[str], str]) -> list[Group]:
    """Victims (version, block index, last use) as (version stem, runs) groups of
    at most UNLINK_GROUP blocks, in an order that cycles through the versions:
    parallel removers then mostly work in different versions."""
    by_version: dict[str, list[int]] = {}
    for name, idx, _ in victims:
        by_version.setdefault(name, []).append(idx)
    numbered: list[tuple[int, str, list[int]]] = []
    for name, indices in by_version.items():
        indices.sort()
        numbered += [
            (i, name, indices[i : i + UNLINK_GROUP]) for i in range(0, len(indices), UNLINK_GROUP)
        ]
    numbered.sort(key=lambda g: g[0])  # stable: the versions' first groups, then their second...
    return [(stem(name), list(runs_of(part))) for _, name, part in numbered]


def remove_group(group: Group) -> int:
    """Remove a group's runs of blocks from their version, opened once; returns
    how many blocks were left with their bytes (their rows are gone: a
    reconcile is due). A version already gone is fine; a run that stays
    locked is logged and left, and the others still go. A punch the
    filesystem refuses (ENOSPC splitting an extent on XFS or btrfs) drops the
    whole version, whose space would otherwise stay taken. Blocks still in a
    format-2 dir (a migration under way) are unlinked there too."""
    stem, runs = group
    _unlink_legacy(stem, runs)
    data, map_ = Path(stem + DATA_SUFFIX), Path(stem + MAP_SUFFIX)
    files = VersionFiles.open_existing(data, map_)
    if files is None:
        return 0  # gone with its version
    left = 0
    failed: OSError | None = None
    try:
        for first, count in runs:
            try:
                if not files.remove(first, count, patience=REMOVE_PATIENCE):
                    left += count
            except OSError as exc:
                failed = exc
                break
    finally:
        files.close()
    if failed is not None:
        log.warning("could not punch evicted blocks of %s (%s): dropping the version", stem, failed)
        wholeversions.drop(data, map_)
        return sum(n for _, n in runs)
    if left:
        log.warning("could not evict %d blocks of %s: in use; a reconcile frees them", left, stem)
    return left


def _unlink_legacy(stem: str, runs: list[tuple[int, int]]) -> None:
    if not os.path.isdir(stem):
        return
    for first, count in runs:
        for index in range(first, first + count):
            for path in (f"{stem}/{block_relpath(index)}", f"{stem}/{block_file_name(index)}"):
                with contextlib.suppress(OSError):
                    os.unlink(path)


def remove_all(groups: list[Group], pool: Executor) -> int:
    """Every group, dealt to the pool's threads; the blocks left."""
    return sum(future.result() for future in [pool.submit(remove_group, g) for g in groups])


class Unlinker:
    """The parent's side: hands slices to the helper, or removes them itself."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._failed_at = -RESTART_AFTER
        self._lock = threading.Lock()  # one slice at a time on the pipe
        self._local: concurrent.futures.ThreadPoolExecutor | None = None
        # The slice handed to the helper and not yet answered for.
        self._outstanding: list[Group] = []
        # Blocks evicted from the index whose bytes are still on disk.
        self._left = 0

    @property
    def helper_pid(self) -> int | None:
        """The helper's pid while one is running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self, groups: list[Group]) -> None:
        """Start removing a slice's groups in the helper (settling the slice
        before first); a small slice, or one with no helper to take it, is
        removed here and now. Blocking."""
        with self._lock:
            self._settle()
            if not groups:
                return
            helped = sum(n for _, runs in groups for _, n in runs) >= HELPER_MIN_BLOCKS
            proc = self._helper() if helped else None
            if proc is not None:
                try:
                    _send_slice(proc, groups)
                    self._outstanding = groups
                    return
                except OSError as exc:
                    log.warning("eviction helper failed (%s); removing in-process", exc)
                    self._drop(proc, failed=True)
            self._remove_here(groups)

    def settle(self) -> None:
        """Wait until the slice started last is removed. Blocking."""
        with self._lock:
            self._settle()

    def take_left(self) -> int:
        """Blocks of the slices settled so far that could not be removed (then
        counted afresh): their bytes wait for a reconcile."""
        with self._lock:
            left, self._left = self._left, 0
        return left

    def close(self) -> None:
        with self._lock:
            self._settle()
            if self._proc is not None:
                self._drop(self._proc)
            if self._local is not None:
                self._local.shutdown(wait=True)
                self._local = None

    def _settle(self) -> None:
        groups, self._outstanding = self._outstanding, []
        if not groups:
            return
        proc = self._proc
        try:
            answer = proc.stdout.readline() if proc is not None and proc.stdout else b""
            if not answer.strip().isdigit():
                raise OSError("the helper exited mid-slice")
            self._left += int(answer)
        except OSError as exc:
            log.warning("eviction helper failed (%s); removing in-process", exc)
            if proc is not None:
                self._drop(proc, failed=True)
            self._remove_here(groups)  # all of them: blocks already gone are fine

    def _remove_here(self, groups: list[Group]) -> None:
        if self._local is None:
            self._local = concurrent.futures.ThreadPoolExecutor(
                UNLINK_THREADS, thread_name_prefix="nwbcache-evict"
            )
        self._left += remove_all(groups, self._local)

    def _helper(self) -> subprocess.Popen[bytes] | None:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._proc is not None:  # it died between slices
            self._drop(self._proc, failed=True)
        if time.monotonic() - self._failed_at < RESTART_AFTER:
            return None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "nwbcache_proxy.unlinker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
            )
        except OSError as exc:
            log.warning("could not start the eviction helper (%s); removing in-process", exc)
            self._failed_at = time.monotonic()
            return None
        return self._proc

    def _drop(self, proc: subprocess.Popen[bytes], *, failed: bool = False) -> None:
        """Close the helper's pipes and reap it (it exits at end of input)."""
        if failed:
            self._failed_at = time.monotonic()
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._proc = None


def _send_slice(proc: subprocess.Popen[bytes], groups: list[Group]) -> None:
    """Hand a slice to the helper (its answer is read by settle)."""
    assert proc.stdin is not None
    lines = [json.dumps(g, separators=(",", ":")).encode() + b"\n" for g in groups]
    proc.stdin.write(b"".join(lines) + b"\n")
    proc.stdin.flush()


def _serve(lines: Iterable[bytes], reply: Callable[[int], object], pool: Executor) -> None:
    """The helper's loop: a slice's groups until an empty line, then remove
    them and answer with how many blocks were left."""
    groups: list[Group] = []
    for line in lines:
        if line.strip():
            stem, runs = json.loads(line)
            groups.append((str(stem), [(int(first), int(n)) for first, n in runs]))
            continue
        left = remove_all(groups, pool)
        groups = []
        reply(left)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with concurrent.futures.ThreadPoolExecutor(UNLINK_THREADS) as pool:
        _serve(sys.stdin.buffer, lambda left: os.write(sys.stdout.fileno(), b"%d\n" % left), pool)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
