"""nwbcache_proxy.retry: which statuses retry, Retry-After, backoff and the retry budget."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nwbcache_proxy.retry import (
    RetryBudget,
    RetryPolicy,
    RetryReason,
    parse_retry_after,
    reason_for_status,
)

NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


# -- statuses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (429, RetryReason.THROTTLED),
        (503, RetryReason.THROTTLED),
        (500, RetryReason.SERVER_ERROR),
        (502, RetryReason.SERVER_ERROR),
        (504, RetryReason.SERVER_ERROR),
        # Answers, not faults: passed on, never retried.
        (200, None),
        (206, None),
        (301, None),
        (304, None),
        (400, None),
        (403, None),
        (404, None),
        (408, None),
        (412, None),
        (416, None),
        (501, None),
        (505, None),
    ],
)
def test_reason_for_status(status: int, reason: RetryReason | None) -> None:
    assert reason_for_status(status) is reason


def test_reasons_are_a_bounded_label_set() -> None:
    assert {str(reason) for reason in RetryReason} == {
        "connect",
        "timeout",
        "throttled",
        "server_error",
        "short_body",
        "reset",
    }
    assert RetryReason("timeout") is RetryReason.TIMEOUT  # round-trips from a stored label


# -- Retry-After ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "now", "expected"),
    [
        ("120", NOW, 120.0),
        ("0", NOW, 0.0),
        (" 7 ", NOW, 7.0),
        ("007", NOW, 7.0),
        ("9" * 40, NOW, 1e12),  # absurd, clamped; the policy caps the wait
        ("Fri, 01 Mar 2024 12:00:30 GMT", NOW, 30.0),  # IMF-fixdate
        ("Friday, 01-Mar-24 12:01:00 GMT", NOW, 60.0),  # obsolete RFC 850
        ("Fri Mar  1 12:00:05 2024", NOW, 5.0),  # obsolete asctime
        ("Fri, 01 Mar 2024 14:00:10 +0200", NOW, 10.0),
        ("Fri, 01 Mar 2024 12:00:30 GMT", NOW.replace(tzinfo=None), 30.0),  # naive now is UTC
        ("Fri, 01 Mar 2024 12:00:30 GMT", NOW.astimezone(timezone(timedelta(hours=-5))), 30.0),
        ("Fri, 01 Mar 2024 11:59:00 GMT", NOW, 0.0),  # in the past
        ("Sun, 06 Nov 1994 08:49:37 GMT", NOW, 0.0),
        (None, NOW, None),
        ("", NOW, None),
        ("   ", NOW, None),
        ("-5", NOW, None),
        ("+5", NOW, None),
        ("1.5", NOW, None),
        ("1e3", NOW, None),
        ("٣", NOW, None),  # a non-ASCII digit
        ("soon", NOW, None),
        ("Fri, 31 Feb 2024 12:00:00 GMT", NOW, None),
        ("Fri, 01 Mar 2024 25:00:00 GMT", NOW, None),
        ("Fri, 01 Mar 99999 12:00:00 GMT", NOW, None),
        ("Fri, 01 Mar 2024", NOW, None),
    ],
)
def test_parse_retry_after(value: str | None, now: datetime, expected: float | None) -> None:
    assert parse_retry_after(value, now) == expected


@given(st.text(max_size=40))
def test_parse_retry_after_never_raises(value: str) -> None:
    result = parse_retry_after(value, NOW)
    assert result is None or (math.isfinite(result) and result >= 0.0)


# -- the policy --------------------------------------------------------------------


def test_policy_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.base_delay, policy.max_delay, policy.max_retry_after) == (
        5,
        0.2,
        20.0,
        30.0,
    )


@pytest.mark.parametrize(
    ("retry_number", "r", "expected"),
    [
        (0, 0.5, 0.1),
        (1, 0.5, 0.2),
        (2, 0.5, 0.4),
        (3, 1.0, 1.6),
        (6, 1.0, 12.8),
        (7, 1.0, 20.0),  # 25.6 capped at max_delay
        (10, 0.5, 10.0),
        (5000, 0.25, 5.0),  # no overflow for absurd retry numbers
        (4, 0.0, 0.0),
    ],
)
def test_delay_full_jitter(retry_number: int, r: float, expected: float) -> None:
    assert RetryPolicy().delay(retry_number, lambda: r) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("retry_number", "r", "retry_after", "expected"),
    [
        (0, 0.0, 3.0, 3.0),  # the server's wait wins over a short jitter
        (0, 1.0, 0.0, 0.2),
        (7, 1.0, 3.0, 20.0),  # a longer jitter wins over a short Retry-After
        (0, 0.0, 100.0, 30.0),  # capped at max_retry_after
        (0, 0.0, 1e12, 30.0),
        (0, 0.5, -4.0, 0.1),  # nonsense is ignored
        (0, 0.5, math.nan, 0.1),
        (0, 0.0, math.inf, 30.0),
    ],
)
def test_delay_retry_after(
    retry_number: int, r: float, retry_after: float, expected: float
) -> None:
    assert RetryPolicy().delay(retry_number, lambda: r, retry_after) == pytest.approx(expected)


@settings(deadline=None)
@given(
    retry_number=st.integers(0, 3000),
    r=st.floats(0.0, 1.0),
    base=st.floats(0.0, 10.0),
    max_delay=st.floats(0.0, 100.0),
    max_retry_after=st.floats(0.0, 100.0),
    retry_after=st.none() | st.floats(-10.0, 1e9),
)
def test_delay_bounds(
    retry_number: int,
    r: float,
    base: float,
    max_delay: float,
    max_retry_after: float,
    retry_after: float | None,
) -> None:
    policy = RetryPolicy(base_delay=base, max_delay=max_delay, max_retry_after=max_retry_after)
    cap = policy.backoff_cap(retry_number)
    assert 0.0 <= cap <= max_delay
    delay = policy.delay(retry_number, lambda: r, retry_after)
    assert delay == policy.delay(retry_number, lambda: r, retry_after)  # deterministic
    if retry_after is None:
        assert 0.0 <= delay <= cap
        assert delay == pytest.approx(r * cap)
    else:
        assert delay <= max(cap, max_retry_after)
        assert delay >= min(max(retry_after, 0.0), max_retry_after)


@settings(deadline=None)
@given(st.integers(0, 40), st.integers(0, 40))
def test_backoff_cap_is_monotonic(a: int, b: int) -> None:
    policy = RetryPolicy()
    lo, hi = sorted((a, b))
    assert policy.backoff_cap(lo) <= policy.backoff_cap(hi)


@pytest.mark.parametrize(("r"), [-0.1, 1.5, math.nan])
def test_delay_rejects_bad_rng(r: float) -> None:
    with pytest.raises(ValueError, match="rng"):
        RetryPolicy().delay(0, lambda: r)


def test_delay_rejects_negative_retry_number() -> None:
    with pytest.raises(ValueError, match="retry_number"):
        RetryPolicy().delay(-1, lambda: 0.5)


@pytest.mark.parametrize(
    ("max_attempts", "attempt", "expected"),
    [
        (5, 1, True),
        (5, 4, True),
        (5, 5, False),
        (5, 6, False),
        (1, 1, False),
        (3, 2, True),
        (3, 3, False),
    ],
)
def test_should_retry(max_attempts: int, attempt: int, expected: bool) -> None:
    assert RetryPolicy(max_attempts=max_attempts).should_retry(attempt) is expected


def test_should_retry_allows_exactly_max_attempts_tries() -> None:
    policy = RetryPolicy()
    tries = 1
    while policy.should_retry(tries):
        tries += 1
    assert tries == policy.max_attempts


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"base_delay": -0.1},
        {"max_delay": -1.0},
        {"max_retry_after": -1.0},
        {"base_delay": math.nan},
    ],
)
def test_policy_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


# -- the budget ------------------------------------------------------------------------

NON_TIMEOUT = [r for r in RetryReason if r is not RetryReason.TIMEOUT]


def test_budget_defaults_are_aws_standard() -> None:
    budget = RetryBudget()
    assert (budget.available, budget.capacity) == (500, 500)
    assert budget.try_acquire(RetryReason.THROTTLED) == 5
    assert budget.try_acquire(RetryReason.TIMEOUT) == 10
    assert budget.available == 485


@pytest.mark.parametrize("reason", NON_TIMEOUT)
def test_budget_exhausted_after_100_retries(reason: RetryReason) -> None:
    budget = RetryBudget()
    assert [budget.try_acquire(reason) for _ in range(100)] == [5] * 100
    assert budget.available == 0
    assert budget.try_acquire(reason) is None
    assert budget.try_acquire(RetryReason.TIMEOUT) is None
    assert budget.available == 0  # a refusal takes nothing


def test_budget_timeouts_cost_double() -> None:
    budget = RetryBudget()
    taken = [budget.try_acquire(RetryReason.TIMEOUT) for _ in range(50)]
    assert taken == [10] * 50
    assert budget.try_acquire(RetryReason.TIMEOUT) is None


def test_budget_refuses_when_it_cannot_pay_in_full() -> None:
    budget = RetryBudget(capacity=12)
    assert budget.try_acquire(RetryReason.TIMEOUT) == 10
    assert budget.try_acquire(RetryReason.TIMEOUT) is None  # 2 left, 10 needed
    assert budget.try_acquire(RetryReason.RESET) is None  # 5 needed
    assert budget.available == 2


@pytest.mark.parametrize(
    ("acquire", "refund", "expected"),
    [
        ([RetryReason.RESET], 5, 500),
        ([RetryReason.RESET, RetryReason.TIMEOUT], 15, 500),
        ([RetryReason.RESET] * 10, 50, 500),
        ([RetryReason.RESET] * 10, 0, 451),  # no retries: +1
        ([RetryReason.RESET] * 10, 20, 470),  # partial refund
    ],
)
def test_budget_refund(acquire: list[RetryReason], refund: int, expected: int) -> None:
    budget = RetryBudget()
    for reason in acquire:
        assert budget.try_acquire(reason) is not None
    budget.record_success(refund)
    assert budget.available == expected


def test_budget_recovers_after_exhaustion() -> None:
    budget = RetryBudget()
    while budget.try_acquire(RetryReason.CONNECT) is not None:
        pass
    assert budget.available == 0
    for _ in range(4):
        budget.record_success(0)
    assert budget.try_acquire(RetryReason.CONNECT) is None  # 4 < 5
    budget.record_success(0)
    assert budget.try_acquire(RetryReason.CONNECT) == 5


@pytest.mark.parametrize("acquired", [0, 1, 5, 10, 10_000])
def test_budget_never_exceeds_capacity(acquired: int) -> None:
    budget = RetryBudget()
    budget.record_success(acquired)
    assert budget.available == 500
    budget.try_acquire(RetryReason.THROTTLED)
    budget.record_success(acquired)
    assert budget.available == min(500, 495 + max(acquired, 1))


@settings(deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(list(RetryReason)),
            st.integers(0, 30),
        ),
        max_size=300,
    )
)
def test_budget_stays_within_bounds(ops: list[RetryReason | int]) -> None:
    budget = RetryBudget(capacity=100)
    for op in ops:
        before = budget.available
        if isinstance(op, RetryReason):
            cost = budget.try_acquire(op)
            if cost is None:
                assert budget.available == before < budget.cost(op)
            else:
                assert cost == budget.cost(op)
                assert budget.available == before - cost
        else:
            budget.record_success(op)
            assert budget.available == min(100, before + (op or 1))
        assert 0 <= budget.available <= budget.capacity


def test_budget_custom_costs() -> None:
    budget = RetryBudget(capacity=20, retry_cost=2, timeout_cost=7, success_refill=3)
    assert budget.try_acquire(RetryReason.SHORT_BODY) == 2
    assert budget.try_acquire(RetryReason.TIMEOUT) == 7
    assert budget.available == 11
    budget.record_success(0)
    assert budget.available == 14


@pytest.mark.parametrize(
    "kwargs",
    [{"capacity": -1}, {"retry_cost": -1}, {"timeout_cost": -1}, {"success_refill": -1}],
)
def test_budget_rejects_negative_sizes(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        RetryBudget(**kwargs)


def test_budget_rejects_negative_refund() -> None:
    budget = RetryBudget()
    with pytest.raises(ValueError):
        budget.record_success(-5)
    assert budget.available == 500
