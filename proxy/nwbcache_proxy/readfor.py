"""A read's terms: who it is for and how it may be served (ReadFor), and what its answer is
called (HIT, MISS, PARTIAL or STALE)."""

from __future__ import annotations

import dataclasses
import enum

from nwbcache.urls import UpstreamURL

from .credentials import NONE, Credentials, anonymous
from .version import Version


class CacheOutcome(enum.StrEnum):
    HIT = "HIT"
    MISS = "MISS"
    PARTIAL = "PARTIAL"
    STALE = "STALE"


def classify(cached_blocks: int, blocks: int, *, stale: bool = False) -> CacheOutcome:
    """The outcome of a response of ``blocks`` blocks, ``cached_blocks`` of which
    were served from the cache, of a version that is ``stale`` or not. (An
    answer made from the version's metadata alone, HEAD or 304, has no
    blocks: a HIT, or STALE.)"""
    if cached_blocks >= blocks:
        return CacheOutcome.STALE if stale else CacheOutcome.HIT
    if cached_blocks == 0:
        return CacheOutcome.MISS
    return CacheOutcome.PARTIAL


@dataclasses.dataclass(frozen=True, slots=True)
class ReadFor:
    """Who a read is for, and how it may be served."""

    creds: Credentials = NONE  # what the request presents upstream
    stale: bool = False  # the version is served without upstream's confirmation
    offline: bool = False  # only-if-cached: fetch nothing
    # Fetch past the range for a sequential reader. Off for a child daemon
    # (parents.py): it reads ahead itself, each group from its own parent, and
    # read-ahead here would fetch groups that belong to another parent.
    readahead: bool = True

    def upstream(self, v: Version, url: UpstreamURL) -> tuple[UpstreamURL, str | None]:
        """The URL and Authorization that fetches for this read send upstream: the
        request's own for a private object; none for a public one, so a wrong
        signature fails nobody's read."""
        if v.private is not False:
            return url, self.creds.authorization
        return (anonymous(url) if self.creds.present else url), None


# A read for a request without credentials, fresh and online (the default).
PLAIN = ReadFor()
