"""HTTP/1.1 on the wire for upstream GETs: the request's bytes, the response's head, how its
body is framed, and chunked decoding. Pure.

wire.py sends and receives; this says what the bytes mean (RFC 9112). Only
what a client of object stores needs: GET and no request body, a response
body framed by Content-Length, by chunks, or by the connection's close.
"""

from __future__ import annotations

import dataclasses
import enum
import re

from multidict import CIMultiDict, CIMultiDictProxy

# A response head longer than this is refused (aiohttp's limit is 8 KiB a
# line; S3's heads are under 1 KiB).
MAX_HEAD = 64 * 1024
HEAD_END = b"\r\n\r\n"
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: ([^\r\n]*))?")
# RFC 9110 token characters, for a field name.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A field value a request may carry: visible ASCII, spaces and tabs, nothing
# that could end the line (a header injected into the request).
_SAFE_VALUE = re.compile(r"[\t\x20-\x7e]*")
_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII only: str.isdigit takes "²"


class HeadError(ValueError):
    """A response head (or chunk framing) that is not HTTP/1.1."""


class Framing(enum.Enum):
    NONE = "none"  # no body: a 1xx, 204 or 304
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"  # Transfer-Encoding: chunked
    CLOSE = "close"  # until the connection closes


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    framing: Framing
    length: int | None  # the body's length when framed by Content-Length
    keep_alive: bool  # whether the connection may carry another request after this body


def request_bytes(target: str, host: str, headers: dict[str, str]) -> bytes:
    """A GET of ``target`` (path and query, already encoded) on ``host``.
    ValueError for a header that could split the request."""
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name.encode("ascii", "replace")) or not _SAFE_VALUE.fullmatch(
            value
        ):
            raise ValueError(f"header {name!r} cannot be sent")
        lines.append(f"{name}: {value}")
    if not _SAFE_VALUE.fullmatch(target) or " " in target or not target.startswith("/"):
        raise ValueError("request target cannot be sent")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def parse_head(data: bytes | bytearray | memoryview) -> ResponseHead:
    """The status line and fields of a head (up to and including its blank line)."""
    text = bytes(data)
    if not text.endswith(HEAD_END):
        raise HeadError("a response head ends with an empty line")
    lines = text[: -len(HEAD_END)].split(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        raise HeadError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    minor, code, reason = status_line.groups()
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            # Also refuses obsolete line folding (a line starting with space).
            raise HeadError(f"malformed header line: {line[:80]!r}")
        headers.add(name.decode("ascii"), value.strip(b" \t").decode("latin-1"))
    status = int(code)
    framing, length = _framing(status, headers)
    return ResponseHead(
        status=status,
        reason=(reason or b"").decode("latin-1"),
        headers=CIMultiDictProxy(headers),
        framing=framing,
        length=length,
        # Both framings at once is how requests are smuggled: never reused
        # (RFC 9112 §6.3).
        keep_alive=framing is not Framing.CLOSE
        and not (framing is Framing.CHUNKED and "Content-Length" in headers)
        and _persistent(minor == b"1", headers),
    )


def _framing(status: int, headers: CIMultiDict[str]) -> tuple[Framing, int | None]:
    """How the body of a response to a GET ends (RFC 9112 §6.3)."""
    if status < 200 or status in (204, 304):
        return Framing.NONE, 0
    codings = [
        c.strip().lower() for v in headers.getall("Transfer-Encoding", []) for c in v.split(",")
    ]
    if codings:
        if codings != ["chunked"]:
            # Another coding would change the bytes: never cached as they are.
            raise HeadError(f"unsupported Transfer-Encoding: {', '.join(codings)}")
        return Framing.CHUNKED, None
    lengths = {v.strip() for v in headers.getall("Content-Length", []) for v in v.split(",")}
    if not lengths:
        return Framing.CLOSE, None
    if len(lengths) > 1 or not _DIGITS.fullmatch(next(iter(lengths))):
        raise HeadError(f"invalid Content-Length: {', '.join(sorted(lengths))}")
    return Framing.LENGTH, int(next(iter(lengths)))


def _persistent(http11: bool, headers: CIMultiDict[str]) -> bool:
    tokens = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    return "keep-alive" in tokens if not http11 else "close" not in tokens


class ChunkDecoder:
    """Takes a chunked body's bytes as they come; ``feed`` returns the data bytes
    in them (views of its argument), ``done`` says when the last chunk and
    the trailers have passed. Bytes after the end are refused."""

    # The longest chunk-size line (with extensions) or trailer line accepted.
    MAX_LINE = 4096

    def __init__(self) -> None:
        self._left = 0  # data bytes of the current chunk still to come
        self._line = bytearray()  # a size or trailer line being gathered
        self._state = "size"  # size | data | data-end | trailer | done
        self.done = False

    def feed(self, data: memoryview) -> list[memoryview]:
        out: list[memoryview] = []
        while data:
            if self._state == "data":
                n = min(self._left, len(data))
                out.append(data[:n])
                data = data[n:]
                self._left -= n
                if not self._left:
                    self._state = "data-end"
                continue
            if self._state == "done":
                raise HeadError("bytes after the end of a chunked body")
            end = bytes(data[: self.MAX_LINE + 2]).find(b"\n")
            if end < 0:
                self._line += data
                data = data[len(data) :]
                if len(self._line) > self.MAX_LINE:
                    raise HeadError("chunk line too long")
                continue
            self._line += data[: end + 1]
            data = data[end + 1 :]
            line = bytes(self._line).rstrip(b"\r\n")
            self._line.clear()
            self._line_done(line)
        return out

    def _line_done(self, line: bytes) -> None:
        if self._state == "data-end":
            if line:
                raise HeadError("chunk data longer than its size")
            self._state = "size"
        elif self._state == "size":
            size = line.split(b";", 1)[0].strip()
            if not size or len(size) > 16 or not re.fullmatch(rb"[0-9A-Fa-f]+", size):
                raise HeadError(f"invalid chunk size: {line[:40]!r}")
            self._left = int(size, 16)
            self._state = "data" if self._left else "trailer"
        elif not line:  # the blank line after the trailers
            self._state = "done"
            self.done = True
