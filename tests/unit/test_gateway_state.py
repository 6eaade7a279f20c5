"""The admission state machine (``LocalState``), driven by a fake clock.

The same algorithm runs as Lua in Redis; ``tests/integration/test_gateway_redis.py`` runs these
scenarios against a real redis-server.
"""

from __future__ import annotations

import pytest

from ragline.gateway.state import FAILED, LIMITED, NEUTRAL, OK, Limits, LocalState, State


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000.0

    def __call__(self) -> float:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += seconds * 1000


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def warm(s: State, name: str = "a") -> None:
    """Past slow start: one call admitted and succeeded (nothing limited, so no rate is charged)."""
    assert (await s.acquire(name, Limits(), 1, "warm")).ok
    await s.settle(name, Limits(), "warm", OK)


@pytest.fixture
async def state(clock: Clock) -> LocalState:
    """A state whose upstream "a" has succeeded once."""
    s = LocalState(clock)
    await warm(s)
    return s


async def test_rpm_admits_one_request_per_interval(state: LocalState, clock: Clock) -> None:
    lim = Limits(rpm=60, headroom=1.0)
    assert (await state.acquire("a", lim, 1, "l1")).ok
    v = await state.acquire("a", lim, 1, "l2")
    assert not v.ok and v.reason == "rpm" and v.wait_s == pytest.approx(1.0)
    clock.advance(0.999)
    assert not (await state.acquire("a", lim, 1, "l3")).ok
    clock.advance(0.002)
    assert (await state.acquire("a", lim, 1, "l4")).ok


async def test_headroom_lowers_the_rate(state: LocalState) -> None:
    await state.acquire("a", Limits(rpm=60, headroom=0.5), 1, "l")
    v = await state.acquire("a", Limits(rpm=60, headroom=0.5), 1, "l")
    assert v.wait_s == pytest.approx(2.0)


async def test_tpm_charges_the_estimate_and_settles_with_the_usage(state: LocalState, clock: Clock) -> None:
    lim = Limits(tpm=6000, headroom=1.0)  # 100 tokens/s
    v = await state.acquire("a", lim, 500, "l1")
    assert v.ok
    refused = await state.acquire("a", lim, 10, "l2")
    assert refused.reason == "tpm" and refused.wait_s == pytest.approx(5.0)
    await state.settle("a", lim, "l1", OK, charged=500, used=100)  # it used 100: 4 s refunded
    refused = await state.acquire("a", lim, 10, "l3")
    assert refused.wait_s == pytest.approx(1.0)
    clock.advance(1.0)
    assert (await state.acquire("a", lim, 10, "l4")).ok


async def test_max_in_flight_and_release(state: LocalState) -> None:
    lim = Limits(max_in_flight=2)
    assert (await state.acquire("a", lim, 1, "1")).ok
    assert (await state.acquire("a", lim, 1, "2")).ok
    v = await state.acquire("a", lim, 1, "3")
    assert not v.ok and v.reason == "busy"
    assert await state.in_flight(["a", "b"]) == [2, 0]
    await state.settle("a", lim, "1", NEUTRAL)
    assert (await state.acquire("a", lim, 1, "4")).ok


async def test_retry_after_is_a_hard_floor_and_429_halves_the_rate_once_a_second(
    state: LocalState, clock: Clock
) -> None:
    lim = Limits(rpm=600, headroom=1.0)
    await state.acquire("a", lim, 1, "1")
    await state.settle("a", lim, "1", LIMITED, retry_after=2.0)
    await state.settle("a", lim, "x", LIMITED, retry_after=0.5)  # a shorter one does not shorten the floor
    snap = await state.snapshot("a", lim)
    assert snap["rate_factor"] == 0.5  # two 429s within a second: one decrease
    clock.advance(1.99)
    v = await state.acquire("a", lim, 1, "2")
    assert not v.ok and v.reason == "retry_after" and v.wait_s == pytest.approx(0.01, abs=1e-6)
    clock.advance(0.02)
    assert (await state.acquire("a", lim, 1, "3")).ok
    await state.settle("a", lim, "3", OK)  # the first call after the wait succeeded: open to all again
    # admitted at the halved rate: 20 requests/s → 0.2 s to the next admission instead of 0.1 s
    v = await state.acquire("a", lim, 1, "4")
    assert v.reason == "rpm" and v.wait_s == pytest.approx(0.2)


async def test_a_429_without_retry_after_waits_one_second(state: LocalState, clock: Clock) -> None:
    lim = Limits()
    await state.settle("a", lim, "1", LIMITED)
    assert (await state.acquire("a", lim, 1, "2")).reason == "retry_after"
    clock.advance(1.0)
    assert (await state.acquire("a", lim, 1, "3")).ok


async def test_success_grows_the_rate_slowly_and_never_above_the_ceiling(state: LocalState, clock: Clock) -> None:
    lim = Limits(rpm=600)
    await state.settle("a", lim, "1", LIMITED, retry_after=0)
    assert (await state.snapshot("a", lim))["rate_factor"] == 0.5
    for i in range(10):
        await state.settle("a", lim, str(i), OK)
    assert (await state.snapshot("a", lim))["rate_factor"] == pytest.approx(0.7)
    for i in range(100):
        await state.settle("a", lim, str(i), OK)
    assert (await state.snapshot("a", lim))["rate_factor"] == 1.0


async def test_adaptive_off_keeps_the_configured_rate(state: LocalState) -> None:
    lim = Limits(rpm=600, adaptive=False, headroom=1.0)
    await state.settle("a", lim, "1", LIMITED, retry_after=0)
    await state.acquire("a", lim, 1, "2")
    await state.settle("a", lim, "2", OK)
    assert (await state.acquire("a", lim, 1, "3")).wait_s == pytest.approx(0.1)


async def test_adaptive_scales_max_in_flight(state: LocalState) -> None:
    lim = Limits(max_in_flight=8)
    await state.settle("a", lim, "1", LIMITED, retry_after=0)  # factor 0.5: 4 in flight ...
    assert (await state.acquire("a", lim, 1, "p")).ok
    await state.settle("a", lim, "p", OK)  # ... (0.52 after the first call's success)
    for i in range(4):
        assert (await state.acquire("a", lim, 1, str(i))).ok
    assert (await state.acquire("a", lim, 1, "5")).reason == "busy"


async def test_breaker_opens_probes_once_and_closes(state: LocalState, clock: Clock) -> None:
    lim = Limits(breaker_failures=3, cooldown_s=5.0)
    for i in range(2):
        assert await state.settle("a", lim, str(i), FAILED) == ""
    await state.settle("a", lim, "ok", OK)  # a success resets the count
    for i in range(2):
        assert await state.settle("a", lim, str(i), FAILED) == ""
    assert await state.settle("a", lim, "3", FAILED) == "opened"
    v = await state.acquire("a", lim, 1, "x")
    assert not v.ok and v.reason == "open" and v.wait_s == pytest.approx(5.0)
    assert (await state.snapshot("a", lim))["breaker"] == "open"
    clock.advance(5.0)
    probe = await state.acquire("a", lim, 1, "p")
    assert probe.ok and probe.probe
    other = await state.acquire("a", lim, 1, "q")
    assert not other.ok and other.reason == "open"  # one probe at a time
    assert (await state.snapshot("a", lim))["breaker"] == "half_open"
    assert await state.settle("a", lim, "p", OK, probe=True) == "closed"
    assert (await state.acquire("a", lim, 1, "r")).ok
    assert (await state.snapshot("a", lim))["breaker"] == "closed"


async def test_a_failed_probe_reopens_the_breaker(state: LocalState, clock: Clock) -> None:
    lim = Limits(breaker_failures=1, cooldown_s=2.0)
    assert await state.settle("a", lim, "1", FAILED) == "opened"
    clock.advance(2.0)
    probe = await state.acquire("a", lim, 1, "p")
    assert probe.probe
    assert await state.settle("a", lim, "p", FAILED, probe=True) == "opened"
    assert (await state.acquire("a", lim, 1, "q")).reason == "open"
    assert (await state.snapshot("a", lim))["breaker_opens"] == 2


async def test_a_probe_that_never_reports_is_replaced(state: LocalState, clock: Clock) -> None:
    lim = Limits(breaker_failures=1, cooldown_s=1.0, lease_s=10.0)
    await state.settle("a", lim, "1", FAILED)
    clock.advance(1.0)
    assert (await state.acquire("a", lim, 1, "p")).probe
    clock.advance(10.0)
    assert (await state.acquire("a", lim, 1, "p2")).probe


async def test_limits_share_scales_every_limit() -> None:
    lim = Limits(rpm=600, tpm=10_000, max_in_flight=8).share(0.25)
    assert (lim.rpm, lim.tpm, lim.max_in_flight) == (150, 2500, 2)
    assert Limits(max_in_flight=2).share(0.1).max_in_flight == 1


async def test_after_a_retry_after_one_call_goes_first(state: LocalState, clock: Clock) -> None:
    lim = Limits()
    await state.settle("a", lim, "x", LIMITED, retry_after=1.0)
    clock.advance(1.0)
    first = await state.acquire("a", lim, 1, "first")
    assert first.ok
    held = await state.acquire("a", lim, 1, "second")  # the queue does not rush in behind it
    assert not held.ok and held.reason == "single" and held.wait_s <= 0.05
    await state.settle("a", lim, "first", OK)
    assert (await state.acquire("a", lim, 1, "third")).ok
    assert (await state.acquire("a", lim, 1, "fourth")).ok


async def test_a_second_429_on_the_first_call_starts_a_new_wait(state: LocalState, clock: Clock) -> None:
    lim = Limits()
    await state.settle("a", lim, "x", LIMITED, retry_after=1.0)
    clock.advance(1.0)
    assert (await state.acquire("a", lim, 1, "first")).ok
    await state.settle("a", lim, "other", OK)  # a call admitted before the 429 proves nothing
    assert not (await state.acquire("a", lim, 1, "y")).ok
    await state.settle("a", lim, "first", LIMITED, retry_after=2.0)
    v = await state.acquire("a", lim, 1, "z")
    assert v.reason == "retry_after" and v.wait_s == pytest.approx(2.0)


async def test_slow_start_one_call_until_the_first_success(clock: Clock) -> None:
    s = LocalState(clock)
    first = await s.acquire("new", Limits(), 1, "1")
    assert first.ok
    v = await s.acquire("new", Limits(), 1, "2")
    assert not v.ok and v.reason == "single"
    await s.settle("new", Limits(), "1", FAILED)  # a failure proves nothing: the next caller goes alone
    assert (await s.acquire("new", Limits(), 1, "3")).ok
    assert not (await s.acquire("new", Limits(), 1, "4")).ok
    await s.settle("new", Limits(), "3", OK)
    assert all([(await s.acquire("new", Limits(), 1, str(i))).ok for i in range(5)])
