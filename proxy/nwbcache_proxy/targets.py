"""Request targets turned into upstream URLs and into log-safe paths, memoised per app.

Readers ask for the same object over and over, and parsing and validating a
URL (or redacting its signature) costs more than a hit's I/O, so both are
remembered by the raw request target. Per app, not per process: every app a
test builds starts empty.
"""

from __future__ import annotations

from nwbcache.urls import AllowList, InvalidURL, UpstreamURL, redact_url, upstream_from_proxy_path

from .errors import BadRequest
from .lru import BoundedLRU

# Distinct request targets remembered.
TARGETS_MEMORY = 10_000


class Targets:
    def __init__(self, allow: AllowList, capacity: int = TARGETS_MEMORY) -> None:
        self._allow = allow
        self._parsed: BoundedLRU[str, tuple[UpstreamURL, bool]] = BoundedLRU(capacity)
        self._redacted: BoundedLRU[str, str] = BoundedLRU(capacity)

    def upstream(self, raw_path: str) -> tuple[UpstreamURL, bool]:
        """The upstream URL a proxied path names, and whether the allow-list
        permits it. Raises BadRequest."""
        known = self._parsed.get(raw_path)
        if known is None:
            path, _, query = raw_path.partition("?")
            try:
                url = upstream_from_proxy_path(path, query)
            except InvalidURL as exc:
                raise BadRequest(
                    f"not a proxied URL ({exc}); expected /<scheme>/<host>[:<port>]/<path>"
                ) from None
            known = (url, self._allow.permits(url))
            self._parsed.put(raw_path, known)
        return known

    def redacted(self, raw_path: str) -> str:
        """The request target with signatures and credentials redacted, for logs."""
        path = self._redacted.get(raw_path)
        if path is None:
            path = redact_url(raw_path)
            self._redacted.put(raw_path, path)
        return path
