"""Upstream GETs on connections of our own, their bodies received straight into the caller's
buffers: the pool of connections, and the response.

Why not aiohttp's client for these (it still asks for listings and DANDI's
API): it copies every body byte twice into fresh memory — the socket's
``recv`` makes a new ``bytes``, its parser slices the body out of that into
another — and re-arms a timer per chunk. In a cold fill that was a third of
the event loop's time (cProfile: ``recv`` 0.29 s and ``data_received`` 0.11 s
of main-thread time per 256 MiB, most of it page faults on new memory).
Here the socket is read with ``recv_into`` (``asyncio.BufferedProtocol``)
into the space the caller's sink offers: a block's own buffer, reused.

A sink takes a body's bytes as they arrive; it never waits, but may pause
the connection until a future of its own is done (a disk write). What a
request means on the wire is httphead.py's; one connection is wireconn.py's.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from .httphead import Framing, ResponseHead, request_bytes
from .wireconn import Connection, Sink, TLSConnection, WireError

# An idle pooled connection older than this is not used again: servers close
# theirs after 5-75 s (S3 ~20 s), and a request sent just as the server
# closes is lost (it is sent again once, on a new connection).
IDLE_TIMEOUT = 10.0


AnyConnection = Connection | TLSConnection


class ConnectFailed(WireError):
    """No connection could be made."""


class Response:
    """A response whose head is in; its body is read with ``deliver`` or ``read``.
    ``close`` (or ``release``) ends it: the connection goes back to the pool
    when the body was read to its end, and is closed otherwise."""

    def __init__(
        self,
        client: WireClient,
        key: tuple[str, str, int],
        conn: AnyConnection,
        head: ResponseHead,
    ) -> None:
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers
        self._head = head
        self._client = client
        self._key = key
        self._conn: AnyConnection | None = conn
        self._read = False
        self.delivered = 0  # bytes ``deliver`` handed to its sink, also when it failed

    async def deliver(self, sink: Sink, skip: int, want: int) -> int:
        """The ``want`` body bytes after the first ``skip``, to ``sink``; returns how
        many it took (fewer when the body is shorter). Raises WireError,
        HeadError or TimeoutError when the connection fails or stalls, after
        the sink has taken the bytes that did come."""
        conn = self._conn
        if conn is None or self._read:
            raise RuntimeError("a response's body is read once")
        self._read = True
        head = self._head
        if head.framing is Framing.NONE:
            return 0
        try:
            await conn.deliver(sink, head, skip, want)
        except BaseException:
            self.close()
            raise
        finally:
            self.delivered = conn.delivered
        return self.delivered

    async def read(self, skip: int, want: int) -> bytes:
        """The ``want`` body bytes after the first ``skip`` (fewer if the body is
        shorter), in memory: a first block."""
        into = BytesSink(want)
        n = await self.deliver(into, skip, want)
        return bytes(into.buffer[:n])

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        head = self._head
        # Read to its end: by deliver, or it came whole with the head (a 1-byte
        # check) and nothing more; a body-less answer (204, 304) with no byte after.
        if self._read:
            done = conn.body_complete
        elif head.framing is Framing.NONE:
            done = conn.pending == 0
        else:
            done = head.framing is Framing.LENGTH and conn.pending == head.length
        if head.keep_alive and not conn.closed and done:
            conn.idle()
            self._client.put_back(self._key, conn)
        else:
            conn.abort()
            self._client.put_back(self._key, None)

    release = close


class BytesSink:
    """A sink into one buffer of a fixed size."""

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.filled = 0

    def space(self) -> memoryview:
        return memoryview(self.buffer)[self.filled :]

    def received(self, n: int) -> None:
        self.filled += n


class WireClient:
    """Keep-alive connections to upstream hosts, at most ``max_connections`` in use."""

    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        headers: dict[str, str],
        on_connection: Callable[[str], None] | None = None,
    ) -> None:
        """``on_connection`` is told how each request got its connection:
        "opened", "reused", or "stale" (a pooled one the server had closed)."""
        self._on_connection = on_connection or (lambda how: None)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._headers = headers  # sent with every request (User-Agent...)
        self._max = max_connections
        self._slots: asyncio.Semaphore | None = None
        self._idle: dict[tuple[str, str, int], list[AnyConnection]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def get(self, url: str, headers: dict[str, str]) -> Response:
        """Send a GET of ``url`` (encoded already) and wait for its response head.
        A pooled connection that the server closed meanwhile is replaced once."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"cannot GET {parts.scheme}:// URLs")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = (parts.scheme, parts.hostname, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        data = request_bytes(target, parts.netloc.rpartition("@")[2], {**self._headers, **headers})
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max)
        await self._slots.acquire()
        try:
            while True:
                conn, reused = self._pooled(key), True
                if conn is None:
                    conn, reused = await self._connect(key), False
                self._on_connection("reused" if reused else "opened")
                try:
                    head = await conn.request(data)
                except WireError:
                    conn.abort()
                    if reused and not conn.received_any:
                        self._on_connection("stale")
                        continue  # closed by the server while idle: once more, on another
                    raise
                except BaseException:
                    conn.abort()
                    raise
                return Response(self, key, conn, head)
        except BaseException:
            self._slots.release()
            raise

    def put_back(self, key: tuple[str, str, int], conn: AnyConnection | None) -> None:
        """A response is done with: its connection (None: closed) is free again."""
        if conn is not None:
            idle = self._idle.setdefault(key, [])
            # The oldest first: closed by now, or soon. A paused connection
            # does not notice its server's close (it sits in CLOSE_WAIT).
            while idle and (idle[0].closed or conn.idle_since - idle[0].idle_since > IDLE_TIMEOUT):
                idle.pop(0).abort()
            if len(idle) < self._max:
                idle.append(conn)
            else:
                conn.abort()
        assert self._slots is not None
        self._slots.release()

    def _pooled(self, key: tuple[str, str, int]) -> AnyConnection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest to be open
            transport = conn.transport
            if conn.closed or transport is None or transport.is_closing():
                continue
            if now - conn.idle_since > IDLE_TIMEOUT:
                conn.abort()
                continue
            return conn
        return None

    async def _connect(self, key: tuple[str, str, int]) -> AnyConnection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls = None
        kind: type[AnyConnection] = Connection
        if scheme == "https":
            if self._ssl is None:
                # The system's trust store (OpenSSL honours SSL_CERT_FILE), as aiohttp.
                self._ssl = ssl.create_default_context()
            tls, kind = self._ssl, TLSConnection
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: kind(self._read_timeout), host, port, ssl=tls
                )
        except TimeoutError:
            raise ConnectFailed(
                f"no connection to {host}:{port} in {self._connect_timeout:g} s"
            ) from None
        except OSError as exc:  # refused, unreachable, DNS, TLS
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from None
        return conn

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports close
