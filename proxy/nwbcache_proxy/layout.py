"""Where things live under ``--cache-dir`` (format version 3).

::

    <cache-dir>/v3/
        objects/<kh[0:2]>/<kh>/meta.json                 current version of the object
        objects/<kh[0:2]>/<kh>/<vd>.<bs>.data            the version's bytes at their offsets
        objects/<kh[0:2]>/<kh>/<vd>.<bs>.map             which blocks are there (mapfile.py)
        index.sqlite3                                    accounting (not presence)
        reconcile.lock                                   one process reconciles at a time
        check.cursor                                     where an interrupted check resumes
        fetch.claims                                     locks: who fetches what (claims.py)
        jobs/<id>.json, <id>.lock, <id>.cancel           warm-up jobs (jobs.py)
        staging/<pid>-<token>/                           a live process's temp files
        staging/<pid>-<token>/.lock                      flock held while it lives
        trash/                                           dirs being deleted

``kh`` is the SHA-256 of the object's cache key, ``vd`` the first 32 hex
digits of its version digest, ``bs`` the block size. A version is named by
its stem ``objects/<kh[0:2]>/<kh>/<vd>.<bs>`` relative to the root (the
index's ``version`` column): two files per version, whatever its size, and
an object dir holds its meta.json and two files per version cached.
Versions of another block size or digest are never looked up; they age out
through eviction.

Formats 1 and 2 kept a file per block: ``<vd>.<bs>/<n>.blk`` (format 1) and
``<vd>.<bs>/<s>/<n>.blk`` (format 2, ``s = n // BLOCKS_PER_DIR``). Their
roots are renamed to format 3's at start and the reconciler moves their
blocks into data files (docs/on-disk-format.md); the names below that
describe them exist for that move only. Pure: paths only, no I/O.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

LAYOUT_VERSION = "v3"
# Older formats' roots, newest first: the first found is renamed to
# LAYOUT_VERSION at start and its blocks moved into data files by the
# reconciler (docs/on-disk-format.md).
LEGACY_VERSIONS = ("v2", "v1")
# Format 2's blocks per shard directory (format 1 had none).
BLOCKS_PER_DIR = 4096
DATA_SUFFIX = ".data"
MAP_SUFFIX = ".map"
# The dirs whose entries name a version's files, from its own up: the
# object's, its shard (``<kh[0:2]>``), ``objects``.
VERSION_DIRS = 3


def key_hash(cache_key: str) -> str:
    return hashlib.sha256(cache_key.encode("utf-8", "surrogateescape")).hexdigest()


class Layout:
    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.root = cache_dir / LAYOUT_VERSION
        self.legacy_roots = tuple(cache_dir / v for v in LEGACY_VERSIONS)
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

    def version_stem(self, kh: str, digest: bytes, block_size: int) -> Path:
        """A version's files without their suffix (``<vd>.<bs>``)."""
        return self.object_dir(kh) / f"{digest.hex()[:32]}.{block_size}"

    def relative(self, path: Path) -> str:
        """``path`` relative to the root: how the index names versions."""
        return str(path.relative_to(self.root))

    def version_path(self, version_name: str) -> Path:
        """The stem of a version named relative to the root."""
        return self.root / version_name

    def data_path(self, version_name: str) -> Path:
        return self.root / (version_name + DATA_SUFFIX)

    def map_path(self, version_name: str) -> Path:
        return self.root / (version_name + MAP_SUFFIX)

    def meta_path_of_version(self, version_name: str) -> Path:
        """The meta.json beside a version named relative to the root."""
        return (self.root / version_name).parent / "meta.json"

    @staticmethod
    def block_size_of(stem: str) -> int | None:
        """The block size a version's stem (``<vd>.<bs>``) records, or None."""
        try:
            return int(stem.rsplit(".", 1)[1])
        except (IndexError, ValueError):
            return None

    @staticmethod
    def stem_of(file_name: str) -> tuple[str, str] | None:
        """(stem, suffix) of a format-3 version file's name, or None."""
        for suffix in (DATA_SUFFIX, MAP_SUFFIX):
            if file_name.endswith(suffix) and len(file_name) > len(suffix):
                return file_name[: -len(suffix)], suffix
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
