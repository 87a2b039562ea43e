"""Blocks already in memory go out together in one write (batching.py, sending.py), and
bytes still on their way from upstream are never held back for a batch."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from nwbcache_proxy import sending
from nwbcache_proxy.batching import BATCH_BYTES, BATCH_PIECES, Batch, batch_bytes
from nwbcache_proxy.buffers import SEND_BYTES
from tests.support.daemons import DaemonThread
from tests.support.helpers import proxied, wait_until
from tests.support.s3emu import S3Emulator

BS = 256 * 1024


# -- the batch (pure) -----------------------------------------------------------
def test_a_batch_keeps_its_pieces_in_order_and_what_is_owed_for_each_block() -> None:
    batch = Batch()
    assert not batch and not batch.full
    batch.add(b"ab", [3])
    batch.add(b"cdef", range(4, 6), trace=False)  # a span read: traced already
    assert batch and batch.pieces == [b"ab", b"cdef"] and batch.nbytes == 6
    assert batch.blocks == [(3, True), (4, False), (5, False)]


@pytest.mark.parametrize(
    ("sizes", "full"),
    [
        ([BATCH_BYTES - 1], False),
        ([BATCH_BYTES], True),
        ([BATCH_BYTES // 2, BATCH_BYTES // 2], True),
        ([1] * (BATCH_PIECES - 1), False),
        ([1] * BATCH_PIECES, True),
    ],
)
def test_a_batch_is_full_at_its_bytes_or_its_pieces(sizes: list[int], full: bool) -> None:
    batch = Batch()
    for k, size in enumerate(sizes):
        batch.add(bytes(size), [k])
    assert batch.full is full


@pytest.mark.parametrize(
    ("streams", "limit"),
    [
        (0, BATCH_BYTES),  # (the asking read is one of them: 0 is taken as 1)
        (1, BATCH_BYTES),
        (32, BATCH_BYTES),  # the most that each gather a full batch
        (64, 512 * 1024),
        (128, 256 * 1024),  # a default block each
        (1024, 32 * 1024),
    ],
)
def test_many_streams_share_the_send_budget(streams: int, limit: int) -> None:
    assert SEND_BYTES == 32 * 1024 * 1024  # (the table's premise)
    assert batch_bytes(streams, SEND_BYTES) == limit


@pytest.mark.parametrize(
    ("streams", "budget", "limit"),
    [
        (1, 4 * 1024 * 1024, BATCH_BYTES),
        (4, 4 * 1024 * 1024, BATCH_BYTES),  # a quarter each: 1 MiB
        (8, 4 * 1024 * 1024, 512 * 1024),
        (3, 10, 3),  # (a batch still takes one whole piece: Reader._batch)
    ],
)
def test_the_budget_shared_is_the_one_given(streams: int, budget: int, limit: int) -> None:
    assert batch_bytes(streams, budget) == limit


def test_a_batch_is_full_at_its_own_limit() -> None:
    batch = Batch(limit=10)
    fullness = []
    for k in range(2):  # a batch takes a whole piece: it may pass its limit once
        batch.add(bytes(6), [k])
        fullness.append((batch.full, batch.nbytes, batch.room))
    assert fullness == [(False, 6, 4), (True, 12, 0)]


@pytest.mark.parametrize(
    ("sent", "left"),
    [
        (0, [b"abc", b"de", b"f"]),
        (1, [b"bc", b"de", b"f"]),
        (3, [b"de", b"f"]),
        (4, [b"e", b"f"]),
        (5, [b"f"]),
        (6, []),
    ],
)
def test_what_is_left_of_pieces_after_a_short_write(sent: int, left: list[bytes]) -> None:
    assert [bytes(p) for p in sending._after([b"abc", b"de", b"f"], sent)] == left


# -- through the daemon -----------------------------------------------------------
# Each on both event loops (runner.new_loop): the direct write goes around
# the loop's transport, whichever it is.
LOOPS = pytest.mark.parametrize("loop", ["uvloop", "asyncio"])


def _open(daemon: DaemonThread, rcvbuf: int | None = None) -> socket.socket:
    host, port = daemon.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connecting: the window advertised is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect((host, int(port)))
    return sock


def _ask(sock: socket.socket, daemon: DaemonThread, url: str, ranges: str) -> bytes:
    """Send a GET of ``ranges``; what came back up to the end of the answer's
    head (and maybe the first bytes of its body: see _body)."""
    target = url.removeprefix(daemon.url)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nRange: bytes={ranges}\r\n\r\n".encode())
    got = bytearray()
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(4096)
        assert chunk, "closed before the headers"
        got += chunk
    return bytes(got)


def _body(
    sock: socket.socket,
    head: bytes,
    length: int,
    progress: Callable[[int], object] | None = None,
) -> bytes:
    """The answer's ``length`` body bytes: those that came with ``head``, then the
    rest from the socket; ``progress`` hears the count after each receive."""
    body = bytearray(head.partition(b"\r\n\r\n")[2])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(body)} bytes"
        body += chunk
        if progress is not None:
            progress(len(body))
    return bytes(body)


@LOOPS
def test_bytes_on_their_way_from_upstream_go_out_as_they_come(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], loop: str
) -> None:
    """At 1 MB/s, a cold 1.5 MiB range: its first block reaches the client long
    before the last (a batch of 1 MiB waited for would hold it back 1 s)."""
    data = os.urandom(8 * BS)
    origin.put("/b/slow", data)
    daemon = make_daemon(block_size=BS, event_loop=loop)
    url = proxied(daemon.url, origin, "/b/slow")
    start, end = 2 * BS, 8 * BS  # past block 0 (discovery may fetch it)
    assert requests.head(url, timeout=30).status_code == 200  # discovery at full speed
    origin.bandwidth = 1e6
    with _open(daemon) as sock:
        t0 = time.monotonic()
        head = _ask(sock, daemon, url, f"{start}-{end - 1}")
        assert head.startswith(b"HTTP/1.1 206")
        arrivals: list[tuple[int, float]] = []
        body = _body(sock, head, end - start, lambda n: arrivals.append((n, time.monotonic())))
        total = time.monotonic() - t0
    assert body == data[start:end]
    first_block_at = next(t for n, t in arrivals if n >= BS) - t0
    assert total > 0.8, "the origin was not slow: the test shows nothing"
    assert first_block_at < 0.4 * total, (first_block_at, total)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Each direct write of several pieces the daemon (a thread of this process)
    makes: (bytes asked, bytes the socket took). The real call runs."""
    seen: list[tuple[int, int]] = []
    real = os.writev

    def spy(fd: int, buffers: Any) -> int:
        asked = sum(len(b) for b in buffers)
        try:
            took = real(fd, buffers)
        except BlockingIOError:
            seen.append((asked, 0))
            raise
        seen.append((asked, took))
        return took

    monkeypatch.setattr(os, "writev", spy)  # (sending.py calls os.writev)
    yield seen


@LOOPS
def test_blocks_in_memory_go_out_together_and_a_short_write_loses_nothing(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    writes: list[tuple[int, int]],
    loop: str,
) -> None:
    """A cold 8 MiB range to a client with a tiny window that waits before
    reading: the fetch is done long before, so the blocks go out several per
    write, which the socket takes only part of; the rest goes through aiohttp."""
    data = os.urandom(40 * BS + 1234)
    origin.put("/b/batch", data)
    daemon = make_daemon(block_size=BS, event_loop=loop)
    url = proxied(daemon.url, origin, "/b/batch")
    start, end = BS + 77, 33 * BS + 5  # partial first and last blocks
    with _open(daemon, rcvbuf=4096) as sock:
        head = _ask(sock, daemon, url, f"{start}-{end - 1}")
        assert head.startswith(b"HTTP/1.1 206")
        time.sleep(0.5)  # the whole range is fetched meanwhile
        body = _body(sock, head, end - start)
    assert body == data[start:end]
    assert any(asked > BS for asked, _ in writes), writes  # several blocks in one write
    assert any(took < asked for asked, took in writes), writes  # and a short one


@LOOPS
def test_a_multipart_answer_of_batched_parts_is_exact(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    writes: list[tuple[int, int]],
    loop: str,
) -> None:
    """Part headers go through aiohttp between parts written directly: the
    order on the wire is kept."""
    data = os.urandom(24 * BS)
    origin.put("/b/multi", data)
    daemon = make_daemon(block_size=BS, event_loop=loop)
    url = proxied(daemon.url, origin, "/b/multi")
    with _open(daemon, rcvbuf=4096) as sock:
        head = _ask(sock, daemon, url, f"10-{8 * BS}, {12 * BS + 3}-{20 * BS - 2}")
        assert head.startswith(b"HTTP/1.1 206")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        boundary = head.split(b"boundary=")[1].split(b"\r\n")[0]
        time.sleep(0.5)
        body = _body(sock, head, length)
    parts = body.split(b"--" + boundary)
    payloads = [p.partition(b"\r\n\r\n")[2].removesuffix(b"\r\n") for p in parts[1:-1]]
    assert payloads == [data[10 : 8 * BS + 1], data[12 * BS + 3 : 20 * BS - 1]]
    assert any(asked > BS for asked, _ in writes), writes


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The bytes of each write responses make (sending._write, one per batch),
    by the Range their request asked. The real call runs."""
    seen: dict[str, list[int]] = {}
    real = sending._write

    async def spy(request: Any, response: Any, pieces: list[Any], *, direct: bool) -> int:
        seen.setdefault(request.headers.get("Range", ""), []).append(sum(len(p) for p in pieces))
        return await real(request, response, pieces, direct=direct)

    monkeypatch.setattr(sending, "_write", spy)
    return seen


@LOOPS
def test_many_responses_under_way_each_gather_a_share_of_the_budget(
    origin: S3Emulator,
    make_daemon: Callable[..., DaemonThread],
    batches: dict[str, list[int]],
    loop: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three clients that stopped reading mid-body, and a fourth: four streams
    share a budget of 10 blocks, 2.5 each, so the fourth's writes gather two
    whole blocks at most (alone a response gathers 1 MiB, as the first of the
    three did), and its bytes are exact. Once the clients have gone no stream
    is counted."""
    data = os.urandom(96 * BS)  # far more than the socket buffers of a client stuck
    origin.put("/b/shared", data)
    daemon = make_daemon(block_size=BS, event_loop=loop)
    monkeypatch.setattr(daemon.cache.reader, "send_budget", 10 * BS)
    url = proxied(daemon.url, origin, "/b/shared")
    assert requests.get(url, timeout=30).content == data  # warm: all from the page cache
    reader = daemon.cache.reader
    whole = f"0-{len(data) - 1}"
    stalled = [_open(daemon, rcvbuf=4096) for _ in range(3)]
    try:
        for sock in stalled:
            assert _ask(sock, daemon, url, whole).startswith(b"HTTP/1.1 206")
        wait_until(lambda: reader.streams == 3, 10, "three responses under way")
        start, end = 3 * BS + 5, 40 * BS
        with _open(daemon, rcvbuf=4096) as sock:
            head = _ask(sock, daemon, url, f"{start}-{end - 1}")
            time.sleep(0.3)
            body = _body(sock, head, end - start)
        assert reader.streams == 3, "a stuck response finished: the test shows nothing"
        assert body == data[start:end]
        assert max(batches[f"bytes={whole}"]) == BATCH_BYTES
        assert max(batches[f"bytes={start}-{end - 1}"]) == 2 * BS, batches
    finally:
        for sock in stalled:
            sock.close()
    wait_until(lambda: reader.streams == 0, 10, "the streams of clients gone")
