"""Objects' meta.json files for this process: read, write, update under the object's lock, drop.

Every call runs in a disk thread. Writes go through the process's staging
dir and a rename (store.write_meta); read-modify-writes hold the object's
flock (store.object_lock), so processes take turns on one object.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import store, wholeversions
from .aio import Disk
from .blocks import Blocks
from .layout import Layout, key_hash
from .objectmeta import ObjectMeta
from .version import Version


class MetaFiles:
    def __init__(self, layout: Layout, disk: Disk, blocks: Blocks) -> None:
        self.layout = layout
        self.disk = disk
        self.blocks = blocks  # its staging dir, once started

    async def read(self, key: str) -> ObjectMeta | None:
        """The object's meta.json, if there is one this daemon reads."""
        path = self.layout.meta_path(key_hash(key))
        raw = await self.disk.run(lambda: store.read_meta(path))
        return ObjectMeta.from_json(raw, key) if raw is not None else None

    async def write(self, meta: ObjectMeta) -> None:
        """Make ``meta`` the object's meta.json (what a discovery found)."""
        path = self.layout.meta_path(key_hash(meta.cache_key))
        staging = self.blocks.staging

        def write() -> None:
            with store.object_lock(path):
                store.write_meta(staging, path, meta.to_json())

        await self.disk.run(write)

    async def update(self, v: Version, **changes: Any) -> ObjectMeta | None:
        """Rewrite meta.json with ``changes`` if it still holds version ``v``, under
        the object's lock; returns what it holds now. ``validated_at`` only moves
        forward and ``private`` only becomes True here (discovery alone, which
        asks upstream afresh, may write it False)."""
        path = self.layout.meta_path(key_hash(v.key))
        staging = self.blocks.staging

        def update() -> ObjectMeta | None:
            with store.object_lock(path):
                raw = store.read_meta(path)
                on_disk = ObjectMeta.from_json(raw, v.key) if raw else None
                if on_disk is None or not on_disk.version.same_version(v.remote):
                    return None
                merged = dataclasses.replace(on_disk, **changes)
                merged = dataclasses.replace(
                    merged,
                    validated_at=max(merged.validated_at, on_disk.validated_at),
                    private=True if on_disk.private else merged.private,
                )
                store.write_meta(staging, path, merged.to_json())
                return merged

        return await self.disk.run(update)

    async def drop(self, v: Version) -> None:
        """Remove version ``v``'s files, and meta.json if it still names ``v``."""
        meta_path = self.layout.meta_path(key_hash(v.key))

        def drop() -> None:
            raw = store.read_meta(meta_path)
            on_disk = ObjectMeta.from_json(raw, v.key) if raw else None
            if on_disk is not None and on_disk.version.same_version(v.remote):
                store.unlink_quietly(meta_path)
            wholeversions.drop(v.data_path, v.map_path)

        await self.disk.run(drop)
