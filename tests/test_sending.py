"""Sending cached ranges: sendfile straight into the socket, and what happens when the
socket cannot take a whole block at once (a slow reader) or the reader goes away."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest
import requests

from nwbcache_proxy.sending import PACED_BYTES, paced
from tests.support.daemons import DaemonThread
from tests.support.helpers import proxied
from tests.support.s3emu import S3Emulator

BS = 1024 * 1024
DATA = os.urandom(12 * BS + 12345)


def _small_window_socket(host: str, port: int) -> socket.socket:
    """A client socket with a small receive buffer (set before connecting, so the
    window it advertises is small from the start)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect((host, port))
    return sock


def _warm_daemon(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], key: str
) -> tuple[str, int, str, str]:
    """A daemon holding DATA at ``key``, read once through it: (host, port,
    request target, URL)."""
    origin.put(key, DATA)
    daemon = make_daemon(block_size=BS)
    url = proxied(daemon.url, origin, key)
    assert requests.get(url, timeout=60).content == DATA
    host, port = daemon.url.removeprefix("http://").split(":")
    return host, int(port), url.removeprefix(daemon.url), url


def test_a_slow_reader_gets_every_byte_of_a_large_cached_range(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """The socket's buffer is far smaller than the range: each block's sendfile
    sends part at once and the rest as the reader drains it."""
    host, port, path, _ = _warm_daemon(origin, make_daemon, "/s/slow")
    start, end = 100, 10 * BS + 99  # 10 MiB, eleven blocks
    with _small_window_socket(host, port) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes={start}-{end}\r\n\r\n".encode()
        )
        received = bytearray()
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 206")
        assert b"X-Cache: HIT" in head
        got = bytearray(body)
        want = end - start + 1
        while len(got) < want:
            time.sleep(0.0005 if len(got) < BS else 0)  # slow at first
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(got)} of {want} bytes"
            got += chunk
    assert bytes(got) == DATA[start : end + 1]


def test_a_reader_that_hangs_up_mid_range_leaves_the_daemon_serving(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    host, port, path, url = _warm_daemon(origin, make_daemon, "/s/hangup")
    for _ in range(5):
        with _small_window_socket(host, port) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\n\r\n".encode())
            sock.recv(4096)
        # closed with most of the body unsent
    r = requests.get(url, headers={"Range": f"bytes={BS - 5}-{3 * BS + 5}"}, timeout=30)
    assert r.status_code == 206
    assert r.content == DATA[BS - 5 : 3 * BS + 6]
    assert r.headers["X-Cache"] == "HIT"


@pytest.mark.parametrize("block_size", [64 * 1024, BS])
def test_a_plain_get_abandoned_after_its_headers_fetches_nothing_more(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread], block_size: int
) -> None:
    """remfile's size probe on a partly cached object: GET, read the headers,
    hang up. Cached blocks go into the socket at once; the first block that
    would have to come from upstream must not be asked for."""
    origin.put("/s/probe", DATA)
    daemon = make_daemon(block_size=block_size, readahead=2 * block_size)
    url = proxied(daemon.url, origin, "/s/probe")
    r = requests.get(url, headers={"Range": f"bytes=0-{2 * block_size - 1}"}, timeout=30)
    assert r.content == DATA[: 2 * block_size]  # blocks 0 and 1 cached, the rest not
    origin.wait_idle()
    origin.clear_log()
    for _ in range(5):
        with requests.get(url, stream=True, timeout=30) as probe:
            assert probe.headers["Content-Length"] == str(len(DATA))
    origin.wait_idle()
    assert origin.log == []
    r = requests.get(url, timeout=60)  # a real download still gets every byte
    assert r.content == DATA


@pytest.mark.parametrize(
    ("plain", "length", "want"),
    [
        (True, PACED_BYTES + 1, True),  # a plain GET of a large body: its client may hang up
        (True, PACED_BYTES, False),  # a small body goes at once
        (True, 1, False),
        (False, PACED_BYTES + 1, False),  # a Range names the bytes the client wants
        (False, 10 * PACED_BYTES, False),
    ],
)
def test_only_a_plain_get_of_a_large_body_is_paced(plain: bool, length: int, want: bool) -> None:
    assert paced(plain, length) is want


def test_a_plain_get_of_a_small_object_fetches_the_rest_in_one_request(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """A cold plain GET of an object of a few blocks: the first block (which
    tells the object's version), then all the others at once. Its window used
    to start at one block and grow as the client took them, each step waiting
    for the client's delayed acknowledgement: four upstream requests here,
    and ~50 ms, for 6 blocks."""
    bs = 4096
    data = os.urandom(5 * bs + 123)
    origin.put("/s/small", data)
    daemon = make_daemon(block_size=bs)
    r = requests.get(proxied(daemon.url, origin, "/s/small"), timeout=30)
    assert r.status_code == 200 and r.content == data
    origin.wait_idle()
    ranges = [q.range for q in origin.requests("/s/small", "GET")]
    assert ranges == [f"bytes=0-{bs - 1}", f"bytes={bs}-{len(data) - 1}"]


def test_no_readahead_still_fetches_a_range_in_one_request(
    origin: S3Emulator, make_daemon: Callable[..., DaemonThread]
) -> None:
    """--readahead 0: nothing past what is asked, but what is asked comes a run
    at a time; it came a block per request, in turn (p99 1.5 s for ranges of
    up to 2 MB of 4 KiB blocks, an outside harness found)."""
    bs = 4096
    data = os.urandom(64 * bs)
    origin.put("/s/noahead", data)
    daemon = make_daemon(block_size=bs, readahead=0)
    url = proxied(daemon.url, origin, "/s/noahead")
    for lo, hi in [(100, 20 * bs - 1), (20 * bs, 40 * bs - 1)]:  # back to back: sequential
        r = requests.get(url, headers={"Range": f"bytes={lo}-{hi}"}, timeout=30)
        assert r.status_code == 206 and r.content == data[lo : hi + 1]
    origin.wait_idle()
    gets = origin.requests("/s/noahead", "GET")
    # The discovery's first block, each range's other blocks in one request,
    # and not a byte past the second range.
    assert len(gets) <= 3, [q.range for q in gets]
    assert origin.bytes_sent("/s/noahead") == 40 * bs
