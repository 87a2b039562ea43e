"""Checks on upstream responses before a byte of them is stored. Pure.

Every rule here comes from a bug a real cache shipped: a 206 trusted without
checking its Content-Range (Apache Traffic Server's slice plugin, nginx's
slice module before ETag checks), a ``*`` total, a 200 carrying the whole
object for a range request, an ETag that changed between two blocks
(rclone #6053: bytes stitched from two versions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .errors import RetryableFault, UpstreamProtocolError, UpstreamStatus, VersionChanged
from .httprange import parse_content_range, parse_digits
from .objectmeta import ObjectVersion
from .retry import reason_for_status

# A 200 for a range request is usable when the wanted bytes start close to
# the beginning: the bytes before them are read and thrown away. Past this
# much, the answer is treated as a fault and retried.
MAX_SKIP_FOR_FULL_ANSWER = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class Accepted:
    """The response may be read: skip ``skip`` bytes, then take ``length``."""

    skip: int
    length: int
    version: ObjectVersion


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value if value else None


def version_from_headers(headers: Mapping[str, str], size: int) -> ObjectVersion:
    return ObjectVersion(
        size=size,
        etag=_header(headers, "ETag"),
        last_modified=_header(headers, "Last-Modified"),
        content_type=_safe_content_type(_header(headers, "Content-Type")),
    )


def _safe_content_type(value: str | None) -> str:
    """Upstream's Content-Type if it is plain printable ASCII, else the generic
    type: it is echoed in our headers and in multipart part headers."""
    if value and value.isascii() and value.isprintable() and len(value) <= 200:
        return value
    return "application/octet-stream"


def check_status(status: int, headers: Mapping[str, str], retry_after: float | None) -> None:
    """Raise for statuses that are not a body we can use."""
    if status in (200, 206, 416):
        return  # 416 is interpreted by the caller: an empty object, or one that shrank
    if status == 412:
        raise VersionChanged("object changed upstream (412 Precondition Failed)")
    reason = reason_for_status(status)
    if reason is not None:
        raise RetryableFault(f"upstream answered {status}", reason=reason, retry_after=retry_after)
    if status in (401, 403, 404, 410, 451):
        raise UpstreamStatus(f"upstream answered {status}", status=status)
    raise UpstreamProtocolError(f"unexpected upstream status {status}")


def accept_range_response(
    status: int,
    headers: Mapping[str, str],
    start: int,
    end: int,
    expected: ObjectVersion | None,
) -> Accepted:
    """Validate the answer to ``Range: bytes=start-(end-1)``.

    ``expected`` is the version the bytes must belong to; None while
    discovering the object, when ``end`` may run past the (unknown) size.
    """
    content_length = _parse_length(headers.get("Content-Length"))
    if status == 416 and expected is not None:
        # We only ask for bytes inside the size we know: the object shrank.
        raise VersionChanged("upstream says the range is now unsatisfiable (416)")
    if status == 206:
        cr = parse_content_range(headers.get("Content-Range", ""))
        if cr is None or cr.start is None or cr.end is None or cr.size is None:
            raise RetryableFault("206 without a usable Content-Range", reason="server_error")
        # The version first: an object that changed size answers a range we
        # asked for with bytes of another length, which is no server error.
        version = version_from_headers(headers, cr.size)
        _check_same_version(expected, version)
        want_end = min(end, cr.size) if expected is None else end
        if cr.start != start or cr.end != want_end:
            raise RetryableFault(
                f"206 for bytes {cr.start}-{cr.end - 1} when {start}-{want_end - 1} was asked",
                reason="server_error",
            )
        if content_length is not None and content_length != cr.end - cr.start:
            raise RetryableFault(
                "206 whose Content-Length disagrees with Content-Range", reason="server_error"
            )
        return Accepted(skip=0, length=cr.end - cr.start, version=version)
    if status == 200:
        if content_length is None:
            raise RetryableFault(
                "200 without Content-Length for a range request", reason="server_error"
            )
        version = version_from_headers(headers, content_length)
        _check_same_version(expected, version)
        want_end = min(end, content_length)
        if start > MAX_SKIP_FOR_FULL_ANSWER:
            raise RetryableFault(
                "upstream ignored Range (200 for the whole object)", reason="server_error"
            )
        return Accepted(skip=start, length=max(0, want_end - start), version=version)
    raise UpstreamProtocolError(f"unexpected upstream status {status}")


def _check_same_version(expected: ObjectVersion | None, got: ObjectVersion) -> None:
    if expected is None:
        return
    if got.size != expected.size:
        raise VersionChanged(f"object size changed upstream ({expected.size} -> {got.size})")
    # Exact equality, not RFC strong comparison: a server with weak ETags still
    # names one version by one string, and that is what binds our blocks.
    if expected.etag is not None and got.etag != expected.etag:
        raise VersionChanged("object ETag changed upstream")


def _parse_length(value: str | None) -> int | None:
    return None if value is None else parse_digits(value)
