"""unlinker: eviction's unlinks in a helper process, and the fallback when it is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nwbcache_proxy import unlinker
from nwbcache_proxy.unlinker import HELPER_MIN_BLOCKS, Group, Unlinker

pytestmark = pytest.mark.slow  # starts the helper


def _blocks(root: Path, dirs: int, per_dir: int) -> list[Group]:
    """Files <n>.blk in ``dirs`` dirs, as groups naming every one of them."""
    groups: list[Group] = []
    for d in range(dirs):
        shard = root / str(d)
        shard.mkdir(parents=True)
        for n in range(per_dir):
            (shard / f"{n}.blk").write_bytes(b"x")
        groups.append((str(shard), list(range(per_dir))))
    return groups


def _run(u: Unlinker, groups: list[Group]) -> None:
    """A slice unlinked, start to end."""
    u.start(groups)
    u.settle()


def _pid(u: Unlinker) -> int | None:
    return u.helper_pid  # a call: mypy keeps no narrowing of it across _run(u, )


def _left(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.blk"))


def test_the_helper_unlinks_exactly_its_groups(tmp_path: Path) -> None:
    groups = _blocks(tmp_path, 3, HELPER_MIN_BLOCKS)
    keep = tmp_path / "0" / "keep.blk"
    keep.write_bytes(b"k")
    victims = [(d, [i for i in idx if i % 2 == 0]) for d, idx in groups]
    victims.append((str(tmp_path / "gone"), [1, 2]))  # a dir dropped meanwhile: fine
    victims.append((victims[0][0], [HELPER_MIN_BLOCKS + 5]))  # a file already gone: fine
    u = Unlinker()
    try:
        _run(u, victims)
        helper = _pid(u)
        assert helper is not None  # it did the work, and stays
        assert _left(tmp_path) == sorted(
            [f"{d}/{n}.blk" for d in range(3) for n in range(1, HELPER_MIN_BLOCKS, 2)]
            + ["0/keep.blk"]
        )
        _run(u, [(d, [i for i in idx if i % 2]) for d, idx in groups])  # the same helper again
        assert _pid(u) == helper
        assert _left(tmp_path) == ["0/keep.blk"]
    finally:
        u.close()
    assert not Path(f"/proc/{helper}").exists()  # closing its input ended it (and it was reaped)


def test_a_dead_helper_means_unlinking_here_then_a_new_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unlinker, "RESTART_AFTER", 0.5)
    u = Unlinker()
    try:
        _run(u, _blocks(tmp_path / "a", 1, HELPER_MIN_BLOCKS))
        first = _pid(u)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pid(u) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        _run(u, _blocks(tmp_path / "b", 1, HELPER_MIN_BLOCKS))  # no helper: done in-process
        assert _left(tmp_path) == []
        assert _pid(u) is None
        time.sleep(0.6)
        _run(u, _blocks(tmp_path / "c", 1, HELPER_MIN_BLOCKS))
        assert _pid(u) not in (None, first)
        assert _left(tmp_path) == []
    finally:
        u.close()


def test_small_slices_start_no_helper(tmp_path: Path) -> None:
    u = Unlinker()
    try:
        _run(u, _blocks(tmp_path, 1, HELPER_MIN_BLOCKS - 1))
        assert _pid(u) is None
        assert _left(tmp_path) == []
    finally:
        u.close()


def test_the_helper_ignores_ctrl_c_and_ends_with_its_input(tmp_path: Path) -> None:
    groups = _blocks(tmp_path, 1, 3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nwbcache_proxy.unlinker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        time.sleep(0.5)  # past its start-up: SIGINT is ignored from then on
        os.kill(proc.pid, signal.SIGINT)
        proc.stdin.write(b'["%s",[0,2]]\n\n' % groups[0][0].encode())
        proc.stdin.flush()
        assert proc.stdout.readline() == b"\n"
        assert _left(tmp_path) == ["0/1.blk"]
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_file_that_cannot_go_stops_neither_its_group_nor_the_helper(tmp_path: Path) -> None:
    groups = _blocks(tmp_path, 1, HELPER_MIN_BLOCKS)
    stuck = tmp_path / "0" / "7.blk"
    stuck.unlink()
    stuck.mkdir()  # unlink(2) of a dir fails (EISDIR), whoever runs the tests
    u = Unlinker()
    try:
        _run(u, groups)
        helper = _pid(u)
        assert helper is not None  # it logged the failure and lives on
        assert _left(tmp_path) == ["0/7.blk"]  # every other block of the group went
        assert stuck.is_dir()
        more = _blocks(tmp_path / "more", 1, HELPER_MIN_BLOCKS)
        _run(u, more)
        assert _pid(u) == helper and _left(tmp_path) == ["0/7.blk"]
    finally:
        u.close()


def test_a_helper_dying_mid_slice_leaves_the_slice_to_this_process(tmp_path: Path) -> None:
    u = Unlinker()
    try:
        _run(u, _blocks(tmp_path / "a", 1, HELPER_MIN_BLOCKS))  # the helper is up
        helper = _pid(u)
        assert helper is not None
        os.kill(helper, signal.SIGSTOP)  # it takes the next slice, and never answers
        u.start(_blocks(tmp_path / "b", 2, HELPER_MIN_BLOCKS))
        assert len(_left(tmp_path)) == 2 * HELPER_MIN_BLOCKS  # nothing unlinked yet
        os.kill(helper, signal.SIGKILL)
        u.settle()  # the answer never comes: the slice is unlinked here
        assert _left(tmp_path) == []
        assert _pid(u) is None
    finally:
        u.close()
