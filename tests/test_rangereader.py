"""What a read hands the server (rangereader.py): the outcome a response turned out to
have once sent, told by its log line and metrics when it is not what its headers said."""

from __future__ import annotations

import pytest

from nwbcache_proxy.rangereader import RangeReader, Tally
from nwbcache_proxy.readfor import CacheOutcome


@pytest.mark.parametrize(
    ("told", "upstream_bytes", "sent"),
    [
        (CacheOutcome.HIT, 0, CacheOutcome.HIT),
        # A block found corrupt as it went out, fetched again: not a HIT.
        (CacheOutcome.HIT, 1, CacheOutcome.PARTIAL),
        (CacheOutcome.PARTIAL, 5, CacheOutcome.PARTIAL),
        (CacheOutcome.MISS, 5, CacheOutcome.MISS),
        # Served without upstream's word on the version: it stays STALE.
        (CacheOutcome.STALE, 5, CacheOutcome.STALE),
    ],
)
def test_the_outcome_once_sent(told: CacheOutcome, upstream_bytes: int, sent: CacheOutcome) -> None:
    reader = RangeReader(told, None, body=b"", tally=Tally(upstream=upstream_bytes))
    assert reader.outcome == told  # what the headers said stays as it was
    assert reader.outcome_sent == sent
