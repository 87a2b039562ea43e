"""Range requests (RFC 9110 §14) as pure functions: Range, If-Range, Content-Range, multipart.

No I/O and no web framework: the server passes header strings in and gets a
decision back, so every edge case can be pinned down by table-driven tests.

How a GET/HEAD handler uses this module, in the order of RFC 9110 §13.2.2:

1. ``conditional.evaluate_preconditions`` -> 412 / 304 / proceed (steps 1-4);
2. ``decide`` -> 200 / 206 / 416 (step 5, If-Range, and then Range itself);
3. for a MULTIPART decision, ``plan_multipart`` gives the exact body layout and
   Content-Length before any byte is read.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .conditional import OWS, evaluate_if_range

# Most ranges a 206 multipart answer may carry after coalescing. RFC 9110 §14.2
# lets a server ignore a Range header field with many small ranges; each part
# costs a header and a seek, so a hostile "bytes=0-0,2-2,4-4,..." could make a
# small request expensive. Above this we answer 200 with the whole object.
MAX_RANGES: int = 64


# Longest decimal position we parse. 19 digits already exceed 2**63, far beyond
# any real object, and the cap keeps int() bounded on hostile input.
_MAX_DIGITS = 19

_METHODS_WITH_RANGES = frozenset({"GET", "HEAD"})


# --------------------------------------------------------------------------- ranges


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A half-open byte interval ``[start, end)`` of a representation."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"invalid byte range [{self.start}, {self.end})")

    @property
    def length(self) -> int:
        return self.end - self.start

    def content_range(self, size: int) -> str:
        """The Content-Range field value for this range of a ``size``-byte object."""
        # RFC 9110 §14.4: incl-range names the last byte inclusively, so an empty
        # range cannot be written, and last-pos must be below complete-length.
        if self.start == self.end or self.end > size:
            raise ValueError(f"range [{self.start}, {self.end}) cannot be sent for size {size}")
        return f"bytes {self.start}-{self.end - 1}/{size}"


class RangeOutcome(enum.Enum):
    FULL = "full"  # answer 200 with the whole representation
    PARTIAL = "partial"  # 206 with one range
    MULTIPART = "multipart"  # 206 multipart/byteranges
    UNSATISFIABLE = "unsatisfiable"  # 416 with Content-Range: bytes */size


@dataclass(frozen=True, slots=True)
class RangeDecision:
    """What to answer. ``ranges`` by outcome: FULL ``(ByteRange(0, size),)``;
    PARTIAL one range; MULTIPART two or more, sorted, disjoint and non-adjacent;
    UNSATISFIABLE ``()``."""

    outcome: RangeOutcome
    ranges: tuple[ByteRange, ...]


@dataclass(frozen=True, slots=True)
class RangeSpec:
    """One byte-range-spec as written (RFC 9110 §14.1.1).

    ``a-b``: first=a, last=b. ``a-``: first=a, last=None.
    ``-n`` (suffix-range): first=None, last=n, the suffix length.
    """

    first: int | None
    last: int | None

    def __post_init__(self) -> None:
        if self.first is None:
            valid = self.last is not None and self.last >= 0
        else:
            valid = self.first >= 0 and (self.last is None or self.last >= self.first)
        if not valid:
            raise ValueError(f"invalid range spec first={self.first} last={self.last}")


def _full(size: int) -> RangeDecision:
    return RangeDecision(RangeOutcome.FULL, (ByteRange(0, size),))


def parse_digits(text: str) -> int | None:
    """``1*DIGIT`` (ASCII only: str.isdigit alone would accept "²" or "٣")."""
    if not 0 < len(text) <= _MAX_DIGITS or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def _parse_range_spec(text: str) -> RangeSpec | None:
    first_text, dash, last_text = text.partition("-")
    if not dash:
        return None
    if not first_text:
        # RFC 9110 §14.1.1: suffix-range = "-" suffix-length
        suffix = parse_digits(last_text)
        return None if suffix is None else RangeSpec(None, suffix)
    # RFC 9110 §14.1.1: int-range = first-pos "-" [ last-pos ]
    first = parse_digits(first_text)
    if first is None:
        return None
    if not last_text:
        return RangeSpec(first, None)
    last = parse_digits(last_text)
    # RFC 9110 §14.1.1: "A range-spec is invalid if the last-pos value is present
    # and less than the first-pos."
    if last is None or last < first:
        return None
    return RangeSpec(first, last)


def parse_range_header(value: str) -> tuple[RangeSpec, ...] | None:
    """Parse a Range field value such as ``bytes=0-99,200-,-50``.

    Returns None when the value is invalid or uses another range unit; the
    caller then ignores Range and answers 200 (RFC 9110 §14.2: a server MUST
    ignore a unit it does not understand and MAY ignore an invalid one).
    """
    # RFC 9110 §14.1.1: ranges-specifier = range-unit "=" range-set. OWS around
    # "=" is not in the grammar but is tolerated, as are outer OWS (§5.5).
    unit, equals, range_set = value.partition("=")
    unit = unit.strip(OWS)
    # RFC 9110 §14.1: range units are compared case-insensitively.
    if not equals or not unit.isascii() or unit.lower() != "bytes":
        return None
    specs: list[RangeSpec] = []
    # RFC 9110 §14.1.1: range-set = 1#range-spec, a comma-separated list (§5.6.1).
    for element in range_set.split(","):
        element = element.strip(OWS)
        if not element:
            # RFC 9110 §5.6.1.2: a recipient accepts and ignores empty list elements.
            continue
        spec = _parse_range_spec(element)
        if spec is None:
            return None
        specs.append(spec)
    # "1#" requires at least one non-empty element: "bytes=" and "bytes=," are invalid.
    return tuple(specs) or None


def _satisfiable_range(spec: RangeSpec, size: int) -> ByteRange | None:
    """The bytes ``spec`` selects from a non-empty object, or None if none."""
    first, last = spec.first, spec.last
    if first is None:
        # RFC 9110 §14.1.3: a suffix-range is satisfiable if its length is
        # non-zero; a suffix longer than the object selects the whole object.
        # (`last` is never None here, RangeSpec forbids it; 0 is "-0".)
        if not last:
            return None
        return ByteRange(max(0, size - last), size)
    # RFC 9110 §14.1.3: an int-range is satisfiable if first-pos < length; a
    # missing or too large last-pos is replaced by length - 1.
    if first >= size:
        return None
    end = size if last is None else min(last + 1, size)
    return ByteRange(first, end)


def _coalesce(ranges: list[ByteRange]) -> list[ByteRange]:
    """Sort, then merge ranges that overlap or touch (RFC 9110 §14.3 allows
    a server to coalesce; it also makes the answer independent of the order
    and repetition in the request)."""
    merged: list[ByteRange] = []
    for current in sorted(ranges, key=lambda r: (r.start, r.end)):
        if merged and current.start <= merged[-1].end:
            previous = merged.pop()
            current = ByteRange(previous.start, max(previous.end, current.end))
        merged.append(current)
    return merged


def resolve_ranges(specs: Sequence[RangeSpec], size: int) -> RangeDecision:
    """Apply parsed range specs to an object of ``size`` bytes."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if size == 0:
        # RFC 9110 §14.1.3 would make every int-range on an empty representation
        # unsatisfiable (416), but S3 answers `bytes=0-` on an empty object with
        # 200 and the empty body, and readers such as fsspec ask exactly that.
        # Matching upstream keeps the proxy transparent.
        return _full(0)
    if len(specs) == 1:  # what nearly every request is: no sorting, no merging
        only = _satisfiable_range(specs[0], size)
        if only is None:
            return RangeDecision(RangeOutcome.UNSATISFIABLE, ())
        return RangeDecision(RangeOutcome.PARTIAL, (only,))
    satisfiable = [r for r in (_satisfiable_range(s, size) for s in specs) if r is not None]
    # RFC 9110 §14.1.3: unsatisfiable specs are dropped; the set as a whole is
    # unsatisfiable only when none is left (then §15.5.17: 416).
    merged = _coalesce(satisfiable)
    if not merged:
        return RangeDecision(RangeOutcome.UNSATISFIABLE, ())
    if len(merged) == 1:
        return RangeDecision(RangeOutcome.PARTIAL, (merged[0],))
    if len(merged) > MAX_RANGES:
        # RFC 9110 §14.2: a server MAY ignore Range; see MAX_RANGES.
        return _full(size)
    return RangeDecision(RangeOutcome.MULTIPART, tuple(merged))


def decide(
    method: str,
    range_header: str | None,
    if_range: str | None,
    size: int,
    etag: str | None,
    last_modified: str | None,
) -> RangeDecision:
    """Full, partial, multipart or unsatisfiable answer for a request.

    Call after ``evaluate_preconditions`` (RFC 9110 §13.2.2: If-Range is step 5).
    """
    # RFC 9110 §14.2: "A server MUST ignore a Range header field received with a
    # request method that is unrecognized or for which range handling is not
    # defined" -- only GET is defined. HEAD is treated like GET because §9.3.2
    # says HEAD SHOULD send the header fields GET would (206/416, Content-Range).
    # Methods are case-sensitive (§9.1), so "get" is not GET.
    if method not in _METHODS_WITH_RANGES or range_header is None:
        return _full(size)
    specs = parse_range_header(range_header)
    if specs is None or not evaluate_if_range(if_range, etag, last_modified):
        return _full(size)
    return resolve_ranges(specs, size)


# --------------------------------------------------------------------------- Content-Range


@dataclass(frozen=True, slots=True)
class ContentRange:
    """A parsed Content-Range. ``[start, end)`` is half-open; both are None for
    ``bytes */size``. ``size`` is None for an unknown length (``/*``)."""

    start: int | None
    end: int | None
    size: int | None


def parse_content_range(value: str) -> ContentRange | None:
    """Strictly parse an upstream Content-Range value; None if malformed.

    RFC 9110 §14.4:
        Content-Range = range-unit SP ( range-resp / unsatisfied-range )
        range-resp = incl-range "/" ( complete-length / "*" )
        incl-range = first-pos "-" last-pos
        unsatisfied-range = "*/" complete-length
    """
    unit, space, rest = value.strip(OWS).partition(" ")
    # RFC 9110 §14.1: range units are case-insensitive; bytes is the only one we use.
    if not space or not unit.isascii() or unit.lower() != "bytes":
        return None
    positions, slash, length_text = rest.partition("/")
    if not slash:
        return None
    size = None if length_text == "*" else parse_digits(length_text)
    if size is None and length_text != "*":
        return None
    if positions == "*":
        # unsatisfied-range needs a complete-length: "bytes */*" is invalid.
        return None if size is None else ContentRange(None, None, size)
    first_text, dash, last_text = positions.partition("-")
    first, last = parse_digits(first_text), parse_digits(last_text)
    if not dash or first is None or last is None or last < first:
        return None
    # RFC 9110 §14.4: a response is invalid if last-pos >= complete-length.
    if size is not None and last >= size:
        return None
    return ContentRange(first, last + 1, size)


# --------------------------------------------------------------------------- multipart


@dataclass(frozen=True, slots=True)
class MultipartPlan:
    """Exact layout of a multipart/byteranges body. The body is, for each part,
    its header bytes followed by its range's bytes, then ``closing``."""

    boundary: str
    parts: tuple[tuple[bytes, ByteRange], ...]
    closing: bytes
    content_length: int
    content_type: str


# RFC 2046 §5.1.1: boundary := 0*69<bchars> bcharsnospace (1 to 70 characters).
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
# RFC 9110 §5.6.2: tchar, the characters a parameter value may use unquoted.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5: field-value characters are VCHAR, SP, HTAB and obs-text;
# CR, LF and NUL in particular would let a value inject header lines.
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def plan_multipart(
    ranges: Sequence[ByteRange], size: int, part_content_type: str, boundary: str
) -> MultipartPlan:
    """Lay out a 206 multipart/byteranges body (RFC 9110 §14.6).

    ``boundary`` must not occur in the object's bytes: pass a fresh random one
    (e.g. ``secrets.token_hex(16)``). An empty ``part_content_type`` omits the
    parts' Content-Type, as §14.6 asks when the representation has none.
    """
    if not ranges:
        raise ValueError("a multipart body needs at least one range")  # RFC 2046 §5.1.1
    if _BOUNDARY.fullmatch(boundary) is None:
        raise ValueError(f"invalid multipart boundary {boundary!r}")
    if _FIELD_VALUE.fullmatch(part_content_type) is None:
        raise ValueError(f"invalid Content-Type for a part: {part_content_type!r}")
    type_line = f"Content-Type: {part_content_type}\r\n" if part_content_type else ""
    # Each part opens with the delimiter CRLF "--" boundary (RFC 2046 §5.1.1); the
    # first one's CRLF ends an empty preamble. Then the part's header fields and
    # the blank line that ends them.
    parts = tuple(
        (
            (
                f"\r\n--{boundary}\r\n{type_line}"
                f"Content-Range: {byte_range.content_range(size)}\r\n\r\n"
            ).encode("latin-1"),
            byte_range,
        )
        for byte_range in ranges
    )
    closing = f"\r\n--{boundary}--\r\n".encode("ascii")
    content_length = sum(len(header) + r.length for header, r in parts) + len(closing)
    # The boundary parameter is quoted when it uses characters a token cannot
    # (bchars include ":", "/", "?", "=", space); bchars never need escaping.
    parameter = boundary if _TOKEN.fullmatch(boundary) else f'"{boundary}"'
    return MultipartPlan(
        boundary=boundary,
        parts=parts,
        closing=closing,
        content_length=content_length,
        content_type=f"multipart/byteranges; boundary={parameter}",
    )
