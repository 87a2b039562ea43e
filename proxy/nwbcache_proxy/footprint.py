"""What the cache takes on disk beyond its blocks' bytes, from the index's totals: what
``--cache-size`` bounds is the blocks' bytes and this. Pure.

Per version: its object's dir and ``meta.json`` (one per object; counted per
version, as an object rarely has two), the first page of its map, and the
last file-system block of its data file, which its last block fills only in
part. Per block: its map entry (8 bytes) and its index row (~68 bytes,
bench/scale.py). Pages of 4 KiB (ext4's and XFS's default). Besides these:
the 256 shard dirs (at most 1 MiB), the index's own pages and its WAL (at
most 4 MiB, schema.WAL_LIMIT).

Measured on ext4: 3,000 objects of 1-8 blocks of 4 KiB and two of 200 MiB
took 523.3 MB (``du``) for 468.5 MB of blocks, 18 KB an object, ~2.5 KB of it
index rows. Counting blocks' bytes alone, an outside harness's cache of
20,000 small objects stood 31-36 % over ``--cache-size``.
"""

from __future__ import annotations

PAGE = 4096
# A version's files and dirs beyond its blocks' bytes: the object's dir, its
# meta.json, the map's first page, the data file's partial last page.
VERSION_BYTES = 4 * PAGE
# A block's map entry and index row.
BLOCK_BYTES = 80


def overhead(versions: int, blocks: int) -> int:
    """Bytes on disk beyond the blocks' own, for this many versions and blocks."""
    return versions * VERSION_BYTES + blocks * BLOCK_BYTES


def block_room(limit: int, versions: int, blocks: int) -> int:
    """The blocks' bytes that keep the cache within ``limit`` bytes on disk with
    this many versions and blocks (eviction's target; evicting frees a little
    more, as blocks and versions go with the bytes)."""
    return max(0, limit - overhead(versions, blocks))
