"""The S3 REST API as the S3 endpoint speaks it. Pure.

Which operation a request is (path-style: ``/<bucket>/<key>``), the upstream
URL of its object, what of a listing's query goes upstream, and the daemon's
errors worded as S3's XML with S3's codes, so that every SDK (botocore,
aws-c-s3, MinIO's clients) raises what its users expect.

Only reads exist here: GetObject and HeadObject are served from the cache,
ListObjects(V2) forwarded upstream, HeadBucket, GetBucketLocation and
ListBuckets answered from the configuration. Every write is AccessDenied (the
endpoint is a read-only cache) and every other operation NotImplemented.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, quote, unquote
from xml.sax.saxutils import escape

from nwbcache.urls import InvalidURL, UpstreamURL, parse_upstream_url

from .errors import (
    BadRequest,
    NotAllowed,
    PreconditionFailed,
    ProxyError,
    RangeNotSatisfiable,
)

S3_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
# S3's own limit on a key's length, in bytes of UTF-8.
MAX_KEY_BYTES = 1024
# The DANDI bucket lives in us-east-2; its usual URL does not say so.
KNOWN_REGIONS: Mapping[str, str] = {"dandiarchive.s3.amazonaws.com": "us-east-2"}
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_REGION_IN_HOST = re.compile(r"(?:^|\.)s3[.-]([a-z]{2}(?:-gov)?-[a-z]+-\d)\.amazonaws\.com$")
# Query parameters that carry a request's signature for this endpoint (SigV4
# presigning, botocore's operation marker) or only override response headers:
# never part of what is asked upstream.
_IGNORED_PREFIXES = ("x-amz-", "response-")
_IGNORED = frozenset({"x-id", "awsaccesskeyid", "signature", "expires"})
LIST_V2_PARAMS = frozenset(
    {
        "list-type",
        "prefix",
        "delimiter",
        "max-keys",
        "continuation-token",
        "start-after",
        "fetch-owner",
        "encoding-type",
    }
)
LIST_V1_PARAMS = frozenset({"prefix", "delimiter", "marker", "max-keys", "encoding-type"})
_OBJECT_PARAMS = frozenset({"versionId"})
_WRITES = frozenset({"PUT", "POST", "DELETE", "PATCH"})


class Operation(enum.StrEnum):
    """What an S3 request asks; a bounded set, used as a metrics label."""

    GET_OBJECT = "GetObject"
    HEAD_OBJECT = "HeadObject"
    LIST_OBJECTS_V2 = "ListObjectsV2"
    LIST_OBJECTS = "ListObjects"
    HEAD_BUCKET = "HeadBucket"
    GET_BUCKET_LOCATION = "GetBucketLocation"
    LIST_BUCKETS = "ListBuckets"
    WRITE = "Write"
    UNSUPPORTED = "Unsupported"


class S3Error(ProxyError):
    """An answer worded by the S3 endpoint itself, with S3's error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, status=status)
        self.code = code


@dataclasses.dataclass(frozen=True, slots=True)
class S3Request:
    operation: Operation
    bucket: str = ""  # "" for the service (ListBuckets)
    key: str = ""  # decoded; "" for a bucket's operations
    query: tuple[tuple[str, str], ...] = ()  # decoded, without signature parameters


@dataclasses.dataclass(frozen=True, slots=True)
class Bucket:
    """``--s3-bucket NAME=URL``: a bucket name on the endpoint and the upstream
    URL its keys are under (virtual-hosted or path-style)."""

    name: str
    base: str  # the URL without a trailing slash
    region: str

    @classmethod
    def parse(cls, entry: str) -> Bucket:
        name, sep, url = entry.strip().partition("=")
        name, url = name.strip(), url.strip().rstrip("/")
        if not sep or not name or not url:
            raise ValueError(f"--s3-bucket takes NAME=URL, got {entry!r}")
        if not _BUCKET_NAME.fullmatch(name):
            raise ValueError(f"--s3-bucket: {name!r} is not an S3 bucket name")
        try:
            some_key = parse_upstream_url(url + "/key")  # validates the part before the key
        except InvalidURL as exc:
            raise ValueError(f"--s3-bucket {name}: {exc}") from None
        if some_key.scheme not in ("http", "https") or some_key.query:
            raise ValueError(f"--s3-bucket {name}: give an http(s) URL without a query")
        base = f"{some_key.scheme}://{some_key.netloc}{some_key.path.removesuffix('/key')}"
        return cls(name, base, _region(some_key.host))

    @property
    def root(self) -> UpstreamURL:
        """The bucket's own URL (what a listing asks; what the allow-list must permit)."""
        return self._url("")

    def _url(self, query: str) -> UpstreamURL:
        # Not parse_upstream_url: that wants an object's path, and this is the
        # bucket's (its parts were validated by parse).
        some_key = parse_upstream_url(self.base + "/key")
        path = some_key.path.removesuffix("key")
        return UpstreamURL(some_key.scheme, some_key.host, some_key.port, path, query)

    def object_url(self, key: str, query: Iterable[tuple[str, str]] = ()) -> UpstreamURL:
        """The upstream URL of ``key``: the same URL, byte for byte, that a
        proxied URL of the object names, so both forms share a cache entry.
        Raises BadRequest for a key that cannot be a URL path."""
        path = quote(key, safe="/")  # S3's canonical escaping: unreserved characters kept
        kept = [(n, v) for n, v in query if n in _OBJECT_PARAMS]
        url = f"{self.base}/{path}"
        if kept:
            url += "?" + "&".join(f"{n}={quote(v, safe='')}" for n, v in kept)
        try:
            return parse_upstream_url(url)
        except InvalidURL as exc:
            raise BadRequest(f"this key cannot be fetched: {exc}") from None

    def list_url(self, query: Iterable[tuple[str, str]], allowed: frozenset[str]) -> UpstreamURL:
        """The upstream URL of a listing: the ``allowed`` parameters, sorted, so one
        listing asked in any order is one cache entry."""
        kept = sorted((n, v) for n, v in query if n in allowed)
        return self._url("&".join(f"{quote(n, safe='')}={quote(v, safe='')}" for n, v in kept))


def _region(host: str) -> str:
    match = _REGION_IN_HOST.search(host)
    return match.group(1) if match else KNOWN_REGIONS.get(host, "us-east-1")


def _signature_or_marker(name: str) -> bool:
    low = name.lower()
    return low in _IGNORED or low.startswith(_IGNORED_PREFIXES)


def classify(method: str, raw_path: str, raw_query: str) -> S3Request:
    """The operation a path-style request asks. Raises S3Error (InvalidBucketName,
    KeyTooLongError, InvalidURI) for what cannot be an S3 request."""
    try:
        pairs = parse_qsl(raw_query, keep_blank_values=True, strict_parsing=False)
    except ValueError:
        raise S3Error(400, "InvalidArgument", "the query string cannot be parsed") from None
    query = tuple((n, v) for n, v in pairs if not _signature_or_marker(n))
    names = {n for n, _ in query}
    bucket_raw, _, key_raw = raw_path.lstrip("/").partition("/")
    if not bucket_raw:
        if method in ("GET", "HEAD") and not names:
            return S3Request(Operation.LIST_BUCKETS)
        return S3Request(Operation.WRITE if method in _WRITES else Operation.UNSUPPORTED)
    bucket = unquote(bucket_raw)
    if not _BUCKET_NAME.fullmatch(bucket):
        raise S3Error(400, "InvalidBucketName", "the specified bucket is not valid")
    try:
        key = unquote(key_raw, errors="strict") if key_raw else ""
    except UnicodeDecodeError:
        raise S3Error(400, "InvalidURI", "the key is not UTF-8") from None
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise S3Error(400, "KeyTooLongError", "your key is too long")
    if method in _WRITES:
        return S3Request(Operation.WRITE, bucket, key)
    if method not in ("GET", "HEAD"):
        return S3Request(Operation.UNSUPPORTED, bucket, key)
    return S3Request(_operation(method, key, names), bucket, key, query)


def _operation(method: str, key: str, names: set[str]) -> Operation:
    if key:
        if names <= _OBJECT_PARAMS:
            return Operation.GET_OBJECT if method == "GET" else Operation.HEAD_OBJECT
        return Operation.UNSUPPORTED  # ?acl, ?tagging, ?partNumber, ?attributes, ...
    if method == "HEAD":
        return Operation.HEAD_BUCKET if not names else Operation.UNSUPPORTED
    if names == {"location"}:
        return Operation.GET_BUCKET_LOCATION
    if "list-type" in names and names <= LIST_V2_PARAMS:
        return Operation.LIST_OBJECTS_V2
    if names <= LIST_V1_PARAMS:
        return Operation.LIST_OBJECTS
    return Operation.UNSUPPORTED  # ?versions, ?uploads, ?policy, ?acl, ...


def check_listing(query: Iterable[tuple[str, str]]) -> None:
    """Refuse, before anything is asked upstream, a listing S3 would refuse."""
    for name, value in query:
        if name == "list-type" and value != "2":
            raise S3Error(400, "InvalidArgument", "list-type must be 2")
        if name == "max-keys" and not (value.isdigit() and len(value) <= 9):
            raise S3Error(400, "InvalidArgument", "max-keys must be a non-negative integer")
        if name == "encoding-type" and value != "url":
            raise S3Error(400, "InvalidArgument", "encoding-type must be url")


# -- answers ---------------------------------------------------------------

_BY_STATUS = {
    400: "InvalidRequest",
    401: "AccessDenied",
    403: "AccessDenied",
    404: "NoSuchKey",
    410: "NoSuchKey",
    429: "SlowDown",
    451: "AccessDenied",
    500: "InternalError",
    501: "NotImplemented",
    502: "ServiceUnavailable",
    503: "SlowDown",
    504: "ServiceUnavailable",
    508: "LoopDetected",
}


def error_code(exc: ProxyError) -> str:
    """The S3 error code for one of the daemon's errors."""
    if isinstance(exc, S3Error):
        return exc.code
    if isinstance(exc, RangeNotSatisfiable):
        return "InvalidRange"
    if isinstance(exc, PreconditionFailed):
        return "PreconditionFailed"
    if isinstance(exc, NotAllowed):
        return "AccessDenied"
    if isinstance(exc, BadRequest):
        return "InvalidArgument"
    return _BY_STATUS.get(exc.status, "InternalError")


def error_xml(exc: ProxyError, resource: str, request_id: str, bucket: str, key: str) -> bytes:
    """S3's ``<Error>`` document for ``exc``."""
    fields = [("Code", error_code(exc)), ("Message", exc.message)]
    if bucket:
        fields.append(("BucketName", bucket))
    if key:
        fields.append(("Key", key))
    if isinstance(exc, RangeNotSatisfiable):
        fields += [("RangeRequested", exc.requested), ("ActualObjectSize", str(exc.size))]
    fields += [("Resource", resource), ("RequestId", request_id)]
    return _document("Error", fields, xmlns=False)


def location_xml(region: str) -> bytes:
    """GetBucketLocation's answer: empty for us-east-1, as S3 says it."""
    value = "" if region == "us-east-1" else escape(region)
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<LocationConstraint xmlns="{S3_XMLNS}">{value}</LocationConstraint>'
    ).encode()


def buckets_xml(names: Iterable[str]) -> bytes:
    """ListBuckets' answer: the buckets this endpoint serves."""
    owner = "<Owner><ID>nwbcache</ID><DisplayName>nwbcache</DisplayName></Owner>"
    entries = "".join(
        f"<Bucket><Name>{escape(n)}</Name><CreationDate>1970-01-01T00:00:00.000Z"
        "</CreationDate></Bucket>"
        for n in names
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ListAllMyBucketsResult xmlns="{S3_XMLNS}">'
        f"{owner}<Buckets>{entries}</Buckets></ListAllMyBucketsResult>"
    ).encode()


def _document(root: str, fields: Iterable[tuple[str, str]], *, xmlns: bool) -> bytes:
    attr = f' xmlns="{S3_XMLNS}"' if xmlns else ""
    body = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in fields)
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<{root}{attr}>{body}</{root}>'.encode()
