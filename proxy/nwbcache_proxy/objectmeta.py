"""What the daemon knows of one version of one upstream object. Pure."""

from __future__ import annotations

import dataclasses
from typing import Any

from .blockfile import version_digest

# meta.json format written. 2 added "private". A format 1 file is read with
# privacy unknown, which makes the object due for discovery before anyone is
# served from it: caches written before privacy existed may hold private
# objects believed public.
META_FORMAT = 2
READABLE_FORMATS = (1, 2)


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectVersion:
    """Size and validators of one version, as upstream reported them."""

    size: int
    etag: str | None
    last_modified: str | None
    content_type: str = "application/octet-stream"

    @property
    def validator(self) -> str:
        """What identifies this version: the ETag, else Last-Modified, else nothing
        but the size (a server without validators cannot be bound any tighter)."""
        if self.etag:
            return "etag:" + self.etag
        if self.last_modified:
            return "lm:" + self.last_modified
        return "size-only"

    def same_version(self, other: ObjectVersion) -> bool:
        return self.size == other.size and self.validator == other.validator


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectMeta:
    """An object's cache identity plus its current version."""

    cache_key: str
    version: ObjectVersion
    validated_at: float
    # True: upstream refuses it without credentials (access.py); None: not known.
    private: bool | None = None
    # Derived once: every block read needs it, and it is a SHA-256.
    digest: bytes = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        digest = version_digest(self.cache_key, self.version.validator, self.version.size)
        object.__setattr__(self, "digest", digest)

    def to_json(self) -> dict[str, Any]:
        v = self.version
        return {
            "format": META_FORMAT,
            "cache_key": self.cache_key,
            "size": v.size,
            "etag": v.etag,
            "last_modified": v.last_modified,
            "content_type": v.content_type,
            "validated_at": self.validated_at,
            "private": self.private,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], cache_key: str) -> ObjectMeta | None:
        """None when the file is of another format or another object (hash collision
        or a misplaced file): such metadata is ignored, never trusted."""
        try:
            fmt = data.get("format")
            if fmt not in READABLE_FORMATS or data.get("cache_key") != cache_key:
                return None
            size = data["size"]
            if not isinstance(size, int) or size < 0:
                return None
            version = ObjectVersion(
                size=size,
                etag=_opt_str(data.get("etag")),
                last_modified=_opt_str(data.get("last_modified")),
                content_type=str(data.get("content_type") or "application/octet-stream"),
            )
            private = data.get("private") if fmt >= 2 else None
            return cls(
                cache_key,
                version,
                float(data["validated_at"]),
                private if isinstance(private, bool) else None,
            )
        except (KeyError, TypeError, ValueError):
            return None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


def block_span(index: int, size: int, block_size: int) -> tuple[int, int]:
    """Byte range [start, end) of block ``index`` in an object of ``size`` bytes."""
    start = index * block_size
    return start, min(start + block_size, size)


def blocks_for(start: int, end: int, block_size: int) -> range:
    """Indices of the blocks covering bytes [start, end) (end > start)."""
    return range(start // block_size, (end - 1) // block_size + 1)
