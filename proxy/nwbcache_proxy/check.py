"""``nwbcache check``: verify every cached block against its object's version,
and optionally repair what is wrong (diskcache's ``Cache.check`` is the model).

Safe while daemons run on the same cache: it only ever deletes blocks that
fail verification (a daemon would drop them too, on first use), and repairs
the index in SQLite transactions.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from pathlib import Path

from . import blockfile, index, store
from .blockfile import HEADER_SIZE, CorruptBlock
from .layout import Layout, key_hash
from .objectmeta import ObjectMeta, block_span


@dataclasses.dataclass(slots=True)
class CheckReport:
    blocks: int = 0
    bytes: int = 0
    corrupt: list[str] = dataclasses.field(default_factory=list)
    stale: int = 0  # blocks of another version or block size: valid, unreachable, aged out by LRU
    missing_from_index: int = 0
    index_without_file: int = 0
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing_from_index and not self.index_without_file

    def summary(self) -> str:
        lines = [
            f"{self.blocks} blocks, {self.bytes} bytes checked",
            f"corrupt blocks: {len(self.corrupt)}"
            + (" (deleted)" if self.repaired and self.corrupt else ""),
            f"blocks of other versions or block sizes (valid, evicted in time): {self.stale}",
            f"index rows missing: {self.missing_from_index}; index rows without a file: "
            f"{self.index_without_file}" + (" (reconciled)" if self.repaired else ""),
        ]
        lines += [f"  corrupt: {path}" for path in self.corrupt[:20]]
        return "\n".join(lines)


def check_cache(cache_dir: Path, *, repair: bool) -> CheckReport:
    layout = Layout(cache_dir)
    report = CheckReport(repaired=repair)
    on_disk: set[str] = set()
    for kh_dir in _dirs(layout.objects, depth=2):
        meta_raw = store.read_meta(layout.meta_path(kh_dir.name))
        key = meta_raw.get("cache_key") if meta_raw else None
        meta = ObjectMeta.from_json(meta_raw, key) if meta_raw and isinstance(key, str) else None
        if meta is not None and key_hash(meta.cache_key) != kh_dir.name:
            meta = None  # misplaced: trusted for no block here
        for vdir in _dirs(kh_dir, depth=1):
            block_size = Layout.block_size_of(vdir.name)
            current = (
                meta is not None
                and block_size is not None
                and vdir == layout.version_dir(kh_dir.name, meta.digest, block_size)
            )
            for entry in os.scandir(vdir):
                if Layout.block_index_of(entry.name) is None:
                    continue
                rel = layout.relative(Path(entry.path))
                on_disk.add(rel)
                report.blocks += 1
                report.bytes += entry.stat().st_size
                problem = _verify(Path(entry.path), meta if current else None, block_size)
                if problem is None:
                    report.stale += not current
                    continue
                report.corrupt.append(f"{rel}: {problem}")
                if repair:
                    store.unlink_quietly(Path(entry.path))
                    on_disk.discard(rel)
    _check_index(layout, on_disk, report, repair)
    return report


def _dirs(root: Path, depth: int) -> list[Path]:
    level = [root]
    for _ in range(depth):
        level = [Path(e.path) for d in level if d.is_dir() for e in os.scandir(d) if e.is_dir()]
    return level


def _verify(path: Path, meta: ObjectMeta | None, block_size: int | None) -> str | None:
    """None if the block is sound; else what is wrong with it."""
    try:
        raw = path.read_bytes()
        header = blockfile.decode_header(raw)
        data = raw[HEADER_SIZE:]
        if len(data) != header.length:
            raise CorruptBlock(f"{len(data)} data bytes, header says {header.length}")
        if zlib.crc32(data) != header.crc32:
            raise CorruptBlock("checksum mismatch")
        block_index = Layout.block_index_of(path.name)
        if meta is not None and block_size is not None and block_index is not None:
            start, end = block_span(block_index, meta.version.size, block_size)
            blockfile.check_header(
                header,
                index=block_index,
                length=end - start,
                digest=meta.digest,
                file_size=len(raw),
            )
    except (CorruptBlock, ValueError) as exc:
        return str(exc)
    except FileNotFoundError:
        return None  # evicted while we looked
    return None


def _size_and_mtime(path: Path) -> tuple[int, float]:
    st = path.stat()
    return st.st_size, st.st_mtime


def _check_index(layout: Layout, on_disk: set[str], report: CheckReport, repair: bool) -> None:
    if not layout.index_path.exists():
        report.missing_from_index = len(on_disk)
        return
    conn = index.connect(layout.index_path)
    try:
        indexed = index.indexed_paths(conn)
        missing = on_disk - indexed
        gone = indexed - on_disk
        report.missing_from_index = len(missing)
        report.index_without_file = len(gone)
        if repair and (missing or gone):
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                index.add_found(
                    conn,
                    [
                        (p, Layout.version_of_block(p), *_size_and_mtime(layout.root / p))
                        for p in missing
                        if (layout.root / p).exists()
                    ],
                )
                index.delete_paths(conn, sorted(gone))
    finally:
        conn.close()
