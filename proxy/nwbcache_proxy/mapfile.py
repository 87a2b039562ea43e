"""Format 3's map file: the header that binds a version's data file to one version, and
the entry per block that says whether it is present (docs/format-3-design.md).

Pure: bytes in, bytes out. versionfile.py does the I/O.

A map file is a 64-byte header, then entry ``n`` at ``HEADER_SIZE + 8n``:
the CRC-32C of block ``n``'s bytes and their length, little-endian. Length
0 is an absent block (a hole in the data file, or bytes written whose entry
never was: a crash between the two). A block is present only if its entry's
length is exactly that of block ``n`` of the version and its bytes' CRC-32C
matches.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence

from .blockfile import Buffer, CorruptBlock, Parts, checksum

MAGIC = b"NWBCMAP\x00"
FORMAT_VERSION = 3
HEADER_SIZE = 64
ENTRY_SIZE = 8
# magic, format, header length, flags, block size, object size, version digest
_HEADER = struct.Struct("<8sHHIQQ32s")
_ENTRY = struct.Struct("<II")
assert _HEADER.size == HEADER_SIZE and _ENTRY.size == ENTRY_SIZE
# The data file's checksums are format 2's (CRC-32C).
_CHECKSUM_VERSION = 2


class CorruptMap(Exception):
    """A map file that does not describe the version it is named for."""


@dataclasses.dataclass(frozen=True, slots=True)
class MapHeader:
    block_size: int
    size: int  # the object's size in bytes
    digest: bytes  # the version digest (blockfile.version_digest), 32 bytes

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.size < 0 or len(self.digest) != 32:
            raise ValueError(f"not a version: {self.block_size} B blocks, {self.size} B")

    @property
    def blocks(self) -> int:
        """How many blocks the version has."""
        return -(-self.size // self.block_size)

    def length_of(self, index: int) -> int:
        """The length of block ``index`` (the last one may be short)."""
        if not 0 <= index < self.blocks:
            raise IndexError(f"block {index} of a version of {self.blocks}")
        return min(self.block_size, self.size - index * self.block_size)

    def offset_of(self, index: int) -> int:
        """Where block ``index`` starts in the data file."""
        return index * self.block_size


def encode_header(h: MapHeader) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, 0, h.block_size, h.size, h.digest)


def decode_header(raw: bytes) -> MapHeader:
    if len(raw) < HEADER_SIZE:
        raise CorruptMap("map file shorter than its header")
    magic, version, header_len, _flags, block_size, size, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CorruptMap("bad magic")
    if version != FORMAT_VERSION or header_len != HEADER_SIZE:
        raise CorruptMap(f"unsupported map format {version}")
    try:
        return MapHeader(block_size, size, digest)
    except ValueError as exc:
        raise CorruptMap(str(exc)) from exc


def check_header(found: MapHeader, want: MapHeader) -> None:
    """Raise CorruptMap unless the map is the wanted version's."""
    if found.digest != want.digest:
        raise CorruptMap("map belongs to another object version")
    if found != want:
        raise CorruptMap(
            f"map of {found.size} B in {found.block_size} B blocks where "
            f"{want.size} B in {want.block_size} B blocks was expected"
        )


def entry_offset(index: int) -> int:
    """Where block ``index``'s entry is in the map file."""
    return HEADER_SIZE + index * ENTRY_SIZE


def encode_entries(blocks: Sequence[Parts]) -> bytes:
    """The entries of consecutive blocks, each given as its bytes in parts."""
    out = bytearray()
    for parts in blocks:
        out += _ENTRY.pack(checksum(_CHECKSUM_VERSION, parts), sum(len(p) for p in parts))
    return bytes(out)


def decode_entries(raw: Buffer) -> list[tuple[int, int]]:
    """(checksum, length) per entry; bytes past the map's end read as absent."""
    whole = len(raw) - len(raw) % ENTRY_SIZE
    return list(_ENTRY.iter_unpack(raw[:whole]))


def mapped(h: MapHeader, first: int, entries: Sequence[tuple[int, int]]) -> list[bool]:
    """Per entry of blocks ``first``, ``first + 1``..., whether it says its block is
    there (the bytes are still to be checked against its checksum). An entry
    past the version's last block (a corrupt map) says no."""
    return [
        length > 0 and first + n < h.blocks and length == h.length_of(first + n)
        for n, (_, length) in enumerate(entries)
    ]


def check_block(entry: tuple[int, int], data: Buffer, index: int) -> None:
    """Raise CorruptBlock unless ``data`` is the block the entry describes."""
    crc, length = entry
    if length == 0:
        raise CorruptBlock(f"block {index} is not in the map")
    if len(data) != length:
        raise CorruptBlock(f"block {index}: {len(data)} bytes where the map says {length}")
    if checksum(_CHECKSUM_VERSION, (data,)) != crc:
        raise CorruptBlock(f"block {index}: checksum mismatch")
