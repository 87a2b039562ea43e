"""breaker: a host that keeps failing is left alone for a while, then probed."""

from __future__ import annotations

import pytest

from nwbcache_proxy.breaker import PROBE_TIMEOUT, Breaker, Breakers, State


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(b: Breaker) -> State:
    return b.state  # read through a call: each check sees the breaker as it is now


def make(clock: Clock) -> Breaker:
    return Breaker(threshold=3, base_cooldown=2.0, max_cooldown=5.0, clock=clock)


def test_it_opens_after_threshold_failures_in_a_row() -> None:
    clock = Clock()
    b = make(clock)
    for _ in range(2):
        b.failure()
        assert b.before() is None
    b.success()  # a success resets the count
    b.failure()
    b.failure()
    assert state(b) is State.CLOSED
    b.failure()
    assert state(b) is State.OPEN
    assert b.before() == pytest.approx(2.0)
    clock.now += 1.5
    assert b.before() == pytest.approx(1.0)  # never under a second (Retry-After)


@pytest.mark.parametrize(
    ("probe_ok", "state_after", "next_cooldown"),
    [(True, State.CLOSED, 2.0), (False, State.OPEN, 4.0)],
)
def test_after_the_cooldown_one_probe_decides(
    probe_ok: bool, state_after: State, next_cooldown: float
) -> None:
    clock = Clock()
    b = make(clock)
    for _ in range(3):
        b.failure()
    clock.now += 2.0
    assert b.before() is None  # the probe goes
    assert state(b) is State.HALF_OPEN
    assert b.before() == 1.0  # others wait while it is out
    if probe_ok:
        b.success()
    else:
        b.failure()
    assert state(b) is state_after
    assert b.cooldown == next_cooldown


def test_the_cooldown_doubles_up_to_its_limit() -> None:
    clock = Clock()
    b = make(clock)
    for _ in range(3):
        b.failure()
    cooldowns = []
    for _ in range(4):
        clock.now = b.open_until
        assert b.before() is None
        b.failure()
        cooldowns.append(b.cooldown)
    assert cooldowns == [4.0, 5.0, 5.0, 5.0]


def test_breakers_are_per_host_and_report_how_many_are_open() -> None:
    clock = Clock()
    seen: list[int] = []
    breakers = Breakers(seen.append, make=lambda: make(clock))
    for _ in range(3):
        breakers.record("a:1", ok=False)
    breakers.record("b:2", ok=False)
    assert breakers.before("a:1") is not None
    assert breakers.before("b:2") is None
    assert breakers.states() == {"a:1": "open"}
    clock.now += 2.0
    assert breakers.before("a:1") is None  # probing
    breakers.record("a:1", ok=True)
    assert seen == [1, 1, 0]  # opened, half-open (still not closed), closed
    assert breakers.not_closed() == 0


def test_a_probe_that_never_reports_lets_another_go_after_a_while() -> None:
    clock = Clock()
    b = make(clock)
    for _ in range(3):
        b.failure()
    clock.now = b.open_until
    assert b.before() is None  # the probe; it is cancelled and says nothing
    clock.now += PROBE_TIMEOUT - 1
    assert b.before() == 1.0
    clock.now += 1
    assert b.before() is None  # another probe
    b.success()
    assert state(b) is State.CLOSED
