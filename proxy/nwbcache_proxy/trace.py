"""``--trace FILE``: one JSON line per block handed to a client, for replaying eviction policies.

bench/policysim replays such files (``python -m bench.policysim.simulate
--trace FILE``) to compare eviction policies on a lab's real workload. A line
names the object by its version directory (hashes: no URL, no credential),
the block, its size and the time::

    {"object": "objects/ab/ab12.../0f3e....262144", "block": 0, "bytes": 262144,
     "time": 1796210100.123}

Blocks are recorded as they are served, not as ranges asked for: remfile's
size probe asks for a whole object and reads none of it.

Lines are buffered and appended once a second (upkeep), each with one
``write`` to a file opened ``O_APPEND``, so the workers of one daemon, or
several daemons, may share a trace file without tearing lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from .aio import Disk
from .version import Version

# Lines kept while the disk is slow to take them; past this, records are
# dropped (and counted) rather than growing memory without bound.
MAX_BUFFERED = 100_000


class TraceWriter:
    def __init__(self, path: Path, disk: Disk) -> None:
        self.path = path
        self.disk = disk
        self._lines: list[str] = []
        self.dropped = 0

    def record(self, v: Version, index: int) -> None:
        """Block ``index`` of version ``v`` goes to a client."""
        if len(self._lines) >= MAX_BUFFERED:
            self.dropped += 1
            return
        record = {
            "object": v.name,
            "block": index,
            "bytes": v.block_length(index),
            "time": round(time.time(), 6),
        }
        self._lines.append(json.dumps(record) + "\n")

    async def flush(self) -> None:
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        # Shielded: a caller cancelled while the job waits for a disk thread
        # (upkeep, stopped at shutdown) must not cancel it, lines and all.
        await asyncio.shield(self.disk.start(lambda: _append(self.path, lines)))


def _append(path: Path, lines: list[str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for line in lines:  # one write per line: appends of a line never interleave
            os.write(fd, line.encode())
    finally:
        os.close(fd)
