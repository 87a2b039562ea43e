"""Sending a range's segments on the wire: writes, sendfile, the fallback, and cutting a
response that cannot be completed."""

from __future__ import annotations

import asyncio
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
        loop = asyncio.get_running_loop()
        with os.fdopen(seg.fd, "rb", buffering=0, closefd=False) as fobj:
            try:
                await loop.sendfile(transport, fobj, seg.offset, seg.length)
            except NotImplementedError:  # TLS transport, or no sendfile on this platform
                data = await loop.run_in_executor(None, os.pread, seg.fd, seg.length, seg.offset)
                await response.write(data)
    finally:
        seg.release()


def abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
