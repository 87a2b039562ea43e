"""Sending a range's segments on the wire: writes, sendfile, the fallback, and cutting a
response that cannot be completed."""

from __future__ import annotations

import asyncio
import errno
import os

from aiohttp import web

from .appkeys import SENT_KEY
from .errors import ProxyError
from .reader import FileSegment, RangeReader


class ResponseAborted(Exception):
    """Headers went out and the body could not be completed: the connection is
    cut so the client sees a short body, never bytes of a wrong version."""


async def send(
    request: web.Request, response: web.StreamResponse, reader: RangeReader, length: int
) -> None:
    """Stream a reader's ``length`` bytes; sendfile for large cached spans.

    Raises ResponseAborted when the body cannot be completed, after cutting
    the connection: with Content-Length already sent, a short body on a
    closed connection is how HTTP/1.1 says "this response failed".
    """
    remaining = length
    try:
        async for segment in reader:
            if isinstance(segment, FileSegment):
                await _send_file_segment(request, response, segment)
                n = segment.length
            else:
                await response.write(segment)
                n = len(segment)
            request[SENT_KEY] = request.get(SENT_KEY, 0) + n
            remaining -= n
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


async def _send_file_segment(
    request: web.Request, response: web.StreamResponse, seg: FileSegment
) -> None:
    try:
        if seg.data is not None:  # verified, or a small span read with the open
            await response.write(seg.data)
            return
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        sent = sendfile_now(transport, seg.fd, seg.offset, seg.length)
        if sent == seg.length:
            return
        loop = asyncio.get_running_loop()
        with os.fdopen(seg.fd, "rb", buffering=0, closefd=False) as fobj:
            try:
                await loop.sendfile(transport, fobj, seg.offset + sent, seg.length - sent)
            except NotImplementedError:  # TLS transport, or no sendfile on this platform
                data = await loop.run_in_executor(
                    None, os.pread, seg.fd, seg.length - sent, seg.offset + sent
                )
                await response.write(data)
    finally:
        seg.release()


def sendfile_now(transport: asyncio.Transport, fd: int, offset: int, count: int) -> int:
    """Bytes of ``fd`` sent straight into the socket with one ``os.sendfile``,
    without waiting: what the socket buffer takes now (often all of a block).

    ``loop.sendfile`` costs a future, a pause of reading and a writer callback
    per call, tens of µs for each 256 KiB block of a large range. Writing past
    the transport is safe only when it has nothing queued (bytes must leave in
    order) and it is plain TCP (under TLS the bytes must be encrypted); then
    this is what ``loop.sendfile`` itself would do first. Returns 0 when it
    cannot be used or the socket takes nothing; the caller sends the rest.
    """
    if transport.get_write_buffer_size() or transport.get_extra_info("sslcontext") is not None:
        return 0
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return os.sendfile(sock.fileno(), fd, offset, count)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return 0  # no sendfile for this pair of files: loop.sendfile falls back
        if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            raise ConnectionResetError(str(exc)) from exc
        raise


def abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
