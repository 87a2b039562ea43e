"""Publishing a block file (publish.publish_block): the file appears whole or not
at all, written unnamed (O_TMPFILE) and linked in, or through a named temp file
in the staging dir where that is not possible; nothing is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nwbcache_proxy import blockfile, publish
from nwbcache_proxy.blockfile import HEADER_SIZE
from nwbcache_proxy.layout import Layout
from nwbcache_proxy.staging import Staging

DIGEST = bytes(range(32))


@pytest.fixture
def staging(tmp_path: Path) -> Staging:
    return Staging(Layout(tmp_path / "cache"))


def _shard(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "v2" / "objects" / "ab" / "0"


def _published(target: Path, fd: int, index: int, parts: list[bytes]) -> None:
    """``target`` holds exactly the block, and ``fd`` is open on that very file."""
    data = b"".join(parts)
    raw = target.read_bytes()
    header = blockfile.decode_header(raw)
    blockfile.check_header(header, index=index, length=len(data), digest=DIGEST, file_size=len(raw))
    blockfile.check_data(header, raw[HEADER_SIZE:])
    assert raw[HEADER_SIZE:] == data
    assert (os.fstat(fd).st_ino, os.fstat(fd).st_nlink) == (target.stat().st_ino, 1)
    assert os.pread(fd, len(data), HEADER_SIZE) == data


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named temp file"])
def test_a_block_appears_whole_and_leaves_nothing_behind(
    staging: Staging, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    if not unnamed:  # a filesystem without O_TMPFILE
        monkeypatch.setattr(publish, "_unnamed_file", lambda directory: None)
    target = _shard(tmp_path) / "7.blk"  # its shard dir does not exist yet
    parts = [os.urandom(5000), os.urandom(70_000), b"", os.urandom(3)]
    size, fd = publish.publish_block(staging, target, 7, parts, DIGEST, fsync=True)
    try:
        assert size == HEADER_SIZE + 75_003
        _published(target, fd, 7, parts)
    finally:
        os.close(fd)
    assert sorted(p.name for p in target.parent.iterdir()) == ["7.blk"]
    assert sorted(p.name for p in staging.path.iterdir()) == [".lock"]


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named temp file"])
def test_a_block_file_already_there_is_replaced_atomically(
    staging: Staging, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    """A reader holding the old file keeps reading the old bytes; a new open
    finds the new ones; there is never a moment with no file (replace, not
    unlink and link)."""
    if not unnamed:
        monkeypatch.setattr(publish, "_unnamed_file", lambda directory: None)
    target = _shard(tmp_path) / "3.blk"
    old = [os.urandom(4096)]
    _, old_fd = publish.publish_block(staging, target, 3, old, DIGEST, fsync=False)
    new = [os.urandom(4096)]
    _, new_fd = publish.publish_block(staging, target, 3, new, DIGEST, fsync=False)
    try:
        _published(target, new_fd, 3, new)
        assert os.pread(old_fd, 4096, HEADER_SIZE) == old[0]
        assert os.fstat(old_fd).st_nlink == 0
    finally:
        os.close(old_fd)
        os.close(new_fd)
    assert sorted(p.name for p in staging.path.iterdir()) == [".lock"]


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named temp file"])
def test_a_write_that_fails_leaves_no_file(
    staging: Staging, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    if not unnamed:
        monkeypatch.setattr(publish, "_unnamed_file", lambda directory: None)
    target = _shard(tmp_path) / "1.blk"
    open_before = set(os.listdir("/proc/self/fd"))

    def failing_write(fd: int, *parts: object) -> None:
        os.write(fd, b"half a block")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish, "_write_all", failing_write)
    with pytest.raises(OSError, match="No space"):
        publish.publish_block(staging, target, 1, [b"x" * 100], DIGEST, fsync=False)
    assert not target.exists()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == [staging.path / ".lock"]
    assert set(os.listdir("/proc/self/fd")) <= open_before | {".", ".."}, "an fd leaked"


def test_a_shard_dir_pruned_while_the_block_is_written_is_made_again(
    staging: Staging, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unnamed file does not keep its dir from being empty: eviction in
    another process may remove the shard dir meanwhile (prune_version)."""
    target = _shard(tmp_path) / "4.blk"
    real_write = publish._write_all

    def write_then_prune(fd: int, *parts: blockfile.Buffer) -> None:
        real_write(fd, *parts)
        os.rmdir(target.parent)  # empty: the file being written has no name

    monkeypatch.setattr(publish, "_write_all", write_then_prune)
    parts = [os.urandom(9000)]
    _, fd = publish.publish_block(staging, target, 4, parts, DIGEST, fsync=False)
    try:
        _published(target, fd, 4, parts)
    finally:
        os.close(fd)


def test_a_system_that_refuses_the_link_gets_named_temp_files(
    staging: Staging, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An LSM or a sandbox may allow O_TMPFILE but not linking it: the block is
    published the named way, and so are the next ones (no link tried again)."""
    monkeypatch.setattr(publish, "_tmpfile_ok", True)
    tried: list[object] = []

    def refused(*args: object, **kwargs: object) -> None:
        tried.append(args)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refused)
    for index in (1, 2):
        target = _shard(tmp_path) / f"{index}.blk"
        parts = [os.urandom(3000 + index)]
        _, fd = publish.publish_block(staging, target, index, parts, DIGEST, fsync=False)
        try:
            _published(target, fd, index, parts)
        finally:
            os.close(fd)
    assert len(tried) == 1 and not publish._tmpfile_ok
    assert sorted(p.name for p in staging.path.iterdir()) == [".lock"]


def test_the_unnamed_file_is_the_default_on_this_filesystem(tmp_path: Path) -> None:
    """The suite's filesystem has O_TMPFILE: the fast path is the one tested."""
    fd = publish._unnamed_file(str(tmp_path / "new" / "dir"))
    assert fd is not None
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").endswith("(deleted)")
    finally:
        os.close(fd)


@pytest.mark.slow  # forks
def test_a_forked_child_links_its_own_files_not_its_parents(
    staging: Staging, tmp_path: Path
) -> None:
    """/proc/<pid>/fd, not an fd of the parent's /proc dir inherited over fork:
    the child's fd 5 is not the parent's fd 5."""
    decoy = os.open(tmp_path / "decoy", os.O_CREAT | os.O_RDWR, 0o644)
    os.write(decoy, b"the parent's file")
    publish._own_fds()  # opened in the parent first
    target = _shard(tmp_path) / "9.blk"
    data = os.urandom(10_000)
    pid = os.fork()
    if pid == 0:  # the child: publish, then report by exit status only
        try:
            publish.publish_block(staging, target, 9, [data], DIGEST, fsync=False)
            os._exit(0 if target.read_bytes()[HEADER_SIZE:] == data else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    os.close(decoy)
    assert os.waitstatus_to_exitcode(status) == 0
    assert target.read_bytes()[HEADER_SIZE:] == data
