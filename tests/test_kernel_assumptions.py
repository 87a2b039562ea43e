"""What the cache's safety takes from the kernel, checked on the kernel it runs on.

Format 2 evicts a block by unlinking its file while responses may still be
sending it: the bytes ``sendfile`` put in a socket's buffer must stay the
file's bytes after the unlink (the pages are the file's, referenced, not
copied). Format 3 (docs/format-3-design.md) cannot lean on this with hole
punching, which changes such bytes in place here, so it copies spans out
instead. The check is bench/layouts.py's, which records both on each machine.
"""

from __future__ import annotations

from pathlib import Path

from bench.layouts import hazards


def test_bytes_sendfile_queued_survive_the_file_being_unlinked(tmp_path: Path) -> None:
    assert hazards(tmp_path)["bytes queued by sendfile kept after unlink"] is True
