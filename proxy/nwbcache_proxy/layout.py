"""Where things live under ``--cache-dir`` (format version 2).

::

    <cache-dir>/v2/
        objects/<kh[0:2]>/<kh>/meta.json                 current version of the object
        objects/<kh[0:2]>/<kh>/<vd>.<bs>/<s>/<n>.blk     block n (see blockfile.py)
        index.sqlite3                                    accounting (not presence)
        reconcile.lock                                   one process reconciles at a time
        check.cursor                                     where an interrupted check resumes
        fetch.claims                                     locks: who fetches what (claims.py)
        jobs/<id>.json, <id>.lock, <id>.cancel           warm-up jobs (jobs.py)
        staging/<pid>-<token>/                           a live process's temp files
        staging/<pid>-<token>/.lock                      flock held while it lives
        trash/                                           version dirs being deleted

``kh`` is the SHA-256 of the object's cache key, ``vd`` the first 32 hex
digits of its version digest, ``bs`` the block size, ``s`` the block's shard,
``n // BLOCKS_PER_DIR``: no directory holds more than BLOCKS_PER_DIR blocks,
however large the object (format 1 kept every block of a version in one
directory: 400,000 files for a 100 GB object). Blocks of another block size
or another version are never looked up; they age out through eviction.
Pure: paths only, no I/O.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

LAYOUT_VERSION = "v2"
# Format 1's root: renamed to LAYOUT_VERSION at start and its blocks moved
# into shard directories by the reconciler (docs/on-disk-format.md).
LEGACY_VERSION = "v1"
# Blocks per shard directory: 4,096 keeps every directory small enough for
# fast lookups and listings (ext4's htree, XFS) and an object of 1 TB in
# 256 KiB blocks in 1,000 shards.
BLOCKS_PER_DIR = 4096


def key_hash(cache_key: str) -> str:
    return hashlib.sha256(cache_key.encode("utf-8", "surrogateescape")).hexdigest()


class Layout:
    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.root = cache_dir / LAYOUT_VERSION
        self.legacy_root = cache_dir / LEGACY_VERSION
        self.objects = self.root / "objects"
        self.staging = self.root / "staging"
        self.trash = self.root / "trash"
        self.index_path = self.root / "index.sqlite3"
        self.reconcile_lock = self.root / "reconcile.lock"
        self.check_cursor = self.root / "check.cursor"
        self.claims_path = self.root / "fetch.claims"
        self.jobs = self.root / "jobs"

    def object_dir(self, kh: str) -> Path:
        return self.objects / kh[:2] / kh

    def meta_path(self, kh: str) -> Path:
        return self.object_dir(kh) / "meta.json"

    def version_dir(self, kh: str, digest: bytes, block_size: int) -> Path:
        return self.object_dir(kh) / f"{digest.hex()[:32]}.{block_size}"

    def relative(self, path: Path) -> str:
        """``path`` relative to the root: how the index names versions."""
        return str(path.relative_to(self.root))

    def version_path(self, version_name: str) -> Path:
        """The version dir of a name relative to the root."""
        return self.root / version_name

    def meta_path_of_version(self, version_name: str) -> Path:
        """The meta.json beside a version dir named relative to the root."""
        return (self.root / version_name).parent / "meta.json"

    def block_path(self, version_name: str, index: int) -> Path:
        """Block ``index`` of the version dir named ``version_name`` (relative)."""
        return self.root / version_name / block_relpath(index)

    def shard_dir(self, version_name: str, shard: int) -> str:
        """Shard dir ``shard`` of a version dir named relative to the root, as a
        str: eviction opens one per group of victims, not a Path per block."""
        return f"{self.root}/{version_name}/{shard}"

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
        return _number(stem) if stem != block_file_name else None

    @staticmethod
    def shard_of_dir(shard_dir_name: str) -> int | None:
        """``s`` of a shard dir's name, or None for any other name."""
        return _number(shard_dir_name)


def _number(text: str) -> int | None:
    """The number ``text`` spells as this layout writes numbers (ASCII digits, no
    leading zero), else None: ``007`` is not where block 7 lives."""
    if not (text.isascii() and text.isdigit()) or (len(text) > 1 and text[0] == "0"):
        return None
    return int(text)


def shard_of(index: int) -> int:
    return index // BLOCKS_PER_DIR


def shard_range(shard: int) -> range:
    """The block indices a shard dir may hold."""
    return range(shard * BLOCKS_PER_DIR, (shard + 1) * BLOCKS_PER_DIR)


def block_relpath(index: int) -> str:
    """Block ``index``'s path inside its version dir."""
    return f"{index // BLOCKS_PER_DIR}/{block_file_name(index)}"


def block_file_name(index: int) -> str:
    """Block ``index``'s file name inside its shard dir."""
    return f"{index}.blk"
