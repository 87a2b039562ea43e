"""Files around the blocks: meta.json, the object dir's lock, dropping dirs, adopting old roots.

Every function here is blocking and is called through an executor by the
async layer. A version's own files (data and map) are versionfile.py's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .layout import Layout
from .staging import Staging, scandir

# Tries at a writer's lock on an object's dir that prunes keep removing (each
# removal needs the object emptied again: a few at most).
LOCK_ATTEMPTS = 100

log = logging.getLogger(__name__)


def adopt_legacy_root(layout: Layout) -> Path | None:
    """Rename an older format's root to this format's, if there is one and no new
    root yet; returns the root renamed. The reconciler then moves its blocks
    into data files (formats 1 and 2 differ from 3 only below object dirs)."""
    if layout.root.exists():
        return None
    for legacy in layout.legacy_roots:
        if not legacy.is_dir():
            continue
        try:
            os.rename(legacy, layout.root)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return None  # another daemon starting at the same moment did it
            raise
        return legacy
    return None


def read_meta(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as fh:
            value = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable object metadata %s: %s", path, exc)
        return None
    return value if isinstance(value, dict) else None


@contextlib.contextmanager
def object_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """An exclusive flock on the directory holding ``path`` (an object's meta.json,
    or a format-3 version's files): read-modify-writes of meta.json by several
    processes take turns, so a refreshed ``validated_at`` never undoes another
    process's ``private``. ``shared``: a lock for reading, which only waits
    for exclusive ones; the directory is not made (FileNotFoundError)."""
    fd = _locked_dir(path.parent, shared)
    try:
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _locked_dir(obj: Path, shared: bool) -> int:
    """An fd of ``obj`` holding its flock. A writer's lock is on a directory
    that is there: prune_object removes an emptied object's dir under its
    lock, and a writer that waited for that lock (or made the dir just
    before the removal) would create its files in no directory (ENOENT: CI
    saw blocks go uncached so). It makes the dir again and locks that one."""
    for _ in range(LOCK_ATTEMPTS):
        if not shared:
            obj.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(obj, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            if shared:
                raise
            continue  # removed between the mkdir and the open
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            if shared or os.fstat(fd).st_nlink > 0:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # removed while this waited for the lock
    raise FileNotFoundError(errno.ENOENT, "the object's dir keeps being removed", str(obj))


def fsync_dirs(path: Path, levels: int) -> None:
    """fsync dir ``path`` and its parents, ``levels`` dirs in all: the names of
    files (and dirs) made in them survive a power cut."""
    for d in [path, *path.parents][:levels]:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_meta(staging: Staging, path: Path, value: dict[str, Any]) -> None:
    tmp = staging.temp_path()
    try:
        tmp.write_text(json.dumps(value, sort_keys=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def drop_dir(layout: Layout, path: Path) -> None:
    """Remove a version (or object) dir: first out of sight by rename, then rmtree."""
    layout.trash.mkdir(parents=True, exist_ok=True)
    doomed = layout.trash / secrets.token_hex(8)
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def prune_object(obj: Path) -> bool:
    """Remove an object's dir and meta.json when no version is left in it (its
    last version's files went with its last block): an object with nothing
    cached keeps nothing on disk. True when it went."""
    if [e.name for e in scandir(obj)] != ["meta.json"]:
        return False
    with object_lock(obj / "meta.json"):
        if [e.name for e in scandir(obj)] != ["meta.json"]:
            return False
        unlink_quietly(obj / "meta.json")
        # Under the lock: a writer waiting for it finds the dir gone and makes
        # it again (_locked_dir), never a dir removed after its mkdir.
        _rmdir_quietly(obj)
    return True


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, OSError):
        os.rmdir(path)


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
