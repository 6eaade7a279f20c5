"""Routing strategies rank every upstream of a group."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ragline.config import UpstreamSettings
from ragline.gateway.router import Router
from ragline.gateway.upstream import Upstream


def ups(n: int, **kw: float) -> list[Upstream]:
    return [Upstream(UpstreamSettings(base_url=f"http://127.0.0.1:{9000 + i}/v1", model="m", name=f"u{i}", **kw))
            for i in range(n)]  # fmt: skip


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="least_busy"):
        Router("fastest")


def test_round_robin_rotates() -> None:
    r, u = Router("round_robin"), ups(3)
    firsts = [r.rank(u)[0].name for _ in range(6)]
    assert firsts == ["u0", "u1", "u2", "u0", "u1", "u2"]
    assert {x.name for x in r.rank(u)} == {"u0", "u1", "u2"}


def test_least_busy_orders_by_shared_counts_and_rotates_ties() -> None:
    r, u = Router("least_busy", rng=random.Random(1)), ups(3)
    assert [x.name for x in r.rank(u, [2, 0, 1])] == ["u1", "u2", "u0"]
    firsts = [r.rank(u, [0, 0, 0])[0].name for _ in range(3)]
    assert sorted(firsts) == ["u0", "u1", "u2"]  # ties rotate


def test_least_busy_counts_a_slow_upstreams_calls_as_more_work() -> None:
    r, u = Router("least_busy", latency_buffer=0.2), ups(3)
    for x, lat in zip(u, (0.040, 0.045, 0.200), strict=True):
        x.observe(lat)
    # u2 is 5x slower: one call in flight there weighs (1+1)*5 = 10, like 9 in flight on u0
    assert r.rank(u, [8, 8, 1])[-1].name == "u2"
    assert r.rank(u, [9, 9, 0])[0].name == "u2"  # idle, it is still the least loaded
    assert {x.name for x in r.rank(u, [3, 3, 0])[:2]} == {"u0", "u1"}  # 4 vs 5: within the buffer


def test_least_busy_never_favours_the_first_on_ties() -> None:
    r, u = Router("least_busy", rng=random.Random(2)), ups(3)
    picks: Counter[str] = Counter()
    for _ in range(300):  # sequential calls, every count 0: the tie-break spreads them evenly
        first = r.rank(u, [0, 0, 0])[0]
        first.started += 1
        picks[first.name] += 1
    assert picks == {"u0": 100, "u1": 100, "u2": 100}


def test_weighted_follows_weights() -> None:
    r = Router("weighted", rng=random.Random(3))
    u = ups(2)
    u[0].weight, u[1].weight = 3.0, 1.0
    picks = Counter(r.rank(u)[0].name for _ in range(4000))
    assert picks["u0"] / 4000 == pytest.approx(0.75, abs=0.03)


def test_random_covers_all() -> None:
    r, u = Router("random", rng=random.Random(4)), ups(3)
    picks = Counter(r.rank(u)[0].name for _ in range(900))
    assert all(250 < c < 350 for c in picks.values())


def test_latency_tries_unmeasured_first_then_the_fastest_sharing_near_ties() -> None:
    r, u = Router("latency", latency_buffer=0.2, rng=random.Random(5)), ups(3)
    u[0].observe(0.050)
    u[1].observe(0.055)  # within 20 % of the best: shares traffic with u0
    assert r.rank(u)[0].name == "u2"  # never measured
    u[2].inflight = 1
    assert r.rank(u)[-1].name == "u2"  # its first call runs: nothing else goes there meanwhile
    u[2].inflight = 0
    u[2].observe(0.250)
    picks = Counter(r.rank(u)[0].name for _ in range(1000))
    assert set(picks) == {"u0", "u1"} and min(picks.values()) > 400
    assert r.rank(u)[-1].name == "u2"


def test_latency_ewma() -> None:
    (u,) = ups(1)
    u.observe(1.0)
    u.observe(0.0)
    assert u.latency == pytest.approx(0.7)  # alpha 0.3
