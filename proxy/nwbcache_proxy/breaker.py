"""Circuit breakers, one per upstream host: stop asking a host that keeps failing. Pure.

After THRESHOLD failures in a row (connection refused or reset, timeouts,
5xx, 429) a host's breaker opens: requests that would go to it fail at once
(503 with Retry-After) instead of waiting through retries, while cached
bytes are still served. After a cool-down one request is let through (half
open): its success closes the breaker, its failure opens it again for twice
as long, up to MAX_COOLDOWN. The pattern of Hystrix and Envoy's outlier
detection, on the scale of one daemon.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

THRESHOLD = 5
BASE_COOLDOWN = 2.0
MAX_COOLDOWN = 300.0
# A probe that never reports (its request cancelled at shutdown, say) must
# not leave the breaker half open for good: after this long another may go.
PROBE_TIMEOUT = 60.0


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"  # one probe under way


class Breaker:
    def __init__(
        self,
        *,
        threshold: int = THRESHOLD,
        base_cooldown: float = BASE_COOLDOWN,
        max_cooldown: float = MAX_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.base_cooldown = base_cooldown
        self.max_cooldown = max_cooldown
        self._clock = clock
        self.state = State.CLOSED
        self.failures = 0
        self.cooldown = base_cooldown
        self.open_until = 0.0
        self.probe_started = 0.0

    def before(self) -> float | None:
        """None if a request may go now; else seconds until one may (Retry-After)."""
        if self.state is State.CLOSED:
            return None
        now = self._clock()
        probe_lost = self.state is State.HALF_OPEN and now - self.probe_started >= PROBE_TIMEOUT
        if (self.state is State.OPEN and now >= self.open_until) or probe_lost:
            self.state = State.HALF_OPEN  # this request is the probe
            self.probe_started = now
            return None
        return max(self.open_until - now, 1.0) if self.state is State.OPEN else 1.0

    def success(self) -> None:
        self.state = State.CLOSED
        self.failures = 0
        self.cooldown = self.base_cooldown

    def failure(self) -> None:
        self.failures += 1
        if self.state is State.HALF_OPEN:
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self._open()
        elif self.state is State.CLOSED and self.failures >= self.threshold:
            self._open()

    def _open(self) -> None:
        self.state = State.OPEN
        self.open_until = self._clock() + self.cooldown


class Breakers:
    """The breakers of every upstream host (allow-listed hosts only, so a few)."""

    def __init__(
        self,
        on_change: Callable[[int], None] = lambda _n: None,
        *,
        make: Callable[[], Breaker] = Breaker,
    ) -> None:
        self._make = make
        self._by_host: dict[str, Breaker] = {}
        self._on_change = on_change  # told how many are not closed, after each change

    def get(self, host: str) -> Breaker:
        breaker = self._by_host.get(host)
        if breaker is None:
            breaker = self._by_host[host] = self._make()
        return breaker

    def record(self, host: str, *, ok: bool) -> None:
        breaker = self.get(host)
        before = breaker.state
        if ok:
            breaker.success()
        else:
            breaker.failure()
        if breaker.state is not before:
            self._on_change(self.not_closed())

    def before(self, host: str) -> float | None:
        breaker = self.get(host)
        state = breaker.state
        wait = breaker.before()
        if breaker.state is not state:
            self._on_change(self.not_closed())
        return wait

    def not_closed(self) -> int:
        return sum(b.state is not State.CLOSED for b in self._by_host.values())

    def states(self) -> dict[str, str]:
        """Host -> state of every breaker that is not closed (status page)."""
        return {h: b.state.value for h, b in self._by_host.items() if b.state is not State.CLOSED}
