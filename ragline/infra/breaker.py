"""A small circuit breaker for calls to a shared service (Redis), DESIGN.md §3.5.

States::

    closed ──(N consecutive failures)──► open ──(reset_s elapsed)──► half_open
      ▲                                   ▲                             │
      └──────────(probe succeeds)─────────┼─────────────────────────────┘
                                          └──────(probe fails)──────────┘

* ``closed``: every call is allowed; a success resets the failure count.
* ``open``: no call is allowed, so a dead Redis costs callers nothing (not
  even a timeout) until ``reset_s`` has passed.
* ``half_open``: exactly one caller (the probe) is allowed through; the others
  are refused until it reports.  If the probe never reports (its task was
  cancelled), another probe is allowed after a further ``reset_s``, so the
  breaker cannot wedge half-open.

The clock is injectable so tests drive the state machine without sleeping.
Not thread-safe: use it from one event loop (all ragline cache code does).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, Literal

State = Literal["closed", "open", "half_open"]

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a single half-open probe."""

    __slots__ = (
        "_clock",
        "_consecutive",
        "_opened_at",
        "_probe_started",
        "_state",
        "failure_threshold",
        "failures_total",
        "opens_total",
        "reset_s",
    )

    def __init__(
        self,
        failure_threshold: int = 3,
        reset_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_s <= 0:
            raise ValueError("reset_s must be > 0")
        self.failure_threshold = failure_threshold
        self.reset_s = reset_s
        self._clock = clock
        self._state: State = CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_started = 0.0
        self.failures_total = 0
        self.opens_total = 0

    @property
    def state(self) -> State:
        """The current state; ``open`` is reported as-is even once ``reset_s`` has passed
        (it turns ``half_open`` only when a caller asks to be let through)."""
        return self._state

    @property
    def closed(self) -> bool:
        return self._state == CLOSED

    def allow(self) -> bool:
        """May a call go through now?  In ``half_open`` a True answer makes the caller the probe,
        which must then call :meth:`record_success` or :meth:`record_failure`."""
        state = self._state
        if state == CLOSED:
            return True
        now = self._clock()
        if state == OPEN:
            if now - self._opened_at >= self.reset_s:
                self._state = HALF_OPEN
                self._probe_started = now
                return True
            return False
        # half_open: one probe at a time, but never wedge on a probe that vanished
        if now - self._probe_started >= self.reset_s:
            self._probe_started = now
            return True
        return False

    def record_success(self) -> None:
        """A call succeeded: close the breaker and forget past failures."""
        self._consecutive = 0
        self._state = CLOSED

    def record_failure(self) -> None:
        """A call failed or timed out: count it, and open the breaker at the threshold
        (a failed half-open probe re-opens it at once)."""
        self.failures_total += 1
        self._consecutive += 1
        if self._state == HALF_OPEN or (self._state == CLOSED and self._consecutive >= self.failure_threshold):
            self._state = OPEN
            self._opened_at = self._clock()
            self.opens_total += 1
        elif self._state == OPEN:
            # a call that started before the breaker opened failed late: restart the wait
            self._opened_at = self._clock()

    def reset(self) -> None:
        """Force the breaker closed (tests, admin)."""
        self.record_success()

    def __repr__(self) -> str:
        return f"CircuitBreaker(state={self._state}, consecutive={self._consecutive})"
