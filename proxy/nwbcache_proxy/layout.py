"""Where things live under ``--cache-dir`` (format version 1).

::

    <cache-dir>/v1/
        objects/<kh[0:2]>/<kh>/meta.json          current version of the object
        objects/<kh[0:2]>/<kh>/<vd>.<bs>/<n>.blk  block n (see blockfile.py)
        index.sqlite3                             LRU accounting (not presence)
        reconcile.lock                            one process reconciles at a time
        staging/<pid>-<token>/                    a live process's temp files
        staging/<pid>-<token>/.lock               flock held while it lives
        trash/                                    version dirs being deleted

``kh`` is the SHA-256 of the object's cache key, ``vd`` the first 32 hex
digits of its version digest, ``bs`` the block size. Blocks of another block
size or another version are never looked up; they age out through the LRU.
Pure: paths only, no I/O.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

LAYOUT_VERSION = "v1"


def key_hash(cache_key: str) -> str:
    return hashlib.sha256(cache_key.encode("utf-8", "surrogateescape")).hexdigest()


class Layout:
    def __init__(self, cache_dir: Path) -> None:
        self.root = cache_dir / LAYOUT_VERSION
        self.objects = self.root / "objects"
        self.staging = self.root / "staging"
        self.trash = self.root / "trash"
        self.index_path = self.root / "index.sqlite3"
        self.reconcile_lock = self.root / "reconcile.lock"

    def object_dir(self, kh: str) -> Path:
        return self.objects / kh[:2] / kh

    def meta_path(self, kh: str) -> Path:
        return self.object_dir(kh) / "meta.json"

    def version_dir(self, kh: str, digest: bytes, block_size: int) -> Path:
        return self.object_dir(kh) / f"{digest.hex()[:32]}.{block_size}"

    def relative(self, path: Path) -> str:
        """``path`` relative to the root: how the index names blocks and versions."""
        return str(path.relative_to(self.root))

    def meta_path_of_version(self, version_name: str) -> Path:
        """The meta.json beside a version dir named relative to the root."""
        return (self.root / version_name).parent / "meta.json"

    @staticmethod
    def version_of_block(block_path: str) -> str:
        """The version dir of a block, both relative to the root."""
        return block_path.rsplit("/", 1)[0]

    @staticmethod
    def block_name(index: int) -> str:
        return f"{index}.blk"

    @staticmethod
    def block_size_of(version_dir_name: str) -> int | None:
        """The block size a version dir's name (``<vd>.<bs>``) records, or None."""
        try:
            return int(version_dir_name.rsplit(".", 1)[1])
        except (IndexError, ValueError):
            return None

    @staticmethod
    def block_index_of(block_file_name: str) -> int | None:
        """``n`` of ``<n>.blk``, or None for any other name."""
        stem = block_file_name.removesuffix(".blk")
        return int(stem) if stem != block_file_name and stem.isdigit() else None
