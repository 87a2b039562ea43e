"""A real HTTP server that answers like S3 GetObject/HeadObject, with injectable faults.

Used by nwbcache's tests and benchmarks as the upstream ("origin") of the proxy.
Path-style URLs: the object key is the whole URL path (``/dandiarchive/blobs/...``),
and a GET of ``/<bucket>`` lists the keys under it (ListObjects(V2): s3list.py);
the query string is ignored for lookup, so presigned URLs work (their X-Amz-*
parameters are only logged, and make HEAD answer 403 as real presigned GET URLs do).

In-process use::

    async with S3Emulator(latency=0.01) as emu:   # serves on this loop
        emu.put("/bucket/key", b"...")
        emu.inject(Fault.RESET_MID_BODY, after_bytes=1000)

    with S3Emulator() as emu:                     # own loop in a daemon thread
        requests.get(emu.url_for("/bucket/key"))

Command line (benchmarks, manual trials), from the repository root::

    python -m tests.support.s3emu --root DIR --prefix /dandiarchive --latency 0.03 --bandwidth 80M
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import email.utils
import enum
import hashlib
import hmac
import os
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import quote
from xml.sax.saxutils import escape

from aiohttp import web

from tests.support.s3list import Entry, list_bucket
from tests.support.served import ServedApp

try:  # Linux: lets a reset wait until the client has the bytes before the cut.
    import fcntl
    import termios

    _TIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - non-Linux
    _TIOCOUTQ = None

__all__ = ["Fault", "LoggedRequest", "S3Emulator", "main", "parse_bandwidth"]

# Upper bound on waiting for the client to acknowledge the bytes before a reset.
_FLUSH_TIMEOUT = 2.0
# Bandwidth pacing granularity: chunks of about this many seconds of transfer,
# so a low cap yields a steady trickle instead of large bursts.
_PACE_SLICE = 0.02
_XML = "application/xml"


class Fault(enum.StrEnum):
    """Misbehaviours the next matching request(s) get; see S3Emulator.inject."""

    SLOWDOWN = "slowdown"  # 503 SlowDown (+ Retry-After when retry_after is set)
    INTERNAL_ERROR = "internal_error"  # 500 InternalError
    THROTTLE_429 = "throttle_429"  # 429 TooManyRequests (+ Retry-After when set)
    RESET_MID_BODY = "reset_mid_body"  # after_bytes of the body, then a TCP reset
    SHORT_BODY = "short_body"  # after_bytes of the body, then a clean close
    WRONG_CONTENT_RANGE = "wrong_content_range"  # 206 for a range one byte off
    FULL_FOR_RANGE = "full_for_range"  # 200 + the whole object for a Range request
    WRONG_ETAG = "wrong_etag"  # another ETag header, the same bytes
    HEAD_REFUSED = "head_refused"  # HEAD answers 403
    STALL = "stall"  # headers, then silence for stall_seconds, then the body
    NOT_FOUND = "not_found"  # 404 NoSuchKey although the object exists


STATS_PATH = "/__s3emu/stats"


@dataclass
class LoggedRequest:
    """One request as the emulator saw and answered it (times from time.monotonic)."""

    method: str
    path: str
    query: str  # raw, still percent-encoded
    headers: dict[str, str]
    range: str | None
    status: int
    bytes_sent: int  # body bytes handed to the connection (0 for HEAD)
    user_agent: str | None
    fault: Fault | None
    started: float
    finished: float
    peer: str | None = None  # "host:port" of the client: shows connection reuse


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class _Object:
    """One stored version of an object: bytes in memory or a file read on demand."""

    key: str
    size: int
    etag: str  # quoted
    last_modified: int  # epoch seconds: HTTP-dates have one-second resolution
    content_type: str
    data: bytes | None = None
    path: str | None = None

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[int, int], bytes | memoryview]]:
        """A read(offset, n) function valid inside the block."""
        if self.data is not None:
            view = memoryview(self.data)  # slices without copying
            yield lambda offset, n: view[offset : offset + n]
            return
        assert self.path is not None
        # pread per chunk, never the whole file: benchmark objects are several GB.
        # Reads stay on the loop: from the page cache they take microseconds,
        # less than a hop to a worker thread would.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            yield lambda offset, n: os.pread(fd, n, offset)
        finally:
            os.close(fd)


def _norm_key(key: str) -> str:
    """Keys are URL paths; accept them with or without the leading slash."""
    return key if key.startswith("/") else "/" + key


def _quote_etag(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


def _http_date(epoch: int) -> str:
    return email.utils.formatdate(epoch, usegmt=True)


# --------------------------------------------------------------------------- ranges


_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str | None) -> tuple[int | None, int | None] | None:
    """(first, last) of a single byte range; None when S3 would ignore the header.

    S3 ignores (answers 200 with the whole object) absent, malformed and
    multi-range headers. first is None for a suffix range ``bytes=-n`` (last = n);
    last is None for an open range ``bytes=a-``.
    """
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text:
        return (None, int(last_text)) if last_text else None
    first = int(first_text)
    last = int(last_text) if last_text else None
    if last is not None and last < first:
        return None
    return first, last


def resolve_range(spec: tuple[int | None, int | None], size: int) -> tuple[int, int] | None:
    """Inclusive (start, end) to serve for a parsed range, or None if unsatisfiable (416)."""
    first, last = spec
    if first is None:  # suffix: the last n bytes
        assert last is not None
        if last == 0 or size == 0:
            return None
        return max(0, size - last), size - 1
    if first >= size:
        return None
    end = size - 1 if last is None else min(last, size - 1)
    return first, end


def _etag_matches(header: str, etag: str) -> bool:
    """If-Match / If-None-Match list membership (weak and strong alike, as S3 does)."""
    bare = etag.strip('"')
    for candidate in header.split(","):
        value = candidate.strip()
        if value == "*" or value.removeprefix("W/").strip('"') == bare:
            return True
    return False


# --------------------------------------------------------------------------- replies


@dataclass
class _Reply:
    """What to answer: status, headers, and either a small body or a slice of an object."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    obj: _Object | None = None
    start: int = 0
    length: int = 0

    @property
    def content_length(self) -> int:
        return self.length if self.obj is not None else len(self.body)

    @property
    def carries_object(self) -> bool:
        return self.obj is not None and self.status in (200, 206)


def _object_headers(obj: _Object) -> dict[str, str]:
    return {
        "ETag": obj.etag,
        "Last-Modified": _http_date(obj.last_modified),
        "Accept-Ranges": "bytes",
        "Content-Type": obj.content_type,
    }


def _whole(obj: _Object) -> _Reply:
    return _Reply(200, _object_headers(obj), obj=obj, start=0, length=obj.size)


def _partial(obj: _Object, start: int, end: int) -> _Reply:
    headers = _object_headers(obj)
    headers["Content-Range"] = f"bytes {start}-{end}/{obj.size}"
    return _Reply(206, headers, obj=obj, start=start, length=max(0, end - start + 1))


def _shifted(reply: _Reply) -> _Reply:
    """The requested slice moved one byte: right length, wrong offset, honest header.

    A request covering the whole object cannot move, so its answer starts one
    byte late and is one byte short instead.
    """
    obj = reply.obj
    assert obj is not None
    start, end = reply.start, reply.start + reply.length - 1
    if end + 1 < obj.size:
        return _partial(obj, start + 1, end + 1)
    if start > 0:
        return _partial(obj, start - 1, end - 1)
    return _partial(obj, start + 1, end)


def _other_etag(etag: str) -> str:
    """A stable ETag that differs from etag, as if the object had been overwritten."""
    return '"' + hashlib.md5(b"overwritten:" + etag.encode()).hexdigest() + '"'


def _error(
    status: int,
    code: str,
    message: str,
    *,
    details: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> _Reply:
    """An S3 error document (details become extra elements, e.g. <Key>)."""
    extra = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in (details or {}).items())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>{extra}</Error>"
    ).encode()
    return _Reply(status, {"Content-Type": _XML, **(headers or {})}, body=body)


DEFAULT_SECRET = b"s3emu-secret"


def _sign(secret: bytes, key: str, date: str, lifetime: str) -> str:
    return hmac.new(secret, f"{key}\n{date}\n{lifetime}".encode(), hashlib.sha256).hexdigest()


def _no_such_key(key: str) -> _Reply:
    return _error(
        404, "NoSuchKey", "The specified key does not exist.", details={"Key": key.lstrip("/")}
    )


def _reply_for(
    obj: _Object, if_match: str | None, if_none_match: str | None, rng: str | None
) -> _Reply:
    """GetObject semantics: preconditions first, then the Range header."""
    if if_match is not None and not _etag_matches(if_match, obj.etag):
        return _error(
            412,
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold",
            details={"Condition": "If-Match"},
        )
    if if_none_match is not None and _etag_matches(if_none_match, obj.etag):
        headers = _object_headers(obj)
        del headers["Content-Type"], headers["Accept-Ranges"]
        return _Reply(304, headers)
    spec = parse_range(rng)
    # An empty object has no byte 0, yet S3 answers "bytes=0-" with a plain 200.
    if spec is None or (obj.size == 0 and spec == (0, None)):
        return _whole(obj)
    span = resolve_range(spec, obj.size)
    if span is None:
        reply = _error(
            416,
            "InvalidRange",
            "The requested range is not satisfiable",
            details={"RangeRequested": rng or "", "ActualObjectSize": str(obj.size)},
        )
        reply.headers["Content-Range"] = f"bytes */{obj.size}"
        return reply
    return _partial(obj, *span)


# --------------------------------------------------------------------------- faults


# Faults that replace the answer with an error document: (status, code, message).
_ERROR_FAULTS: dict[Fault, tuple[int, str, str]] = {
    Fault.SLOWDOWN: (503, "SlowDown", "Please reduce your request rate."),
    Fault.INTERNAL_ERROR: (
        500,
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    Fault.THROTTLE_429: (429, "TooManyRequests", "Please reduce your request rate."),
    Fault.NOT_FOUND: (404, "NoSuchKey", "The specified key does not exist."),
    Fault.HEAD_REFUSED: (403, "AccessDenied", "Access Denied"),
}
# Faults that act on the body while it is sent: meaningless without one.
_BODY_FAULTS = frozenset({Fault.RESET_MID_BODY, Fault.SHORT_BODY, Fault.STALL})


@dataclass
class _FaultRule:
    fault: Fault
    remaining: int
    method: str | None
    path: str | None
    with_range: bool | None
    after_bytes: int | None
    retry_after: float | None
    stall_seconds: float

    def matches(self, method: str, key: str, has_range: bool, reply: _Reply) -> bool:
        return (
            (self.method is None or self.method == method)
            and (self.path is None or self.path == key)
            and (self.with_range is None or self.with_range == has_range)
            and _can_show(self.fault, method, reply)
        )


def _can_show(fault: Fault, method: str, reply: _Reply) -> bool:
    """Whether fault would change this answer; a rule is not spent on a request it cannot affect.

    So ``inject(Fault.RESET_MID_BODY)`` hits the proxy's next GET with a body,
    not the HEAD or the 304 before it.
    """
    if method not in ("GET", "HEAD"):
        return False
    if fault is Fault.HEAD_REFUSED:
        return method == "HEAD"
    if fault in _ERROR_FAULTS:
        return True
    if not reply.carries_object:
        return False
    assert reply.obj is not None
    if fault is Fault.FULL_FOR_RANGE:
        return reply.status == 206
    if fault is Fault.WRONG_CONTENT_RANGE:
        return reply.obj.size >= 2  # a one-byte object has no other byte to point at
    if fault is Fault.STALL:
        return method == "GET"
    if fault in _BODY_FAULTS:  # reset / short body need a byte to withhold
        return method == "GET" and reply.length > 0
    return True  # WRONG_ETAG


def _apply_fault(rule: _FaultRule, reply: _Reply, key: str) -> _Reply:
    """The answer as changed by the fault (body faults act later, while sending)."""
    fault = rule.fault
    if fault in _ERROR_FAULTS:
        status, code, message = _ERROR_FAULTS[fault]
        headers = {}
        if rule.retry_after is not None:
            # "%g": whole seconds as HTTP wants; fractions kept so tests can stay fast.
            headers["Retry-After"] = f"{rule.retry_after:g}"
        details = {"Key": key.lstrip("/")} if fault is Fault.NOT_FOUND else None
        return _error(status, code, message, details=details, headers=headers)
    obj = reply.obj
    if fault is Fault.FULL_FOR_RANGE:
        assert obj is not None
        return _whole(obj)
    if fault is Fault.WRONG_CONTENT_RANGE:
        return _shifted(reply)
    if fault is Fault.WRONG_ETAG:
        assert obj is not None
        reply.headers["ETag"] = _other_etag(obj.etag)
    return reply


def _cut_point(after_bytes: int | None, length: int) -> int:
    """How much of the body a truncating fault sends: default half, always short."""
    after = length // 2 if after_bytes is None else after_bytes
    return max(0, min(after, length - 1))


# --------------------------------------------------------------------------- connection


class _Pacer:
    """Holds each chunk back until a link of `bandwidth` bytes/s would have delivered it."""

    def __init__(self, bandwidth: float | None) -> None:
        self._bandwidth = bandwidth
        self._t0 = time.monotonic()

    async def wait_for(self, total_bytes: int) -> None:
        if self._bandwidth is None:
            return
        delay = self._t0 + total_bytes / self._bandwidth - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _stall(request: web.BaseRequest, seconds: float) -> None:
    """Send nothing for `seconds`, giving up early once the client hangs up."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if _client_gone(request):
            raise ConnectionResetError("client went away during the stall")
        await asyncio.sleep(min(left, 0.05))


def _unacked_bytes(sock: socket.socket) -> int:
    """Bytes in the kernel send queue not yet acknowledged by the peer (0 if unknown)."""
    if _TIOCOUTQ is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


async def _reset_connection(request: web.BaseRequest) -> None:
    """Abort with a TCP RST, after the bytes already written have reached the client.

    An RST discards whatever is still in our send queue, so without the wait
    the client would see a random amount less than after_bytes.
    """
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    deadline = time.monotonic() + _FLUSH_TIMEOUT
    while time.monotonic() < deadline and not transport.is_closing():
        if transport.get_write_buffer_size() == 0 and (sock is None or _unacked_bytes(sock) == 0):
            break
        await asyncio.sleep(0.002)
    if sock is not None:
        # Linger 0: close() sends RST instead of FIN, like a dropped S3 connection.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _request_id() -> tuple[str, str]:
    """(x-amz-request-id, x-amz-id-2), shaped like S3's."""
    return secrets.token_hex(8).upper(), secrets.token_urlsafe(48)


# --------------------------------------------------------------------------- emulator


class S3Emulator(ServedApp):
    thread_name = "s3emu"

    """S3 GetObject/HeadObject over real HTTP on 127.0.0.1, with faults and a request log.

    latency: seconds before the status line of every response (first-byte latency).
    bandwidth: bytes/s cap per response body (None: unlimited).
    head_refused: every HEAD answers 403, like a bucket reachable only via presigned GET.
    presigned_refuse_head: HEAD with X-Amz-Signature in the query answers 403
        (presigned URLs are signed for GET only).
    access_log: a stream that gets one line per finished request (the CLI uses stderr).
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        bandwidth: float | None = None,
        head_refused: bool = False,
        chunk_size: int = 64 * 1024,
        presigned_refuse_head: bool = True,
        access_log: TextIO | None = None,
    ) -> None:
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError("bandwidth must be positive (None for unlimited)")
        super().__init__()
        self.latency = latency
        self.bandwidth = bandwidth
        self.head_refused = head_refused
        self.chunk_size = chunk_size
        self.presigned_refuse_head = presigned_refuse_head
        self.access_log = access_log
        self.log: list[LoggedRequest] = []
        self._active = 0  # requests being served now (see wait_idle)
        # put/inject may come from a test thread while the loop thread serves.
        self._lock = threading.Lock()
        self._objects: dict[str, _Object] = {}
        self._rules: list[_FaultRule] = []
        self._signed: dict[str, bytes] = {}  # key prefix -> secret (require_signature)
        # As S3: a signature that is there must be right, even for a public object.
        self.reject_bad_signatures = False

    # ----------------------------------------------------------------- objects

    def put(
        self,
        key: str,
        data: bytes,
        *,
        etag: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> str:
        """Store (or replace) an object in memory; returns its quoted ETag (default: MD5)."""
        key = _norm_key(key)
        quoted = _quote_etag(etag) if etag else '"' + hashlib.md5(data).hexdigest() + '"'
        data = bytes(data)
        self._store(
            key,
            lambda modified: _Object(key, len(data), quoted, modified, content_type, data=data),
        )
        return quoted

    def put_file(self, key: str, path: str | os.PathLike[str], *, etag: str | None = None) -> str:
        """Serve a file from disk (read per chunk); returns its quoted ETag.

        The default ETag hashes (path, size, mtime), not the content: benchmark
        files are several GB. The size is fixed now; later appends are not served.
        """
        key = _norm_key(key)
        real = os.path.abspath(path)
        st = os.stat(real)
        if etag:
            quoted = _quote_etag(etag)
        else:
            ident = f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()
            quoted = '"' + hashlib.md5(ident).hexdigest() + '"'
        self._store(
            key,
            lambda modified: _Object(
                key, st.st_size, quoted, modified, "application/octet-stream", path=real
            ),
        )
        return quoted

    def _store(self, key: str, make: Callable[[int], _Object]) -> None:
        with self._lock:
            previous = self._objects.get(key)
            modified = int(time.time())
            if previous is not None:
                # A new version must show a new Last-Modified, even within the same second.
                modified = max(modified, previous.last_modified + 1)
            self._objects[key] = make(modified)

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(_norm_key(key), None)

    def _list(self, bucket: str, query: Mapping[str, str]) -> _Reply:
        """ListObjects(V2) of the objects under ``/<bucket>/`` (s3list.py)."""
        under = f"/{bucket}/"
        with self._lock:
            entries = [
                Entry(k[len(under) :], o.size, o.etag, o.last_modified)
                for k, o in self._objects.items()
                if k.startswith(under)
            ]
        if not entries:  # a bucket here is a prefix some object has
            return _error(404, "NoSuchBucket", "The specified bucket does not exist")
        status, body = list_bucket(bucket, entries, query)
        return _Reply(status, {"Content-Type": _XML}, body=body)

    def _lookup(self, key: str) -> _Object | None:
        with self._lock:
            return self._objects.get(key)

    # -------------------------------------------------------------- signatures

    def require_signature(self, prefix: str, secret: bytes = DEFAULT_SECRET) -> None:
        """Objects whose key starts with ``prefix`` answer every request 403
        AccessDenied unless it is presigned (:meth:`presign`, not expired) or
        carries :meth:`authorization`: a private bucket, an embargoed DANDI
        blob. Checked before the object is looked up, as S3 does."""
        with self._lock:
            self._signed[_norm_key(prefix)] = secret

    def allow_anonymous(self, prefix: str) -> None:
        """Lift :meth:`require_signature` (an embargo released)."""
        with self._lock:
            self._signed.pop(_norm_key(prefix), None)

    def presign(self, key: str, *, expires_in: int = 3600, signed_at: float | None = None) -> str:
        """A SigV4-shaped query string that grants ``key`` for ``expires_in`` seconds
        from ``signed_at`` (default now): an HMAC of path, date and lifetime."""
        key = _norm_key(key)
        date = time.strftime(
            "%Y%m%dT%H%M%SZ", time.gmtime(time.time() if signed_at is None else signed_at)
        )
        signature = _sign(self._secret_for(key), key, date, str(expires_in))
        return (
            "X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=S3EMU%2F20260101%2Fus-east-2%2Fs3%2Faws4_request"
            f"&X-Amz-Date={date}&X-Amz-Expires={expires_in}"
            f"&X-Amz-SignedHeaders=host&X-Amz-Signature={signature}"
        )

    def authorization(self, key: str) -> str:
        """An Authorization header value that grants ``key``."""
        key = _norm_key(key)
        return f"S3EMU-HMAC {_sign(self._secret_for(key), key, 'header', '')}"

    def _secret_for(self, key: str) -> bytes:
        with self._lock:
            matching = [p for p in self._signed if key.startswith(p)]
            if not matching:
                raise ValueError(f"{key} is not under a prefix given to require_signature")
            return self._signed[max(matching, key=len)]

    def _refusal(self, request: web.Request, key: str) -> _Reply | None:
        """403 when ``key`` needs a signature the request does not carry."""
        with self._lock:
            matching = [p for p in self._signed if key.startswith(p)]
            if matching:
                secret = self._signed[max(matching, key=len)]
            elif self.reject_bad_signatures and "X-Amz-Signature" in request.query:
                secret = DEFAULT_SECRET
            else:
                return None
        auth = request.headers.get("Authorization")
        if auth is not None and hmac.compare_digest(
            auth, f"S3EMU-HMAC {_sign(secret, key, 'header', '')}"
        ):
            return None
        q = request.query
        signature, date, lifetime = (
            q.get("X-Amz-Signature"),
            q.get("X-Amz-Date"),
            q.get("X-Amz-Expires"),
        )
        if signature is None or date is None or lifetime is None:
            return _error(403, "AccessDenied", "Access Denied")
        if not hmac.compare_digest(signature, _sign(secret, key, date, lifetime)):
            return _error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        try:
            signed_at = calendar.timegm(time.strptime(date, "%Y%m%dT%H%M%SZ"))
            expired = time.time() > signed_at + int(lifetime)
        except ValueError:
            expired = True
        if expired:
            return _error(403, "AccessDenied", "Request has expired")
        return None

    # ------------------------------------------------------------------ faults

    def inject(
        self,
        fault: Fault,
        *,
        count: int = 1,
        method: str | None = None,
        path: str | None = None,
        with_range: bool | None = None,
        after_bytes: int | None = None,
        retry_after: float | None = None,
        stall_seconds: float = 5.0,
    ) -> None:
        """Give `fault` to the next `count` matching requests.

        A request matches when method, path (key) and whether it carries a Range
        header agree with those given (None: any), and the fault can show on its
        answer (see _can_show). The oldest matching rule wins.

        after_bytes (RESET_MID_BODY, SHORT_BODY): body bytes sent before the cut,
        default half, at most length - 1. retry_after: Retry-After seconds for
        SLOWDOWN / THROTTLE_429. stall_seconds: STALL's silence.
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        rule = _FaultRule(
            fault=Fault(fault),
            remaining=count,
            method=method.upper() if method else None,
            path=_norm_key(path) if path is not None else None,
            with_range=with_range,
            after_bytes=after_bytes,
            retry_after=retry_after,
            stall_seconds=stall_seconds,
        )
        with self._lock:
            self._rules.append(rule)

    def clear_faults(self) -> None:
        with self._lock:
            self._rules.clear()

    def _take_fault(
        self, method: str, key: str, has_range: bool, reply: _Reply
    ) -> _FaultRule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, key, has_range, reply):
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._rules.remove(rule)
                    return rule
        return None

    # --------------------------------------------------------------------- log

    def clear_log(self) -> None:
        self.log.clear()

    def requests(self, path: str | None = None, method: str | None = None) -> list[LoggedRequest]:
        key = _norm_key(path) if path is not None else None
        wanted = method.upper() if method else None
        return [
            r
            for r in list(self.log)
            if (key is None or r.path == key) and (wanted is None or r.method == wanted)
        ]

    def bytes_sent(self, path: str | None = None) -> int:
        return sum(r.bytes_sent for r in self.requests(path))

    def wait_idle(self, timeout: float = 5.0, quiet: float = 0.05) -> None:
        """Wait until no request is being served (and none for ``quiet`` s).

        A request is logged when its response has been sent, which can be a
        moment after the client has its bytes: call this before counting.
        """
        deadline = time.monotonic() + timeout
        idle_since: float | None = None
        while time.monotonic() < deadline:
            if self._active == 0:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= quiet:
                    return
            else:
                idle_since = None
            time.sleep(0.01)
        raise TimeoutError(f"origin still serving {self._active} request(s)")

    def _record(self, entry: LoggedRequest) -> None:
        entry.finished = time.monotonic()
        self.log.append(entry)  # list.append is atomic: readers in other threads are safe
        if self.access_log is not None:
            target = entry.path + (f"?{entry.query}" if entry.query else "")
            print(
                f'{entry.peer or "-"} "{entry.method} {target}" {entry.status} '
                f"{entry.bytes_sent} range={entry.range or '-'} fault={entry.fault or '-'} "
                f"{entry.finished - entry.started:.3f}s",
                file=self.access_log,
                flush=True,
            )

    # ----------------------------------------------------------------- serving

    def stats(self) -> dict[str, int]:
        """Totals of the request log, and requests being served now."""
        log = list(self.log)
        return {
            "requests": len(log),
            "bytes": sum(r.bytes_sent for r in log),
            "active": self._active,
        }

    def app(self) -> web.Application:
        """A fresh aiohttp app bound to this emulator's state (e.g. for aiohttp_client)."""
        app = web.Application()
        # For a benchmark driving the emulator in another process. Not an S3
        # path: bucket names cannot contain "_", so no object can shadow it.
        app.router.add_get(STATS_PATH, self._stats)
        app.router.add_route("*", "/{key:.*}", self._handle)
        return app

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = request.path
        peer = request.transport.get_extra_info("peername") if request.transport else None
        entry = LoggedRequest(
            method=request.method,
            path=key,
            query=request.rel_url.raw_query_string,
            headers=dict(request.headers),
            range=request.headers.get("Range"),
            status=0,
            bytes_sent=0,
            user_agent=request.headers.get("User-Agent"),
            fault=None,
            started=time.monotonic(),
            finished=0.0,
            peer=f"{peer[0]}:{peer[1]}" if peer else None,
        )
        self._active += 1
        try:
            return await self._serve(request, key, entry)
        finally:
            self._record(entry)
            self._active -= 1

    async def _serve(
        self, request: web.Request, key: str, entry: LoggedRequest
    ) -> web.StreamResponse:
        reply = self._plan(request, key)
        rule = self._take_fault(request.method, key, "Range" in request.headers, reply)
        if rule is not None:
            entry.fault = rule.fault
            reply = _apply_fault(rule, reply, key)
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        request_id, host_id = _request_id()
        headers = {"x-amz-request-id": request_id, "x-amz-id-2": host_id, "Server": "AmazonS3"}
        resp = web.StreamResponse(status=reply.status, headers={**headers, **reply.headers})
        resp.content_length = reply.content_length
        truncating = rule is not None and rule.fault in (Fault.SHORT_BODY, Fault.RESET_MID_BODY)
        if truncating:
            resp.force_close()  # the connection cannot carry another response after a lie
        entry.status = reply.status
        try:
            await resp.prepare(request)
            if request.method != "HEAD":
                await self._send_body(request, resp, reply, rule, entry)
        except ConnectionError:
            pass  # the client hung up (or we reset it); the log keeps what was sent
        return resp

    def _plan(self, request: web.Request, key: str) -> _Reply:
        """The answer a healthy S3 would give, before faults."""
        if request.method not in ("GET", "HEAD"):
            return _error(
                405,
                "MethodNotAllowed",
                "The specified method is not allowed against this resource.",
                headers={"Allow": "GET, HEAD"},
            )
        refusal = self._refusal(request, key)
        if refusal is not None:
            return refusal
        if request.method == "HEAD" and (
            self.head_refused or (self.presigned_refuse_head and "X-Amz-Signature" in request.query)
        ):
            return _error(403, "AccessDenied", "Access Denied")
        bucket = key.strip("/")
        if request.method == "GET" and bucket and "/" not in bucket:
            return self._list(bucket, request.query)
        obj = self._lookup(key)
        if obj is None:
            return _no_such_key(key)
        h = request.headers
        return _reply_for(obj, h.get("If-Match"), h.get("If-None-Match"), h.get("Range"))

    async def _send_body(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        reply: _Reply,
        rule: _FaultRule | None,
        entry: LoggedRequest,
    ) -> None:
        if reply.obj is None:
            if reply.body:
                await resp.write(reply.body)
                entry.bytes_sent = len(reply.body)
            await resp.write_eof()
            return
        fault = rule.fault if rule is not None else None
        stop = reply.length
        if rule is not None and fault is Fault.STALL:
            await _stall(request, rule.stall_seconds)
        elif rule is not None and fault in (Fault.SHORT_BODY, Fault.RESET_MID_BODY):
            stop = _cut_point(rule.after_bytes, reply.length)
        await self._stream(resp, reply, stop, entry)
        if fault is Fault.RESET_MID_BODY:
            await _reset_connection(request)
        else:
            # SHORT_BODY ends here too: force_close() makes aiohttp close cleanly (FIN).
            await resp.write_eof()

    async def _stream(
        self, resp: web.StreamResponse, reply: _Reply, stop: int, entry: LoggedRequest
    ) -> None:
        """Write reply's object bytes [0, stop) relative to its start, paced to bandwidth."""
        assert reply.obj is not None
        step = self.chunk_size
        if self.bandwidth is not None:
            step = max(1024, min(step, int(self.bandwidth * _PACE_SLICE)))
        pacer = _Pacer(self.bandwidth)
        with reply.obj.reader() as read:
            while entry.bytes_sent < stop:
                chunk = read(reply.start + entry.bytes_sent, min(step, stop - entry.bytes_sent))
                if not chunk:  # the file shrank on disk: the client sees a short body
                    break
                await pacer.wait_for(entry.bytes_sent + len(chunk))
                await resp.write(chunk)
                entry.bytes_sent += len(chunk)

    # ------------------------------------------------------------- lifecycle

    def url_for(self, key: str) -> str:
        return self.url + quote(_norm_key(key))


# --------------------------------------------------------------------------- CLI


_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def parse_bandwidth(text: str) -> float:
    """'80M' -> 80e6 bytes/s: decimal network units (k, M, G), optional 'B' or 'B/s'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kKmMgG]?)(?:B(?:/s)?)?\s*", text)
    if match is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a positive bandwidth: {text!r} (e.g. 80M)")
    return float(match[1]) * _UNITS[match[2].upper()]


def put_tree(emu: S3Emulator, root: Path, prefix: str) -> int:
    """put_file every regular file under root at <prefix>/<relative path>; returns the count."""
    count = 0
    base = "/" + prefix.strip("/") if prefix.strip("/") else ""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file():
                emu.put_file(f"{base}/{path.relative_to(root).as_posix()}", path)
                count += 1
    return count


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s3emu",
        description="Serve every file under --root like S3 GetObject/HeadObject "
        "(path-style URLs: <prefix>/<relative path>).",
    )
    parser.add_argument("--root", type=Path, required=True, help="directory to serve")
    parser.add_argument(
        "--prefix", default="", help="URL path prefix, e.g. /dandiarchive (default: none)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    parser.add_argument("--port", type=int, default=0, help="default: 0 (any free port)")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds before every status line, e.g. 0.03"
    )
    parser.add_argument(
        "--bandwidth",
        type=parse_bandwidth,
        default=None,
        help="per-response cap in BYTES per second, decimal network units: "
        "80M = 80*10**6 bytes/s (k=10**3, G=10**9); default: unlimited",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=64 * 1024, help="write size in bytes (default: 65536)"
    )
    return parser


async def _serve_tree(args: argparse.Namespace) -> None:
    emu = S3Emulator(
        latency=args.latency,
        bandwidth=args.bandwidth,
        chunk_size=args.chunk_size,
        access_log=sys.stderr,
    )
    count = put_tree(emu, args.root, args.prefix)
    print(f"s3emu: {count} files from {args.root}", file=sys.stderr, flush=True)
    await emu.start(args.host, args.port)
    # Benchmark scripts wait for this exact line.
    print(f"s3emu: serving {emu.url}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows loops
            loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        await emu.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.root.is_dir():
        print(f"s3emu: not a directory: {args.root}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_tree(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
