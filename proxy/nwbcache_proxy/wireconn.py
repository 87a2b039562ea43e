"""One HTTP/1.1 connection to upstream, received with ``recv_into`` straight into a sink's space.

The protocol half of wire.py: a response's head is gathered in the
connection's own buffer; its body goes into the buffers its sink offers
(``asyncio.BufferedProtocol.get_buffer``), so the kernel's copy is the only
one. Bytes that arrive where the sink cannot take them directly (with the
head, before the wanted ones, chunk framing) wait in a backlog and are
copied in. A sink that asks for a pause gets nothing more until its future
is done. Reading is paused whenever no body is being delivered, so nothing
arrives that no request asked for.

Over TLS the connection is a plain ``asyncio.Protocol`` (``TLSConnection``):
decryption copies anyway, and Python 3.11's TLS layer, when the peer closes
while reading is paused, hands a BufferedProtocol one buffer's worth on
resuming and drops the rest.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol, cast

from .httphead import HEAD_END, MAX_HEAD, ChunkDecoder, Framing, ResponseHead, parse_head


class Sink(Protocol):
    def space(self) -> memoryview:
        """Where the next body bytes go: a writable view, never empty."""

    def received(self, n: int) -> asyncio.Future[Any] | None:
        """``n`` bytes were written at the start of ``space()``. A future: receive
        nothing more until it is done."""


class WireError(ConnectionError):
    """The connection failed, or its peer's bytes are not HTTP."""


class _Connection:
    """What both kinds of connection do with the bytes they receive."""

    def __init__(self, read_timeout: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.received_any = False  # of the current request's answer
        self.delivered = 0  # bytes handed to the current sink
        self._read_timeout = read_timeout
        self._spill = bytearray(MAX_HEAD)  # heads; skipped bytes and chunks (TCP)
        self._n = 0  # bytes of a head in _spill
        self._backlog: list[memoryview] = []  # received, not yet handed on
        self._ready: list[memoryview] = []  # chunk data decoded from the backlog
        self._lost: Exception | None = None  # why the connection closed
        self._waiter: asyncio.Future[Any] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._activity = 0.0
        self._state = "idle"  # idle | head | body | held (head in, body not being read) | failed
        self._sink: Sink | None = None
        self._sink_busy = False  # paused until the sink's future is done
        self._delivery = 0  # which delivery a sink's future belongs to
        self._skip = 0  # body bytes to throw away before the wanted ones
        self._want = 0  # bytes still to hand to the sink
        self._remaining: int | None = None  # body bytes still to come (None: framing tells)
        self._decoder: ChunkDecoder | None = None

    @property
    def body_complete(self) -> bool:
        """Read to its end, and nothing past it: bytes beyond an answer's framing
        make its connection untrustworthy for the next one."""
        return self._state == "held" and self._remaining == 0 and not self.pending

    @property
    def pending(self) -> int:
        """Bytes received past the head that nothing took (a 1-byte body, or more)."""
        return sum(len(b) for b in self._backlog) + sum(len(b) for b in self._ready)

    # -- a request and its body ------------------------------------------------
    async def request(self, data: bytes) -> ResponseHead:
        """Send a request; its response head (the body bytes that came with it
        stay in the backlog)."""
        assert self.transport is not None and self._state == "idle"
        self._state, self._n, self.received_any = "head", 0, False
        self._remaining = None  # until this answer's body is read (body_complete)
        self._backlog, self._ready = [], []
        self._waiter = asyncio.get_running_loop().create_future()
        self._watch()
        self.transport.write(data)
        self._resume()
        head: ResponseHead = await self._waiter
        return head

    async def deliver(self, sink: Sink, head: ResponseHead, skip: int, want: int) -> None:
        """Hand ``want`` body bytes after the first ``skip`` to ``sink``, fewer if
        the body ends first (``delivered`` tells)."""
        self._sink, self._skip, self._want, self.delivered = sink, skip, want, 0
        self._sink_busy = False
        self._delivery += 1
        self._remaining = head.length if head.framing is Framing.LENGTH else None
        self._decoder = ChunkDecoder() if head.framing is Framing.CHUNKED else None
        self._state = "body"
        self._waiter = asyncio.get_running_loop().create_future()
        self._watch()
        try:
            try:
                self._drain()
            except Exception as exc:  # the framing's, or the sink's
                self._fail(exc)
            if self._state == "body" and not self._sink_busy and not self.pending:
                self._resume()
            await self._waiter
        finally:
            self._sink = None

    def idle(self) -> None:
        """Its answer is done with and was read to the end: ready for another request."""
        self._state = "idle"
        self._sink_busy = False
        self.idle_since = time.monotonic()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio's side ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._lost = exc
        if self._state == "body":
            self._closed_while_delivering()
        elif self._state != "held":  # held: deliver() tells, after the bytes that came
            self._fail(WireError(f"connection closed ({exc or 'by the peer'})"))

    def eof_received(self) -> bool | None:
        return None  # close: HTTP/1.1 has no half-closed exchange

    def _closed_while_delivering(self) -> None:
        """The connection closed during a body: its end if the body is framed by
        the close (and closed cleanly), else a failure; either once the sink
        has taken the bytes that came before (_drain calls again)."""
        if self.pending:
            return
        exc = self._lost
        if exc is None and self._remaining is None and self._decoder is None:
            self._finish()
        else:
            self._fail(WireError(f"connection closed mid-body ({exc or 'by the peer'})"))

    # -- bytes in --------------------------------------------------------------
    def _received(self, data: memoryview) -> None:
        """Bytes that came elsewhere than in the sink's space: a head, or what
        the sink takes through the backlog."""
        self.received_any = True
        self._activity = time.monotonic()
        try:
            if self._state == "head":
                self._head_received(data)
            elif self._state in ("body", "held"):
                # Held: only over TLS, whose layer may still hand over bytes it
                # had decrypted when reading was paused.
                self._backlog.append(data)
                if self._state == "body":
                    self._drain()
            else:
                raise WireError("upstream sent bytes no request asked for")
        except Exception as exc:  # the framing's, or a sink's: this answer is done for
            self._fail(exc)

    def _head_received(self, data: memoryview) -> None:
        """``data`` has been appended to the head being gathered (in _spill)."""
        start = max(0, self._n - len(HEAD_END) + 1)
        self._n += len(data)
        while True:
            end = self._spill.find(HEAD_END, start, self._n)
            if end < 0:
                if self._n >= len(self._spill):
                    raise WireError(f"response head longer than {MAX_HEAD} bytes")
                return
            end += len(HEAD_END)
            head = parse_head(memoryview(self._spill)[:end])
            rest = bytes(self._spill[end : self._n])
            if 100 <= head.status < 200:
                if head.status == 101:
                    raise WireError("upstream switched protocols")
                # An interim answer (100 Continue, 103 Early Hints): the real
                # one follows on the same connection.
                self._spill[: len(rest)] = rest
                self._n, start = len(rest), 0
                continue
            if rest:
                self._backlog.append(memoryview(rest))
            self._state = "held"
            self._pause()
            self._resolve(head)
            return

    def _space(self) -> memoryview:
        """The sink's space, cut to the bytes still wanted and still to come."""
        space = self._sink.space()  # type: ignore[union-attr]
        limit = self._want if self._remaining is None else min(self._want, self._remaining)
        return space[:limit] if len(space) > limit else space

    def _drain(self) -> None:
        """Hand the backlog to the sink (chunk framing decoded on the way) until
        it is empty, the sink asks for a pause, or the wanted bytes are in."""
        while self._state == "body" and not self._sink_busy:
            if self._decoder is not None:
                if not self._ready and self._backlog:
                    self._ready = self._decoder.feed(self._backlog.pop(0))
                    continue
                queue = self._ready
            else:
                queue = self._backlog
            if not queue:
                break
            data = queue[0]
            if self._remaining is not None and self._decoder is None:
                data = data[: self._remaining]
                if not data:
                    break  # past the body: bytes that are not this answer's
            if self._skip:
                n = min(self._skip, len(data))
                self._skip -= n
                if self._remaining is not None and self._decoder is None:
                    self._remaining -= n
            else:
                space = self._space()
                n = min(len(space), len(data))
                space[:n] = data[:n]
                self._delivered(n)
            if n < len(queue[0]):
                queue[0] = queue[0][n:]
            else:
                del queue[0]
        if self._state != "body" or self._sink_busy:
            return
        if self._decoder is not None and self._decoder.done and not self.pending:
            self._remaining = 0  # the last chunk and the trailers are in
        if self._remaining == 0 or not (self._want or self._skip):
            self._finish()
        elif self.closed:
            self._closed_while_delivering()

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
            delivery = self._delivery
            wait.add_done_callback(lambda _: self._sink_ready(delivery))

    def _sink_ready(self, delivery: int) -> None:
        if delivery != self._delivery or self._state != "body":
            return  # a future of a delivery that is over
        self._sink_busy = False
        self._activity = time.monotonic()  # the read timeout counts from here
        try:
            self._drain()
        except Exception as exc:
            self._fail(exc)
            return
        if self._state == "body" and not self._sink_busy and not self.pending:
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


class Connection(_Connection, asyncio.BufferedProtocol):
    """A plain TCP connection: the body is received straight into the sink's space."""

    _into_sink = False  # where get_buffer sent the read buffer_updated tells of

    def get_buffer(self, sizehint: int) -> memoryview:
        self._into_sink = (
            self._state == "body" and not self._skip and self._decoder is None and not self._backlog
        )
        if self._into_sink:
            return self._space()
        spill = memoryview(self._spill)
        if self._state == "head":
            return spill[self._n :]
        if self._state == "body" and self._skip and self._decoder is None:
            n = min(self._skip, len(spill))  # not beyond the unwanted bytes
            return spill[: n if self._remaining is None else min(n, self._remaining)]
        return spill

    def buffer_updated(self, nbytes: int) -> None:
        if self._into_sink:
            self.received_any = True
            self._activity = time.monotonic()
            try:
                self._delivered(nbytes)
            except Exception as exc:  # the sink's: this answer is done for
                self._fail(exc)
            return
        start = self._n if self._state == "head" else 0
        # Views of _spill stay in the backlog only while reading is paused.
        self._received(memoryview(self._spill)[start : start + nbytes])


class TLSConnection(_Connection, asyncio.Protocol):
    """A TLS connection: decrypted bytes are copied into the sink's space (see
    the module's docstring for why not received straight into it)."""

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self._state == "head":
            room = memoryview(self._spill)[self._n :]
            n = min(len(room), len(view))
            if not n:
                self._fail(WireError(f"response head longer than {MAX_HEAD} bytes"))
                return
            room[:n] = view[:n]
            self._received(room[:n])
            view = view[n:]
        if view:
            self._received(view)
