"""Tests of nwbcache_proxy.blockfile: the block header format, its checks, the
checksums (CRC-32C for format 2, zlib's CRC-32 for format 1, still read) and the
version digest. Tables of cases plus properties; no files touched."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nwbcache_proxy.blockfile import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    BlockHeader,
    CorruptBlock,
    check_data,
    check_header,
    checksum,
    decode_header,
    encode_header,
    version_digest,
)

DIGEST = bytes(range(32))
OTHER_DIGEST = bytes(range(1, 33))
DATA = b"hello"
U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1


def patched(raw: bytes, offset: int, value: bytes) -> bytes:
    """``raw`` with ``value`` written over it at ``offset``."""
    return raw[:offset] + value + raw[offset + len(value) :]


# -- the format ---------------------------------------------------------------------


def test_constants_are_the_documented_format() -> None:
    assert MAGIC == b"NWBCBLK\x00"
    assert FORMAT_VERSION == 2
    assert HEADER_SIZE == 64


def test_header_bytes_are_pinned() -> None:
    """Format version 2, byte for byte: a change here breaks every cache on disk."""
    want = bytes.fromhex(
        "4e574243424c4b00"  # magic
        "0200"  # format version 2
        "4000"  # header length 64
        "00000000"  # flags
        "0700000000000000"  # index 7
        "05000000"  # data length 5
        "4cbb719a"  # CRC-32C of b"hello", 0x9a71bb4c
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"  # digest
    )
    assert encode_header(7, DATA, DIGEST) == want


# A block written by a daemon of format 1 (before CRC-32C), byte for byte.
V1_HEADER = bytes.fromhex(
    "4e574243424c4b00"  # magic
    "0100"  # format version 1
    "4000"  # header length 64
    "00000000"  # flags
    "0700000000000000"  # index 7
    "05000000"  # data length 5
    "86a61036"  # CRC-32 (zlib) of b"hello", 0x3610a686
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"  # digest
)


def test_a_format_1_block_is_still_read_and_checked_with_zlibs_crc() -> None:
    header = decode_header(V1_HEADER + DATA)
    assert header == BlockHeader(
        index=7, length=5, checksum=0x3610A686, version_digest=DIGEST, version=1
    )
    check_header(header, index=7, length=5, digest=DIGEST, file_size=HEADER_SIZE + 5)
    check_data(header, DATA)
    with pytest.raises(CorruptBlock, match=r"^checksum mismatch$"):
        check_data(header, b"hellO")


@pytest.mark.parametrize(("version", "other"), [(1, 2), (2, 1)])
def test_each_format_is_checked_with_its_own_checksum(version: int, other: int) -> None:
    """A header of one format carrying the other format's checksum is refused."""
    raw = patched(V1_HEADER, 8, version.to_bytes(2, "little"))
    raw = patched(raw, 28, checksum(other, [DATA]).to_bytes(4, "little"))
    with pytest.raises(CorruptBlock, match=r"^checksum mismatch$"):
        check_data(decode_header(raw), DATA)


@pytest.mark.parametrize(
    ("version", "data", "value"),
    [
        # The check values of the CRC catalogue (reveng.sourceforge.io):
        # CRC-32/ISCSI (CRC-32C) and CRC-32/ISO-HDLC (zlib's) of "123456789".
        (2, b"123456789", 0xE3069283),
        (1, b"123456789", 0xCBF43926),
        (2, b"", 0),
        (1, b"", 0),
    ],
)
def test_checksums_are_the_standard_ones(version: int, data: bytes, value: int) -> None:
    assert checksum(version, [data]) == value


@given(st.lists(st.binary(max_size=300), max_size=8), st.sampled_from([1, 2]))
def test_checksum_of_parts_is_that_of_their_bytes_joined(parts: list[bytes], version: int) -> None:
    """A block may be handed over in several parts (Parts): one checksum over them all."""
    views = [memoryview(b"." + part + b".")[1:-1] for part in parts]
    assert checksum(version, views) == checksum(version, [b"".join(parts)])
    assert encode_header(3, views, DIGEST) == encode_header(3, b"".join(parts), DIGEST)


@pytest.mark.parametrize(
    ("offset", "size", "value"),
    [
        (0, 8, int.from_bytes(MAGIC, "little")),
        (8, 2, FORMAT_VERSION),
        (10, 2, HEADER_SIZE),
        (12, 4, 0),
        (16, 8, 0x0102030405060708),
        (24, 4, len(DATA)),
        (28, 4, 0x9A71BB4C),  # CRC-32C
        (32, 32, int.from_bytes(DIGEST, "little")),
    ],
)
def test_header_fields_sit_at_their_documented_offsets(offset: int, size: int, value: int) -> None:
    raw = encode_header(0x0102030405060708, DATA, DIGEST)
    assert len(raw) == HEADER_SIZE
    assert int.from_bytes(raw[offset : offset + size], "little") == value


# -- encode / decode round trip -----------------------------------------------------


@pytest.mark.parametrize(
    ("index", "data"),
    [
        (0, b""),
        (0, b"x"),
        (1, DATA),
        (12345, bytes(range(256)) * 16),
        (U64_MAX, b"last"),
        (3, bytearray(b"from a bytearray")),
        (4, memoryview(b"from a memoryview")),
        (5, memoryview(b"..a slice..")[2:9]),
    ],
)
def test_round_trip(index: int, data: bytes | bytearray | memoryview) -> None:
    raw = encode_header(index, data, DIGEST)
    header = decode_header(raw)
    assert header == BlockHeader(
        index=index, length=len(data), checksum=checksum(2, [data]), version_digest=DIGEST
    )
    check_header(
        header, index=index, length=len(data), digest=DIGEST, file_size=len(raw) + len(data)
    )
    check_data(header, data)


def test_decode_reads_only_the_header_of_a_whole_file() -> None:
    raw = encode_header(2, DATA, DIGEST)
    assert decode_header(raw + DATA) == decode_header(raw)


@pytest.mark.parametrize(
    ("index", "data", "digest"),
    [
        (-1, DATA, DIGEST),  # u64
        (2**64, DATA, DIGEST),
    ],
)
def test_encode_refuses_an_index_out_of_range(index: int, data: bytes, digest: bytes) -> None:
    with pytest.raises(struct.error):
        encode_header(index, data, digest)


@given(
    st.integers(0, U64_MAX),
    st.binary(max_size=4096),
    st.binary(min_size=32, max_size=32),
)
def test_round_trip_property(index: int, data: bytes, digest: bytes) -> None:
    raw = encode_header(index, data, digest)
    header = decode_header(raw + data)
    assert (header.index, header.length, header.version_digest) == (index, len(data), digest)
    check_header(header, index=index, length=len(data), digest=digest, file_size=len(raw + data))
    check_data(header, data)


# -- decode: truncated and garbled headers --------------------------------------------

GOOD = encode_header(9, DATA, DIGEST)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(b"", "^block file shorter than its header$", id="empty"),
        pytest.param(GOOD[:1], "shorter than its header", id="1 byte"),
        pytest.param(GOOD[:8], "shorter than its header", id="magic only"),
        pytest.param(GOOD[:32], "shorter than its header", id="no digest"),
        pytest.param(GOOD[:63], "shorter than its header", id="one byte short"),
        pytest.param(bytes(64), "^bad magic$", id="zeros"),
        pytest.param(b"\xff" * 64, "^bad magic$", id="ones"),
        pytest.param(patched(GOOD, 0, b"nwbcblk\x00"), "^bad magic$", id="lower-case magic"),
        pytest.param(patched(GOOD, 0, b"NWBCBLK1"), "^bad magic$", id="magic without NUL"),
        pytest.param(patched(GOOD, 0, b"NWBCIDX\x00"), "^bad magic$", id="another magic"),
        pytest.param(DATA * 13, "^bad magic$", id="data where the header should be"),
        pytest.param(patched(GOOD, 8, b"\x00\x00"), "^unsupported block format 0$", id="v0"),
        pytest.param(patched(GOOD, 8, b"\x03\x00"), "^unsupported block format 3$", id="v3"),
        pytest.param(patched(GOOD, 8, b"\x00\x01"), "^unsupported block format 256$", id="v256"),
        pytest.param(patched(GOOD, 8, b"\xff\xff"), "^unsupported block format 65535$", id="vmax"),
        # A wrong header length is reported as the (good) format version.
        pytest.param(patched(GOOD, 10, b"\x00\x00"), "^unsupported block format 2$", id="hlen 0"),
        pytest.param(patched(GOOD, 10, b"\x3f\x00"), "^unsupported block format 2$", id="hlen 63"),
        pytest.param(patched(GOOD, 10, b"\x41\x00"), "^unsupported block format 2$", id="hlen 65"),
        pytest.param(patched(GOOD, 10, b"\x00\x40"), "^unsupported block format 2$", id="hlen BE"),
        pytest.param(
            patched(V1_HEADER, 10, b"\x00\x00"), "^unsupported block format 1$", id="v1 hlen 0"
        ),
    ],
)
def test_decode_refuses(raw: bytes, message: str) -> None:
    with pytest.raises(CorruptBlock, match=message):
        decode_header(raw)


@pytest.mark.parametrize("position", range(8))
def test_any_byte_of_the_magic_is_checked(position: int) -> None:
    raw = patched(GOOD, position, bytes([GOOD[position] ^ 0x20]))
    with pytest.raises(CorruptBlock, match="bad magic"):
        decode_header(raw)


@pytest.mark.parametrize("flags", [b"\x01\x00\x00\x00", b"\xff\xff\xff\xff"])
def test_flags_are_reserved_and_not_checked(flags: bytes) -> None:
    assert decode_header(patched(GOOD, 12, flags)) == decode_header(GOOD)


# -- check_header: every field against the block wanted -------------------------------

HEADER = BlockHeader(index=9, length=100, checksum=0, version_digest=DIGEST)
FILE = HEADER_SIZE + 100


@pytest.mark.parametrize(
    ("index", "length", "digest", "file_size", "message"),
    [
        pytest.param(
            9, 100, OTHER_DIGEST, FILE, "^block belongs to another object version$", id="digest"
        ),
        pytest.param(9, 100, DIGEST[:31], FILE, "another object version", id="short digest"),
        pytest.param(9, 100, b"", FILE, "another object version", id="no digest"),
        pytest.param(8, 100, DIGEST, FILE, "^block index 9 where 8 was expected$", id="index-1"),
        pytest.param(10, 100, DIGEST, FILE, "^block index 9 where 10 was expected$", id="index+1"),
        pytest.param(9 + 2**32, 100, DIGEST, FILE, "^block index 9 where", id="index+2**32"),
        pytest.param(
            9,
            99,
            DIGEST,
            HEADER_SIZE + 99,
            r"^block length 100 \(file 163 B\) where 99 was expected$",
            id="length-1",
        ),
        pytest.param(
            9,
            101,
            DIGEST,
            HEADER_SIZE + 101,
            r"^block length 100 \(file 165 B\) where 101 was expected$",
            id="length+1",
        ),
        pytest.param(
            9,
            100,
            DIGEST,
            FILE - 1,
            r"^block length 100 \(file 163 B\) where 100 was expected$",
            id="file cut short",
        ),
        pytest.param(9, 100, DIGEST, FILE + 1, r"\(file 165 B\)", id="file too long"),
        pytest.param(9, 100, DIGEST, HEADER_SIZE, r"\(file 64 B\)", id="header only"),
        pytest.param(9, 100, DIGEST, 100, r"\(file 100 B\)", id="size without the header"),
        pytest.param(9, 100, DIGEST, 0, r"\(file 0 B\)", id="empty file"),
        # Several wrong: the version is reported first, then the index.
        pytest.param(1, 1, OTHER_DIGEST, 1, "another object version", id="all wrong"),
        pytest.param(1, 1, DIGEST, 1, "^block index", id="index and length"),
    ],
)
def test_check_header_refuses(
    index: int, length: int, digest: bytes, file_size: int, message: str
) -> None:
    with pytest.raises(CorruptBlock, match=message):
        check_header(HEADER, index=index, length=length, digest=digest, file_size=file_size)


@pytest.mark.parametrize(
    ("header", "index", "length"),
    [
        (HEADER, 9, 100),
        (BlockHeader(0, 0, 0, DIGEST), 0, 0),  # an empty object's only block
        (BlockHeader(U64_MAX, U32_MAX, 0, DIGEST), U64_MAX, U32_MAX),
    ],
)
def test_check_header_accepts_the_block_wanted(
    header: BlockHeader, index: int, length: int
) -> None:
    check_header(header, index=index, length=length, digest=DIGEST, file_size=HEADER_SIZE + length)


# -- check_data: the checksum ----------------------------------------------------------------

# 1 KiB with no repeats, so no rearrangement of it gives the same bytes.
BLOCK = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(32))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(BLOCK[:-1], id="last byte missing"),
        pytest.param(BLOCK[1:], id="first byte missing"),
        pytest.param(BLOCK + b"\x00", id="a byte too many"),
        pytest.param(b"", id="nothing"),
        pytest.param(bytes(len(BLOCK)), id="zeros (a hole left by a power cut)"),
        pytest.param(patched(BLOCK, 500, b"\xff"), id="one byte changed"),
        pytest.param(BLOCK[512:] + BLOCK[:512], id="halves swapped"),
    ],
)
def test_check_data_refuses_other_bytes(data: bytes) -> None:
    header = decode_header(encode_header(0, BLOCK, DIGEST))
    with pytest.raises(CorruptBlock, match=r"^checksum mismatch$"):
        check_data(header, data)


@pytest.mark.parametrize(
    "data", [b"", BLOCK, bytearray(BLOCK), memoryview(BLOCK), memoryview(b"xx" + BLOCK)[2:]]
)
def test_check_data_accepts_the_same_bytes(data: bytes | bytearray | memoryview) -> None:
    header = decode_header(encode_header(0, bytes(data), DIGEST))
    check_data(header, data)


@given(st.binary(min_size=1, max_size=2048), st.data())
def test_crc_catches_any_single_bit_flip(data: bytes, draw: st.DataObject) -> None:
    header = decode_header(encode_header(0, data, DIGEST))
    bit = draw.draw(st.integers(0, 8 * len(data) - 1))
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptBlock, match="checksum mismatch"):
        check_data(header, flipped)


@given(st.integers(0, 8 * HEADER_SIZE - 1).filter(lambda bit: not 96 <= bit < 128))
def test_any_header_bit_flip_outside_the_flags_is_caught(bit: int) -> None:
    """Decoding, the header check and the CRC check together catch it."""
    raw = bytearray(encode_header(9, BLOCK, DIGEST))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptBlock):
        header = decode_header(bytes(raw))
        check_header(
            header, index=9, length=len(BLOCK), digest=DIGEST, file_size=HEADER_SIZE + len(BLOCK)
        )
        check_data(header, BLOCK)


# -- version_digest -------------------------------------------------------------------

KEY = "https://dandiarchive.s3.amazonaws.com/blobs/abc"
VALIDATOR = 'etag:"v1"'


def test_version_digest_is_pinned() -> None:
    """Stable across processes and releases: it names version directories on disk."""
    digest = version_digest(KEY, VALIDATOR, 1000)
    assert digest.hex() == "4424a3051216b747add4b2f5fa658da626483aaceee5917855dea2f2333b4a86"
    assert digest == hashlib.sha256(f"{KEY}\0{VALIDATOR}\0{1000}\0".encode()).digest()
    assert version_digest("", "", 0).hex() == (
        "73d049f6dc618e4cfdbbb16f78e5de18d379db936a3e1a7301514de10a76da51"
    )


@pytest.mark.parametrize(
    ("key", "validator", "size"),
    [
        pytest.param(KEY + "x", VALIDATOR, 1000, id="key"),
        pytest.param(KEY.upper(), VALIDATOR, 1000, id="key case"),
        pytest.param(KEY + "?versionId=1", VALIDATOR, 1000, id="key query"),
        pytest.param(KEY, 'etag:"v2"', 1000, id="etag"),
        pytest.param(KEY, 'etag:W/"v1"', 1000, id="weak etag"),
        pytest.param(KEY, "lm:Sun, 06 Nov 1994 08:49:37 GMT", 1000, id="last-modified"),
        pytest.param(KEY, "size-only", 1000, id="no validator"),
        pytest.param(KEY, VALIDATOR, 999, id="size - 1"),
        pytest.param(KEY, VALIDATOR, 1001, id="size + 1"),
        pytest.param(KEY, VALIDATOR, 0, id="size 0"),
        pytest.param(KEY, VALIDATOR, 10000, id="size with a digit more"),
        # Field boundaries moved: the separator keeps these apart.
        pytest.param(KEY + 'etag:"v1"', "", 1000, id="validator moved into key"),
        pytest.param(KEY, VALIDATOR + "1", 0, id="size digit moved into validator"),
        pytest.param(KEY, VALIDATOR + "100", 0, id="size moved into validator"),
    ],
)
def test_version_digest_changes_with_every_field(key: str, validator: str, size: int) -> None:
    assert version_digest(key, validator, size) != version_digest(KEY, VALIDATOR, 1000)


def test_version_digest_takes_undecodable_bytes_as_they_came() -> None:
    """A surrogate-escaped byte (from a header that was not UTF-8) hashes as that byte."""
    raw = version_digest("k", "etag:\udcff", 1)
    assert raw == hashlib.sha256(b"k\0etag:\xff\x001\0").digest()
    assert raw != version_digest("k", "etag:\xff", 1)  # "ÿ" is two bytes in UTF-8


# NUL is left out: it is the separator, and neither a URL nor a header value holds it.
texts = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=40)


@given(
    st.tuples(texts, texts, st.integers(0, 2**63)), st.tuples(texts, texts, st.integers(0, 2**63))
)
def test_version_digest_tells_versions_apart(
    a: tuple[str, str, int], b: tuple[str, str, int]
) -> None:
    assert (version_digest(*a) == version_digest(*b)) == (a == b)
    assert len(version_digest(*a)) == 32
