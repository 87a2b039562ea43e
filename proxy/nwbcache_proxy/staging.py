"""Per-process staging dirs for temp files, and sweeping what dead processes left.

A process's temp files (meta.json on its way, a block on a filesystem without
O_TMPFILE) live in a dir of its own under ``staging/``, held by an flock while
the process lives: a starting daemon removes the dirs of dead processes
without touching those of live ones sharing the cache, and a dead process's
dir is the sign of an unclean stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import os
import secrets
import shutil
import time
from pathlib import Path

from .layout import Layout


class Staging:
    """A per-process directory for temp files, alive while its flock is held.

    Temp files live on the cache's filesystem so that publishing is one
    ``os.replace``.
    """

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        layout.staging.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        # Created and locked under a dot-name, then renamed into place: a
        # daemon sweeping at the same moment never sees it unlocked.
        nascent = layout.staging / f"{NASCENT_PREFIX}{name}"
        nascent.mkdir()
        self._lock_fd = os.open(nascent / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = layout.staging / name
        os.rename(nascent, self.path)
        # The dir is this process's alone, so a counter names temp files
        # uniquely (no getrandom per block; next() on a count is atomic).
        self._names = itertools.count()

    def temp_path(self) -> Path:
        return self.path / f"{next(self._names)}.tmp"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Let go of the lock but leave the directory: a later sweep takes it
        for a dead process's (an unclean stop)."""
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


# Staging dirs still being set up; swept only when this old (a crash mid-set-up).
NASCENT_PREFIX = "."
NASCENT_GRACE = 3600.0


@dataclasses.dataclass(frozen=True, slots=True)
class Swept:
    dead: int  # staging dirs of processes that died without closing: an unclean stop
    trash: int  # dirs left in trash by an interrupted drop


def sweep_leftovers(layout: Layout) -> Swept:
    """Remove staging dirs of dead processes and anything left in trash.

    Safe to run while other daemons use the cache: a live process holds the
    flock on its staging dir. A dead process's staging dir is the sign of an
    unclean stop (a clean one removes its own), after which the index may
    disagree with the files.
    """
    dead = 0
    for entry in scandir(layout.staging):
        if entry.name.startswith(NASCENT_PREFIX) and not _older_than(entry, NASCENT_GRACE):
            continue
        lock = Path(entry.path) / ".lock"
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = -1  # died before taking its lock, or half-removed
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # alive
            shutil.rmtree(entry.path, ignore_errors=True)
            dead += 1
        finally:
            if fd >= 0:
                os.close(fd)
    trash = 0
    for entry in scandir(layout.trash):
        shutil.rmtree(entry.path, ignore_errors=True)
        trash += 1
    return Swept(dead, trash)


def _older_than(entry: os.DirEntry[str], seconds: float) -> bool:
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > seconds
    except FileNotFoundError:
        return False


def scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []
