"""The credentials a request carries for upstream, and what the cache may know of them. Pure.

A request may authenticate itself to upstream with presigned query
parameters (S3 SigV2/SigV4, CloudFront) or an ``Authorization`` header. The
daemon forwards them upstream but keeps only a fingerprint (a SHA-256 bound
to the object's cache key): enough to remember that upstream accepted them,
never enough to replay them. Presigned credentials say when they expire
(``X-Amz-Date`` + ``X-Amz-Expires``, or ``Expires``); a remembered
acceptance never outlives that.
"""

from __future__ import annotations

import calendar
import dataclasses
import hashlib
import time
from urllib.parse import unquote

from nwbcache.urls import UpstreamURL, cache_key, is_signature_param, parse_upstream_url

# ``response-*`` parameters ride along with presigned URLs but only override
# response headers: they authenticate nothing.
_NOT_CREDENTIALS = ("response-",)


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    """What a request presents to upstream: signature parameters (name, value as
    sent, sorted) and the Authorization header."""

    params: tuple[tuple[str, str], ...] = ()
    authorization: str | None = None

    @property
    def present(self) -> bool:
        return bool(self.params) or self.authorization is not None

    def fingerprint(self, cache_key: str) -> str:
        """A digest naming these credentials for one object; none of them can be
        recovered from it. Requests without credentials share one fingerprint."""
        h = hashlib.sha256(cache_key.encode("utf-8", "surrogateescape"))
        for name, value in self.params:
            h.update(b"\x00q\x00" + name.encode() + b"=" + value.encode())
        if self.authorization is not None:
            h.update(b"\x00a\x00" + self.authorization.encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def expires_at(self) -> float | None:
        """When presigned credentials stop being valid (epoch seconds), if they say."""
        values = {unquote(n).lower(): unquote(v) for n, v in self.params}
        expires = _integer(values.get("expires"))  # SigV2: the epoch second itself
        if expires is not None:
            return float(expires)
        signed_at = _amz_date(values.get("x-amz-date"))
        lifetime = _integer(values.get("x-amz-expires"))
        if signed_at is not None and lifetime is not None:
            return signed_at + lifetime
        return None


# A request without credentials (most of them: public objects, plain URLs).
NONE = Credentials()


def of_request(query: str, authorization: str | None) -> Credentials:
    """The credentials in a raw query string and an Authorization header value."""
    if not query and not authorization:
        return NONE
    params = []
    for param in query.split("&"):
        name, _, value = param.partition("=")
        if (
            name
            and is_signature_param(name)
            and not unquote(name).lower().startswith(_NOT_CREDENTIALS)
        ):
            params.append((name, value))
    auth = authorization if authorization else None
    return Credentials(tuple(sorted(params)), auth)


def anonymous(url: UpstreamURL) -> UpstreamURL:
    """``url`` without its credentials: the object as anyone may ask for it."""
    return parse_upstream_url(cache_key(url))


def _integer(text: str | None) -> int | None:
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 12:
        return None
    return int(text)


def _amz_date(text: str | None) -> float | None:
    """``20261202T101500Z`` (SigV4's basic ISO 8601, UTC) -> epoch seconds."""
    if text is None:
        return None
    try:
        return float(calendar.timegm(time.strptime(text, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        return None
