"""Conditional requests (RFC 9110 §13): entity-tag comparison, If-Range, and the
preconditions If-Match, If-None-Match, If-Modified-Since, If-Unmodified-Since. Pure.

Entity-tags are handled as they appear on the wire, quotes and ``W/`` included.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# RFC 9110 §5.6.3: optional whitespace (OWS) is spaces and horizontal tabs only.
OWS = " \t"
# Methods for which a failed If-None-Match means 304 rather than 412 (§13.1.2).
_SAFE_METHODS = frozenset({"GET", "HEAD"})

# RFC 9110 §8.8.3: entity-tag = [ weak ] opaque-tag; weak = %s"W/" (case-sensitive);
# opaque-tag = DQUOTE *etagc DQUOTE; etagc = %x21 / %x23-7E / obs-text.
_ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
# One element of a #entity-tag list: the tag, OWS, then a comma or the end.
_ETAG_ELEMENT = re.compile(r'((?:W/)?"[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|\Z)')


def _opaque_tag(tag: str) -> tuple[bool, str] | None:
    """(is_weak, opaque-tag) of a well-formed entity-tag, else None."""
    match = _ENTITY_TAG.fullmatch(tag)
    if match is None:
        return None
    return match[1] is not None, match[2]


def strong_match(a: str, b: str) -> bool:
    """RFC 9110 §8.8.3.2 strong comparison: both well-formed, neither weak,
    opaque-tags identical character by character."""
    parsed_a, parsed_b = _opaque_tag(a), _opaque_tag(b)
    if parsed_a is None or parsed_b is None:
        return False
    return not parsed_a[0] and not parsed_b[0] and parsed_a[1] == parsed_b[1]


def weak_match(a: str, b: str) -> bool:
    """RFC 9110 §8.8.3.2 weak comparison: opaque-tags identical, either or
    both may be weak."""
    parsed_a, parsed_b = _opaque_tag(a), _opaque_tag(b)
    if parsed_a is None or parsed_b is None:
        return False
    return parsed_a[1] == parsed_b[1]


def parse_etag_list(value: str) -> tuple[str, ...]:
    """Entity-tags of an If-Match / If-None-Match value, as written.

    ``"*"`` gives ``("*",)``. Malformed elements are dropped: a tag that cannot
    be parsed can never match, so dropping it decides the same as keeping it.
    Commas inside quotes belong to the tag (etagc includes ","), so the list is
    scanned rather than split.
    """
    # RFC 9110 §13.1.1 / §13.1.2: If-Match = "*" / #entity-tag.
    if value.strip(OWS) == "*":
        return ("*",)
    tags: list[str] = []
    pos, end = 0, len(value)
    while True:
        # RFC 9110 §5.6.1.2: skip OWS and empty list elements.
        while pos < end and value[pos] in " \t,":
            pos += 1
        if pos == end:
            return tuple(tags)
        match = _ETAG_ELEMENT.match(value, pos)
        if match is not None:
            tags.append(match[1])
            pos = match.end()
        else:
            comma = value.find(",", pos)
            pos = end if comma < 0 else comma + 1


def _list_matches(field: str, etag: str | None, *, strong: bool) -> bool:
    """Whether an If-Match / If-None-Match list matches the current etag.
    ``"*"`` matches whenever the representation has an etag."""
    if etag is None:
        return False
    tags = parse_etag_list(field)
    if tags == ("*",):
        return True
    compare = strong_match if strong else weak_match
    return any(compare(tag, etag) for tag in tags)


def _parse_http_date(text: str) -> datetime | None:
    try:
        parsed = parsedate_to_datetime(text.strip(OWS))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # asctime dates and "-0000" parse without a zone; RFC 9110 §5.6.7 says every
    # HTTP-date is UTC, and naive/aware datetimes would never compare equal.
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def evaluate_if_range(if_range: str | None, etag: str | None, last_modified: str | None) -> bool:
    """True when Range should be honoured (RFC 9110 §13.1.5)."""
    if if_range is None:
        return True
    value = if_range.strip(OWS)
    # RFC 9110 §13.1.5: an entity-tag is told from an HTTP-date by its start,
    # and is compared strongly; a weak tag can therefore never match.
    if value.startswith(('"', "W/")):
        return etag is not None and strong_match(value, etag)
    # RFC 9110 §13.1.5: a date validator must match Last-Modified exactly.
    # Comparing the instants accepts the same date written in another format.
    if last_modified is None:
        return False
    wanted, current = _parse_http_date(value), _parse_http_date(last_modified)
    return wanted is not None and current is not None and wanted == current


class Precondition(enum.Enum):
    PROCEED = "proceed"
    NOT_MODIFIED = "not_modified"  # 304
    FAILED = "failed"  # 412


# Fields that are lists: repeated field lines combine with ", " (RFC 9110 §5.3).
_LIST_FIELDS = ("if-match", "if-none-match")
# Fields holding one HTTP-date: a repeated field is not a valid HTTP-date and
# RFC 9110 §13.1.3 / §13.1.4 say an invalid date is ignored.
_DATE_FIELDS = ("if-modified-since", "if-unmodified-since")


def _precondition_fields(headers: Mapping[str, str]) -> dict[str, str]:
    """The four precondition fields, looked up case-insensitively (RFC 9110
    §5.1). ``headers.items()`` may repeat a name (e.g. aiohttp's CIMultiDict)."""
    values: dict[str, list[str]] = {}
    for name, value in headers.items():
        key = name.lower()
        if key in _LIST_FIELDS or key in _DATE_FIELDS:
            values.setdefault(key, []).append(value)
    fields = {key: ", ".join(values[key]) for key in _LIST_FIELDS if key in values}
    fields |= {key: values[key][0] for key in _DATE_FIELDS if len(values.get(key, ())) == 1}
    return fields


def _modified_after(last_modified: str | None, date_field: str) -> bool | None:
    """Whether Last-Modified is later than ``date_field``; None when either is
    missing or not a valid HTTP-date (the field is then ignored)."""
    if last_modified is None:
        return None
    current, since = _parse_http_date(last_modified), _parse_http_date(date_field)
    if current is None or since is None:
        return None
    return current > since


def evaluate_preconditions(
    method: str,
    headers: Mapping[str, str],
    etag: str | None,
    last_modified: str | None,
) -> Precondition:
    """Steps 1-4 of RFC 9110 §13.2.2 (If-Range, step 5, is in ``decide``)."""
    fields = _precondition_fields(headers)
    if_match = fields.get("if-match")
    if_unmodified_since = fields.get("if-unmodified-since")
    if if_match is not None:
        # Step 1 / §13.1.1: If-Match uses strong comparison.
        if not _list_matches(if_match, etag, strong=True):
            return Precondition.FAILED
    elif if_unmodified_since is not None and _modified_after(last_modified, if_unmodified_since):
        # Step 2 / §13.1.4: false if modified after the date.
        return Precondition.FAILED
    safe = method in _SAFE_METHODS
    if_none_match = fields.get("if-none-match")
    if_modified_since = fields.get("if-modified-since")
    if if_none_match is not None:
        # Step 3 / §13.1.2: If-None-Match uses weak comparison.
        if _list_matches(if_none_match, etag, strong=False):
            return Precondition.NOT_MODIFIED if safe else Precondition.FAILED
    elif (
        safe
        and if_modified_since is not None
        and _modified_after(last_modified, if_modified_since) is False
    ):
        # Step 4 / §13.1.3: only for GET and HEAD; false if not modified since.
        return Precondition.NOT_MODIFIED
    return Precondition.PROCEED


def if_match(etag: str | None, last_modified: str | None) -> dict[str, str]:
    """The precondition that binds a request upstream to the version held: a
    strong ETag's If-Match, else If-Unmodified-Since, so upstream refuses (412)
    rather than send bytes of another version."""
    if etag and not etag.startswith("W/"):
        return {"If-Match": etag}
    if last_modified:
        return {"If-Unmodified-Since": last_modified}
    return {}
