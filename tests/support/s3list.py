"""ListObjects and ListObjectsV2 as S3 answers them, for the emulator (s3emu.py).

Prefix, delimiter (CommonPrefixes), max-keys, pagination (V2's opaque
continuation token and start-after, V1's marker) and ``encoding-type=url``,
in S3's XML, so that botocore's paginators, s3fs and the AWS CLI list it as
they list S3.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote
from xml.sax.saxutils import escape

__all__ = ["Entry", "list_bucket"]

S3_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
MAX_KEYS = 1000


@dataclass(frozen=True)
class Entry:
    key: str  # within the bucket, no leading slash
    size: int
    etag: str  # quoted
    last_modified: int  # epoch seconds


class ListingError(ValueError):
    """A listing request S3 refuses with 400 InvalidArgument."""


def _token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode()


def _untoken(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ListingError("The continuation token provided is incorrect") from None


def _iso(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(epoch))


def list_bucket(
    bucket: str, entries: Iterable[Entry], query: Mapping[str, str]
) -> tuple[int, bytes]:
    """(status, XML body) of a listing of ``entries`` (any order)."""
    try:
        return 200, _listing(bucket, sorted(entries, key=lambda e: e.key), query)
    except ListingError as exc:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidArgument</Code>'
            f"<Message>{escape(str(exc))}</Message></Error>"
        )
        return 400, body.encode()


def _listing(bucket: str, entries: list[Entry], query: Mapping[str, str]) -> bytes:
    v2 = query.get("list-type") == "2"
    prefix = query.get("prefix", "")
    delimiter = query.get("delimiter", "")
    raw_max = query.get("max-keys", str(MAX_KEYS))
    if not raw_max.isdigit():
        raise ListingError("Provided max-keys not an integer or within integer range")
    max_keys = min(int(raw_max), MAX_KEYS)
    url = query.get("encoding-type") == "url"
    if v2:
        token = query.get("continuation-token")
        after = _untoken(token) if token is not None else query.get("start-after", "")
    else:
        after = query.get("marker", "")

    contents: list[Entry] = []
    prefixes: list[str] = []
    last = ""
    truncated = False
    for entry in entries:
        if not entry.key.startswith(prefix) or entry.key <= after:
            continue
        rolled = ""
        if delimiter:
            cut = entry.key.find(delimiter, len(prefix))
            if cut >= 0:
                rolled = entry.key[: cut + len(delimiter)]
        if rolled and (rolled == last or rolled <= after):
            continue  # under a common prefix already given
        if len(contents) + len(prefixes) == max_keys:
            truncated = True
            break
        if rolled:
            prefixes.append(rolled)
            last = rolled
        else:
            contents.append(entry)
            last = entry.key

    def enc(text: str) -> str:
        return escape(quote(text, safe="/") if url else text)

    parts = [f"<Name>{escape(bucket)}</Name>", f"<Prefix>{enc(prefix)}</Prefix>"]
    if v2:
        parts.append(f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>")
        if "continuation-token" in query:
            parts.append(
                f"<ContinuationToken>{escape(query['continuation-token'])}</ContinuationToken>"
            )
        if "start-after" in query:
            parts.append(f"<StartAfter>{enc(query['start-after'])}</StartAfter>")
    else:
        parts.append(f"<Marker>{enc(after)}</Marker>")
    parts.append(f"<MaxKeys>{max_keys}</MaxKeys>")
    if delimiter:
        parts.append(f"<Delimiter>{enc(delimiter)}</Delimiter>")
    if url:
        parts.append("<EncodingType>url</EncodingType>")
    parts.append(f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>")
    if truncated:
        if v2:
            parts.append(f"<NextContinuationToken>{_token(last)}</NextContinuationToken>")
        else:
            parts.append(f"<NextMarker>{enc(last)}</NextMarker>")
    for e in contents:
        parts.append(
            f"<Contents><Key>{enc(e.key)}</Key><LastModified>{_iso(e.last_modified)}"
            f"</LastModified><ETag>{escape(e.etag)}</ETag><Size>{e.size}</Size>"
            "<StorageClass>STANDARD</StorageClass></Contents>"
        )
    for p in prefixes:
        parts.append(f"<CommonPrefixes><Prefix>{enc(p)}</Prefix></CommonPrefixes>")
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{S3_XMLNS}">'
        + "".join(parts)
        + "</ListBucketResult>"
    ).encode()
