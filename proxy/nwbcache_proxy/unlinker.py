"""Eviction's unlinks, done by a helper process so they never contend for the daemon's GIL.

An evicted block is one ``unlink``; a slice is a thousand. On threads of the
daemon each unlink hands the GIL back and forth with the event loop: under a
stream of hits that ping-pong (context switches, futex wake-ups) cost more
than the unlinks, slowed the hits, and left eviction at a third of its idle
rate. The helper (``python -m nwbcache_proxy.unlinker``, one per evicting
process, started at its first slice) has a GIL of its own.

Protocol, on the helper's stdin and stdout, one slice at a time: a JSON line
per group ``[shard dir, [block index, ...]]``, then an empty line; the
helper unlinks every group (UNLINK_THREADS threads, a shard dir each, opened
once) and answers with one empty line. The parent chooses the next slice's
rows meanwhile, and reads the answer before it hands over the next slice.
The helper exits at end of input (its parent closed the pipe, or died) and
ignores SIGINT (a Ctrl-C goes to the parent).

If the helper cannot be started or dies, the slice's files are unlinked in
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

from .layout import block_file_name

log = logging.getLogger(__name__)

# (shard dir, block indices): the blocks of one group live in one dir.
Group = tuple[str, list[int]]
# Threads unlinking in parallel (in the helper, or here as the fallback). An
# unlink that must read its inode from disk waits on I/O; in parallel they
# overlap (1,024 files took 80 µs each on one thread, 26 µs on eight).
UNLINK_THREADS = 8
# Smaller slices are unlinked in this process: a process is not worth
# starting for a few files (a small cache, a trickle of evictions).
HELPER_MIN_BLOCKS = 256
# After the helper failed, slices are unlinked here for this long before a
# new helper is tried.
RESTART_AFTER = 30.0


def unlink_group(group: Group) -> None:
    """Unlink a group's blocks by name in their shard dir, opened once: no path
    walk per block. Files and dirs already gone are fine; a file that cannot
    be unlinked (EACCES, EIO...) is logged and left for a reconcile, and the
    others still go."""
    shard_dir, indices = group
    try:
        dir_fd = os.open(shard_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return  # gone with its version
    except OSError as exc:
        log.warning("could not open %s to evict %d blocks: %s", shard_dir, len(indices), exc)
        return
    failed: OSError | None = None
    try:
        for idx in indices:
            try:
                os.unlink(block_file_name(idx), dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                failed = exc
    finally:
        os.close(dir_fd)
    if failed is not None:
        log.warning("could not unlink evicted blocks in %s: %s", shard_dir, failed)


def unlink_all(groups: list[Group], pool: Executor) -> None:
    """Every group, dealt to the pool's threads (mostly a dir each: unlinks in
    one dir take turns on its lock)."""
    for future in [pool.submit(unlink_group, g) for g in groups]:
        future.result()


class Unlinker:
    """The parent's side: hands slices to the helper, or unlinks them itself."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._failed_at = -RESTART_AFTER
        self._lock = threading.Lock()  # one slice at a time on the pipe
        self._local: concurrent.futures.ThreadPoolExecutor | None = None
        # The slice handed to the helper and not yet answered for.
        self._outstanding: list[Group] = []

    @property
    def helper_pid(self) -> int | None:
        """The helper's pid while one is running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self, groups: list[Group]) -> None:
        """Start unlinking a slice's groups in the helper (settling the slice
        before first); a small slice, or one with no helper to take it, is
        unlinked here and now. Blocking."""
        with self._lock:
            self._settle()
            if not groups:
                return
            helped = sum(len(indices) for _, indices in groups) >= HELPER_MIN_BLOCKS
            proc = self._helper() if helped else None
            if proc is not None:
                try:
                    _send_slice(proc, groups)
                    self._outstanding = groups
                    return
                except OSError as exc:
                    log.warning("eviction helper failed (%s); unlinking in-process", exc)
                    self._drop(proc, failed=True)
            self._unlink_here(groups)

    def settle(self) -> None:
        """Wait until the slice started last is unlinked. Blocking."""
        with self._lock:
            self._settle()

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
            if proc is None or proc.stdout is None or proc.stdout.readline() != b"\n":
                raise OSError("the helper exited mid-slice")
        except OSError as exc:
            log.warning("eviction helper failed (%s); unlinking in-process", exc)
            if proc is not None:
                self._drop(proc, failed=True)
            self._unlink_here(groups)  # all of them: files already gone are fine

    def _unlink_here(self, groups: list[Group]) -> None:
        if self._local is None:
            self._local = concurrent.futures.ThreadPoolExecutor(
                UNLINK_THREADS, thread_name_prefix="nwbcache-evict"
            )
        unlink_all(groups, self._local)

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
            log.warning("could not start the eviction helper (%s); unlinking in-process", exc)
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


def _serve(lines: Iterable[bytes], reply: Callable[[], object], pool: Executor) -> None:
    """The helper's loop: a slice's groups until an empty line, then unlink
    them and answer."""
    groups: list[Group] = []
    for line in lines:
        if line.strip():
            shard_dir, indices = json.loads(line)
            groups.append((str(shard_dir), [int(i) for i in indices]))
            continue
        unlink_all(groups, pool)
        groups = []
        reply()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with concurrent.futures.ThreadPoolExecutor(UNLINK_THREADS) as pool:
        _serve(sys.stdin.buffer, lambda: os.write(sys.stdout.fileno(), b"\n"), pool)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
