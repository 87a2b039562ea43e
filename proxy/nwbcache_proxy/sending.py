"""Sending a range's segments on the wire: writes (several pieces in one, straight to the
socket), pacing, and cutting a response that cannot be completed.

Cached bytes are written from memory, never sent with ``sendfile`` from the
cache's files: a hole punched by an eviction changes bytes a socket has not
sent yet (docs/format-3-design.md, Hazards 1)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios
import time

from aiohttp import web

from .appkeys import SENT_KEY
from .blockfile import Buffer
from .errors import ProxyError
from .rangereader import RangeReader

# A plain GET's client may want only the headers (remfile learns the size
# that way and hangs up). For its first PACED_SEGMENTS writes (the first is
# its first block alone: reader.py) and first PACED_BYTES, the next block is
# not asked for (nor fetched upstream) before the client has taken what was
# sent: blocks go into the socket buffer far faster than a client that is
# about to hang up can say so.
PACED_SEGMENTS = 2
PACED_BYTES = 1024 * 1024
# How long a paced response waits for its client before going on anyway.
PACE_TIMEOUT = 5.0


def paced(plain: bool, length: int) -> bool:
    """Whether a response's body of ``length`` bytes is paced (and fetched as
    its client takes it, not at once): a plain GET's, unless the whole body is
    PACED_BYTES or less. Pacing waits for the client's acknowledgements, which
    its kernel delays (up to 40 ms on Linux) while it has nothing to send
    back: a plain GET of an object of a few 4 KiB blocks took ~50 ms, cached or
    not, against ~1-4 ms. A client that hangs up after the headers of a small
    body costs that body upstream, PACED_BYTES at most. Pure."""
    return plain and length > PACED_BYTES


class ResponseAborted(Exception):
    """Headers went out and the body could not be completed: the connection is
    cut so the client sees a short body, never bytes of a wrong version."""


async def send(
    request: web.Request,
    response: web.StreamResponse,
    reader: RangeReader,
    length: int,
    *,
    pace: bool = False,
) -> None:
    """Stream a reader's ``length`` bytes.

    ``pace``: a plain GET; its first PACED_BYTES go no faster than the client
    takes them (see PACED_BYTES).

    Raises ResponseAborted when the body cannot be completed, after cutting
    the connection: with Content-Length already sent, a short body on a
    closed connection is how HTTP/1.1 says "this response failed".
    """
    remaining = length
    segments = 0
    direct = _direct_ok(request, response)
    try:
        async for pieces in reader:
            remaining -= await _write(request, response, pieces, direct=direct and segments > 0)
            segments += 1
            if (
                pace
                and remaining > 0
                and (segments <= PACED_SEGMENTS or length - remaining < PACED_BYTES)
            ):
                await _client_caught_up(request)
            if remaining > 0:
                # A write into the socket buffer succeeds after the peer closed;
                # give the loop one turn to notice a close, and stop before
                # asking for (and maybe fetching) the next block.
                await asyncio.sleep(0)
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError("client went away")
    except ProxyError as exc:
        abort(request)
        raise ResponseAborted(f"upstream failed mid-body: {exc}") from exc
    except ConnectionError as exc:  # the client hung up; fetches others wait on go on
        raise ResponseAborted("client went away") from exc


def _direct_ok(request: web.Request, response: web.StreamResponse) -> bool:
    """Whether the response's body bytes may go to its socket as they are:
    not framed (chunked) or encoded (compressed) by aiohttp, not over TLS."""
    transport = request.transport
    return (
        transport is not None
        and response.content_length is not None  # (without, HTTP/1.1 is chunked)
        and not response.chunked
        and not response.compression
        and transport.get_extra_info("sslcontext") is None
        and transport.get_extra_info("socket") is not None
    )


async def _write(
    request: web.Request, response: web.StreamResponse, pieces: list[Buffer], *, direct: bool
) -> int:
    """Send consecutive pieces (counted in the request's SENT_KEY as they go);
    their length.

    Several pieces go in one ``writev`` straight to the socket when
    ``direct`` and nothing aiohttp wrote is still waiting in the transport,
    so the bytes stay in order; whatever the socket does not take then goes
    through aiohttp (which buffers it and waits for the client). ``direct``
    is never true for a response's first write: aiohttp sends the headers
    with the first body bytes written through it."""
    n = sum(len(p) for p in pieces)
    transport = request.transport
    if direct and len(pieces) > 1 and transport is not None:
        if transport.is_closing():
            raise ConnectionResetError("client went away")
        if transport.get_write_buffer_size() == 0:
            try:
                sent = os.writev(transport.get_extra_info("socket").fileno(), pieces)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:  # the transport has not seen it: close it
                transport.abort()
                raise ConnectionResetError(f"client went away: {exc}") from exc
            _count(request, sent)
            pieces = _after(pieces, sent)
    for piece in pieces:
        await response.write(piece)
        _count(request, len(piece))
    return n


def _count(request: web.Request, sent: int) -> None:
    request[SENT_KEY] = request.get(SENT_KEY, 0) + sent


def _after(pieces: list[Buffer], sent: int) -> list[Buffer]:
    """What is left of ``pieces`` once their first ``sent`` bytes went out."""
    for k, piece in enumerate(pieces):
        if sent < len(piece):
            return [memoryview(piece)[sent:], *pieces[k + 1 :]]
        sent -= len(piece)
    return []


async def _client_caught_up(request: web.Request) -> None:
    """Wait until the client has acknowledged every byte sent, or has gone."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    deadline = time.monotonic() + PACE_TIMEOUT
    while time.monotonic() < deadline:
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        if transport.get_write_buffer_size() == 0 and _unacknowledged(sock.fileno()) == 0:
            return
        await asyncio.sleep(0.001)


def _unacknowledged(fd: int) -> int:
    """Bytes in the socket's send queue the peer has not acknowledged (Linux
    SIOCOUTQ); 0 where that cannot be told."""
    try:
        raw = fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


def abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
