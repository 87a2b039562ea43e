"""Tests of nwbcache_proxy.wire and wireconn: upstream GETs on the daemon's own HTTP/1.1
connections, bodies received straight into a sink.

The servers are real ones on 127.0.0.1 port 0: the S3 emulator, and a
scripted server for what the emulator does not do on purpose (chunked and
close-framed bodies, a body after a pause, bytes past the body, a close while
idle). Bytes are compared with what the server sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trustme

from nwbcache_proxy import wire
from nwbcache_proxy.httphead import HeadError
from nwbcache_proxy.wire import BytesSink, ConnectFailed, WireClient
from nwbcache_proxy.wireconn import WireError
from tests.support.s3emu import Fault, S3Emulator

# One step of a scripted answer: bytes to send, seconds to wait, "close", or
# "reset" (a close that drops what is unsent: an RST).
Step = bytes | float | str
Script = Callable[[int, bytes], list[Step]]


class Scripted:
    """An HTTP/1.1 server that answers the n-th request with script(n, request)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed_by_client = 0  # connections the client closed (EOF between requests)
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    request = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_client += 1
                    return
                self.requests.append(request)
                for step in self.script(len(self.requests) - 1, request):
                    if step == "close":
                        writer.close()
                        return
                    if step == "reset":
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        writer.transport.abort()
                        return
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                    else:
                        assert isinstance(step, bytes)
                        writer.write(step)
                        await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def answer(body: bytes, *extra: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Recording(BytesSink):
    """A sink that also counts its calls, and may hold the connection paused."""

    def __init__(
        self, size: int, *, hold: asyncio.Future[Any] | None = None, cap: int | None = None
    ) -> None:
        super().__init__(size)
        self.calls = 0
        self.hold = hold
        self.cap = cap  # the most space offered at a time (a block's remaining space)

    def space(self) -> memoryview:
        space = super().space()
        return space if self.cap is None else space[: self.cap]

    def received(self, n: int) -> asyncio.Future[Any] | None:  # type: ignore[override]
        super().received(n)
        self.calls += 1
        return self.hold


@pytest.fixture
async def client() -> AsyncIterator[WireClient]:
    c = WireClient(max_connections=4, connect_timeout=2, read_timeout=0.5, headers={"X-A": "1"})
    yield c
    await c.close()


async def fetch(client: WireClient, url: str, skip: int = 0, want: int = 1 << 20) -> bytes:
    resp = await client.get(url, {})
    try:
        sink = BytesSink(want)
        n = await resp.deliver(sink, skip, want)
        return bytes(sink.buffer[:n])
    finally:
        resp.close()


# -- against the S3 emulator ------------------------------------------------------


async def test_ranged_gets_from_the_emulator_are_exact_and_share_one_connection(
    client: WireClient,
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    with S3Emulator() as emu:
        emu.put("/b/k", data)
        for start, end in [(0, 1), (10, 70_000), (1024 * 1024, len(data))]:
            resp = await client.get(f"{emu.url}/b/k", {"Range": f"bytes={start}-{end - 1}"})
            assert resp.status == 206
            assert resp.headers["content-range"] == f"bytes {start}-{end - 1}/{len(data)}"
            sink = BytesSink(end - start)
            assert await resp.deliver(sink, 0, end - start) == end - start
            resp.close()
            assert bytes(sink.buffer) == data[start:end]
        peers = {r.peer for r in emu.requests("/b/k")}
    assert len(peers) == 1  # kept alive and reused
    assert all(r.headers.get("X-A") == "1" for r in emu.requests("/b/k"))


async def test_a_body_cut_by_the_server_fails_after_the_bytes_that_came(
    client: WireClient,
) -> None:
    data = os.urandom(1024 * 1024)
    with S3Emulator() as emu:
        emu.put("/b/k", data)
        emu.inject(Fault.RESET_MID_BODY, path="/b/k", after_bytes=300_000)
        resp = await client.get(f"{emu.url}/b/k", {})
        sink = BytesSink(len(data))
        with pytest.raises(WireError):
            await resp.deliver(sink, 0, len(data))
        assert 0 < resp.delivered <= 300_000
        assert bytes(sink.buffer[: resp.delivered]) == data[: resp.delivered]


# -- framing --------------------------------------------------------------------------


async def test_a_chunked_body_is_decoded_and_the_connection_reused(client: WireClient) -> None:
    body = os.urandom(100_000)
    framed = b"".join(
        b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in (body[:1], body[1:70_000], body[70_000:])
    )
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\nT: 1\r\n\r\n"
    # Sent in odd pieces, with pauses: the decoder sees every cut.
    steps: list[Step] = []
    for i in range(0, len(raw), 7001):
        steps += [raw[i : i + 7001], 0.001]
    async with Scripted(lambda n, r: steps) as server:
        assert await fetch(client, server.url) == body
        assert await fetch(client, server.url) == body
    assert server.connections == 1


async def test_a_body_framed_by_the_close_is_read_to_the_close(client: WireClient) -> None:
    body = os.urandom(50_000)

    def script(n: int, request: bytes) -> list[Step]:
        return [b"HTTP/1.1 200 OK\r\n\r\n" + body[:1000], 0.01, body[1000:], "close"]

    async with Scripted(script) as server:
        assert await fetch(client, server.url) == body
        assert await fetch(client, server.url) == body
    assert server.connections == 2  # such a connection cannot carry another answer


async def test_a_body_framed_by_the_close_but_cut_by_a_reset_is_a_failure(
    client: WireClient,
) -> None:
    """Only a clean close ends such a body: a reset is a fault, not its end."""

    def script(n: int, request: bytes) -> list[Step]:
        return [b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 1000, 0.05, "reset"]

    async with Scripted(script) as server:
        resp = await client.get(server.url, {})
        with pytest.raises(WireError, match="mid-body"):
            await resp.deliver(BytesSink(10_000), 0, 10_000)
        assert resp.delivered == 1000


async def test_skip_then_want_takes_the_middle_and_drops_the_connection(
    client: WireClient,
) -> None:
    body = os.urandom(200_000)
    async with Scripted(lambda n, r: [answer(body)]) as server:
        assert await fetch(client, server.url, skip=100, want=1000) == body[100:1100]
        assert await fetch(client, server.url, skip=150_000, want=10**6) == body[150_000:]
    # The first body was left unread: its connection was closed, not reused.
    assert server.connections == 2


async def test_an_error_body_that_comes_after_its_head_is_not_taken_for_the_next_answer(
    client: WireClient,
) -> None:
    """A response closed unread (a 403) whose body had not come yet: the
    connection must not be reused, or that body would be read as the next
    response's head."""
    error = b"<Error>AccessDenied</Error>"

    def script(n: int, request: bytes) -> list[Step]:
        if n == 0:
            head = f"HTTP/1.1 403 Forbidden\r\nContent-Length: {len(error)}\r\n\r\n"
            return [head.encode(), 0.05, error]
        return [answer(b"fine")]

    async with Scripted(script) as server:
        resp = await client.get(server.url, {})
        assert resp.status == 403
        resp.close()
        await asyncio.sleep(0.1)
        assert await fetch(client, server.url) == b"fine"


async def test_a_small_body_that_came_with_its_head_keeps_the_connection(
    client: WireClient,
) -> None:
    async with Scripted(lambda n, r: [answer(b"x", status="206 Partial Content")]) as server:
        for _ in range(3):
            resp = await client.get(server.url, {})
            await asyncio.sleep(0.01)
            resp.close()  # unread, but it was all there
    assert server.connections == 1


async def test_bytes_past_the_body_make_the_connection_unusable(client: WireClient) -> None:
    async with Scripted(lambda n, r: [answer(b"abc") + b"GARBAGE"]) as server:
        assert await fetch(client, server.url) == b"abc"
        assert await fetch(client, server.url) == b"abc"
    assert server.connections == 2


async def test_interim_answers_are_passed_over_for_the_final_one(client: WireClient) -> None:
    """A 100 Continue or 103 Early Hints is not the answer: taking it for one
    would leave the real answer on the connection for the next request."""

    def script(n: int, request: bytes) -> list[Step]:
        path = request.split(b" ")[1]
        hints = b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
        return [b"HTTP/1.1 100 Continue\r\n\r\n" + hints, 0.01, answer(b"bytes of " + path)]

    async with Scripted(script) as server:
        assert await fetch(client, server.url + "/a") == b"bytes of /a"
        resp = await client.get(server.url + "/b", {})
        assert resp.status == 200
        resp.close()  # unread: its body may not all be in, so the connection goes
        assert await fetch(client, server.url + "/c") == b"bytes of /c"


async def test_switching_protocols_is_refused(client: WireClient) -> None:
    async with Scripted(lambda n, r: [b"HTTP/1.1 101 Switching Protocols\r\n\r\n"]) as server:
        with pytest.raises(WireError, match="switched protocols"):
            await client.get(server.url, {})


class Pausing(BytesSink):
    """A sink that asks for a pause after every piece (a disk job each), and
    fails the test if it is given bytes while paused."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.pauses = 0
        self.busy: asyncio.Future[Any] | None = None

    def received(self, n: int) -> asyncio.Future[Any] | None:  # type: ignore[override]
        assert self.busy is None or self.busy.done(), "bytes while paused"
        super().received(n)
        self.pauses += 1
        self.busy = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.001, self.busy.set_result, None)
        return self.busy


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_a_sink_that_pauses_is_given_nothing_until_it_is_ready(
    client: WireClient, chunked: bool
) -> None:
    """Bytes waiting in the backlog (those that came with the head, and chunk
    data decoded from one read) are handed on one pause at a time."""
    body = os.urandom(300_000)
    if chunked:
        framed = b"".join(
            b"%x\r\n%s\r\n" % (1000, body[i : i + 1000]) for i in range(0, len(body), 1000)
        )
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"
    else:
        raw = answer(body)
    async with Scripted(lambda n, r: [raw]) as server:
        resp = await client.get(server.url, {})
        await asyncio.sleep(0.05)  # all of it is on its way, much of it with the head
        sink = Pausing(len(body))
        assert await resp.deliver(sink, 0, len(body)) == len(body)
        resp.close()
    assert bytes(sink.buffer) == body
    assert sink.pauses > 1


# -- connections ----------------------------------------------------------------------


async def test_a_connection_the_server_closed_while_idle_is_replaced_once() -> None:
    told: list[str] = []
    client = WireClient(
        max_connections=2, connect_timeout=2, read_timeout=2, headers={}, on_connection=told.append
    )
    async with Scripted(lambda n, r: [answer(b"ok%d" % n), 0.01, "close"]) as server:
        assert await fetch(client, server.url) == b"ok0"
        await asyncio.sleep(0.05)  # the server has closed it meanwhile
        assert await fetch(client, server.url) == b"ok1"
    await client.close()
    assert server.connections == 2
    assert told == ["opened", "reused", "stale", "opened"]


async def test_a_connection_left_idle_behind_busier_ones_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool reuses its newest connection, so an older one may sit idle past
    the idle timeout while the newest keeps being reused: it is closed when
    a connection goes back, not left open (in CLOSE_WAIT once its server
    gives up on it)."""
    monkeypatch.setattr(wire, "IDLE_TIMEOUT", 0.3)
    client = WireClient(max_connections=2, connect_timeout=2, read_timeout=2, headers={})
    async with Scripted(lambda n, r: [0.02, answer(b"x")]) as server:
        await asyncio.gather(fetch(client, server.url), fetch(client, server.url))
        assert server.connections == 2
        for _ in range(5):  # the newest, again and again
            await asyncio.sleep(0.1)
            assert await fetch(client, server.url) == b"x"
        await asyncio.sleep(0.05)
        assert server.connections == 2
        assert server.closed_by_client == 1  # the older one; the newest is still pooled
    await client.close()


async def test_a_stalled_body_times_out_with_what_came(client: WireClient) -> None:
    async with Scripted(lambda n, r: [answer(b"x" * 1000)[:-600], 5.0]) as server:
        resp = await client.get(server.url, {})
        sink = BytesSink(1000)
        with pytest.raises(TimeoutError, match=r"no bytes from upstream for 0\.5 s"):
            await resp.deliver(sink, 0, 1000)
        assert resp.delivered == 400


async def test_a_head_that_never_comes_times_out(client: WireClient) -> None:
    async with Scripted(lambda n, r: [b"HTTP/1.1 200 OK\r\n", 5.0]) as server:
        with pytest.raises(TimeoutError):
            await client.get(server.url, {})


async def test_a_sink_that_holds_the_connection_pauses_it(client: WireClient) -> None:
    """A sink's future pauses reading (a disk write under way) and does not
    count against the read timeout."""
    body = os.urandom(4 * 1024 * 1024)
    async with Scripted(lambda n, r: [answer(body)]) as server:
        resp = await client.get(server.url, {})
        hold: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sink = Recording(len(body), hold=hold)
        reading = asyncio.ensure_future(resp.deliver(sink, 0, len(body)))
        await asyncio.sleep(0.8)  # longer than the read timeout
        assert sink.calls == 1 and not reading.done()
        sink.hold = None
        hold.set_result(None)
        assert await reading == len(body)
        assert bytes(sink.buffer) == body
        resp.close()


async def test_a_head_longer_than_the_limit_is_refused(client: WireClient) -> None:
    huge = b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 70_000 + b"\r\n\r\n"
    async with Scripted(lambda n, r: [huge]) as server:
        with pytest.raises(WireError, match="longer than"):
            await client.get(server.url, {})


async def test_not_http_is_refused(client: WireClient) -> None:
    async with Scripted(lambda n, r: [b"SSH-2.0-OpenSSH\r\n\r\n"]) as server:
        with pytest.raises(HeadError):
            await client.get(server.url, {})


async def test_nothing_listening_is_a_connect_failure(client: WireClient) -> None:
    async with Scripted(lambda n, r: []) as server:
        url = server.url
    with pytest.raises(ConnectFailed):
        await client.get(url, {})


async def test_a_header_that_would_split_the_request_is_never_sent(client: WireClient) -> None:
    async with Scripted(lambda n, r: [answer(b"x")]) as server:
        with pytest.raises(ValueError, match="cannot be sent"):
            await client.get(server.url, {"X": "1\r\nInjected: yes"})
    assert server.connections == 0


async def test_at_most_max_connections_are_in_use() -> None:
    limited = WireClient(max_connections=2, connect_timeout=2, read_timeout=2, headers={})
    async with Scripted(lambda n, r: [0.2, answer(b"x")]) as server:
        started = asyncio.get_running_loop().time()
        await asyncio.gather(*(fetch(limited, server.url) for _ in range(4)))
        took = asyncio.get_running_loop().time() - started
    await limited.close()
    assert server.connections == 2
    assert took >= 0.4  # two rounds of two


# -- TLS --------------------------------------------------------------------------------


class TLSServers:
    """TLS servers with a certificate of a test CA the client trusts."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context

    async def start(
        self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
    ) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=self.context)
        return f"https://localhost:{server.sockets[0].getsockname()[1]}"


@pytest.fixture
def tls_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> TLSServers:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # as OpenSSL reads it
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    return TLSServers(context)


@pytest.mark.parametrize("pause", [0.0, 0.3], ids=["at once", "after a pause"])
async def test_tls_a_close_while_reading_is_paused_loses_nothing(
    tls_server: TLSServers, pause: float
) -> None:
    """The server sends a whole answer and closes (a FIN right after) while
    reading is paused, after the head or for a disk job: every byte still
    reaches the sink, offered a block's space at a time. (Python 3.11's TLS
    layer hands a BufferedProtocol one buffer's worth and drops the rest.)"""
    body = os.urandom(200_000)
    sctx = tls_server.context
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_once() -> None:
        raw, _ = listener.accept()
        with sctx.wrap_socket(raw, server_side=True) as conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            conn.sendall(answer(body, "Connection: close"))
            socket.socket.shutdown(conn, socket.SHUT_WR)  # the FIN, not waiting for ours
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(1)

    server = threading.Thread(target=serve_once, daemon=True)
    server.start()
    port = listener.getsockname()[1]
    client = WireClient(max_connections=2, connect_timeout=2, read_timeout=2, headers={})
    resp = await client.get(f"https://localhost:{port}/k", {})
    await asyncio.sleep(pause)
    sink = Recording(len(body), cap=64 * 1024)
    assert await resp.deliver(sink, 0, len(body)) == len(body)
    assert bytes(sink.buffer) == body
    resp.close()
    await client.close()
    server.join(5)
    listener.close()


async def test_tls_a_reset_before_the_body_is_read_fails_at_once(
    tls_server: TLSServers,
) -> None:
    """Not after the read timeout: the connection is known to be gone."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.05)
        linger = struct.pack("ii", 1, 0)  # a reset, not a close
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.transport.abort()

    url = await tls_server.start(serve)
    client = WireClient(max_connections=2, connect_timeout=2, read_timeout=30, headers={})
    resp = await client.get(url + "/k", {})
    await asyncio.sleep(0.3)  # checking the head, say: the reset comes meanwhile
    started = asyncio.get_running_loop().time()
    with pytest.raises(WireError):
        await resp.deliver(BytesSink(100_000), 0, 100_000)
    assert asyncio.get_running_loop().time() - started < 5
    await client.close()


async def test_https_upstream_is_verified_and_read_into_the_sink(
    tls_server: TLSServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real S3 is HTTPS: the sink's buffers fill through the TLS layer too, and
    the server's certificate is checked against the system's trust (here the
    test CA, through SSL_CERT_FILE as OpenSSL reads it)."""
    body = os.urandom(2 * 1024 * 1024)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(answer(body))
            await writer.drain()
        writer.close()

    url = await tls_server.start(serve)
    trusted = os.environ["SSL_CERT_FILE"]
    monkeypatch.setenv("SSL_CERT_FILE", os.devnull)  # a trust store without the test CA
    untrusting = WireClient(max_connections=2, connect_timeout=2, read_timeout=2, headers={})
    with pytest.raises(ConnectFailed, match="certificate verify failed"):
        await fetch(untrusting, url + "/k")
    await untrusting.close()

    monkeypatch.setenv("SSL_CERT_FILE", trusted)
    trusting = WireClient(max_connections=2, connect_timeout=2, read_timeout=2, headers={})
    assert await fetch(trusting, url + "/k", want=len(body)) == body
    assert await fetch(trusting, url + "/k", skip=5, want=100) == body[5:105]
    await trusting.close()
