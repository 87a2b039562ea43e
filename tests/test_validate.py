"""Tests of nwbcache_proxy.validate: every upstream answer shape, accepted or refused.

Tables of (status, headers, asked range, expected version) cases with the exact
outcome: the ``Accepted`` value, or the exception type, its message and what
it carries (retry reason, HTTP status). Properties cover the arithmetic over
all sizes and ranges.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from nwbcache_proxy.errors import (
    ProxyError,
    RetryableFault,
    UpstreamProtocolError,
    UpstreamStatus,
    VersionChanged,
)
from nwbcache_proxy.objectmeta import ObjectVersion
from nwbcache_proxy.validate import (
    MAX_SKIP_FOR_FULL_ANSWER,
    Accepted,
    accept_range_response,
    check_status,
    version_from_headers,
)

SIZE = 1000
ETAG = '"v1"'
OTHER_ETAG = '"v2"'
LM = "Sun, 06 Nov 1994 08:49:37 GMT"
LATER = "Mon, 07 Nov 1994 08:49:37 GMT"
HDF5 = "application/x-hdf5"
OCTET = "application/octet-stream"

V1 = ObjectVersion(size=SIZE, etag=ETAG, last_modified=LM, content_type=HDF5)
LM_ONLY = ObjectVersion(size=SIZE, etag=None, last_modified=LM, content_type=HDF5)
BARE = ObjectVersion(size=SIZE, etag=None, last_modified=None, content_type=OCTET)
BIG = ObjectVersion(
    size=4 * MAX_SKIP_FOR_FULL_ANSWER, etag=ETAG, last_modified=LM, content_type=HDF5
)


def answer(
    content_range: str | None = None,
    content_length: str | None = None,
    *,
    etag: str | None = ETAG,
    last_modified: str | None = LM,
    content_type: str | None = HDF5,
) -> dict[str, str]:
    """Upstream response headers; None leaves a header out."""
    headers = {
        "Content-Range": content_range,
        "Content-Length": content_length,
        "ETag": etag,
        "Last-Modified": last_modified,
        "Content-Type": content_type,
    }
    return {name: value for name, value in headers.items() if value is not None}


# -- check_status ------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 206, 416])
def test_check_status_passes_statuses_with_a_usable_answer(status: int) -> None:
    check_status(status, {}, None)


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (429, "throttled"),
        (503, "throttled"),
        (500, "server_error"),
        (502, "server_error"),
        (504, "server_error"),
    ],
)
@pytest.mark.parametrize("retry_after", [None, 0.0, 7.5])
def test_check_status_retries_throttling_and_server_errors(
    status: int, reason: str, retry_after: float | None
) -> None:
    with pytest.raises(RetryableFault, match=f"^upstream answered {status}$") as caught:
        check_status(status, {}, retry_after)
    assert caught.value.reason == reason
    assert caught.value.retry_after == retry_after


def test_check_status_412_means_the_version_changed() -> None:
    with pytest.raises(VersionChanged, match="412 Precondition Failed") as caught:
        check_status(412, {"ETag": OTHER_ETAG}, None)
    assert caught.value.status == 503


@pytest.mark.parametrize("status", [401, 403, 404, 410, 451])
def test_check_status_passes_definitive_answers_on(status: int) -> None:
    with pytest.raises(UpstreamStatus, match=f"^upstream answered {status}$") as caught:
        check_status(status, {}, 3.0)
    assert caught.value.status == status


@pytest.mark.parametrize(
    "status", [100, 201, 204, 301, 302, 304, 400, 405, 409, 418, 499, 501, 505, 599]
)
def test_check_status_refuses_anything_else(status: int) -> None:
    with pytest.raises(UpstreamProtocolError, match=f"^unexpected upstream status {status}$") as c:
        check_status(status, {}, None)
    assert c.value.status == 502
    assert not isinstance(c.value, UpstreamStatus | VersionChanged)


# -- version_from_headers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "size", "want"),
    [
        (answer(), SIZE, V1),
        ({}, 0, ObjectVersion(0, None, None, OCTET)),
        ({"ETag": ETAG}, 5, ObjectVersion(5, ETAG, None, OCTET)),
        ({"Last-Modified": LM}, 5, ObjectVersion(5, None, LM, OCTET)),
        ({"ETag": 'W/"weak"'}, 5, ObjectVersion(5, 'W/"weak"', None, OCTET)),
        # Empty validators are no validators.
        (
            {"ETag": "", "Last-Modified": "", "Content-Type": ""},
            5,
            ObjectVersion(5, None, None, OCTET),
        ),
        # The size is the caller's, never read from the headers.
        ({"Content-Length": "3", "ETag": ETAG}, 9, ObjectVersion(9, ETAG, None, OCTET)),
    ],
)
def test_version_from_headers(headers: dict[str, str], size: int, want: ObjectVersion) -> None:
    assert version_from_headers(headers, size) == want


@pytest.mark.parametrize(
    ("content_type", "kept"),
    [
        (HDF5, True),
        ("text/plain; charset=utf-8", True),
        ("x" * 200, True),
        ("x" * 201, False),  # longer than anything real: not echoed
        ("text/plain\r\nX-Injected: 1", False),  # header injection
        ("text/plain\n", False),
        ("text/plain\tx", False),
        ("text/\x7fplain", False),
        ("text/plain\x00", False),
        ("text/plaïn", False),  # non-ASCII
        ("text/plain\u2028", False),
    ],
)
def test_version_from_headers_echoes_only_a_safe_content_type(
    content_type: str, kept: bool
) -> None:
    got = version_from_headers({"Content-Type": content_type}, 1).content_type
    assert got == (content_type if kept else OCTET)


# -- accept_range_response: accepted -----------------------------------------------

ACCEPTED: list[Any] = [
    # (id, status, headers, start, end, expected, Accepted)
    (
        "206 first block",
        206,
        answer("bytes 0-99/1000", "100"),
        0,
        100,
        V1,
        Accepted(skip=0, length=100, version=V1),
    ),
    (
        "206 middle block",
        206,
        answer("bytes 300-399/1000", "100"),
        300,
        400,
        V1,
        Accepted(0, 100, V1),
    ),
    (
        "206 short last block",
        206,
        answer("bytes 900-999/1000", "100"),
        900,
        1000,
        V1,
        Accepted(0, 100, V1),
    ),
    ("206 one byte", 206, answer("bytes 999-999/1000", "1"), 999, 1000, V1, Accepted(0, 1, V1)),
    (
        "206 resumed mid-block",
        206,
        answer("bytes 123-199/1000", "77"),
        123,
        200,
        V1,
        Accepted(0, 77, V1),
    ),
    (
        "206 without Content-Length",
        206,
        answer("bytes 0-99/1000"),
        0,
        100,
        V1,
        Accepted(0, 100, V1),
    ),
    (
        "206 unit in upper case",
        206,
        answer("BYTES 0-99/1000", "100"),
        0,
        100,
        V1,
        Accepted(0, 100, V1),
    ),
    (
        "206 Content-Range with surrounding blanks",
        206,
        answer(" bytes 0-99/1000 ", "100"),
        0,
        100,
        V1,
        Accepted(0, 100, V1),
    ),
    (
        "206 discovery, object smaller than the first block",
        206,
        answer("bytes 0-999/1000", "1000"),
        0,
        4096,
        None,
        Accepted(0, 1000, V1),
    ),
    (
        "206 discovery, object larger than the first block",
        206,
        answer("bytes 0-4095/1000000", "4096"),
        0,
        4096,
        None,
        Accepted(0, 4096, ObjectVersion(1_000_000, ETAG, LM, HDF5)),
    ),
    (
        "206 discovery without validators",
        206,
        answer("bytes 0-9/10", "10", etag=None, last_modified=None, content_type=None),
        0,
        10,
        None,
        Accepted(0, 10, ObjectVersion(10, None, None, OCTET)),
    ),
    (
        "206 weak ETag, same string",
        206,
        answer("bytes 0-99/1000", "100", etag='W/"v1"'),
        0,
        100,
        ObjectVersion(SIZE, 'W/"v1"', LM, HDF5),
        Accepted(0, 100, ObjectVersion(SIZE, 'W/"v1"', LM, HDF5)),
    ),
    (
        "206 ETag appears where there was none",
        206,
        answer("bytes 0-99/1000", "100"),
        0,
        100,
        LM_ONLY,
        Accepted(0, 100, V1),
    ),
    (
        "206 object without validators, same size",
        206,
        answer("bytes 0-99/1000", "100", etag=None, last_modified=None, content_type=None),
        0,
        100,
        BARE,
        Accepted(0, 100, BARE),
    ),
    (
        "206 Content-Type changed: not part of the version check",
        206,
        answer("bytes 0-99/1000", "100", content_type="text/plain"),
        0,
        100,
        V1,
        Accepted(0, 100, ObjectVersion(SIZE, ETAG, LM, "text/plain")),
    ),
    (
        "200 discovery: whole object, shorter than the first block",
        200,
        answer(content_length="1000"),
        0,
        4096,
        None,
        Accepted(skip=0, length=1000, version=V1),
    ),
    (
        "200 discovery: whole object, longer than the first block",
        200,
        answer(content_length="1000"),
        0,
        100,
        None,
        Accepted(skip=0, length=100, version=V1),
    ),
    (
        "200 discovery: empty object",
        200,
        answer(content_length="0", etag=None, last_modified=None, content_type=None),
        0,
        4096,
        None,
        Accepted(skip=0, length=0, version=ObjectVersion(0, None, None, OCTET)),
    ),
    (
        "200 for a block: skip to it",
        200,
        answer(content_length="1000"),
        300,
        400,
        V1,
        Accepted(skip=300, length=100, version=V1),
    ),
    (
        "200 for the last block",
        200,
        answer(content_length="1000"),
        900,
        1000,
        V1,
        Accepted(skip=900, length=100, version=V1),
    ),
    (
        "200 with the skip exactly at the limit",
        200,
        answer(content_length=str(BIG.size)),
        MAX_SKIP_FOR_FULL_ANSWER,
        MAX_SKIP_FOR_FULL_ANSWER + 100,
        BIG,
        Accepted(skip=MAX_SKIP_FOR_FULL_ANSWER, length=100, version=BIG),
    ),
]


@pytest.mark.parametrize(
    ("status", "headers", "start", "end", "expected", "want"),
    [pytest.param(*case[1:], id=case[0]) for case in ACCEPTED],
)
def test_accepted_answers(
    status: int,
    headers: dict[str, str],
    start: int,
    end: int,
    expected: ObjectVersion | None,
    want: Accepted,
) -> None:
    assert accept_range_response(status, headers, start, end, expected) == want


# -- accept_range_response: refused ------------------------------------------------

RETRY = "retry"  # RetryableFault, reason server_error: ask again

REFUSED: list[Any] = [
    # (id, status, headers, start, end, expected, exception, message)
    (
        "206 without Content-Range",
        206,
        answer(None, "100"),
        0,
        100,
        V1,
        RETRY,
        "usable Content-Range",
    ),
    ("206 empty Content-Range", 206, answer("", "100"), 0, 100, V1, RETRY, "usable Content-Range"),
    ("206 Content-Range without total", 206, answer("bytes 0-99"), 0, 100, V1, RETRY, "usable"),
    ("206 total '*'", 206, answer("bytes 0-99/*", "100"), 0, 100, V1, RETRY, "usable"),
    ("206 total '*', discovery", 206, answer("bytes 0-99/*"), 0, 100, None, RETRY, "usable"),
    ("206 unsatisfied-range form", 206, answer("bytes */1000"), 0, 100, V1, RETRY, "usable"),
    ("206 other unit", 206, answer("items 0-99/1000"), 0, 100, V1, RETRY, "usable"),
    ("206 last-pos past the total", 206, answer("bytes 0-1000/1000"), 0, 100, V1, RETRY, "usable"),
    ("206 last-pos before first-pos", 206, answer("bytes 99-0/1000"), 0, 100, V1, RETRY, "usable"),
    ("206 signed position", 206, answer("bytes +0-99/1000"), 0, 100, V1, RETRY, "usable"),
    ("206 non-ASCII digits", 206, answer("bytes ٠-99/1000"), 0, 100, V1, RETRY, "usable"),
    (
        "206 starts late",
        206,
        answer("bytes 1-100/1000", "100"),
        0,
        100,
        V1,
        RETRY,
        "^206 for bytes 1-100 when 0-99 was asked$",
    ),
    (
        "206 starts early",
        206,
        answer("bytes 0-199/1000", "200"),
        100,
        200,
        V1,
        RETRY,
        "^206 for bytes 0-199 when 100-199 was asked$",
    ),
    (
        "206 ends early",
        206,
        answer("bytes 0-49/1000", "50"),
        0,
        100,
        V1,
        RETRY,
        "^206 for bytes 0-49 when 0-99 was asked$",
    ),
    (
        "206 ends late",
        206,
        answer("bytes 0-199/1000", "200"),
        0,
        100,
        V1,
        RETRY,
        "^206 for bytes 0-199 when 0-99 was asked$",
    ),
    (
        "206 discovery, less than the object has",
        206,
        answer("bytes 0-499/1000", "500"),
        0,
        4096,
        None,
        RETRY,
        "^206 for bytes 0-499 when 0-999 was asked$",
    ),
    (
        "206 Content-Length longer than the range",
        206,
        answer("bytes 0-99/1000", "101"),
        0,
        100,
        V1,
        RETRY,
        "Content-Length disagrees",
    ),
    (
        "206 Content-Length shorter than the range",
        206,
        answer("bytes 0-99/1000", "99"),
        0,
        100,
        V1,
        RETRY,
        "Content-Length disagrees",
    ),
    (
        "206 object grew",
        206,
        answer("bytes 0-99/2000", "100"),
        0,
        100,
        V1,
        VersionChanged,
        r"^object size changed upstream \(1000 -> 2000\)$",
    ),
    (
        "206 ETag changed",
        206,
        answer("bytes 0-99/1000", "100", etag=OTHER_ETAG),
        0,
        100,
        V1,
        VersionChanged,
        "^object ETag changed upstream$",
    ),
    (
        "206 ETag gone",
        206,
        answer("bytes 0-99/1000", "100", etag=None),
        0,
        100,
        V1,
        VersionChanged,
        "ETag changed",
    ),
    (
        "206 weak form of the same ETag",
        206,
        answer("bytes 0-99/1000", "100", etag='W/"v1"'),
        0,
        100,
        V1,
        VersionChanged,
        "ETag changed",
    ),
    (
        "206 size checked before ETag",
        206,
        answer("bytes 0-99/2000", "100", etag=OTHER_ETAG),
        0,
        100,
        V1,
        VersionChanged,
        "size changed",
    ),
    (
        "416 for a range inside the known size: the object shrank",
        416,
        answer("bytes */10"),
        0,
        100,
        V1,
        VersionChanged,
        "unsatisfiable",
    ),
    (
        "416 while discovering: the caller's to interpret",
        416,
        answer("bytes */0"),
        0,
        4096,
        None,
        UpstreamProtocolError,
        "^unexpected upstream status 416$",
    ),
    (
        "200 without Content-Length",
        200,
        answer(),
        0,
        100,
        None,
        RETRY,
        "^200 without Content-Length for a range request$",
    ),
    ("200 empty Content-Length", 200, answer(content_length=""), 0, 100, V1, RETRY, "200 without"),
    ("200 negative Content-Length", 200, answer(content_length="-1"), 0, 100, V1, RETRY, "without"),
    ("200 signed Content-Length", 200, answer(content_length="+9"), 0, 100, V1, RETRY, "without"),
    ("200 Content-Length 1e3", 200, answer(content_length="1e3"), 0, 100, V1, RETRY, "without"),
    ("200 Content-Length 1 000", 200, answer(content_length="1 000"), 0, 100, V1, RETRY, "without"),
    (
        "200 skip past the limit",
        200,
        answer(content_length=str(BIG.size)),
        MAX_SKIP_FOR_FULL_ANSWER + 1,
        MAX_SKIP_FOR_FULL_ANSWER + 100,
        BIG,
        RETRY,
        r"^upstream ignored Range \(200 for the whole object\)$",
    ),
    (
        "200 skip past the limit, discovery",
        200,
        answer(content_length=str(BIG.size)),
        MAX_SKIP_FOR_FULL_ANSWER + 1,
        MAX_SKIP_FOR_FULL_ANSWER + 100,
        None,
        RETRY,
        "ignored Range",
    ),
    (
        "200 object grew",
        200,
        answer(content_length="1001"),
        0,
        100,
        V1,
        VersionChanged,
        r"\(1000 -> 1001\)",
    ),
    (
        "200 object shrank",
        200,
        answer(content_length="999"),
        0,
        100,
        V1,
        VersionChanged,
        r"\(1000 -> 999\)",
    ),
    (
        "200 ETag changed",
        200,
        answer(content_length="1000", etag=OTHER_ETAG),
        0,
        100,
        V1,
        VersionChanged,
        "ETag changed",
    ),
    (
        "200 version checked before the skip limit",
        200,
        answer(content_length=str(BIG.size), etag=OTHER_ETAG),
        MAX_SKIP_FOR_FULL_ANSWER + 1,
        MAX_SKIP_FOR_FULL_ANSWER + 100,
        BIG,
        VersionChanged,
        "ETag changed",
    ),
    ("204", 204, answer(), 0, 100, V1, UpstreamProtocolError, "^unexpected upstream status 204$"),
    ("304", 304, answer(), 0, 100, V1, UpstreamProtocolError, "status 304"),
    ("302", 302, answer(), 0, 100, None, UpstreamProtocolError, "status 302"),
    ("500", 500, answer(content_length="1000"), 0, 100, V1, UpstreamProtocolError, "status 500"),
]


@pytest.mark.parametrize(
    ("status", "headers", "start", "end", "expected", "error", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSED],
)
def test_refused_answers(
    status: int,
    headers: dict[str, str],
    start: int,
    end: int,
    expected: ObjectVersion | None,
    error: type[Exception] | str,
    message: str,
) -> None:
    if error == RETRY:
        with pytest.raises(RetryableFault, match=message) as fault:
            accept_range_response(status, headers, start, end, expected)
        assert fault.value.reason == "server_error"
        assert fault.value.retry_after is None
        return
    assert isinstance(error, type)
    with pytest.raises(error, match=message) as caught:
        accept_range_response(status, headers, start, end, expected)
    assert type(caught.value) is error
    assert isinstance(caught.value, ProxyError)


# -- answers that once got the wrong treatment ---------------------------------------


def test_206_from_an_object_that_shrank_is_a_version_change() -> None:
    no_etag = ObjectVersion(size=100, etag=None, last_modified=None)
    with pytest.raises(VersionChanged, match="size changed"):
        accept_range_response(206, {"Content-Range": "bytes 50-79/80"}, 50, 100, no_etag)


@pytest.mark.parametrize(
    "content_length",
    [
        pytest.param("²", id="superscript digit"),
        pytest.param("1" * 5000, id="5000 digits"),
        pytest.param("١٠٠٠", id="Arabic-Indic digits"),
    ],
)
def test_content_length_is_ascii_digits_only(content_length: str) -> None:
    with pytest.raises(RetryableFault, match="200 without Content-Length"):
        accept_range_response(200, answer(content_length=content_length), 0, 100, None)


# -- properties ----------------------------------------------------------------------

sizes = st.integers(min_value=1, max_value=2**53)


@st.composite
def ranges(draw: st.DrawFn) -> tuple[int, int, int]:
    """(size, start, end) with 0 <= start < end <= size."""
    size = draw(sizes)
    start = draw(st.integers(0, size - 1))
    end = draw(st.integers(start + 1, size))
    return size, start, end


@given(ranges())
def test_exact_206_is_accepted_whole(case: tuple[int, int, int]) -> None:
    size, start, end = case
    version = ObjectVersion(size, ETAG, LM, HDF5)
    headers = answer(f"bytes {start}-{end - 1}/{size}", str(end - start))
    got = accept_range_response(206, headers, start, end, version)
    assert got == Accepted(skip=0, length=end - start, version=version)


@given(sizes, st.integers(min_value=1, max_value=2**30))
def test_discovery_206_is_clipped_to_the_object(size: int, first_len: int) -> None:
    last = min(first_len, size) - 1
    got = accept_range_response(206, answer(f"bytes 0-{last}/{size}"), 0, first_len, None)
    assert got == Accepted(0, last + 1, ObjectVersion(size, ETAG, LM, HDF5))


@given(ranges(), st.integers(-3, 3), st.integers(-3, 3))
def test_206_for_other_bytes_is_retried(
    case: tuple[int, int, int], start_off: int, end_off: int
) -> None:
    size, start, end = case
    first, last = start + start_off, end - 1 + end_off
    assume((start_off, end_off) != (0, 0))  # the exact answer: accepted
    assume(0 <= first <= last < size)  # else not a valid Content-Range: refused as unusable
    headers = answer(f"bytes {first}-{last}/{size}")
    with pytest.raises(RetryableFault, match=r"^206 for bytes"):
        accept_range_response(206, headers, start, end, ObjectVersion(size, ETAG, LM, HDF5))


@given(ranges())
def test_200_within_the_skip_limit_is_read_past(case: tuple[int, int, int]) -> None:
    size, start, end = case
    version = ObjectVersion(size, ETAG, LM, HDF5)
    headers = answer(content_length=str(size))
    if start > MAX_SKIP_FOR_FULL_ANSWER:
        with pytest.raises(RetryableFault, match="ignored Range"):
            accept_range_response(200, headers, start, end, version)
    else:
        got = accept_range_response(200, headers, start, end, version)
        assert got == Accepted(skip=start, length=end - start, version=version)
