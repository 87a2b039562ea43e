"""Mapping between upstream object URLs and the daemon's proxied URLs.

``<proxy>/<scheme>/<host>[:<port>]/<path>[?<query>]`` stands for
``<scheme>://<host>[:<port>]/<path>[?<query>]``. Shared by the daemon and the
light client package, so this module uses the standard library only (and
:mod:`nwbcache.env`, for the default proxy ``$NWBCACHE_URL``).

The object path is kept percent-encoded exactly as received and is never
decoded: decoding and re-encoding is not an identity (``%2F`` vs ``/``,
``%7E`` vs ``~``, lower- vs upper-case hex), and S3 keys must reach upstream
and the cache key byte-exactly. The only rewrite is escaping raw non-ASCII
characters, which cannot be sent in a request line as they are.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import unicodedata
from collections.abc import Iterable
from typing import NamedTuple
from urllib.parse import quote, unquote

from . import env

__all__ = [
    "DANDI_API_URL",
    "DANDI_HOSTS",
    "ENV_VAR",
    "SIGNATURE_PARAMS",
    "SIGNATURE_PREFIXES",
    "AllowList",
    "AllowRule",
    "InvalidURL",
    "UpstreamURL",
    "cache_key",
    "is_signature_param",
    "original_url",
    "parse_upstream_url",
    "proxied_url",
    "redact_url",
    "upstream_from_proxy_path",
]

ENV_VAR = env.ENV_URL  # the name is env's; kept here for code that imported it from here

_DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443}

# Query parameters that authenticate a request rather than name an object
# (S3 SigV2/SigV4 presigning, CloudFront signed URLs). They differ between two
# presigned URLs of one object, so they are left out of the cache key, and
# they are secrets (or help forge one), so logs never show their values.
SIGNATURE_PARAMS: frozenset[str] = frozenset(
    {
        "signature",
        "expires",
        "awsaccesskeyid",
        "x-amz-security-token",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-date",
        "x-amz-expires",
        "x-amz-algorithm",
        "x-amz-signedheaders",
        "key-pair-id",
        "policy",
    }
)
# ``response-*`` only override response headers (Content-Type, ...), never the
# bytes, so like the signature they are not part of an object's identity.
SIGNATURE_PREFIXES: tuple[str, ...] = ("x-amz-", "response-")

DANDI_HOSTS: tuple[str, ...] = (
    "dandiarchive.s3.amazonaws.com",
    "s3.us-east-2.amazonaws.com/dandiarchive",
    "s3.amazonaws.com/dandiarchive",
)
# The DANDI Archive's API, where asset paths are looked up.
DANDI_API_URL = "https://api.dandiarchive.org/api"

_REDACTED = "REDACTED"
_SCHEME_RE = re.compile(r"[a-z][a-z0-9+.-]{0,15}")
_LABEL_RE = re.compile(r"[a-z0-9_-]{1,63}")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_BAD_ASCII_RE = re.compile(r"[\x00-\x20\x7f\\]")
_BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SLASHES_RE = re.compile(r"[/\\]")
# Every printable ASCII character, "%" included: ``quote`` then escapes only
# what is not ASCII and leaves existing escapes alone.
_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))
_BAD_UNICODE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
_QUERY_PARAM_RE = re.compile(r"([?&#])([^=&#?]*)=([^&#]*)")
_USERINFO_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@")


class InvalidURL(ValueError):
    """A URL or allow-list entry that cannot be used.

    The message says what is wrong; it never contains a query string, so a
    signature cannot leak into an error page or a log.
    """


# -- the parsed form -------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class UpstreamURL:
    """An upstream object URL, validated (build it with :func:`parse_upstream_url`)."""

    scheme: str
    host: str
    port: int | None
    path: str
    query: str

    @property
    def netloc(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else _DEFAULT_PORTS[self.scheme]

    @property
    def url(self) -> str:
        """The URL to request upstream, signature included."""
        base = f"{self.scheme}://{self.netloc}{self.path}"
        return f"{base}?{self.query}" if self.query else base

    def __repr__(self) -> str:
        # The default dataclass repr would put a presigned URL's signature
        # into tracebacks and debug logs.
        return f"UpstreamURL({redact_url(self.url)!r})"


def is_signature_param(name: str) -> bool:
    """Whether a query parameter name (raw or percent-encoded) is a signature parameter."""
    low = unquote(name).lower()
    return low in SIGNATURE_PARAMS or low.startswith(SIGNATURE_PREFIXES)


# -- validation helpers ----------------------------------------------------


def _check_chars(text: str, what: str) -> None:
    """Refuse whitespace, control and invisible characters, and backslashes.

    Parsers disagree about them (WHATWG turns ``\\`` into ``/`` and strips
    tabs; urllib strips newlines), and such disagreement is how a URL that
    looks allowed reaches another host or object.
    """
    if _BAD_ASCII_RE.search(text):
        raise InvalidURL(f"{what} contains whitespace, a control character or a backslash")
    if not text.isascii():
        for char in text:
            if not char.isascii() and (
                char.isspace() or unicodedata.category(char) in _BAD_UNICODE_CATEGORIES
            ):
                raise InvalidURL(f"{what} contains whitespace or an invisible character")


def _escape_non_ascii(text: str) -> str:
    if text.isascii():
        return text
    try:
        # surrogateescape: a byte that arrived undecodable goes back out as itself.
        return quote(text, safe=_PRINTABLE_ASCII, errors="surrogateescape")
    except UnicodeEncodeError:
        raise InvalidURL("URL contains a character that is not valid Unicode") from None


def _check_path(path: str, what: str = "object path") -> None:
    """Refuse malformed escapes and dot segments, literal or encoded.

    A ``..`` would be resolved by some client, proxy or server on the way
    and not by others, so the object fetched could differ from the one the
    allow-list and the cache key saw. ``%2E%2E%2F`` is refused too, in case
    something down the line decodes the slashes before resolving.
    """
    if _BAD_PERCENT_RE.search(path):
        raise InvalidURL(f"{what} contains a '%' that does not start a %XX escape")
    for segment in path.split("/"):
        if "." not in segment and "%" not in segment:
            continue
        decoded = unquote(segment)
        for part in _SLASHES_RE.split(decoded):
            if part in (".", ".."):
                raise InvalidURL(f"{what} contains a '.' or '..' segment")


def _parse_port(text: str) -> int:
    if not _PORT_RE.fullmatch(text):
        raise InvalidURL("port must be a number between 1 and 65535")
    port = int(text)
    if not 1 <= port <= 65535:
        raise InvalidURL("port must be a number between 1 and 65535")
    return port


def _parse_host(text: str) -> str:
    if not text:
        raise InvalidURL("URL has no host")
    if text.startswith("["):
        if not text.endswith("]"):
            raise InvalidURL("unterminated IPv6 literal")
        inner = text[1:-1]
        if "%" in inner:
            raise InvalidURL("IPv6 zone identifiers are not supported")
        try:
            return f"[{ipaddress.IPv6Address(inner).compressed}]"
        except ValueError:
            raise InvalidURL("invalid IPv6 literal") from None
    if not text.isascii():
        raise InvalidURL("host name is not ASCII; give its punycode (xn--) form")
    host = text.lower()
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise InvalidURL(f"invalid host name {host[:64]!r}")
    if all(label.isdigit() for label in labels):
        # No DNS name is all digits, and resolvers read "2130706433" or
        # "0177.0.0.1" as 127.0.0.1: only the dotted-quad form is accepted.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise InvalidURL(f"invalid IPv4 address {host[:64]!r}") from None
    return host


def _parse_authority(authority: str) -> tuple[str, int | None]:
    if not authority:
        raise InvalidURL("URL has no host")
    if "@" in authority:
        raise InvalidURL("credentials in the URL (user@host) are not allowed")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise InvalidURL("unterminated IPv6 literal")
        host_text, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InvalidURL("unexpected text after the IPv6 literal")
        port_text = rest[1:] if rest else None
    else:
        host_text, colon, after = authority.partition(":")
        if ":" in after:
            raise InvalidURL("an IPv6 address must be in brackets, e.g. [::1]:9000")
        port_text = after if colon else None
    host = _parse_host(host_text)
    return host, None if port_text is None else _parse_port(port_text)


def _make(scheme: str, authority: str, path: str, query: str) -> UpstreamURL:
    host, port = _parse_authority(authority)
    if path in ("", "/"):
        raise InvalidURL("URL has no object path")
    _check_path(path)
    return UpstreamURL(scheme, host, port, _escape_non_ascii(path), _escape_non_ascii(query))


def _split_scheme(url: str) -> tuple[str, str]:
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or not _SCHEME_RE.fullmatch(scheme):
        raise InvalidURL("not an absolute URL (expected http://, https:// or s3://)")
    return scheme, rest


def _split_rest(rest: str) -> tuple[str, str, str]:
    """``authority/path?query`` (fragment already removed) into its three parts."""
    end = len(rest)
    for delimiter in "/?":
        index = rest.find(delimiter)
        if 0 <= index < end:
            end = index
    path, _, query = rest[end:].partition("?")
    return rest[:end], path, query


# -- public functions ------------------------------------------------------


def parse_upstream_url(url: str) -> UpstreamURL:
    """Parse and validate an ``http(s)://`` or ``s3://`` object URL."""
    _check_chars(url, "URL")
    scheme, rest = _split_scheme(url)
    rest = rest.partition("#")[0]  # a fragment is never sent to a server
    if scheme == "s3":
        return _parse_s3(rest)
    if scheme not in _DEFAULT_PORTS:
        raise InvalidURL(f"unsupported scheme {scheme!r}: expected http, https or s3")
    authority, path, query = _split_rest(rest)
    return _make(scheme, authority, path, query)


def _parse_s3(rest: str) -> UpstreamURL:
    bucket, path, query = _split_rest(rest)
    bucket = bucket.lower()
    if not _BUCKET_RE.fullmatch(bucket):
        raise InvalidURL("invalid S3 bucket name in s3:// URL")
    if "." in bucket:
        # *.s3.amazonaws.com's certificate does not cover "a.b.s3.amazonaws.com":
        # a dotted bucket is only reachable over HTTPS path-style.
        return _make("https", "s3.amazonaws.com", f"/{bucket}{path}", query)
    return _make("https", f"{bucket}.s3.amazonaws.com", path, query)


def upstream_from_proxy_path(path: str, query: str = "") -> UpstreamURL:
    """The upstream URL named by a daemon request path ``/<scheme>/<host>[:<port>]/<path>``.

    ``path`` is the raw (still percent-encoded) path after the daemon's origin
    and prefix; ``query`` is the raw query string without ``?``.
    """
    _check_chars(path, "request path")
    _check_chars(query, "query string")
    if not path.startswith("/"):
        raise InvalidURL("request path must start with '/'")
    if "?" in path or "#" in path:
        raise InvalidURL("request path contains '?' or '#'; pass the query string separately")
    if "#" in query:
        raise InvalidURL("query string contains '#'")
    parts = path[1:].split("/", 2)
    scheme = parts[0].lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidURL("request path must start with /http/ or /https/")
    if len(parts) < 2 or not parts[1]:
        raise InvalidURL("request path has no upstream host: expected /<scheme>/<host>/<path>")
    authority = parts[1]
    if "%" in authority:
        # Some clients escape the brackets and colon of "[::1]:9000"; the host
        # is validated strictly after decoding, so decoding here is safe.
        authority = unquote(authority)
        _check_chars(authority, "upstream host")
    if len(parts) < 3 or not parts[2]:
        raise InvalidURL("request path has no object path: expected /<scheme>/<host>/<path>")
    return _make(scheme, authority, "/" + parts[2], query)


class _Proxy(NamedTuple):
    scheme: str
    netloc: str
    prefix: str  # "" or "/cache", never a trailing slash

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.prefix}"


def _proxy(proxy: str | None) -> _Proxy:
    # NWBCACHE_URL is read at call time so it can be set after import.
    text = ((env.proxy() or "") if proxy is None else proxy).strip()
    if not text:
        raise InvalidURL(
            f"no proxy given: pass proxy= or set {env.ENV_URL} (e.g. {env.DEFAULT_DAEMON_URL})"
        )
    _check_chars(text, "proxy URL")
    if "://" not in text:
        text = "http://" + text
    scheme, rest = _split_scheme(text)
    if scheme not in _DEFAULT_PORTS:
        raise InvalidURL("proxy URL must start with http:// or https://")
    if "?" in rest or "#" in rest:
        raise InvalidURL("proxy URL must not have a query or fragment")
    authority, _, prefix = rest.partition("/")
    host, port = _parse_authority(authority)
    prefix = prefix.rstrip("/")
    prefix = "/" + prefix if prefix else ""
    _check_path(prefix, "proxy path prefix")
    netloc = host if port is None else f"{host}:{port}"
    return _Proxy(scheme, netloc, prefix)


def _proxy_path(u: UpstreamURL) -> str:
    return f"/{u.scheme}/{u.netloc}{u.path}" + (f"?{u.query}" if u.query else "")


def proxied_url(url: str, proxy: str | None = None) -> str:
    """The URL under the daemon (``proxy``, default ``$NWBCACHE_URL``) that serves ``url``.

    Idempotent: a URL that already points at the proxy comes back normalised.
    """
    base = _proxy(proxy)
    u = parse_upstream_url(url)
    if u.scheme == base.scheme and u.netloc == base.netloc:
        if base.prefix and not u.path.startswith(base.prefix + "/"):
            raise InvalidURL("URL points at the proxy itself")
        try:
            u = upstream_from_proxy_path(u.path[len(base.prefix) :], u.query)
        except InvalidURL:
            raise InvalidURL("URL points at the proxy itself") from None
    return base.base + _proxy_path(u)


def original_url(proxied: str, proxy: str | None = None) -> str:
    """The upstream URL behind a proxied URL (the inverse of :func:`proxied_url`).

    Only the path prefix of ``proxy`` (default ``$NWBCACHE_URL``) is used, so
    ``localhost`` and ``127.0.0.1`` spellings of the daemon both work.
    """
    prefix = ""
    if proxy is not None or env.proxy() is not None:
        prefix = _proxy(proxy).prefix
    outer = parse_upstream_url(proxied)
    path = outer.path
    if prefix:
        if not path.startswith(prefix + "/"):
            raise InvalidURL("URL is not under the proxy's path prefix")
        path = path[len(prefix) :]
    return upstream_from_proxy_path(path, outer.query).url


def cache_key(u: UpstreamURL) -> str:
    """The object's identity: the URL without signature parameters, other parameters sorted."""
    port = "" if u.port is None or u.port == _DEFAULT_PORTS[u.scheme] else f":{u.port}"
    params = sorted(
        param
        for param in u.query.split("&")
        if param and not is_signature_param(param.partition("=")[0])
    )
    key = f"{u.scheme}://{u.host}{port}{u.path}"
    return f"{key}?{'&'.join(params)}" if params else key


def key_of(url: str, *, prefix: bool = False) -> str:
    """The cache key of an object's URL, or (``prefix``) of a URL prefix: scheme
    and host lowercased, default port dropped, ``s3://bucket/`` as
    ``https://bucket.s3.amazonaws.com/``, signature parameters removed. A prefix
    ending with the host means the whole host. Raises InvalidURL."""
    try:
        return cache_key(parse_upstream_url(url))
    except InvalidURL:
        if not prefix:
            raise
    # "https://host" or "s3://bucket/": no object path yet
    return cache_key(parse_upstream_url(url.rstrip("/") + "/_"))[:-1]


def redact_url(url: str) -> str:
    """``url`` for a log line: signature parameter values (and any userinfo) replaced."""
    url = _USERINFO_RE.sub(rf"\1{_REDACTED}@", url, count=1)
    start = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=-1)
    if start < 0:
        return url

    def _redact(match: re.Match[str]) -> str:
        separator, name, value = match.groups()
        if value and is_signature_param(name):
            return f"{separator}{name}={_REDACTED}"
        return match.group(0)

    return url[:start] + _QUERY_PARAM_RE.sub(_redact, url[start:])


# -- allow-list --------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class AllowRule:
    """One allow-list entry: a host, a port (None = the scheme's default) and a path prefix."""

    host: str
    port: int | None
    path_prefix: str  # "" = any path; otherwise "/a/b", no trailing slash

    def permits(self, u: UpstreamURL) -> bool:
        if u.host != self.host:
            return False
        if u.effective_port != (self.port or _DEFAULT_PORTS[u.scheme]):
            return False
        # Match whole segments, so "/dandiarchive" does not open "/dandiarchive-evil".
        prefix = self.path_prefix
        return not prefix or u.path == prefix or u.path.startswith(prefix + "/")

    def __str__(self) -> str:
        netloc = self.host if self.port is None else f"{self.host}:{self.port}"
        return netloc + self.path_prefix

    @classmethod
    def parse(cls, entry: str) -> AllowRule:
        text = entry.strip()
        if not text:
            raise InvalidURL("empty allow-list entry")
        try:
            _check_chars(text, "entry")
            if "://" in text:
                raise InvalidURL("give HOST[:PORT][/path/prefix], without a scheme")
            if "?" in text or "#" in text:
                raise InvalidURL("entry must not contain '?' or '#'")
            authority, _, prefix = text.partition("/")
            host, port = _parse_authority(authority)
            prefix = prefix.rstrip("/")
            prefix = "/" + prefix if prefix else ""
            _check_path(prefix, "path prefix")
        except InvalidURL as exc:
            raise InvalidURL(f"allow-list entry {text[:100]!r}: {exc}") from None
        return cls(host, port, prefix)


@dataclasses.dataclass(frozen=True, slots=True)
class AllowList:
    """The upstream hosts (and path prefixes) the daemon may read from."""

    entries: tuple[AllowRule, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """Parse ``HOST``, ``HOST:PORT``, ``HOST[:PORT]/path/prefix`` or ``[::1]:9000`` entries."""
        if isinstance(entries, str):  # one entry, not its characters
            entries = (entries,)
        return cls(tuple(AllowRule.parse(entry) for entry in entries))

    def permits(self, u: UpstreamURL) -> bool:
        return any(rule.permits(u) for rule in self.entries)
