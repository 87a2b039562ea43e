"""One HTTP/1.1 connection to upstream, received with ``recv_into`` straight into a sink's space.

The protocol half of wire.py: a request's head is gathered in the
connection's own buffer; its body goes into the buffers its sink offers
(``asyncio.BufferedProtocol.get_buffer``), so the kernel's copy is the only
one. Bytes that arrive where the sink cannot take them directly (with the
head, before the wanted ones, chunk framing) are copied in. Reading is
paused whenever no body is being delivered: nothing arrives that no request
asked for.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from .httphead import HEAD_END, MAX_HEAD, ChunkDecoder, Framing, ResponseHead, parse_head


class Sink(Protocol):
    def space(self) -> memoryview:
        """Where the next body bytes go: a writable view, never empty."""

    def received(self, n: int) -> asyncio.Future[Any] | None:
        """``n`` bytes were written at the start of ``space()``. A future: receive
        nothing more until it is done."""


class WireError(ConnectionError):
    """The connection failed, or its peer's bytes are not HTTP."""


class Connection(asyncio.BufferedProtocol):
    def __init__(self, read_timeout: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # False once bytes came that this connection's answers did not frame.
        self.reusable = True
        self.idle_since = 0.0
        self.received_any = False  # of the current request's answer
        self.delivered = 0  # bytes handed to the current sink
        self._read_timeout = read_timeout
        self._spill = bytearray(MAX_HEAD)  # heads, skipped bytes, chunk framing
        self._n = 0  # bytes of a head in _spill
        self._waiter: asyncio.Future[Any] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._activity = 0.0
        self._state = "idle"  # idle | head | body | held (head in, body not being read) | failed
        self._sink: Sink | None = None
        self._sink_busy = False  # paused until the sink's future is done
        self._skip = 0  # body bytes to throw away before the wanted ones
        self._want = 0  # bytes still to hand to the sink
        self._remaining: int | None = None  # body bytes still to come (None: framing tells)
        self._decoder: ChunkDecoder | None = None

    @property
    def body_complete(self) -> bool:
        return self._state == "held" and self._remaining == 0

    # -- a request and its body ------------------------------------------------
    async def request(self, data: bytes) -> tuple[ResponseHead, memoryview]:
        """Send a request; its response head, and the body bytes that came with it."""
        assert self.transport is not None and self._state == "idle"
        self._state, self._n, self.received_any = "head", 0, False
        self._remaining = None  # until this answer's body is read (body_complete)
        self._waiter = asyncio.get_running_loop().create_future()
        self._watch()
        self.transport.write(data)
        self._resume()
        head: ResponseHead
        head, leftover = await self._waiter
        return head, leftover

    async def deliver(
        self, sink: Sink, head: ResponseHead, leftover: memoryview, skip: int, want: int
    ) -> None:
        """Hand ``want`` body bytes after the first ``skip`` to ``sink``, fewer if
        the body ends first (``delivered`` tells). ``leftover``: body bytes that
        came with the head."""
        self._sink, self._skip, self._want, self.delivered = sink, skip, want, 0
        self._remaining = head.length if head.framing is Framing.LENGTH else None
        self._decoder = ChunkDecoder() if head.framing is Framing.CHUNKED else None
        self._state = "body"
        self._waiter = asyncio.get_running_loop().create_future()
        self._watch()
        try:
            self._take(leftover)
            if self._state == "body" and not self._sink_busy:
                self._resume()
            await self._waiter
        finally:
            self._sink = None

    def idle(self) -> None:
        """Its answer is done with and was read to the end: ready for another request."""
        self._state = "idle"
        self.idle_since = time.monotonic()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio's side ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == "body" and self._remaining is None and self._decoder is None:
            self._finish()  # a body framed by the close: this is its end
        else:
            self._fail(WireError(f"connection closed ({exc or 'by the peer'})"))

    def eof_received(self) -> bool | None:
        return None  # close: HTTP/1.1 has no half-closed exchange

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._state == "body" and not self._skip and self._decoder is None:
            return self._space()
        spill = memoryview(self._spill)
        if self._state == "head":
            return spill[self._n :]
        if self._state == "body" and self._skip:  # not beyond the unwanted bytes
            n = min(self._skip, len(spill))
            return spill[: n if self._remaining is None else min(n, self._remaining)]
        return spill

    def buffer_updated(self, nbytes: int) -> None:
        self.received_any = True
        self._activity = time.monotonic()
        try:
            if self._state == "head":
                self._head_received(nbytes)
            elif self._state != "body":
                raise WireError("upstream sent bytes no request asked for")
            elif self._decoder is not None:
                self._take(memoryview(self._spill)[:nbytes])
            elif self._skip:
                self._skipped(nbytes)
            else:
                self._delivered(nbytes)
        except Exception as exc:  # the framing's, or a sink's: this answer is done for
            self._fail(exc)

    # -- bytes in --------------------------------------------------------------
    def _head_received(self, nbytes: int) -> None:
        start = max(0, self._n - len(HEAD_END) + 1)
        self._n += nbytes
        end = self._spill.find(HEAD_END, start, self._n)
        if end < 0:
            if self._n >= len(self._spill):
                raise WireError(f"response head longer than {MAX_HEAD} bytes")
            return
        end += len(HEAD_END)
        head = parse_head(memoryview(self._spill)[:end])
        leftover = memoryview(bytes(self._spill[end : self._n]))
        self._state = "held"
        self._pause()
        self._resolve((head, leftover))

    def _space(self) -> memoryview:
        """The sink's space, cut to the bytes still wanted and still to come."""
        space = self._sink.space()  # type: ignore[union-attr]
        limit = self._want if self._remaining is None else min(self._want, self._remaining)
        return space[:limit] if len(space) > limit else space

    def _take(self, data: memoryview) -> None:
        """Bytes received elsewhere than in the sink's space: copied in (chunk
        framing decoded first)."""
        if self._decoder is not None:
            pieces = self._decoder.feed(data)
        else:
            if self._remaining is not None and len(data) > self._remaining:
                self.reusable = False  # more than the body: what follows is not to be trusted
                data = data[: self._remaining]
            pieces = [data]
        for piece in pieces:
            while piece and self._state == "body":
                if self._skip:
                    n = min(self._skip, len(piece))
                    self._skipped(n)
                else:
                    space = self._space()
                    n = min(len(space), len(piece))
                    space[:n] = piece[:n]
                    self._delivered(n)
                piece = piece[n:]
            if piece:
                self.reusable = False  # bytes of this body were left unread
        if self._decoder is not None and self._decoder.done:
            self._remaining = 0  # the last chunk and the trailers are in
        if self._state == "body" and (self._remaining == 0 or not (self._want or self._skip)):
            self._finish()

    def _skipped(self, nbytes: int) -> None:
        self._skip -= nbytes
        if self._remaining is not None and self._decoder is None:
            self._remaining -= nbytes
            if self._remaining == 0:
                self._finish()

    def _delivered(self, nbytes: int) -> None:
        self._want -= nbytes
        self.delivered += nbytes
        if self._remaining is not None and self._decoder is None:
            self._remaining -= nbytes
        wait = self._sink.received(nbytes)  # type: ignore[union-attr]
        if self._want == 0 or self._remaining == 0:
            self._finish()
        elif wait is not None and not wait.done():
            self._sink_busy = True
            self._pause()
            wait.add_done_callback(self._sink_ready)

    def _sink_ready(self, _: asyncio.Future[Any]) -> None:
        self._sink_busy = False
        self._activity = time.monotonic()  # the read timeout counts from here
        if self._state == "body":
            self._resume()

    # -- ends ------------------------------------------------------------------
    def _finish(self) -> None:
        self._state = "held"
        self._pause()
        self._resolve(None)

    def _resolve(self, result: Any) -> None:
        self._unwatch()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(result)

    def _fail(self, exc: BaseException) -> None:
        self._unwatch()
        self._state = "failed"
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.abort()

    # -- reading paused and not; the read timeout --------------------------------
    def _pause(self) -> None:
        if self.transport is not None and self.transport.is_reading():
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_reading():
            self.transport.resume_reading()

    def _watch(self) -> None:
        """Fail the answer when no byte comes for the read timeout (not counting
        time paused by the sink). One timer, re-armed only when it fires:
        aiohttp re-arms one per chunk received."""
        self._unwatch()
        self._activity = time.monotonic()
        self._watchdog = asyncio.get_running_loop().call_later(self._read_timeout, self._check)

    def _check(self) -> None:
        self._watchdog = None
        if self._state not in ("head", "body"):
            return
        quiet = 0.0 if self._sink_busy else time.monotonic() - self._activity
        if quiet >= self._read_timeout:
            self._fail(TimeoutError(f"no bytes from upstream for {self._read_timeout:g} s"))
            return
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self._read_timeout - quiet, self._check)

    def _unwatch(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
