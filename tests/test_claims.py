"""Claims on upstream work shared by every process on a cache dir (claims.py).

Two ``Claims`` on one file are two open file descriptions: their locks
exclude each other exactly as two processes' do, so these run in-process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwbcache_proxy.claims import Claims, block_offset, discovery_offset


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Claims, Claims]]:
    a, b = Claims(tmp_path / "fetch.claims"), Claims(tmp_path / "fetch.claims")
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("v/a.256", 0), ("v/a.256", 1)),  # neighbours in one version
        (("v/a.256", 5), ("v/b.256", 5)),  # same index, another version
        (("v/a.256", 5), ("v/a.4096", 5)),  # same object, another block size
        (("v/a.256", 0), ("v/a.256", 2**31 - 1)),  # both ends of a version's range
    ],
)
def test_block_offsets_differ(one: tuple[str, int], other: tuple[str, int]) -> None:
    assert block_offset(*one) != block_offset(*other)


def test_offsets_are_stable_and_in_range() -> None:
    assert block_offset("objects/ab/abc/0123.262144", 7) == block_offset(
        "objects/ab/abc/0123.262144", 7
    )
    # A version's blocks are consecutive bytes: a run is one lock.
    assert block_offset("x", 8) - block_offset("x", 3) == 5
    top = (1 << 63) - 1  # the largest offset a lock may start at
    for name in ("", "x", "objects/ff/" + "f" * 64 + "/" + "f" * 32 + ".262144"):
        assert 0 <= block_offset(name, 2**31 - 1) < 1 << 62
    key = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert 1 << 62 <= discovery_offset(key) <= top  # discovery claims: their own namespace
    assert discovery_offset(key) != discovery_offset("0" + key[1:])


def test_a_claim_excludes_other_holders_until_released(pair: tuple[Claims, Claims]) -> None:
    a, b = pair
    assert a.take_block("v", 3)
    assert a.take_block("v", 3), "taking what one holds again succeeds"
    assert not b.take_block("v", 3)
    assert b.take_block("v", 4)
    a.release_block("v", 3)
    assert b.take_block("v", 3)
    assert not a.take_block("v", 3)


def test_a_run_is_claimed_whole_or_block_by_block(pair: tuple[Claims, Claims]) -> None:
    a, b = pair
    assert a.take_blocks("v", 10, 4) == [True] * 4
    assert b.take_blocks("v", 8, 8) == [True, True, False, False, False, False, True, True]
    assert not a.take_block("v", 9)
    a.release_block("v", 11)  # one block of a run goes alone
    assert b.take_block("v", 11)
    assert not b.take_block("v", 12)


def test_consecutive_blocks_are_released_together_and_only_they(
    pair: tuple[Claims, Claims], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    assert a.take_blocks("v", 10, 8) == [True] * 8
    calls: list[tuple[int, int]] = []
    real = a.release

    def recording(start: int, length: int = 1) -> None:
        calls.append((start, length))
        real(start, length)

    monkeypatch.setattr(a, "release", recording)
    a.release_blocks("v", 12, 4)
    assert calls == [(block_offset("v", 12), 4)]  # one lock call for the four
    assert b.take_blocks("v", 10, 8) == [False, False, True, True, True, True, False, False]
    # Past the version's range of indices, block by block (each wraps alone).
    a.release_blocks("v", 2**31 - 1, 2)
    assert calls[1:] == [(block_offset("v", 2**31 - 1), 1), (block_offset("v", 2**31), 1)]


def test_releasing_an_unheld_claim_touches_no_other(pair: tuple[Claims, Claims]) -> None:
    a, b = pair
    assert a.take_block("v", 1)
    b.release_block("v", 1)
    assert not b.take_block("v", 1)


def test_closing_drops_every_claim(pair: tuple[Claims, Claims]) -> None:
    """What the kernel does when a process dies: its descriptions close."""
    a, b = pair
    assert a.take_blocks("v", 0, 16) == [True] * 16
    assert a.take(discovery_offset("ab" * 32))
    assert not b.take_block("v", 7)
    a.close()
    assert b.take_blocks("v", 0, 16) == [True] * 16
    assert b.take(discovery_offset("ab" * 32))


@pytest.mark.slow  # forks
def test_a_forked_child_claims_on_its_own_description(tmp_path: Path) -> None:
    """A worker forked after its parent used the file must not share the
    parent's description (their locks would never conflict)."""
    parent = Claims(tmp_path / "fetch.claims")
    assert parent.take_block("v", 1)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's claim must exclude it
        os.close(read)
        answer = b"%d%d" % (parent.take_block("v", 1), parent.take_block("v", 2))
        os.write(write, answer)
        os._exit(0)
    os.close(write)
    answer = os.read(read, 8)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"01"
    assert parent.take_block("v", 2)  # the child's claim died with it
    parent.close()


def test_an_unusable_file_turns_claims_off_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = Claims(tmp_path / "no-such-dir" / "fetch.claims")
    with caplog.at_level(logging.WARNING, logger="nwbcache_proxy.claims"):
        assert missing.take_block("v", 1)
        assert missing.take_blocks("v", 0, 3) == [True] * 3
        missing.release_block("v", 1)
    warnings = [r for r in caplog.records if "claims off" in r.getMessage()]
    assert len(warnings) == 1
