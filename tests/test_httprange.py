"""Tests of nwbcache_proxy.httprange: tables of RFC 9110 cases plus properties."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from nwbcache_proxy.conditional import (
    Precondition,
    evaluate_if_range,
    evaluate_preconditions,
    parse_etag_list,
    strong_match,
    weak_match,
)
from nwbcache_proxy.httprange import (
    MAX_RANGES,
    ByteRange,
    ContentRange,
    RangeDecision,
    RangeOutcome,
    RangeSpec,
    decide,
    parse_content_range,
    parse_range_header,
    plan_multipart,
    resolve_ranges,
)

FULL = RangeOutcome.FULL
PARTIAL = RangeOutcome.PARTIAL
MULTIPART = RangeOutcome.MULTIPART
UNSATISFIABLE = RangeOutcome.UNSATISFIABLE

DATE = "Sun, 06 Nov 1994 08:49:37 GMT"
DATE_RFC850 = "Sunday, 06-Nov-94 08:49:37 GMT"
DATE_ASCTIME = "Sun Nov  6 08:49:37 1994"
EARLIER = "Sat, 05 Nov 1994 08:49:37 GMT"
LATER = "Mon, 07 Nov 1994 08:49:37 GMT"
ETAG = '"abc"'


def spans(decision: RangeDecision) -> list[tuple[int, int]]:
    return [(r.start, r.end) for r in decision.ranges]


# --------------------------------------------------------------------------- ByteRange


def test_byte_range_length_and_content_range() -> None:
    r = ByteRange(10, 20)
    assert r.length == 10
    assert r.content_range(100) == "bytes 10-19/100"
    assert ByteRange(99, 100).content_range(100) == "bytes 99-99/100"


@pytest.mark.parametrize(("start", "end"), [(-1, 5), (5, 4), (-2, -1)])
def test_byte_range_rejects_negative_or_reversed(start: int, end: int) -> None:
    with pytest.raises(ValueError, match="invalid byte range"):
        ByteRange(start, end)


@pytest.mark.parametrize(
    ("byte_range", "size"),
    [(ByteRange(0, 0), 0), (ByteRange(5, 5), 10), (ByteRange(0, 11), 10)],
    ids=["empty-on-empty", "empty", "past-end"],
)
def test_content_range_refuses_unsendable_range(byte_range: ByteRange, size: int) -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        byte_range.content_range(size)


@pytest.mark.parametrize(("first", "last"), [(None, None), (None, -1), (-1, None), (5, 4)])
def test_range_spec_rejects_invalid(first: int | None, last: int | None) -> None:
    with pytest.raises(ValueError, match="invalid range spec"):
        RangeSpec(first, last)


# --------------------------------------------------------------------------- parse_range_header

S = RangeSpec

VALID_RANGE_HEADERS = [
    ("bytes=0-499", (S(0, 499),)),
    ("bytes=0-0", (S(0, 0),)),
    ("bytes=500-", (S(500, None),)),
    ("bytes=-500", (S(None, 500),)),
    ("bytes=-0", (S(None, 0),)),
    ("bytes=0-1,5-,-3", (S(0, 1), S(5, None), S(None, 3))),
    ("BYTES=1-2", (S(1, 2),)),
    ("Bytes=1-2", (S(1, 2),)),
    ("bytes = 1-2", (S(1, 2),)),
    ("bytes=\t1-2 ,\t3-4 ", (S(1, 2), S(3, 4))),
    ("  bytes=1-2  ", (S(1, 2),)),
    ("bytes=1-2,,3-4", (S(1, 2), S(3, 4))),
    ("bytes=,1-2,", (S(1, 2),)),
    ("bytes=007-010", (S(7, 10),)),
    ("bytes=5-5", (S(5, 5),)),
    ("bytes=9999999999999999999-", (S(9999999999999999999, None),)),
    ("bytes=-9999999999999999999", (S(None, 9999999999999999999),)),
]


@pytest.mark.parametrize(("header", "expected"), VALID_RANGE_HEADERS)
def test_parse_range_header_valid(header: str, expected: tuple[RangeSpec, ...]) -> None:
    assert parse_range_header(header) == expected


INVALID_RANGE_HEADERS = [
    "",
    "bytes",
    "bytes=",
    "bytes=,",
    "bytes= , ",
    "bytes=-",
    "bytes=5",
    "bytes=5-4",
    "bytes=a-b",
    "bytes=1-b",
    "bytes=+1-2",
    "bytes=1-+2",
    "bytes=--5",
    "bytes=-5-",
    "bytes=1-2-3",
    "bytes=1 -2",
    "bytes=1- 2",
    "bytes=0-1,\n2-3",  # only SP and HTAB are OWS
    "bytes=\x0c0-1",
    "bytes=0-1\u00a0",
    "bytes=0x10-20",
    "bytes=1.5-2",
    "bytes=²-3",
    "bytes=١-٣",
    "bytes=10000000000000000000-",  # 20 digits: overflow guard
    "bytes=0-10000000000000000000",
    "bytes=-10000000000000000000",
    "bytes=0-1,x",
    "bytes=0-1;2-3",
    "items=0-1",
    "bytesx=0-1",
    "by tes=0-1",
    "bytes:0-1",
    "bytes 0-1",
    "=0-1",
]


@pytest.mark.parametrize("header", INVALID_RANGE_HEADERS)
def test_parse_range_header_invalid(header: str) -> None:
    assert parse_range_header(header) is None


# --------------------------------------------------------------------------- resolve_ranges

RESOLVE_CASES = [
    # (range header, size, outcome, ranges)
    ("bytes=0-0", 1, PARTIAL, [(0, 1)]),
    ("bytes=0-", 1, PARTIAL, [(0, 1)]),
    ("bytes=-1", 1, PARTIAL, [(0, 1)]),
    ("bytes=1-", 1, UNSATISFIABLE, []),
    ("bytes=0-99", 100, PARTIAL, [(0, 100)]),  # exact end
    ("bytes=0-100", 100, PARTIAL, [(0, 100)]),  # one past the end: clamped
    ("bytes=10-5000", 100, PARTIAL, [(10, 100)]),  # clamped
    ("bytes=99-99", 100, PARTIAL, [(99, 100)]),
    ("bytes=99-", 100, PARTIAL, [(99, 100)]),
    ("bytes=100-", 100, UNSATISFIABLE, []),  # first == size
    ("bytes=100-200", 100, UNSATISFIABLE, []),
    ("bytes=-10", 100, PARTIAL, [(90, 100)]),
    ("bytes=-100", 100, PARTIAL, [(0, 100)]),
    ("bytes=-1000", 100, PARTIAL, [(0, 100)]),  # suffix longer than size
    ("bytes=-0", 100, UNSATISFIABLE, []),
    ("bytes=-0,-0", 100, UNSATISFIABLE, []),
    ("bytes=-0,0-0", 100, PARTIAL, [(0, 1)]),  # unsatisfiable specs are dropped
    ("bytes=200-,5-9", 100, PARTIAL, [(5, 10)]),
    ("bytes=9999999999999999999-", 100, UNSATISFIABLE, []),
    ("bytes=0-9999999999999999999", 100, PARTIAL, [(0, 100)]),
    # Empty object: S3 answers 200, so do we, whatever the spec.
    ("bytes=0-", 0, FULL, [(0, 0)]),
    ("bytes=0-0", 0, FULL, [(0, 0)]),
    ("bytes=-5", 0, FULL, [(0, 0)]),
    ("bytes=-0", 0, FULL, [(0, 0)]),
    # Several ranges.
    ("bytes=0-9,20-29", 100, MULTIPART, [(0, 10), (20, 30)]),
    ("bytes=20-29,0-9", 100, MULTIPART, [(0, 10), (20, 30)]),  # unsorted
    ("bytes=0-9,10-19", 100, PARTIAL, [(0, 20)]),  # adjacent
    ("bytes=0-9,11-19", 100, MULTIPART, [(0, 10), (11, 20)]),  # one-byte gap stays
    ("bytes=0-9,5-14", 100, PARTIAL, [(0, 15)]),  # overlapping
    ("bytes=0-50,10-20", 100, PARTIAL, [(0, 51)]),  # contained
    ("bytes=0-9,0-9", 100, PARTIAL, [(0, 10)]),  # duplicate
    ("bytes=50-59,-10,0-9", 100, MULTIPART, [(0, 10), (50, 60), (90, 100)]),
    ("bytes=-10,85-94", 100, PARTIAL, [(85, 100)]),  # suffix overlapping an int-range
    ("bytes=30-39,0-9,35-,12-12", 100, MULTIPART, [(0, 10), (12, 13), (30, 100)]),
    ("bytes=0-0,2-2,1-1", 100, PARTIAL, [(0, 3)]),  # chain of adjacent ranges
]


@pytest.mark.parametrize(("header", "size", "outcome", "ranges"), RESOLVE_CASES)
def test_resolve_ranges(
    header: str, size: int, outcome: RangeOutcome, ranges: list[tuple[int, int]]
) -> None:
    specs = parse_range_header(header)
    assert specs is not None
    decision = resolve_ranges(specs, size)
    assert decision.outcome is outcome
    assert spans(decision) == ranges


def _every_other_byte(count: int) -> str:
    return "bytes=" + ",".join(f"{2 * i}-{2 * i}" for i in range(count))


@pytest.mark.parametrize(
    ("count", "outcome", "n_ranges"),
    [(MAX_RANGES, MULTIPART, MAX_RANGES), (MAX_RANGES + 1, FULL, 1)],
    ids=["at-limit", "over-limit"],
)
def test_max_ranges_limit(count: int, outcome: RangeOutcome, n_ranges: int) -> None:
    specs = parse_range_header(_every_other_byte(count))
    assert specs is not None
    decision = resolve_ranges(specs, 10_000)
    assert decision.outcome is outcome
    assert len(decision.ranges) == n_ranges
    if outcome is FULL:
        assert spans(decision) == [(0, 10_000)]


def test_max_ranges_counts_after_coalescing() -> None:
    # 1000 specs that merge into one range are not "too many ranges".
    specs = [RangeSpec(i, i) for i in range(1000)]
    decision = resolve_ranges(specs, 10_000)
    assert decision == RangeDecision(PARTIAL, (ByteRange(0, 1000),))


def test_resolve_ranges_without_specs_is_unsatisfiable() -> None:
    assert resolve_ranges([], 10) == RangeDecision(UNSATISFIABLE, ())


def test_resolve_ranges_rejects_negative_size() -> None:
    with pytest.raises(ValueError, match="size"):
        resolve_ranges([RangeSpec(0, 0)], -1)


# --------------------------------------------------------------------------- If-Range

IF_RANGE_CASES = [
    # (If-Range, etag, last_modified, honoured)
    (None, ETAG, DATE, True),
    (None, None, None, True),
    (ETAG, ETAG, None, True),
    (f" {ETAG} ", ETAG, None, True),
    ('"other"', ETAG, DATE, False),
    ('W/"abc"', ETAG, DATE, False),  # weak tags never match strongly
    (ETAG, 'W/"abc"', DATE, False),
    ('W/"abc"', 'W/"abc"', DATE, False),
    (ETAG, None, DATE, False),
    ('"abc', ETAG, DATE, False),  # malformed tag
    ('"ABC"', ETAG, DATE, False),  # case-sensitive
    (DATE, ETAG, DATE, True),
    (DATE_RFC850, None, DATE, True),  # same instant, obsolete format
    (DATE_ASCTIME, None, DATE, True),
    (DATE, None, DATE_ASCTIME, True),
    (EARLIER, ETAG, DATE, False),
    (LATER, ETAG, DATE, False),
    (DATE, ETAG, None, False),  # no Last-Modified to compare with
    (DATE, ETAG, "not a date", False),
    ("not a date", ETAG, DATE, False),
    ("", ETAG, DATE, False),
    ("abc", "abc", DATE, False),  # unquoted: neither a tag nor a date
]


@pytest.mark.parametrize(("if_range", "etag", "last_modified", "honoured"), IF_RANGE_CASES)
def test_evaluate_if_range(
    if_range: str | None, etag: str | None, last_modified: str | None, honoured: bool
) -> None:
    assert evaluate_if_range(if_range, etag, last_modified) is honoured


# --------------------------------------------------------------------------- decide

DECIDE_CASES = [
    # (method, Range, If-Range, size, outcome, ranges)
    ("GET", None, None, 100, FULL, [(0, 100)]),
    ("GET", "bytes=0-9", None, 100, PARTIAL, [(0, 10)]),
    ("HEAD", "bytes=0-9", None, 100, PARTIAL, [(0, 10)]),
    ("HEAD", "bytes=100-", None, 100, UNSATISFIABLE, []),
    ("GET", "bytes=100-", None, 100, UNSATISFIABLE, []),
    ("GET", "bytes=0-0,5-5", None, 100, MULTIPART, [(0, 1), (5, 6)]),
    ("POST", "bytes=0-9", None, 100, FULL, [(0, 100)]),
    ("PUT", "bytes=100-", None, 100, FULL, [(0, 100)]),
    ("OPTIONS", "bytes=0-9", None, 100, FULL, [(0, 100)]),
    ("get", "bytes=0-9", None, 100, FULL, [(0, 100)]),  # methods are case-sensitive
    ("GET", "bytes=5-4", None, 100, FULL, [(0, 100)]),  # invalid Range is ignored
    ("GET", "items=0-9", None, 100, FULL, [(0, 100)]),
    ("GET", "bytes=0-9", ETAG, 100, PARTIAL, [(0, 10)]),
    ("GET", "bytes=0-9", '"stale"', 100, FULL, [(0, 100)]),
    ("GET", "bytes=100-", '"stale"', 100, FULL, [(0, 100)]),  # no 416 either
    ("GET", "bytes=0-9", DATE, 100, PARTIAL, [(0, 10)]),
    ("GET", "bytes=0-9", EARLIER, 100, FULL, [(0, 100)]),
    ("GET", None, '"stale"', 100, FULL, [(0, 100)]),
    ("GET", "bytes=0-", None, 0, FULL, [(0, 0)]),
    ("HEAD", None, None, 0, FULL, [(0, 0)]),
]


@pytest.mark.parametrize(
    ("method", "range_header", "if_range", "size", "outcome", "ranges"), DECIDE_CASES
)
def test_decide(
    method: str,
    range_header: str | None,
    if_range: str | None,
    size: int,
    outcome: RangeOutcome,
    ranges: list[tuple[int, int]],
) -> None:
    decision = decide(method, range_header, if_range, size, ETAG, DATE)
    assert decision.outcome is outcome
    assert spans(decision) == ranges


# --------------------------------------------------------------------------- entity-tags

# RFC 9110 §8.8.3.2's comparison table, plus malformed inputs.
MATCH_CASES = [
    # (a, b, strong, weak)
    ('W/"1"', 'W/"1"', False, True),
    ('W/"1"', 'W/"2"', False, False),
    ('W/"1"', '"1"', False, True),
    ('"1"', '"1"', True, True),
    ('"1"', '"2"', False, False),
    ('""', '""', True, True),
    ('"a,b"', '"a,b"', True, True),
    ('w/"1"', 'w/"1"', False, False),  # "W/" is case-sensitive; w/ is malformed
    ("1", "1", False, False),  # unquoted
    ('"1', '"1', False, False),
    ('"a b"', '"a b"', False, False),  # space is not an etagc
    ('" 1"', '"1"', False, False),
    ("*", "*", False, False),
    ("", "", False, False),
]


@pytest.mark.parametrize(("a", "b", "strong", "weak"), MATCH_CASES)
def test_entity_tag_comparison(a: str, b: str, strong: bool, weak: bool) -> None:
    assert strong_match(a, b) is strong
    assert strong_match(b, a) is strong
    assert weak_match(a, b) is weak
    assert weak_match(b, a) is weak


ETAG_LIST_CASES = [
    ("*", ("*",)),
    (" * ", ("*",)),
    ('"a"', ('"a"',)),
    ('"a", W/"b" ,"c"', ('"a"', 'W/"b"', '"c"')),
    ('"a,b", "c"', ('"a,b"', '"c"')),  # comma inside the opaque-tag
    ('"a",,\t,"b"', ('"a"', '"b"')),  # empty elements
    ("", ()),
    (" , ", ()),
    ('"a", bogus, "b"', ('"a"', '"b"')),  # malformed element dropped
    ('"a", *', ('"a"',)),  # "*" is only valid alone
    ('"a" "b", "c"', ('"c"',)),
    ('"unterminated', ()),
    ('W/"x", w/"y"', ('W/"x"',)),
]


@pytest.mark.parametrize(("value", "expected"), ETAG_LIST_CASES)
def test_parse_etag_list(value: str, expected: tuple[str, ...]) -> None:
    assert parse_etag_list(value) == expected


# --------------------------------------------------------------------------- preconditions

P = Precondition

PRECONDITION_CASES = [
    # (method, headers, etag, last_modified, expected)
    ("GET", {}, ETAG, DATE, P.PROCEED),
    # If-Match: strong comparison.
    ("GET", {"If-Match": ETAG}, ETAG, DATE, P.PROCEED),
    ("GET", {"If-Match": '"x", "abc"'}, ETAG, DATE, P.PROCEED),
    ("GET", {"If-Match": '"x"'}, ETAG, DATE, P.FAILED),
    ("GET", {"If-Match": 'W/"abc"'}, ETAG, DATE, P.FAILED),
    ("GET", {"If-Match": ETAG}, 'W/"abc"', DATE, P.FAILED),
    ("GET", {"If-Match": "*"}, ETAG, DATE, P.PROCEED),
    ("GET", {"If-Match": "*"}, None, DATE, P.FAILED),
    ("GET", {"If-Match": ETAG}, None, DATE, P.FAILED),
    ("GET", {"If-Match": ""}, ETAG, DATE, P.FAILED),
    # If-Unmodified-Since.
    ("GET", {"If-Unmodified-Since": DATE}, ETAG, DATE, P.PROCEED),
    ("GET", {"If-Unmodified-Since": LATER}, ETAG, DATE, P.PROCEED),
    ("GET", {"If-Unmodified-Since": EARLIER}, ETAG, DATE, P.FAILED),
    ("GET", {"If-Unmodified-Since": "garbage"}, ETAG, DATE, P.PROCEED),  # invalid: ignored
    ("GET", {"If-Unmodified-Since": EARLIER}, ETAG, None, P.PROCEED),  # nothing to compare
    # Step 1 before step 2: a passing If-Match makes If-Unmodified-Since ignored.
    ("GET", {"If-Match": ETAG, "If-Unmodified-Since": EARLIER}, ETAG, DATE, P.PROCEED),
    ("GET", {"If-Match": '"x"', "If-Unmodified-Since": LATER}, ETAG, DATE, P.FAILED),
    # If-None-Match: weak comparison; 304 for GET/HEAD, 412 otherwise.
    ("GET", {"If-None-Match": ETAG}, ETAG, DATE, P.NOT_MODIFIED),
    ("HEAD", {"If-None-Match": ETAG}, ETAG, DATE, P.NOT_MODIFIED),
    ("GET", {"If-None-Match": 'W/"abc"'}, ETAG, DATE, P.NOT_MODIFIED),
    ("GET", {"If-None-Match": ETAG}, 'W/"abc"', DATE, P.NOT_MODIFIED),
    ("GET", {"If-None-Match": '"x"'}, ETAG, DATE, P.PROCEED),
    ("GET", {"If-None-Match": "*"}, ETAG, DATE, P.NOT_MODIFIED),
    ("GET", {"If-None-Match": "*"}, None, DATE, P.PROCEED),
    ("PUT", {"If-None-Match": ETAG}, ETAG, DATE, P.FAILED),
    ("POST", {"If-None-Match": "*"}, ETAG, DATE, P.FAILED),
    ("DELETE", {"If-None-Match": '"x"'}, ETAG, DATE, P.PROCEED),
    # If-Modified-Since: GET/HEAD only; ignored when If-None-Match is present.
    ("GET", {"If-Modified-Since": DATE}, ETAG, DATE, P.NOT_MODIFIED),
    ("HEAD", {"If-Modified-Since": LATER}, ETAG, DATE, P.NOT_MODIFIED),
    ("GET", {"If-Modified-Since": EARLIER}, ETAG, DATE, P.PROCEED),
    ("GET", {"If-Modified-Since": DATE_RFC850}, ETAG, DATE, P.NOT_MODIFIED),
    ("GET", {"If-Modified-Since": "garbage"}, ETAG, DATE, P.PROCEED),
    ("GET", {"If-Modified-Since": DATE}, ETAG, None, P.PROCEED),
    ("PUT", {"If-Modified-Since": DATE}, ETAG, DATE, P.PROCEED),
    ("GET", {"If-None-Match": '"x"', "If-Modified-Since": DATE}, ETAG, DATE, P.PROCEED),
    ("GET", {"If-None-Match": ETAG, "If-Modified-Since": EARLIER}, ETAG, DATE, P.NOT_MODIFIED),
    # Order across steps: 412 from steps 1-2 wins over 304 from steps 3-4.
    ("GET", {"If-Match": '"x"', "If-None-Match": ETAG}, ETAG, DATE, P.FAILED),
    ("GET", {"If-Unmodified-Since": EARLIER, "If-Modified-Since": DATE}, ETAG, DATE, P.FAILED),
    ("GET", {"If-Match": ETAG, "If-None-Match": ETAG}, ETAG, DATE, P.NOT_MODIFIED),
    ("GET", {"If-Match": ETAG, "If-Modified-Since": DATE}, ETAG, DATE, P.NOT_MODIFIED),
    # Header names are case-insensitive; If-Range is not a precondition here.
    ("GET", {"if-none-match": ETAG}, ETAG, DATE, P.NOT_MODIFIED),
    ("GET", {"IF-MATCH": '"x"'}, ETAG, DATE, P.FAILED),
    ("GET", {"iF-mOdIfIeD-sInCe": DATE}, ETAG, DATE, P.NOT_MODIFIED),
    ("GET", {"If-Range": '"x"'}, ETAG, DATE, P.PROCEED),
]


@pytest.mark.parametrize(
    ("method", "headers", "etag", "last_modified", "expected"), PRECONDITION_CASES
)
def test_evaluate_preconditions(
    method: str,
    headers: dict[str, str],
    etag: str | None,
    last_modified: str | None,
    expected: Precondition,
) -> None:
    assert evaluate_preconditions(method, headers, etag, last_modified) is expected


class _MultiHeaders(dict[str, str]):
    """A Mapping whose items() repeats a name, like aiohttp's CIMultiDict."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__(pairs)
        self._pairs = pairs

    def items(self) -> list[tuple[str, str]]:  # type: ignore[override]
        return list(self._pairs)


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        # Repeated list fields combine (RFC 9110 §5.3): either line may match.
        ([("If-None-Match", '"x"'), ("if-none-match", ETAG)], P.NOT_MODIFIED),
        ([("If-None-Match", ETAG), ("If-None-Match", '"x"')], P.NOT_MODIFIED),
        ([("If-Match", '"x"'), ("If-Match", ETAG)], P.PROCEED),
        ([("If-Match", ETAG), ("IF-MATCH", '"x"')], P.PROCEED),
        # A repeated date field is not a valid HTTP-date and is ignored.
        ([("If-Modified-Since", DATE), ("If-Modified-Since", DATE)], P.PROCEED),
        ([("If-Unmodified-Since", EARLIER), ("If-Unmodified-Since", EARLIER)], P.PROCEED),
    ],
)
def test_evaluate_preconditions_repeated_fields(
    pairs: list[tuple[str, str]], expected: Precondition
) -> None:
    headers = _MultiHeaders(pairs)
    assert evaluate_preconditions("GET", headers, ETAG, DATE) is expected


# --------------------------------------------------------------------------- Content-Range

VALID_CONTENT_RANGES = [
    ("bytes 0-499/1234", ContentRange(0, 500, 1234)),
    ("bytes 0-0/1", ContentRange(0, 1, 1)),
    ("bytes 1233-1233/1234", ContentRange(1233, 1234, 1234)),
    ("bytes 5-9/*", ContentRange(5, 10, None)),
    ("bytes */1234", ContentRange(None, None, 1234)),
    ("bytes */0", ContentRange(None, None, 0)),
    ("BYTES 0-1/2", ContentRange(0, 2, 2)),
    (" bytes 0-1/2 ", ContentRange(0, 2, 2)),  # outer OWS is not part of the value
    ("bytes 007-009/010", ContentRange(7, 10, 10)),
]


@pytest.mark.parametrize(("value", "expected"), VALID_CONTENT_RANGES)
def test_parse_content_range_valid(value: str, expected: ContentRange) -> None:
    assert parse_content_range(value) == expected


INVALID_CONTENT_RANGES = [
    "",
    "bytes",
    "bytes ",
    "bytes */*",
    "bytes 5-4/10",  # last < first
    "bytes 0-10/10",  # last >= size
    "bytes 0-0/0",
    "bytes 0-9",
    "bytes 0-/10",
    "bytes -9/10",
    "bytes 0 9/10",
    "bytes  0-9/10",  # two spaces
    "bytes\t0-9/10",
    "bytes=0-9/10",
    "bytes 0-9 /10",
    "bytes 0-9/ 10",
    "bytes 0-9/10/10",
    "bytes +0-9/10",
    "bytes 0-9/-10",
    "bytes 0x0-9/10",
    "bytes 0-9/1e3",
    "bytes ٠-٩/١٠",
    "items 0-9/10",
    "bytes 0-9/10000000000000000000",  # 20 digits
    "bytes 10000000000000000000-10000000000000000001/*",
    "bytes *",
    "bytes */",
    "bytes 0-9/",
]


@pytest.mark.parametrize("value", INVALID_CONTENT_RANGES)
def test_parse_content_range_invalid(value: str) -> None:
    assert parse_content_range(value) is None


# --------------------------------------------------------------------------- multipart


def test_plan_multipart_exact_layout() -> None:
    data = bytes(range(100))
    plan = plan_multipart([ByteRange(0, 2), ByteRange(10, 13)], 100, "application/x-hdf5", "B0U")
    assert plan.boundary == "B0U"
    assert plan.content_type == "multipart/byteranges; boundary=B0U"
    assert plan.parts == (
        (
            b"\r\n--B0U\r\nContent-Type: application/x-hdf5\r\n"
            b"Content-Range: bytes 0-1/100\r\n\r\n",
            ByteRange(0, 2),
        ),
        (
            b"\r\n--B0U\r\nContent-Type: application/x-hdf5\r\n"
            b"Content-Range: bytes 10-12/100\r\n\r\n",
            ByteRange(10, 13),
        ),
    )
    assert plan.closing == b"\r\n--B0U--\r\n"
    body = b"".join(h + data[r.start : r.end] for h, r in plan.parts) + plan.closing
    assert plan.content_length == len(body) == 75 + 2 + 77 + 3 + 11


def test_plan_multipart_without_content_type_omits_the_line() -> None:
    plan = plan_multipart([ByteRange(0, 1), ByteRange(2, 3)], 3, "", "b")
    assert plan.parts[0][0] == b"\r\n--b\r\nContent-Range: bytes 0-0/3\r\n\r\n"


@pytest.mark.parametrize(
    ("boundary", "parameter"),
    [
        ("simple_boundary-1.2", "simple_boundary-1.2"),
        ("a:b", '"a:b"'),
        ("with space", '"with space"'),
        ("x" * 70, "x" * 70),
    ],
)
def test_plan_multipart_quotes_boundary_when_needed(boundary: str, parameter: str) -> None:
    plan = plan_multipart([ByteRange(0, 1)], 1, "text/plain", boundary)
    assert plan.content_type == f"multipart/byteranges; boundary={parameter}"


@pytest.mark.parametrize(
    ("ranges", "size", "content_type", "boundary", "message"),
    [
        ([], 10, "text/plain", "b", "at least one range"),
        ([ByteRange(0, 1)], 10, "text/plain", "", "boundary"),
        ([ByteRange(0, 1)], 10, "text/plain", "x" * 71, "boundary"),
        ([ByteRange(0, 1)], 10, "text/plain", "ends with space ", "boundary"),
        ([ByteRange(0, 1)], 10, "text/plain", "a\r\nb", "boundary"),
        ([ByteRange(0, 1)], 10, "text/plain", 'a"b', "boundary"),
        ([ByteRange(0, 1)], 10, "text/plain\r\nX-Evil: 1", "b", "Content-Type"),
        ([ByteRange(0, 1)], 10, "text/plain\x00", "b", "Content-Type"),
        ([ByteRange(0, 1)], 10, "text/plain; name=\u2603", "b", "Content-Type"),
        ([ByteRange(5, 11)], 10, "text/plain", "b", "cannot be sent"),
        ([ByteRange(5, 5)], 10, "text/plain", "b", "cannot be sent"),
    ],
)
def test_plan_multipart_rejects_bad_input(
    ranges: list[ByteRange], size: int, content_type: str, boundary: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_multipart(ranges, size, content_type, boundary)


# --------------------------------------------------------------------------- properties

sizes = st.integers(min_value=0, max_value=300)
positions = st.integers(min_value=0, max_value=400)
range_specs = st.one_of(
    positions.map(lambda n: RangeSpec(None, n)),
    positions.map(lambda a: RangeSpec(a, None)),
    st.tuples(positions, st.integers(0, 100)).map(lambda t: RangeSpec(t[0], t[0] + t[1])),
)
spec_lists = st.lists(range_specs, min_size=1, max_size=90)


def _selected_bytes(spec: RangeSpec, size: int) -> range:
    """Reference model: the byte offsets RFC 9110 §14.1.3 says ``spec`` selects."""
    if spec.first is None:
        assert spec.last is not None
        return range(max(0, size - spec.last) if spec.last else size, size)
    last = size - 1 if spec.last is None else min(spec.last, size - 1)
    return range(spec.first, last + 1)


def _runs(offsets: set[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for offset in sorted(offsets):
        if runs and runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], offset + 1)
        else:
            runs.append((offset, offset + 1))
    return runs


@given(specs=spec_lists, size=sizes)
def test_resolved_ranges_are_in_bounds_sorted_disjoint_and_apart(
    specs: list[RangeSpec], size: int
) -> None:
    decision = resolve_ranges(specs, size)
    if decision.outcome is FULL:
        assert decision.ranges == (ByteRange(0, size),)
        return
    for r in decision.ranges:
        assert 0 <= r.start < r.end <= size
    for before, after in zip(decision.ranges, decision.ranges[1:], strict=False):
        assert before.end < after.start  # sorted, disjoint and not adjacent
    expected_count = {PARTIAL: 1, UNSATISFIABLE: 0}.get(decision.outcome)
    if expected_count is None:
        assert 2 <= len(decision.ranges) <= MAX_RANGES
    else:
        assert len(decision.ranges) == expected_count


@given(specs=spec_lists, size=sizes)
def test_resolved_ranges_cover_exactly_the_requested_bytes(
    specs: list[RangeSpec], size: int
) -> None:
    wanted = _runs({offset for spec in specs for offset in _selected_bytes(spec, size)})
    decision = resolve_ranges(specs, size)
    if size == 0 or len(wanted) > MAX_RANGES:
        assert decision == RangeDecision(FULL, (ByteRange(0, size),))
    elif not wanted:
        assert decision == RangeDecision(UNSATISFIABLE, ())
    else:
        assert decision.outcome is (PARTIAL if len(wanted) == 1 else MULTIPART)
        assert spans(decision) == wanted


@given(specs=spec_lists, size=sizes)
def test_resolve_ranges_ignores_order_of_specs(specs: list[RangeSpec], size: int) -> None:
    assert resolve_ranges(specs, size) == resolve_ranges(list(reversed(specs)), size)


ows = st.sampled_from(["", " ", "\t", "  ", " \t"])


@given(
    specs=spec_lists,
    unit=st.sampled_from(["bytes", "BYTES", "Bytes", "bYtEs"]),
    blanks=st.lists(ows, min_size=200, max_size=200),
)
def test_range_header_round_trips(specs: list[RangeSpec], unit: str, blanks: list[str]) -> None:
    def written(spec: RangeSpec) -> str:
        first = "" if spec.first is None else str(spec.first)
        last = "" if spec.last is None else str(spec.last)
        return f"{first}-{last}"

    elements = [f"{blanks[2 * i]}{written(s)}{blanks[2 * i + 1]}" for i, s in enumerate(specs)]
    header = f"{blanks[-1]}{unit}{blanks[-2]}={blanks[-3]}" + ",".join(elements)
    assert parse_range_header(header) == tuple(specs)


@given(text=st.text(max_size=40))
def test_parse_range_header_never_raises_and_returns_valid_specs(text: str) -> None:
    result = parse_range_header("bytes=" + text)
    assert result is None or (len(result) >= 1 and all(isinstance(s, RangeSpec) for s in result))


@given(
    size=st.integers(min_value=1, max_value=10**18),
    data=st.data(),
)
def test_content_range_round_trips(size: int, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, size - 1))
    end = data.draw(st.integers(start + 1, size))
    text = ByteRange(start, end).content_range(size)
    assert parse_content_range(text) == ContentRange(start, end, size)


@given(text=st.text(max_size=30))
def test_parse_content_range_never_returns_inconsistent_ranges(text: str) -> None:
    parsed = parse_content_range("bytes " + text)
    if parsed is not None and parsed.start is not None and parsed.end is not None:
        assert 0 <= parsed.start < parsed.end
        assert parsed.size is None or parsed.end <= parsed.size


boundaries = st.text(
    alphabet="0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?",
    min_size=8,
    max_size=70,
)


@given(
    payload=st.binary(min_size=1, max_size=300),
    data=st.data(),
    boundary=boundaries,
    content_type=st.sampled_from(["", "application/octet-stream", "text/plain; charset=utf-8"]),
)
def test_multipart_plan_matches_the_body_it_describes(
    payload: bytes, data: st.DataObject, boundary: str, content_type: str
) -> None:
    size = len(payload)
    # Any in-bounds ranges, overlapping or unsorted too: the layout must not care.
    starts = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=12))
    ranges = [ByteRange(s, data.draw(st.integers(s + 1, size))) for s in starts]
    delimiter = b"\r\n--" + boundary.encode()
    assume(delimiter not in payload)

    plan = plan_multipart(ranges, size, content_type, boundary)
    body = b"".join(h + payload[r.start : r.end] for h, r in plan.parts) + plan.closing
    assert plan.content_length == len(body)

    # Parse the body back as RFC 2046 would and check every part.
    chunks = body.split(delimiter)
    assert chunks[0] == b""  # empty preamble
    assert chunks[-1] == b"--\r\n"  # close-delimiter, no epilogue
    assert len(chunks) - 2 == len(ranges)
    for chunk, r in zip(chunks[1:-1], ranges, strict=True):
        head, blank, content = chunk.partition(b"\r\n\r\n")
        assert blank
        lines = head.split(b"\r\n")
        assert lines[0] == b""  # the delimiter line ends right after the boundary
        fields = dict(line.decode().split(": ", 1) for line in lines[1:])
        assert parse_content_range(fields["Content-Range"]) == ContentRange(r.start, r.end, size)
        assert fields.get("Content-Type", "") == content_type
        assert content == payload[r.start : r.end]


# RFC 9110 §8.8.3: etagc = %x21 / %x23-7E / obs-text
etag_chars = st.sampled_from([chr(c) for c in (0x21, *range(0x23, 0x7F), *range(0x80, 0x100))])
entity_tags = st.builds(
    lambda weak, opaque: ("W/" if weak else "") + f'"{opaque}"',
    st.booleans(),
    st.text(alphabet=etag_chars, max_size=10),
)


@given(tags=st.lists(entity_tags, max_size=8), blanks=st.lists(ows, min_size=16, max_size=16))
def test_etag_list_round_trips(tags: list[str], blanks: list[str]) -> None:
    value = ",".join(f"{blanks[2 * i]}{t}{blanks[2 * i + 1]}" for i, t in enumerate(tags))
    assert parse_etag_list(value) == tuple(tags)


@given(a=entity_tags, b=entity_tags)
def test_strong_match_implies_weak_match(a: str, b: str) -> None:
    assert strong_match(a, b) == strong_match(b, a)
    assert weak_match(a, b) == weak_match(b, a)
    if strong_match(a, b):
        assert weak_match(a, b)
    assert weak_match(a, a)
    assert strong_match(a, a) is not a.startswith("W/")
