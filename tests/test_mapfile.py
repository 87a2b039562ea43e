"""Format 3's map file (mapfile.py): the header that binds a data file to one version, and
the entry per block that says whether it is there. Tables."""

from __future__ import annotations

import os

import crc32c
import pytest

from nwbcache_proxy.blockfile import CorruptBlock
from nwbcache_proxy.mapfile import (
    ENTRY_SIZE,
    HEADER_SIZE,
    CorruptMap,
    MapHeader,
    check_block,
    check_header,
    decode_entries,
    decode_header,
    encode_entries,
    encode_header,
    entry_offset,
    mapped,
)

DIGEST = bytes(range(32))
H = MapHeader(block_size=4096, size=10_000, digest=DIGEST)  # blocks of 4096, 4096, 1808
RAW = encode_header(H)


def test_a_header_reads_back_as_written() -> None:
    raw = encode_header(H)
    assert len(raw) == HEADER_SIZE
    assert decode_header(raw) == H
    check_header(decode_header(raw), H)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(RAW[:63], "shorter", id="short"),
        pytest.param(b"X" + RAW[1:], "magic", id="bad magic"),
        pytest.param(
            encode_header(H)[:8] + b"\x02\x00" + encode_header(H)[10:], "format 2", id="v2"
        ),
        pytest.param(
            encode_header(H)[:10] + b"\x20\x00" + encode_header(H)[12:], "format", id="hlen"
        ),
        pytest.param(bytes(HEADER_SIZE), "magic", id="zeros (a torn header)"),
    ],
)
def test_a_header_that_is_not_a_map_is_refused(raw: bytes, message: str) -> None:
    with pytest.raises(CorruptMap, match=message):
        decode_header(raw)


@pytest.mark.parametrize(
    ("found", "message"),
    [
        pytest.param(MapHeader(4096, 10_000, bytes(32)), "another object version", id="digest"),
        pytest.param(MapHeader(4096, 10_001, DIGEST), "10001 B", id="size"),
        pytest.param(MapHeader(8192, 10_000, DIGEST), "8192 B blocks", id="block size"),
    ],
)
def test_a_map_of_another_version_is_refused(found: MapHeader, message: str) -> None:
    with pytest.raises(CorruptMap, match=message):
        check_header(found, H)


@pytest.mark.parametrize(
    ("header", "blocks", "lengths"),
    [
        (H, 3, [4096, 4096, 1808]),
        (MapHeader(4096, 8192, DIGEST), 2, [4096, 4096]),
        (MapHeader(4096, 1, DIGEST), 1, [1]),
        (MapHeader(4096, 0, DIGEST), 0, []),
    ],
)
def test_block_lengths(header: MapHeader, blocks: int, lengths: list[int]) -> None:
    assert header.blocks == blocks
    assert [header.length_of(i) for i in range(blocks)] == lengths
    with pytest.raises(IndexError):
        header.length_of(blocks)


@pytest.mark.parametrize(
    ("block_size", "size", "digest"),
    [(0, 1, DIGEST), (4096, -1, DIGEST), (4096, 1, bytes(31))],
)
def test_a_header_that_is_no_version_cannot_be_made(
    block_size: int, size: int, digest: bytes
) -> None:
    with pytest.raises(ValueError):
        MapHeader(block_size, size, digest)


def test_entries_say_each_blocks_checksum_and_length() -> None:
    a, b = os.urandom(4096), os.urandom(1808)
    raw = encode_entries([[a[:100], a[100:]], [b]])  # a block may come in parts
    assert len(raw) == 2 * ENTRY_SIZE
    assert decode_entries(raw) == [(crc32c.crc32c(a), 4096), (crc32c.crc32c(b), 1808)]
    assert entry_offset(0) == HEADER_SIZE and entry_offset(2) == HEADER_SIZE + 16


def test_a_short_read_of_entries_reads_the_whole_ones() -> None:
    raw = encode_entries([[b"x" * 4096], [b"y" * 4096]])
    assert len(decode_entries(raw[:12])) == 1
    assert decode_entries(b"") == []


@pytest.mark.parametrize(
    ("first", "entries", "want"),
    [
        pytest.param(0, [(1, 4096), (2, 4096), (3, 1808)], [True, True, True], id="all"),
        pytest.param(0, [(0, 0), (2, 4096)], [False, True], id="a hole"),
        pytest.param(1, [(2, 4096), (3, 4096)], [True, False], id="last block too long"),
        pytest.param(2, [(3, 1807)], [False], id="last block too short"),
        pytest.param(2, [(3, 1808), (4, 4096)], [True, False], id="an entry past the end"),
    ],
)
def test_mapped(first: int, entries: list[tuple[int, int]], want: list[bool]) -> None:
    assert mapped(H, first, entries) == want


def test_a_block_is_checked_against_its_entry() -> None:
    data = os.urandom(4096)
    entry = (crc32c.crc32c(data), 4096)
    check_block(entry, data, 0)
    with pytest.raises(CorruptBlock, match="checksum"):
        check_block(entry, data[:-1] + bytes([data[-1] ^ 1]), 0)
    with pytest.raises(CorruptBlock, match="4095 bytes"):
        check_block(entry, data[:-1], 0)
    with pytest.raises(CorruptBlock, match="not in the map"):
        check_block((0, 0), b"", 0)
    with pytest.raises(CorruptBlock, match="checksum"):
        check_block(entry, bytes(4096), 0)  # a punched block reads as zeros
