"""When and how long to retry an upstream read.

Modelled on the AWS SDK "standard" retry mode: retry throttling and server
faults (never a 4xx answer), full-jitter exponential backoff capped at 20 s,
and a process-wide token bucket so that an upstream outage does not turn
every reader's retries into a retry storm.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = [
    "RetryBudget",
    "RetryPolicy",
    "RetryReason",
    "parse_retry_after",
    "reason_for_status",
]


class RetryReason(enum.StrEnum):
    """Why an attempt is retried; a bounded set, used as a metrics label."""

    CONNECT = "connect"
    TIMEOUT = "timeout"
    THROTTLED = "throttled"  # 429, or 503 (S3 "SlowDown")
    SERVER_ERROR = "server_error"  # 500, 502, 504
    SHORT_BODY = "short_body"
    RESET = "reset"


_THROTTLED = frozenset({429, 503})
_SERVER_ERROR = frozenset({500, 502, 504})


def reason_for_status(status: int) -> RetryReason | None:
    """The retry reason for an upstream status, or None if the status is an answer.

    4xx (404, 403, 412, 416, ...) are answers about the request or the object
    and are passed on; asking again would get the same answer.
    """
    if status in _THROTTLED:
        return RetryReason.THROTTLED
    if status in _SERVER_ERROR:
        return RetryReason.SERVER_ERROR
    return None


_DELTA_SECONDS = re.compile(r"[0-9]+")
# Longer digit strings are clamped rather than parsed: callers cap the wait
# anyway, and int() of thousands of digits is slow or refused.
_MAX_DELTA_DIGITS = 12


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110 §10.2.3).

    Accepts delta-seconds or an HTTP-date; a date in the past gives 0.0;
    a missing, negative or unparsable value gives None. A naive ``now`` is
    taken as UTC.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        if len(text) > _MAX_DELTA_DIGITS:
            return float(10**_MAX_DELTA_DIGITS)
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # HTTP-dates are always GMT; parsedate gives a naive datetime for "-0000".
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many times to try, and how long to wait between tries."""

    # Total tries, the first included. AWS uses 3; we allow 5 because the
    # daemon sits on laboratory and home WAN links that drop more than EC2's,
    # and a block read is cheap to repeat (reads resume where they stopped).
    # The shared RetryBudget, not this number, bounds a retry storm.
    max_attempts: int = 5
    base_delay: float = 0.2  # seconds
    max_delay: float = 20.0  # AWS MAX_BACKOFF
    max_retry_after: float = 30.0  # never sleep longer than this for a server's Retry-After

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not (self.base_delay >= 0 and self.max_delay >= 0 and self.max_retry_after >= 0):
            raise ValueError("base_delay, max_delay and max_retry_after must be >= 0")

    def backoff_cap(self, retry_number: int) -> float:
        """The upper bound of the jittered delay before retry ``retry_number`` (0-based)."""
        if retry_number < 0:
            raise ValueError("retry_number must be >= 0")
        try:
            return min(self.base_delay * 2.0**retry_number, self.max_delay)
        except OverflowError:
            return self.max_delay if self.base_delay > 0 else 0.0

    def delay(
        self, retry_number: int, rng: Callable[[], float], retry_after: float | None = None
    ) -> float:
        """Seconds to sleep before retry ``retry_number`` (0 for the first retry).

        Full jitter (``rng() * cap``) spreads the retries of many readers hit
        by the same fault. A server's Retry-After is honoured up to
        ``max_retry_after``, so a hostile or broken header cannot stall us.
        """
        cap = self.backoff_cap(retry_number)
        r = rng()
        if not 0.0 <= r <= 1.0:
            raise ValueError("rng() must return a number in [0, 1]")
        jittered = r * cap
        if retry_after is None:
            return jittered
        wanted = retry_after if retry_after > 0 else 0.0  # also maps NaN to 0
        return max(jittered, min(wanted, self.max_retry_after))

    def should_retry(self, attempt: int) -> bool:
        """Whether another try may follow ``attempt`` tries made so far."""
        return attempt < self.max_attempts


class RetryBudget:
    """Token bucket shared by all upstream requests of a process.

    AWS standard mode: 500 tokens; a retry costs 5, a retry after a timeout
    10; a request that succeeds gives back what its retries took, or 1 token
    if it needed none. When the bucket cannot pay for a retry, the caller
    fails instead, so a dead upstream costs at most a bounded burst of
    retries rather than ``max_attempts`` times the request rate.

    Not thread-safe by design: one budget per event loop, whose callbacks
    never interleave inside these synchronous methods.
    """

    __slots__ = ("_available", "_capacity", "_retry_cost", "_success_refill", "_timeout_cost")

    def __init__(
        self,
        capacity: int = 500,
        retry_cost: int = 5,
        timeout_cost: int = 10,
        success_refill: int = 1,
    ) -> None:
        if min(capacity, retry_cost, timeout_cost, success_refill) < 0:
            raise ValueError("retry budget sizes and costs must be >= 0")
        self._capacity = capacity
        self._available = capacity
        self._retry_cost = retry_cost
        self._timeout_cost = timeout_cost
        self._success_refill = success_refill

    @property
    def available(self) -> int:
        return self._available

    @property
    def capacity(self) -> int:
        return self._capacity

    def cost(self, reason: RetryReason) -> int:
        return self._timeout_cost if reason == RetryReason.TIMEOUT else self._retry_cost

    def try_acquire(self, reason: RetryReason) -> int | None:
        """Take the cost of one retry; None (nothing taken) when the budget cannot pay."""
        cost = self.cost(reason)
        if cost > self._available:
            return None
        self._available -= cost
        return cost

    def record_success(self, acquired: int) -> None:
        """A request succeeded after its retries took ``acquired`` tokens in total."""
        if acquired < 0:
            raise ValueError("acquired must be >= 0")
        refill = acquired if acquired > 0 else self._success_refill
        self._available = min(self._capacity, self._available + refill)

    def __repr__(self) -> str:
        return f"RetryBudget(available={self._available}, capacity={self._capacity})"
