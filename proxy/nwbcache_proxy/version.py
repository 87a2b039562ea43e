"""The one name of a cached version: cache key, validators, digest, block size, files. Pure."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .layout import DATA_SUFFIX, MAP_SUFFIX, Layout, key_hash
from .mapfile import MapHeader
from .objectmeta import ObjectMeta, ObjectVersion, block_count, block_span, blocks_for


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Version:
    """One version of one object as this cache stores it.

    Everything that names a version derives from this one value: its files'
    path without their suffix (``stem``), the same relative to the cache root
    (``name``: the index's ``version`` column and the open-version table's
    key), and the digest its map file's header repeats. Two values are the same version when
    their ``name`` is equal (it holds the digest and the block size).
    """

    key: str  # the object's cache key (nwbcache.urls.cache_key)
    remote: ObjectVersion  # size and validators, as upstream reported them
    digest: bytes  # SHA-256 of (key, validator, size): see blockfile.version_digest
    block_size: int
    stem: Path
    name: str
    # Whether upstream refuses it without credentials (None: not known yet).
    private: bool | None = None

    @property
    def about(self) -> tuple[str, int]:
        """(cache key, size): what the index notes of a version's object."""
        return self.key, self.remote.size

    @classmethod
    def of(cls, layout: Layout, meta: ObjectMeta, block_size: int) -> Version:
        path = layout.version_stem(key_hash(meta.cache_key), meta.digest, block_size)
        return cls(
            key=meta.cache_key,
            remote=meta.version,
            digest=meta.digest,
            block_size=block_size,
            stem=path,
            name=layout.relative(path),
            private=meta.private,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    # -- what HTTP needs -------------------------------------------------------
    @property
    def size(self) -> int:
        return self.remote.size

    @property
    def etag(self) -> str | None:
        return self.remote.etag

    # -- blocks ----------------------------------------------------------------
    @property
    def block_count(self) -> int:
        return block_count(self.remote.size, self.block_size)

    def block_span(self, index: int) -> tuple[int, int]:
        """Bytes [start, end) of block ``index`` in the object."""
        return block_span(index, self.remote.size, self.block_size)

    def block_length(self, index: int) -> int:
        start, end = self.block_span(index)
        return end - start

    def blocks_for(self, start: int, end: int) -> range:
        """Indices of the blocks covering bytes [start, end) (end > start)."""
        return blocks_for(start, end, self.block_size)

    @property
    def data_path(self) -> Path:
        return self.stem.with_name(self.stem.name + DATA_SUFFIX)

    @property
    def map_path(self) -> Path:
        return self.stem.with_name(self.stem.name + MAP_SUFFIX)

    @property
    def header(self) -> MapHeader:
        """What the version's map file says of it."""
        return MapHeader(self.block_size, self.remote.size, self.digest)
