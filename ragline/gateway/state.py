"""Per-upstream admission state, and the in-process implementation of it.

For every upstream the state holds, in one place so that a single step decides admission:

* **rate limits**: requests and tokens per minute as GCRA (a token bucket in "theoretical arrival
  time" form) with no burst: a request is admitted when the bucket has no debt, and adds
  ``cost × interval`` of it.  So any window of *w* seconds admits at most ``w × rate + 1`` requests
  (``w × rate`` tokens plus one request's worth), which is what makes "never above the limit in any
  1 s or 60 s window" hold.  The rate is ``limit × headroom × factor``;
* **adaptive rate (AIMD)**: ``factor`` halves on a 429 (at most once a second, so one burst of 429s
  is one decrease) down to 1/32, and grows by 0.02 per success up to 1: never above the ceiling.
  It scales rpm, tpm and max in-flight alike;
* **Retry-After floor**: after a 429 nothing is admitted to that upstream until its Retry-After has
  passed (1 s when it gave none); then one call goes first, alone, and only its success opens the
  upstream to everyone again (a second 429 starts a new wait), so the callers that queued during
  the wait do not all arrive at once.  An upstream never seen to succeed starts the same way (slow
  start: one call, then everyone), so a burst at start-up cannot land on an upstream that is
  rate-limiting or down;
* **circuit breaker**: ``breaker_failures`` consecutive failures open it for ``cooldown_s``; then
  exactly one caller is admitted as the half-open probe; its success closes the breaker, its failure
  re-opens it.  A probe that never reports is replaced after a lease time;
* **in-flight leases**: each admitted call holds a lease until it settles (in Redis a lease expires,
  so a killed process cannot leak capacity).

Apart from that, :meth:`LocalState.take_now` is a plain request-rate limit (GCRA with a burst, no
slow start, no leases) on the same clock, for the server's per-key and per-tenant API limits.

:class:`LocalState` keeps this in the process; :class:`~ragline.gateway.redis_state.RedisState` runs
the same algorithm as Lua scripts in Redis, so that every worker and instance shares one state.
The tests drive both through the same cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

__all__ = [
    "FAILED",
    "LIMITED",
    "NEUTRAL",
    "OK",
    "Limits",
    "LocalState",
    "State",
    "Verdict",
]

OK: Final = "ok"
LIMITED: Final = "limited"
"""The upstream answered 429."""
FAILED: Final = "failed"
"""5xx, timeout, connection failure, malformed answer: counts towards the breaker."""
NEUTRAL: Final = "neutral"
"""Not the upstream's doing (a bad request, a cancelled caller): releases the lease, nothing else."""

MIN_FACTOR: Final = 1 / 32
INCREASE: Final = 0.02
DECREASE_EVERY_S: Final = 1.0
DEFAULT_RETRY_AFTER_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What one upstream allows (``None``: unlimited) and how its breaker behaves."""

    rpm: float | None = None
    tpm: float | None = None
    max_in_flight: int | None = None
    breaker_failures: int = 5
    cooldown_s: float = 10.0
    adaptive: bool = True
    headroom: float = 0.9
    lease_s: float = 120.0
    """How long an admitted call may hold its lease (and a half-open probe its turn) before it lapses."""

    def share(self, fraction: float) -> Limits:
        """These limits scaled to ``fraction`` of each (one process's share while Redis is away)."""
        if fraction >= 1.0:
            return self
        return Limits(
            None if self.rpm is None else self.rpm * fraction,
            None if self.tpm is None else self.tpm * fraction,
            None if self.max_in_flight is None else max(1, int(self.max_in_flight * fraction)),
            self.breaker_failures,
            self.cooldown_s,
            self.adaptive,
            self.headroom,
            self.lease_s,
        )


class Verdict(NamedTuple):
    ok: bool
    wait_s: float
    """Not admitted: when to ask again (0 when unknown, e.g. waiting for a free in-flight slot)."""
    reason: str
    """ok, retry_after, open (breaker open or another caller is probing), single (one call at a time
    until one succeeds), busy, rpm, tpm."""
    probe: bool = False
    """Admitted as the half-open probe."""
    lease: str = ""
    """The lease to settle (the state may have renamed it, e.g. when admitted by a fallback)."""


class State(Protocol):
    """Admission state of every upstream."""

    @property
    def mode(self) -> str:
        """Where it lives right now: "local" or "redis"."""
        ...

    async def acquire(self, name: str, limits: Limits, tokens: int, lease: str) -> Verdict: ...

    async def settle(
        self,
        name: str,
        limits: Limits,
        lease: str,
        outcome: str,
        *,
        charged: int = 0,
        used: int | None = None,
        retry_after: float | None = None,
        probe: bool = False,
    ) -> str:
        """Release ``lease`` and record ``outcome``; ``used`` tokens replace the ``charged`` estimate.
        Returns the breaker transition it caused: "opened", "closed" or ""."""
        ...

    async def in_flight(self, names: Sequence[str]) -> list[int]: ...

    async def wait_release(self, timeout_s: float) -> None:
        """Sleep until some lease is released, at most ``timeout_s``."""
        ...

    async def snapshot(self, name: str, limits: Limits) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class _Entry:
    tat_r: float = 0.0
    tat_t: float = 0.0
    factor: float = 1.0
    until: float = 0.0
    single: bool = True
    """Calls go one at a time: nothing has succeeded yet, or a 429 came since the last success."""
    ra_probe: str = ""
    ra_probe_until: float = 0.0
    last_dec: float = -1e18
    fails: int = 0
    open_until: float = 0.0
    half: bool = False
    probe_until: float = 0.0
    opens: int = 0
    inflight: int = 0


class LocalState:
    """The state in this process (all times in ms from an injectable monotonic clock)."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or (lambda: time.monotonic() * 1000.0)
        self._entries: dict[str, _Entry] = {}
        self._released: asyncio.Event | None = None
        self._buckets: dict[str, float] = {}
        """Plain request-rate buckets of :meth:`take_now`: name → theoretical arrival time (ms)."""

    @property
    def mode(self) -> str:
        return "local"

    def _entry(self, name: str) -> _Entry:
        e = self._entries.get(name)
        if e is None:
            e = self._entries[name] = _Entry()
        return e

    async def acquire(self, name: str, limits: Limits, tokens: int, lease: str) -> Verdict:
        return self.acquire_now(name, limits, tokens, lease)

    def acquire_now(self, name: str, limits: Limits, tokens: int, lease: str = "") -> Verdict:
        """The admission step (synchronous: nothing here waits)."""
        now = self._clock()
        e = self._entry(name)
        if e.until > now:
            return Verdict(False, (e.until - now) / 1000, "retry_after")
        probe = False
        if e.open_until > now:
            return Verdict(False, (e.open_until - now) / 1000, "open")
        if e.half:
            if e.probe_until > now:  # another caller is probing: ask again soon, not after its lease
                return Verdict(False, min(e.probe_until - now, limits.cooldown_s * 1000) / 1000, "open")
            probe = True
        ra_probe = False
        if e.single:
            if e.ra_probe_until > now:  # the first call has not answered yet
                return Verdict(False, min(e.ra_probe_until - now, 50.0) / 1000, "single")
            ra_probe = True
        f = e.factor if limits.adaptive else 1.0
        if limits.max_in_flight is not None and e.inflight >= max(1, int(limits.max_in_flight * f)):
            return Verdict(False, 0.0, "busy")
        if limits.rpm is not None and e.tat_r > now:
            return Verdict(False, (e.tat_r - now) / 1000, "rpm")
        if limits.tpm is not None and e.tat_t > now:
            return Verdict(False, (e.tat_t - now) / 1000, "tpm")
        if limits.rpm is not None:
            e.tat_r = now + 60_000.0 / (limits.rpm * limits.headroom * f)
        if limits.tpm is not None:
            e.tat_t = now + max(tokens, 1) * 60_000.0 / (limits.tpm * limits.headroom * f)
        if probe:
            e.probe_until = now + limits.lease_s * 1000
        if ra_probe:
            e.ra_probe, e.ra_probe_until = lease, now + limits.lease_s * 1000
        e.inflight += 1
        return Verdict(True, 0.0, "ok", probe, lease)

    async def take(self, buckets: Sequence[tuple[str, float, int]]) -> Verdict:
        return self.take_now(buckets)

    def take_now(self, buckets: Sequence[tuple[str, float, int]]) -> Verdict:
        """Admit one request against every ``(name, rpm, burst)`` bucket at once, or against none.

        A plain request-rate limit (the API's per-key and per-tenant limits, the invalidation API):
        GCRA with a tolerance of ``burst - 1`` intervals, so ``burst`` requests may come back to back
        and any *w* seconds admit at most ``w × rpm / 60 + burst``.  No slow start, no lease, no
        headroom, nothing to settle; ``burst`` 1 is the rule of :meth:`acquire_now` (admitted when the
        bucket has no debt).  Refused: ``wait_s`` is when every bucket admits again and ``reason``
        names the bucket that waits longest; nothing is charged.
        """
        now = self._clock()
        tats = self._buckets
        worst, why = 0.0, ""
        for name, rpm, burst in buckets:
            interval = 60_000.0 / rpm
            wait = max(tats.get(name, 0.0), now) - (burst - 1) * interval - now
            if wait > worst:
                worst, why = wait, name
        if why:
            return Verdict(False, worst / 1000, why)
        if len(tats) > 65_536:  # bounded: a bucket whose debt is paid holds no information
            for stale in [n for n, tat in tats.items() if tat <= now]:
                del tats[stale]
        for name, rpm, _ in buckets:
            tats[name] = max(tats.get(name, 0.0), now) + 60_000.0 / rpm
        return Verdict(True, 0.0, "ok")

    def raise_debt(self, name: str, debt_s: float) -> None:
        """Bucket ``name`` owes at least ``debt_s`` seconds from now (e.g. what a shared state reported;
        never lowers a debt)."""
        now = self._clock()
        self._buckets[name] = max(self._buckets.get(name, 0.0), now + debt_s * 1000)

    async def settle(
        self,
        name: str,
        limits: Limits,
        lease: str,
        outcome: str,
        *,
        charged: int = 0,
        used: int | None = None,
        retry_after: float | None = None,
        probe: bool = False,
    ) -> str:
        now = self._clock()
        e = self._entry(name)
        e.inflight = max(0, e.inflight - 1)
        if self._released is not None:
            self._released.set()
            self._released = None
        f = e.factor if limits.adaptive else 1.0
        if lease and lease == e.ra_probe:
            e.ra_probe, e.ra_probe_until = "", 0.0
            if outcome == OK:
                e.single = False
        if used is not None and limits.tpm is not None and used != charged:
            # the estimate was charged at admission; correct it with what the upstream reported
            e.tat_t = max(e.tat_t + (used - charged) * 60_000.0 / (limits.tpm * limits.headroom * f), now)
        if outcome == OK:
            e.fails = 0
            if limits.adaptive:
                e.factor = min(1.0, e.factor + INCREASE)
            if e.half:
                e.half = False
                e.open_until = e.probe_until = 0.0
                return "closed"
            return ""
        if outcome == LIMITED:
            wait = DEFAULT_RETRY_AFTER_S if retry_after is None else retry_after
            e.until = max(e.until, now + wait * 1000)
            e.single = True
            if limits.adaptive and now - e.last_dec >= DECREASE_EVERY_S * 1000:
                e.factor = max(MIN_FACTOR, e.factor / 2)
                e.last_dec = now
            if probe:
                e.probe_until = 0.0  # the probe learnt nothing about health: the next caller probes
            return ""
        if outcome == FAILED:
            e.fails += 1
            if probe or (not e.half and e.fails >= limits.breaker_failures):
                e.open_until = now + limits.cooldown_s * 1000
                e.half = True
                e.probe_until = 0.0
                e.fails = 0
                e.opens += 1
                return "opened"
            return ""
        if probe:
            e.probe_until = 0.0
        return ""

    async def in_flight(self, names: Sequence[str]) -> list[int]:
        entries = self._entries
        return [entries[n].inflight if n in entries else 0 for n in names]

    async def wait_release(self, timeout_s: float) -> None:
        if self._released is None:
            self._released = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), timeout_s)

    async def snapshot(self, name: str, limits: Limits) -> dict[str, Any]:
        now = self._clock()
        e = self._entry(name)
        return describe(
            now,
            e.factor,
            e.until,
            e.open_until,
            e.half,
            e.probe_until,
            e.opens,
            e.inflight,
            self.mode,
        )

    async def aclose(self) -> None:
        return None


def describe(
    now: float,
    factor: float,
    until: float,
    open_until: float,
    half: bool,
    probe_until: float,
    opens: int,
    inflight: int,
    mode: str,
) -> dict[str, Any]:
    """The operator's view of one upstream's state (``/v1/upstreams``, metrics)."""
    if open_until > now:
        breaker = "open"
    elif half:
        breaker = "half_open"
    else:
        breaker = "closed"
    return {
        "breaker": breaker,
        "breaker_opens": opens,
        "rate_factor": round(factor, 4),
        "cooling_down_s": round(max(0.0, until - now) / 1000, 3),
        "open_for_s": round(max(0.0, open_until - now) / 1000, 3),
        "probing": half and probe_until > now,
        "in_flight": inflight,
        "state": mode,
    }
