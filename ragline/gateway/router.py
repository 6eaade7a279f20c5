"""Routing strategies: the order in which a group's upstreams are asked for capacity.

Each strategy ranks every candidate (not just picks one), so that when the first has no capacity
(rate, Retry-After, breaker, in-flight) admission falls through to the next without asking again.

* ``round_robin``: rotate (per process).
* ``random``: uniform shuffle.
* ``weighted``: a weighted random order (Efraimidis–Spirakis keys), traffic ∝ ``weight``.
* ``least_busy``: the least outstanding work first: the in-flight count from the shared state
  (every worker and instance when Redis is configured), plus the call being placed, times how much
  slower than the fastest the upstream is (its latency EWMA over the best one's; 1 within
  ``latency_buffer``, so equal upstreams are compared by count alone).  Counting calls alone sends a
  5× slower upstream 1/11 of the traffic (equal counts → traffic ∝ 1/latency) and puts the p95 on
  it; weighting by latency is what Envoy's and Linkerd's least-request balancers do.  Ties rotate
  (per process) — never "the first in the list", which is what makes one upstream take most of the
  traffic when counts are equal (BerriAI/litellm#39322).  Only calls that reach the gateway count:
  cache hits are answered above it and never touch the counters.
* ``latency``: lowest latency EWMA first; upstreams within ``latency_buffer`` of the best share
  the traffic at random (so two equally fast upstreams both serve).  An upstream with no sample yet
  is tried first while nothing is in flight to it (one call measures it), and last while its first
  call runs (so a burst does not all go to an unknown, perhaps slow, upstream).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import Final

from ragline.gateway.upstream import Upstream

STRATEGIES: Final = ("round_robin", "least_busy", "weighted", "random", "latency")


class Router:
    def __init__(self, strategy: str, latency_buffer: float = 0.2, rng: random.Random | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.buffer = latency_buffer
        self._rng = rng or random.Random()
        self._turn = itertools.count()

    @property
    def needs_counts(self) -> bool:
        """Does ranking need the shared in-flight counts (one state round trip)?"""
        return self.strategy == "least_busy"

    def rank(self, ups: Sequence[Upstream], in_flight: Sequence[int] | None = None) -> list[Upstream]:
        n = len(ups)
        if n <= 1:
            return list(ups)
        rng = self._rng
        s = self.strategy
        if s == "round_robin":
            i = next(self._turn) % n
            return [*ups[i:], *ups[:i]]
        if s == "random":
            out = list(ups)
            rng.shuffle(out)
            return out
        if s == "weighted":
            return sorted(ups, key=lambda u: -math.log(1.0 - rng.random()) / u.weight)
        if s == "least_busy":
            counts = in_flight if in_flight is not None else [u.inflight for u in ups]
            slow = self._slowness(ups)
            t = next(self._turn)
            order = sorted(range(n), key=lambda i: ((counts[i] + 1) * slow[i], (i - t) % n))
            return [ups[i] for i in order]
        # latency
        unmeasured = [u for u in ups if u.latency is None and u.inflight == 0]
        measuring = [u for u in ups if u.latency is None and u.inflight > 0]
        measured = sorted((u for u in ups if u.latency is not None), key=lambda u: u.latency or 0.0)
        if measured:
            best = measured[0].latency or 0.0
            near = [u for u in measured if (u.latency or 0.0) <= best * (1.0 + self.buffer)]
            rng.shuffle(near)
            measured = near + measured[len(near) :]
        rng.shuffle(unmeasured)
        return unmeasured + measured + measuring

    def _slowness(self, ups: Sequence[Upstream]) -> list[float]:
        """Each upstream's latency over the fastest's (1.0 within the buffer or while unmeasured)."""
        known = [u.latency for u in ups if u.latency]
        if not known:
            return [1.0] * len(ups)
        best, cut = min(known), 1.0 + self.buffer
        out = []
        for u in ups:
            r = u.latency / best if u.latency else 1.0
            out.append(r if r > cut else 1.0)
        return out
