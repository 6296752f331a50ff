"""The breaker policy, driven by a fake clock."""

from __future__ import annotations

import pytest

from policies.circuit_breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# (events, expected state, expected allow() afterwards); events: "f" failure, "s" success,
# "+N" advance the clock N seconds, "a" a call asks allow(). Threshold 3, cool-down 10 s.
CASES = [
    ("", BreakerState.CLOSED, True),
    ("ff", BreakerState.CLOSED, True),  # below the threshold
    ("ffsff", BreakerState.CLOSED, True),  # a success resets the count
    ("fff", BreakerState.OPEN, False),  # threshold reached: open
    ("fff+9", BreakerState.OPEN, False),  # cool-down not over
    ("fff+10", BreakerState.OPEN, True),  # cool-down over: allow() moves to half-open
    ("fff+10a", BreakerState.HALF_OPEN, False),  # only one probe in half-open
    ("fff+10as", BreakerState.CLOSED, True),  # probe succeeded: closed
    ("fff+10af", BreakerState.OPEN, False),  # probe failed: open again
    ("fff+10af+10", BreakerState.OPEN, True),  # ...for another full cool-down
]


@pytest.mark.parametrize(("events", "state", "allowed"), CASES)
def test_breaker_transitions(events: str, state: BreakerState, allowed: bool) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=10, clock=clock)
    for token in events.replace("+", " +").replace("f", " f").replace("s", " s").replace("a", " a").split():
        if token.startswith("+"):
            clock.now += float(token[1:])
        elif token == "f":
            breaker.record_failure()
        elif token == "s":
            breaker.record_success()
        else:
            breaker.allow()
    assert breaker.state is state
    assert breaker.allow() is allowed


def test_remaining_cooldown_counts_down_on_the_clock() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=30, clock=clock)
    assert breaker.remaining_cooldown_s() == 0
    breaker.record_failure()
    clock.now += 12
    assert breaker.remaining_cooldown_s() == pytest.approx(18)


@pytest.mark.parametrize(("threshold", "cooldown"), [(0, 1.0), (1, -1.0)])
def test_invalid_settings_are_refused(threshold: int, cooldown: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=threshold, cooldown_s=cooldown)
