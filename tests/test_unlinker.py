"""unlinker: eviction's removals (unmap, then punch) in a helper process, and the fallback
when it is gone. Checked on real format-3 versions: a removed block is out of its map
and a hole in its data file; every other block reads back as written."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nwbcache_proxy import unlinker
from nwbcache_proxy.layout import DATA_SUFFIX, MAP_SUFFIX
from nwbcache_proxy.mapfile import MapHeader
from nwbcache_proxy.unlinker import HELPER_MIN_BLOCKS, REMOVE_PATIENCE, Group, Unlinker
from nwbcache_proxy.versionfile import VersionFiles
from tests.support.helpers import mapped_exactly

BS = 4096  # a filesystem block: a removed block's space is freed, not only zeroed


def _files(stem: str) -> tuple[Path, Path]:
    return Path(stem + DATA_SUFFIX), Path(stem + MAP_SUFFIX)


def _block(stem: str, n: int) -> bytes:
    return random.Random(f"{Path(stem).name}/{n}").randbytes(BS)


def _versions(root: Path, versions: int, blocks: int) -> list[Group]:
    """``versions`` versions of ``blocks`` blocks each, every block written, in one
    object dir; as groups naming every block of each (one run)."""
    groups: list[Group] = []
    obj = root / "objects" / "ab" / "abab"
    obj.mkdir(parents=True, exist_ok=True)
    for v in range(versions):
        stem = str(obj / f"{v:04d}.{BS}")
        digest = hashlib.sha256(stem.encode()).digest()
        files = VersionFiles.open(*_files(stem), MapHeader(BS, blocks * BS, digest), create=True)
        assert files is not None
        try:
            files.write_group(0, [[_block(stem, n)] for n in range(blocks)])
        finally:
            files.close()
        groups.append((stem, [(0, blocks)]))
    return groups


def _open(stem: str) -> VersionFiles:
    files = VersionFiles.open_existing(*_files(stem))
    assert files is not None
    return files


def _left(root: Path) -> dict[str, list[int]]:
    """Per version under ``root`` (its stem's name relative to root), the blocks
    its map still has, each read back and compared with what was written; its
    data file holds bytes at exactly those (the others were punched)."""
    out: dict[str, list[int]] = {}
    for map_path in sorted(root.rglob(f"*{MAP_SUFFIX}")):
        stem = str(map_path)[: -len(MAP_SUFFIX)]
        files = _open(stem)
        try:
            mapped = mapped_exactly(files, functools.partial(_block, stem), BS)
        finally:
            files.close()
        out[str(Path(stem).relative_to(root))] = mapped
    return out


def _run(u: Unlinker, groups: list[Group]) -> None:
    """A slice removed, start to end."""
    u.start(groups)
    u.settle()


def _pid(u: Unlinker) -> int | None:
    return u.helper_pid  # a call: mypy keeps no narrowing of it across _run(u, )


def _name(stem: str, root: Path) -> str:
    return str(Path(stem).relative_to(root))


@pytest.mark.slow  # starts the helper
def test_the_helper_removes_exactly_its_groups(tmp_path: Path) -> None:
    n = HELPER_MIN_BLOCKS
    groups = _versions(tmp_path, 4, n)
    bystander = groups.pop()  # a version no group names
    removed_before = groups[0][0]
    files = _open(removed_before)  # a block already gone: fine
    try:
        assert files.remove(0, 1)
    finally:
        files.close()
    victims = [(stem, [(i, 1) for i in range(0, n, 2)]) for stem, _ in groups]
    victims.append((str(tmp_path / "objects" / "ab" / "abab" / f"gone.{BS}"), [(1, 2)]))
    u = Unlinker()
    try:
        _run(u, victims)
        helper = _pid(u)
        assert helper is not None  # it did the work, and stays
        odd = list(range(1, n, 2))
        assert _left(tmp_path) == {
            **{_name(stem, tmp_path): odd for stem, _ in groups},
            _name(bystander[0], tmp_path): list(range(n)),
        }
        # all but two, as runs over blocks gone already too, by the same helper again
        _run(u, [(stem, [(1, n // 2 - 2), (n // 2 + 1, n // 2 - 2)]) for stem, _ in groups])
        assert _pid(u) == helper
        assert _left(tmp_path) == {
            **{_name(stem, tmp_path): [n // 2 - 1, n - 1] for stem, _ in groups},
            _name(bystander[0], tmp_path): list(range(n)),
        }
    finally:
        u.close()
    assert not Path(f"/proc/{helper}").exists()  # closing its input ended it (and it was reaped)


@pytest.mark.slow  # starts the helper
def test_a_dead_helper_means_removing_here_then_a_new_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unlinker, "RESTART_AFTER", 0.5)
    u = Unlinker()
    try:
        _run(u, _versions(tmp_path / "a", 1, HELPER_MIN_BLOCKS))
        first = _pid(u)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pid(u) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        _run(u, _versions(tmp_path / "b", 1, HELPER_MIN_BLOCKS))  # no helper: done in-process
        assert _pid(u) is None
        assert _left(tmp_path) == {f"{d}/objects/ab/abab/0000.{BS}": [] for d in "ab"}
        time.sleep(0.6)
        _run(u, _versions(tmp_path / "c", 1, HELPER_MIN_BLOCKS))
        assert _pid(u) not in (None, first)
        assert _left(tmp_path) == {f"{d}/objects/ab/abab/0000.{BS}": [] for d in "abc"}
    finally:
        u.close()


def test_small_slices_start_no_helper(tmp_path: Path) -> None:
    """Unmarked: a helper started here would trip conftest's guard."""
    u = Unlinker()
    try:
        groups = _versions(tmp_path, 2, HELPER_MIN_BLOCKS // 2 - 1)
        _run(u, groups)
        assert _pid(u) is None
        assert _left(tmp_path) == {_name(stem, tmp_path): [] for stem, _ in groups}
    finally:
        u.close()


@pytest.mark.slow  # starts the helper
def test_the_helper_ignores_ctrl_c_and_ends_with_its_input(tmp_path: Path) -> None:
    ((stem, _),) = _versions(tmp_path, 1, 4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nwbcache_proxy.unlinker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        # An empty slice answered: past its start-up (importing takes a good part
        # of a second on a busy machine), where SIGINT is ignored from then on.
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"0\n"
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.1)  # (a signal is not delivered at once)
        assert proc.poll() is None
        proc.stdin.write(b'["%s",[[0,1],[2,2]]]\n\n' % stem.encode())
        proc.stdin.flush()
        assert proc.stdout.readline() == b"0\n"
        assert _left(tmp_path) == {_name(stem, tmp_path): [1]}
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _gappy(stem: str, blocks: int) -> Group:
    """Every block but each fifth: runs (1, 4), (6, 4), (11, 4)..."""
    return stem, [(first, min(4, blocks - first)) for first in range(1, blocks, 5)]


@pytest.mark.slow  # starts the helper
def test_a_run_that_cannot_go_stops_neither_its_group_nor_the_helper(tmp_path: Path) -> None:
    """A run read through another open (here, another process) for longer than
    REMOVE_PATIENCE is left whole, bytes and all, for a reconcile; the group's
    other runs, the slice's other groups and a group of a version gone still
    go, and the helper lives on."""
    n = HELPER_MIN_BLOCKS
    (a, _), (b, _) = _versions(tmp_path, 2, n)
    gone = str(tmp_path / "objects" / "ab" / "abab" / f"gone.{BS}")
    reader = _open(a)
    u = Unlinker()
    try:
        assert reader.lock_shared(7, 1)  # in the run (6, 4)
        started = time.monotonic()
        _run(u, [(gone, [(0, 3)]), _gappy(a, n), _gappy(b, n)])
        assert time.monotonic() - started >= REMOVE_PATIENCE  # it waited, then gave up
        helper = _pid(u)
        assert helper is not None  # it logged the failure and lives on
        fifths = list(range(0, n, 5))
        assert _left(tmp_path) == {
            _name(a, tmp_path): sorted([*fifths, 6, 7, 8, 9]),
            _name(b, tmp_path): fifths,
        }
        assert reader.read_block(7) == _block(a, 7)
        reader.unlock_shared(7, 1)
        more = _versions(tmp_path / "more", 1, n)
        _run(u, more)
        assert _pid(u) == helper
        assert _left(tmp_path / "more") == {_name(more[0][0], tmp_path / "more"): []}
        _run(u, [(a, [(6, 4)])])  # let go of: the run goes now
        assert _left(tmp_path)[_name(a, tmp_path)] == fifths
    finally:
        reader.close()
        u.close()


@pytest.mark.slow  # starts the helper
def test_a_run_read_for_less_than_the_patience_still_goes(tmp_path: Path) -> None:
    """The helper waits for a reader copying a block out (milliseconds, in life)."""
    n = HELPER_MIN_BLOCKS
    ((stem, runs),) = _versions(tmp_path, 1, n)
    reader = _open(stem)
    u = Unlinker()
    try:
        assert reader.lock_shared(n - 1, 1)
        u.start([(stem, runs)])
        time.sleep(0.2)
        assert _left(tmp_path) == {_name(stem, tmp_path): list(range(n))}  # nothing yet
        reader.unlock_shared(n - 1, 1)
        u.settle()
        assert _left(tmp_path) == {_name(stem, tmp_path): []}
    finally:
        reader.close()
        u.close()


def test_in_process_a_run_in_use_or_a_version_gone_stops_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The same in this process (a small slice, or the fallback), with a patience
    made short: a reader's open in this process holds a run past it."""
    monkeypatch.setattr(unlinker, "REMOVE_PATIENCE", 0.05)
    (a, _), (b, _) = _versions(tmp_path, 2, 40)
    gone = str(tmp_path / "objects" / "ab" / "abab" / f"gone.{BS}")
    reader = _open(a)
    u = Unlinker()
    try:
        assert reader.lock_shared(11, 1)  # in the run (11, 4)
        with caplog.at_level(logging.WARNING, logger="nwbcache_proxy.unlinker"):
            _run(u, [_gappy(a, 40), (gone, [(0, 3)]), _gappy(b, 40)])
        assert _pid(u) is None
        fifths = list(range(0, 40, 5))
        assert _left(tmp_path) == {
            _name(a, tmp_path): sorted([*fifths, 11, 12, 13, 14]),
            _name(b, tmp_path): fifths,
        }
        assert f"could not evict 4 blocks of {a}" in caplog.text
    finally:
        reader.close()
        u.close()


@pytest.mark.slow  # starts the helper
def test_a_helper_dying_mid_slice_leaves_the_slice_to_this_process(tmp_path: Path) -> None:
    u = Unlinker()
    try:
        _run(u, _versions(tmp_path / "a", 1, HELPER_MIN_BLOCKS))  # the helper is up
        helper = _pid(u)
        assert helper is not None
        os.kill(helper, signal.SIGSTOP)  # it takes the next slice, and never answers
        groups = _versions(tmp_path / "b", 2, HELPER_MIN_BLOCKS)
        u.start(groups)
        everything = list(range(HELPER_MIN_BLOCKS))
        assert _left(tmp_path / "b") == {
            _name(stem, tmp_path / "b"): everything for stem, _ in groups
        }  # nothing removed yet
        os.kill(helper, signal.SIGKILL)
        u.settle()  # the answer never comes: the slice is removed here
        assert _left(tmp_path / "b") == {_name(stem, tmp_path / "b"): [] for stem, _ in groups}
        assert _pid(u) is None
    finally:
        u.close()
