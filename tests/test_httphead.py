"""Tests of nwbcache_proxy.httphead: the bytes of an upstream GET, the response head,
how the body is framed (RFC 9112 §6.3), and chunked decoding. Pure, table-tested."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nwbcache_proxy.httphead import (
    ChunkDecoder,
    Framing,
    HeadError,
    parse_head,
    request_bytes,
)


def head(*lines: str, status: str = "HTTP/1.1 206 Partial Content") -> bytes:
    return ("\r\n".join([status, *lines]) + "\r\n\r\n").encode("latin-1")


@pytest.mark.parametrize(
    ("raw", "framing", "length", "keep_alive"),
    [
        pytest.param(head("Content-Length: 10"), Framing.LENGTH, 10, True, id="length"),
        pytest.param(head("Content-Length: 0"), Framing.LENGTH, 0, True, id="empty body"),
        pytest.param(head("Content-Length: 5, 5"), Framing.LENGTH, 5, True, id="a repeated length"),
        pytest.param(
            head("Content-Length: 5", "content-length: 5"), Framing.LENGTH, 5, True, id="twice"
        ),
        pytest.param(head("Transfer-Encoding: chunked"), Framing.CHUNKED, None, True, id="chunked"),
        pytest.param(
            head("Transfer-Encoding: chunked", "Content-Length: 9"),
            Framing.CHUNKED,
            None,
            False,
            id="chunked wins over a length, and the connection is not reused",
        ),
        pytest.param(head("Server: x"), Framing.CLOSE, None, False, id="until the close"),
        pytest.param(head(status="HTTP/1.1 204 No Content"), Framing.NONE, 0, True, id="204"),
        pytest.param(
            head("Content-Length: 99", status="HTTP/1.1 304 Not Modified"),
            Framing.NONE,
            0,
            True,
            id="304 has no body whatever its length",
        ),
        pytest.param(
            head("Content-Length: 3", "Connection: close"), Framing.LENGTH, 3, False, id="close"
        ),
        pytest.param(
            head("Content-Length: 3", status="HTTP/1.0 200 OK"),
            Framing.LENGTH,
            3,
            False,
            id="HTTP/1.0 closes by default",
        ),
        pytest.param(
            head("Content-Length: 3", "Connection: Keep-Alive", status="HTTP/1.0 200 OK"),
            Framing.LENGTH,
            3,
            True,
            id="HTTP/1.0 keep-alive",
        ),
    ],
)
def test_framing(raw: bytes, framing: Framing, length: int | None, keep_alive: bool) -> None:
    parsed = parse_head(raw)
    assert (parsed.framing, parsed.length, parsed.keep_alive) == (framing, length, keep_alive)


def test_the_status_reason_and_fields_are_read_case_insensitively() -> None:
    parsed = parse_head(
        head('ETag:  "abc"  ', "content-range: bytes 0-9/100", "X-Empty:", "Content-Length: 10")
    )
    assert (parsed.status, parsed.reason) == (206, "Partial Content")
    assert parsed.headers["Content-Range"] == "bytes 0-9/100"
    assert parsed.headers["etag"] == '"abc"'  # surrounding whitespace is not the value's
    assert parsed.headers["X-Empty"] == ""


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\n", "ends with an empty line", id="no end"),
        pytest.param(head(status="HTTP/2 200 OK"), "status line", id="HTTP/2"),
        pytest.param(head(status="HTTP/1.1 20 OK"), "status line", id="two-digit status"),
        pytest.param(head(status="ICY 200 OK"), "status line", id="not HTTP"),
        pytest.param(head("Content-Length 5"), "malformed header", id="no colon"),
        pytest.param(head("Bad Name: 1"), "malformed header", id="space in the name"),
        pytest.param(head("X: 1", " folded"), "malformed header", id="obsolete line folding"),
        pytest.param(head("Content-Length: 5, 6"), "invalid Content-Length", id="two lengths"),
        pytest.param(head("Content-Length: -1"), "invalid Content-Length", id="negative"),
        pytest.param(head("Content-Length: 0x10"), "invalid Content-Length", id="hex"),
        pytest.param(head("Content-Length: ²"), "invalid Content-Length", id="not ASCII digits"),
        pytest.param(
            head("Transfer-Encoding: gzip, chunked"), "unsupported Transfer-Encoding", id="gzip"
        ),
        pytest.param(
            head("Transfer-Encoding: chunked, identity"),
            "unsupported Transfer-Encoding",
            id="chunked not last",
        ),
    ],
)
def test_heads_that_are_not_http_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(HeadError, match=message):
        parse_head(raw)


def test_a_request_is_a_get_with_its_host_and_headers() -> None:
    data = request_bytes("/b/k?x=1%202", "s3.example:9000", {"Range": "bytes=0-9"})
    assert data == b"GET /b/k?x=1%202 HTTP/1.1\r\nHost: s3.example:9000\r\nRange: bytes=0-9\r\n\r\n"


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        pytest.param("/k", {"X": "a\r\nInjected: 1"}, id="CRLF in a value"),
        pytest.param("/k", {"X": "a\nb"}, id="LF in a value"),
        pytest.param("/k", {"Bad Name": "1"}, id="space in a name"),
        pytest.param("/k", {"X:Y": "1"}, id="colon in a name"),
        pytest.param("/k HTTP/1.1\r\nX: 1", {}, id="a target that ends the line"),
        pytest.param("/a b", {}, id="space in the target"),
        pytest.param("k", {}, id="not origin-form"),
    ],
)
def test_a_request_that_could_be_split_is_refused(target: str, headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        request_bytes(target, "h", headers)


# -- chunked bodies ---------------------------------------------------------------


def chunked(data: bytes, sizes: list[int], *, extensions: bool, trailers: bool) -> bytes:
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = max(1, sizes[i % len(sizes)])
        piece = data[pos : pos + n]
        ext = b";name=value" if extensions and i % 2 else b""
        out.append(b"%X%s\r\n%s\r\n" % (len(piece), ext, piece))
        pos, i = pos + n, i + 1
    out.append(b"0\r\n" + (b"X-Checksum: 1\r\n" if trailers else b"") + b"\r\n")
    return b"".join(out)


@settings(max_examples=100, deadline=None)
@given(
    st.binary(max_size=5000),
    st.lists(st.integers(1, 3000), min_size=1, max_size=4),
    st.lists(st.integers(1, 700), min_size=1, max_size=5),
    st.booleans(),
    st.booleans(),
)
def test_a_chunked_body_decodes_to_its_bytes_however_it_is_cut(
    data: bytes, sizes: list[int], cuts: list[int], extensions: bool, trailers: bool
) -> None:
    wire = chunked(data, sizes, extensions=extensions, trailers=trailers)
    decoder = ChunkDecoder()
    out, pos, i = bytearray(), 0, 0
    while pos < len(wire):
        n = cuts[i % len(cuts)]
        for piece in decoder.feed(memoryview(wire)[pos : pos + n]):
            out += piece
        pos, i = pos + n, i + 1
    assert bytes(out) == data
    assert decoder.done


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        pytest.param(b"zz\r\n", "invalid chunk size", id="not hex"),
        pytest.param(b"\r\n", "invalid chunk size", id="empty size"),
        pytest.param(b"3\r\nabcd\r\n", "longer than its size", id="data past its size"),
        pytest.param(b"0\r\n\r\nmore", "after the end", id="bytes after the end"),
        pytest.param(b"1" * 5000, "too long", id="a size line without end"),
        pytest.param(b"11111111111111111\r\n", "invalid chunk size", id="a size too large"),
    ],
)
def test_chunk_framing_that_is_wrong_is_refused(wire: bytes, message: str) -> None:
    with pytest.raises(HeadError, match=message):
        ChunkDecoder().feed(memoryview(wire))
