"""The on-disk format of one cached block (format version 1). Pure: no I/O.

A block file is a 64-byte header followed by the block's bytes::

    offset size  field
    0      8     magic  b"NWBCBLK\\x00"
    8      2     format version (1), little-endian u16
    10     2     header length (64), u16
    12     4     flags (0), u32
    16     8     block index within the object, u64
    24     4     data length, u32
    28     4     CRC-32 (zlib) of the data, u32
    32     32    version digest: SHA-256 of (cache key, validator, size)
    64     ...   data

The version digest binds the block to one version of one object, so a block
can never be served for another object or another version even if a file
were misplaced. The CRC catches torn or rotted blocks (a power cut without
``--fsync``): it is verified before a block is first served by a process.
docs/on-disk-format.md describes the directory layout around these files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import zlib

MAGIC = b"NWBCBLK\x00"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sHHIQII32s")
assert _HEADER.size == HEADER_SIZE


class CorruptBlock(Exception):
    """A block file that must not be served (wrong header, length or checksum)."""


@dataclasses.dataclass(frozen=True, slots=True)
class BlockHeader:
    index: int
    length: int
    crc32: int
    version_digest: bytes


def version_digest(cache_key: str, validator: str, size: int) -> bytes:
    """Identity of one version of one object."""
    h = hashlib.sha256()
    for part in (cache_key, validator, str(size)):
        h.update(part.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.digest()


def encode_header(index: int, data: bytes | bytearray | memoryview, digest: bytes) -> bytes:
    return _HEADER.pack(
        MAGIC, FORMAT_VERSION, HEADER_SIZE, 0, index, len(data), zlib.crc32(data), digest
    )


def decode_header(raw: bytes) -> BlockHeader:
    if len(raw) < HEADER_SIZE:
        raise CorruptBlock("block file shorter than its header")
    magic, version, header_len, _flags, index, length, crc, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CorruptBlock("bad magic")
    if version != FORMAT_VERSION or header_len != HEADER_SIZE:
        raise CorruptBlock(f"unsupported block format {version}")
    return BlockHeader(index=index, length=length, crc32=crc, version_digest=digest)


def check_header(
    header: BlockHeader, *, index: int, length: int, digest: bytes, file_size: int
) -> None:
    """Raise CorruptBlock unless the header describes exactly the block we want."""
    if header.version_digest != digest:
        raise CorruptBlock("block belongs to another object version")
    if header.index != index:
        raise CorruptBlock(f"block index {header.index} where {index} was expected")
    if header.length != length or file_size != HEADER_SIZE + length:
        raise CorruptBlock(
            f"block length {header.length} (file {file_size} B) where {length} was expected"
        )


def check_data(header: BlockHeader, data: bytes | bytearray | memoryview) -> None:
    if zlib.crc32(data) != header.crc32:
        raise CorruptBlock("checksum mismatch")
