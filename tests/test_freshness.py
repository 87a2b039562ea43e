"""freshness: how long a cached version is served unconfirmed, as a table."""

from __future__ import annotations

import pytest

from nwbcache_proxy.freshness import RETRY_REVALIDATION, Freshness, Policy

P = Policy(revalidate_after=100.0, stale_if_error=1000.0)
FRESH, STALE, EXPIRED = Freshness.FRESH, Freshness.STALE, Freshness.EXPIRED


@pytest.mark.parametrize(
    ("age", "immutable", "privacy_known", "offline", "expected"),
    [
        (0.0, False, True, False, FRESH),
        (99.9, False, True, False, FRESH),
        (100.0, False, True, False, STALE),  # due: served now, revalidated behind
        (1099.9, False, True, False, STALE),  # still within stale-if-error
        (1100.0, False, True, False, EXPIRED),  # too old to serve unconfirmed
        (1e9, True, True, False, FRESH),  # immutable: never revalidated, no limit
        (1e9, False, True, True, STALE),  # only-if-cached: what is stored is served
        (0.0, False, False, False, EXPIRED),  # privacy unknown: ask first
        (0.0, True, False, True, EXPIRED),  # ...even offline and immutable
    ],
)
def test_judge(
    age: float, immutable: bool, privacy_known: bool, offline: bool, expected: Freshness
) -> None:
    verdict = P.judge(age=age, immutable=immutable, privacy_known=privacy_known, offline=offline)
    assert verdict is expected


@pytest.mark.parametrize(
    ("age", "immutable", "offline", "expected"),
    [
        (0.0, False, False, EXPIRED),  # no-cache: upstream's word first, however fresh
        (500.0, False, False, EXPIRED),
        (0.0, True, False, FRESH),  # an immutable version has nothing to confirm
        (0.0, False, True, FRESH),  # only-if-cached wins: nothing is asked
        (500.0, False, True, STALE),
    ],
)
def test_judge_when_the_request_asks_for_upstreams_word(
    age: float, immutable: bool, offline: bool, expected: Freshness
) -> None:
    verdict = P.judge(
        age=age, immutable=immutable, privacy_known=True, offline=offline, revalidate=True
    )
    assert verdict is expected


def test_no_stale_serving_when_stale_if_error_is_zero() -> None:
    strict = Policy(revalidate_after=0.0, stale_if_error=0.0)
    assert strict.judge(age=0.0, immutable=False, privacy_known=True) is EXPIRED


@pytest.mark.parametrize(
    ("last_attempt", "running", "expected"),
    [
        (None, False, True),
        (None, True, False),  # one at a time
        (1000.0 - RETRY_REVALIDATION + 0.1, False, False),  # failed just now: wait
        (1000.0 - RETRY_REVALIDATION, False, True),
    ],
)
def test_should_revalidate(last_attempt: float | None, running: bool, expected: bool) -> None:
    assert Policy.should_revalidate(now=1000.0, last_attempt=last_attempt, running=running) is (
        expected
    )
