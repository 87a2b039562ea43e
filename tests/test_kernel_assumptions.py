"""What the cache's safety takes from the kernel, checked on the kernel it runs on.

Format 2 evicts a block by unlinking its file while responses may still be
sending it: the bytes ``sendfile`` put in a socket's buffer must stay the
file's bytes after the unlink (the pages are the file's, referenced, not
copied). Format 3 (docs/format-3-design.md) cannot lean on this with hole
punching, which changes such bytes in place (``make bench-layouts`` records it),
so it copies spans out instead.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return client, accepted


def test_bytes_sendfile_queued_survive_the_file_being_unlinked(tmp_path: Path) -> None:
    path = tmp_path / "0.blk"
    data = os.urandom(2 * 1024 * 1024)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    os.pread(fd, len(data), 0)  # in the page cache, as a warm block is
    sender, receiver = _loopback_pair()
    with sender, receiver:
        sender.setblocking(False)
        sent = 0
        try:  # the receiver does not read: what is sent waits in the buffers
            while sent < len(data):
                sent += os.sendfile(sender.fileno(), fd, sent, len(data) - sent)
        except BlockingIOError:
            pass  # the buffers are full
        assert sent >= 256 * 1024
        os.unlink(path)  # eviction
        os.close(fd)  # and the last fd of it
        got = bytearray()
        while len(got) < sent:
            chunk = receiver.recv(1 << 20)
            assert chunk, "connection closed early"
            got += chunk
    assert bytes(got) == data[:sent]
