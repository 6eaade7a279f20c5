"""Routing strategies: the order in which a group's upstreams are asked for capacity.

Each strategy ranks every candidate (not just picks one), so that when the first has no capacity
(rate, Retry-After, breaker, in-flight) admission falls through to the next without asking again.

* ``round_robin``: rotate (per process).
* ``random``: uniform shuffle.
* ``weighted``: a weighted random order (Efraimidis–Spirakis keys), traffic ∝ ``weight``.
* ``least_busy``: fewest in flight first, counted in the shared state (every worker and instance
  when Redis is configured).  Ties go to the upstream this process has sent fewest calls, then
  at random — never to the first in the list, which is what makes one upstream take most of the
  traffic when counts are equal (BerriAI/litellm#39322).  Only calls that reach the gateway count:
  cache hits are answered above it and never touch the counters.
* ``latency``: lowest latency EWMA first; upstreams within ``latency_buffer`` of the best share
  the traffic at random (so two equally fast upstreams both serve), and an upstream with no sample
  yet is tried first so every one gets measured.
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
            order = sorted(range(n), key=lambda i: (counts[i], ups[i].started, rng.random()))
            return [ups[i] for i in order]
        # latency
        unmeasured = [u for u in ups if u.latency is None]
        measured = sorted((u for u in ups if u.latency is not None), key=lambda u: u.latency or 0.0)
        if measured:
            best = measured[0].latency or 0.0
            near = [u for u in measured if (u.latency or 0.0) <= best * (1.0 + self.buffer)]
            rng.shuffle(near)
            measured = near + measured[len(near) :]
        rng.shuffle(unmeasured)
        return unmeasured + measured
