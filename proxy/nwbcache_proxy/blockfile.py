"""The on-disk format of one cached block (format version 2; 1 still read). Pure: no I/O.

A block file is a 64-byte header followed by the block's bytes::

    offset size  field
    0      8     magic  b"NWBCBLK\\x00"
    8      2     format version (2), little-endian u16
    10     2     header length (64), u16
    12     4     flags (0), u32
    16     8     block index within the object, u64
    24     4     data length, u32
    28     4     checksum of the data, u32: CRC-32C (Castagnoli)
    32     32    version digest: SHA-256 of (cache key, validator, size)
    64     ...   data

The version digest binds the block to one version of one object, so a block
can never be served for another object or another version even if a file
were misplaced. The CRC catches torn or rotted blocks (a power cut without
``--fsync``): it is verified before a block is first served by a process.
docs/on-disk-format.md describes the directory layout around these files.

Format 1 differs only in its checksum: CRC-32 (zlib's polynomial). Blocks
of format 1 are still read and checked; new blocks are written as format 2.
Why the change: zlib's CRC-32 ran at 1.9-3.4 GB/s here and was a fifth of
the disk threads' time in a cold fill; CRC-32C runs at 18 GB/s on the CPU's
own instruction (SSE 4.2, ARMv8), keeps CRC-32's guarantees (every burst
error of up to 32 bits is caught), and is the checksum S3 itself offers
(``x-amz-checksum-crc32c``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import zlib
from collections.abc import Callable, Sequence

import crc32c

MAGIC = b"NWBCBLK\x00"
FORMAT_VERSION = 2
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sHHIQII32s")
assert _HEADER.size == HEADER_SIZE


Buffer = bytes | bytearray | memoryview
# A block's bytes in one or more parts, written with one writev (a fill hands
# over InflightBlock.parts: the block's buffer; a test may cut it anyhow).
Parts = Sequence[Buffer]

# The checksum of each format version read: (data, checksum so far) -> checksum.
_CHECKSUMS: dict[int, Callable[[Buffer, int], int]] = {
    1: zlib.crc32,
    2: crc32c.crc32c,
}


class CorruptBlock(Exception):
    """A block file that must not be served (wrong header, length or checksum)."""


@dataclasses.dataclass(frozen=True, slots=True)
class BlockHeader:
    index: int
    length: int
    checksum: int
    version_digest: bytes
    version: int = FORMAT_VERSION


def version_digest(cache_key: str, validator: str, size: int) -> bytes:
    """Identity of one version of one object."""
    h = hashlib.sha256()
    for part in (cache_key, validator, str(size)):
        h.update(part.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.digest()


def encode_header(index: int, data: Buffer | Parts, digest: bytes) -> bytes:
    """The header of a block whose bytes are ``data``, one buffer or parts in order."""
    parts: Parts = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
    return _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        HEADER_SIZE,
        0,
        index,
        sum(len(part) for part in parts),
        checksum(FORMAT_VERSION, parts),
        digest,
    )


def checksum(version: int, parts: Parts) -> int:
    """The checksum of format ``version`` of the bytes in ``parts``, in order."""
    update = _CHECKSUMS[version]
    value = 0
    for part in parts:
        value = update(part, value)
    return value


def decode_header(raw: bytes) -> BlockHeader:
    if len(raw) < HEADER_SIZE:
        raise CorruptBlock("block file shorter than its header")
    magic, version, header_len, _flags, index, length, crc, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CorruptBlock("bad magic")
    if version not in _CHECKSUMS or header_len != HEADER_SIZE:
        raise CorruptBlock(f"unsupported block format {version}")
    return BlockHeader(
        index=index, length=length, checksum=crc, version_digest=digest, version=version
    )


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


def check_data(header: BlockHeader, data: Buffer) -> None:
    if checksum(header.version, (data,)) != header.checksum:
        raise CorruptBlock("checksum mismatch")
