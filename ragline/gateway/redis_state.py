"""The upstream state in Redis: one state for every worker and instance (DESIGN §6, §7).

Why hand-written Lua: admission must check and update several things at once (Retry-After floor,
breaker, in-flight leases, requests and tokens per minute, the adaptive factor) in one round trip
and atomically, or two instances could both take the last slot.  ``limits`` has no tokens-per-minute
with a cost known only afterwards, nor in-flight leases, and a chain of separate limiter calls would
cost a round trip each and could admit a request one limiter refuses.  The algorithm is the one of
:class:`~ragline.gateway.state.LocalState` (same tests), on Redis' clock (``TIME``), so instances on
machines whose clocks differ still agree.

Redis going away mid-run is a stated choice: **fail open to local limits**.  Calls are guarded by a
:class:`~ragline.infra.redis_conn.RedisConn` breaker (1 s per call, open after two failures; a single
failed call is answered "ask again", not by local admission, so one process whose event loop stalled
cannot admit on top of the shared limit); while it is open each process admits from its
own :class:`LocalState` with every limit scaled by ``gateway.local_share`` (set it to 1/N for N
processes to keep their sum within the limit), requests keep flowing, ``mode`` reports ``local``, and
the shared state is used again once Redis answers.  Leases taken in Redis expire on their own, so a
process that dies (or loses Redis) mid-call cannot leak capacity.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

from redis.asyncio import Redis

from ragline.gateway.state import OK, Limits, LocalState, Verdict, describe
from ragline.infra.redis_conn import RedisConn, RedisUnavailable

__all__ = ["RedisState"]

_ACQUIRE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local h = redis.call('HMGET', KEYS[1], 'tat_r', 'tat_t', 'f', 'until', 'open_until', 'half', 'probe_until',
                     'single', 'ra_probe_until')
local tat_r = tonumber(h[1]) or 0
local tat_t = tonumber(h[2]) or 0
local f = tonumber(h[3]) or 1
local until_ = tonumber(h[4]) or 0
local open_until = tonumber(h[5]) or 0
local probe_until = tonumber(h[7]) or 0
local rpm, tpm, maxf = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, lease, lease_ms = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local headroom, cooldown_ms = tonumber(ARGV[7]), tonumber(ARGV[9])
if ARGV[8] ~= '1' then f = 1 end
if until_ > now then return {0, tostring(until_ - now), 'retry_after', 0} end
if open_until > now then return {0, tostring(open_until - now), 'open', 0} end
local probe = 0
if h[6] == '1' then
  if probe_until > now then return {0, tostring(math.min(probe_until - now, cooldown_ms)), 'open', 0} end
  probe = 1
end
local ra_probe = 0
if h[8] ~= '0' then  -- one at a time: never succeeded yet (absent), or a 429 since the last success
  local ru = tonumber(h[9]) or 0
  if ru > now then return {0, tostring(math.min(ru - now, 50)), 'single', 0} end
  ra_probe = 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if maxf > 0 and redis.call('ZCARD', KEYS[2]) >= math.max(1, math.floor(maxf * f)) then
  return {0, '0', 'busy', 0}
end
if rpm > 0 and tat_r > now then return {0, tostring(tat_r - now), 'rpm', 0} end
if tpm > 0 and tat_t > now then return {0, tostring(tat_t - now), 'tpm', 0} end
if rpm > 0 then redis.call('HSET', KEYS[1], 'tat_r', tostring(now + 60000 / (rpm * headroom * f))) end
if tpm > 0 then
  redis.call('HSET', KEYS[1], 'tat_t', tostring(now + math.max(tokens, 1) * 60000 / (tpm * headroom * f)))
end
if probe == 1 then redis.call('HSET', KEYS[1], 'probe_until', tostring(now + lease_ms)) end
if ra_probe == 1 then redis.call('HSET', KEYS[1], 'ra_probe', lease, 'ra_probe_until', tostring(now + lease_ms)) end
redis.call('ZADD', KEYS[2], now + lease_ms, lease)
redis.call('PEXPIRE', KEYS[1], 86400000)
redis.call('PEXPIRE', KEYS[2], lease_ms + 1000)
return {1, '0', 'ok', probe}
"""

_SETTLE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZREM', KEYS[2], ARGV[1])
local outcome = ARGV[2]
local charged, used, ra = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tpm, headroom, adaptive = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8] == '1'
local failures, cooldown_ms, probe = tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11] == '1'
local h = redis.call('HMGET', KEYS[1], 'f', 'tat_t', 'fails', 'half', 'until', 'last_dec', 'ra_probe')
local f = tonumber(h[1]) or 1
local half = h[4] == '1'
if h[7] and h[7] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'ra_probe', '', 'ra_probe_until', 0)
  if outcome == 'ok' then redis.call('HSET', KEYS[1], 'single', 0) end
end
if used >= 0 and tpm > 0 and used ~= charged then
  local ff = f
  if not adaptive then ff = 1 end
  local tat_t = (tonumber(h[2]) or 0) + (used - charged) * 60000 / (tpm * headroom * ff)
  redis.call('HSET', KEYS[1], 'tat_t', tostring(math.max(tat_t, now)))
end
if outcome == 'ok' then
  redis.call('HSET', KEYS[1], 'fails', 0)
  if adaptive then redis.call('HSET', KEYS[1], 'f', tostring(math.min(1, f + 0.02))) end
  if half then
    redis.call('HSET', KEYS[1], 'half', 0, 'open_until', 0, 'probe_until', 0)
    return 'closed'
  end
  return ''
elseif outcome == 'limited' then
  if ra < 0 then ra = 1000 end
  redis.call('HSET', KEYS[1], 'until', tostring(math.max(tonumber(h[5]) or 0, now + ra)), 'single', 1)
  if adaptive and now - (tonumber(h[6]) or -1e15) >= 1000 then
    redis.call('HSET', KEYS[1], 'f', tostring(math.max(1 / 32, f / 2)), 'last_dec', tostring(now))
  end
  if probe then redis.call('HSET', KEYS[1], 'probe_until', 0) end
  return ''
elseif outcome == 'failed' then
  local fails = (tonumber(h[3]) or 0) + 1
  if probe or ((not half) and fails >= failures) then
    redis.call('HSET', KEYS[1], 'open_until', tostring(now + cooldown_ms), 'half', 1, 'probe_until', 0, 'fails', 0)
    redis.call('HINCRBY', KEYS[1], 'opens', 1)
    return 'opened'
  end
  redis.call('HSET', KEYS[1], 'fails', fails)
  return ''
end
if probe then redis.call('HSET', KEYS[1], 'probe_until', 0) end
return ''
"""

_SNAPSHOT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local h = redis.call('HMGET', KEYS[1], 'f', 'until', 'open_until', 'half', 'probe_until', 'opens')
local n = redis.call('ZCOUNT', KEYS[2], now, '+inf')
return {tostring(now), h[1] or '1', h[2] or '0', h[3] or '0', h[4] or '0', h[5] or '0', h[6] or '0', n}
"""

_COUNTS: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('ZCOUNT', key, now, '+inf') end
return out
"""
"""Live leases per upstream, on Redis' clock like the leases themselves (their scores are expiry times)."""

_TAKE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tats, worst, why = {}, 0, 0
for i, key in ipairs(KEYS) do
  local interval, tolerance = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tat = math.max(tonumber(redis.call('GET', key)) or 0, now)
  tats[i] = tat + interval
  if tat - tolerance - now > worst then worst, why = tat - tolerance - now, i end
end
if why > 0 then return {0, string.format('%.17g', worst), why} end  -- 17 digits: tostring keeps 10 us
for i, key in ipairs(KEYS) do
  redis.call('SET', key, string.format('%.17g', tats[i]), 'PX', math.ceil(tats[i] - now) + 1000)
end
return {1, '0', 0}
"""
"""Plain request-rate buckets (see :meth:`LocalState.take_now`): all admit, and all are charged, or none."""

_CHARGE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local out = {}
local since = now - tonumber(ARGV[#ARGV])  -- when the first of these requests was admitted
for i, key in ipairs(KEYS) do
  local interval, n = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tat = math.max(tonumber(redis.call('GET', key)) or 0, since) + n * interval
  if n > 0 then
    redis.call('SET', key, string.format('%.17g', tat), 'PX', math.max(math.ceil(tat - now), 0) + 1000)
  end
  out[i] = string.format('%.17g', tat - now)
end
return out
"""
"""Add requests already admitted elsewhere to the same buckets; returns each one's debt (ms)."""

_LOCAL: Final = "L:"
"""Prefix of a lease admitted by the local fallback (it settles there, not in Redis)."""


def _num(x: float | int | None) -> str:
    return "0" if x is None else repr(float(x))


class RedisState:
    """The shared state (see the module docs); ``prefix`` namespaces the keys."""

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Redis | None = None,
        prefix: str = "ragline:gw:",
        local_share: float = 1.0,
        timeout_s: float = 1.0,
    ) -> None:
        self._conn = RedisConn(
            url, client=client, timeout_s=timeout_s, connect_timeout_s=1.0, failure_threshold=2, reset_s=1.0
        )
        redis = self._conn.client
        self._acquire = redis.register_script(_ACQUIRE)
        self._settle = redis.register_script(_SETTLE)
        self._snapshot = redis.register_script(_SNAPSHOT)
        self._counts = redis.register_script(_COUNTS)
        self._take = redis.register_script(_TAKE)
        self._charge = redis.register_script(_CHARGE)
        self._prefix = prefix
        self._timeout = timeout_s
        self.local = LocalState()
        self.local_share = local_share
        self.fallbacks = 0
        """Calls answered by the local state because Redis could not be used."""

    @property
    def mode(self) -> str:
        return "redis" if self._conn.healthy else "local"

    def _keys(self, name: str) -> list[str]:
        base = f"{self._prefix}{{{name}}}"  # one hash slot per upstream (Redis Cluster)
        return [base, base + ":leases"]

    async def _call(self, script: Any, name: str, args: list[Any]) -> Any:
        async def run(_: Redis) -> Any:
            async with asyncio.timeout(self._timeout):
                return await script(keys=self._keys(name), args=args)

        return await self._conn.call(run)

    async def acquire(self, name: str, limits: Limits, tokens: int, lease: str) -> Verdict:
        args = [
            _num(limits.rpm),
            _num(limits.tpm),
            limits.max_in_flight or 0,
            tokens,
            lease,
            int(limits.lease_s * 1000),
            _num(limits.headroom),
            "1" if limits.adaptive else "0",
            int(limits.cooldown_s * 1000),
        ]
        try:
            ok, wait_ms, reason, probe = await self._call(self._acquire, name, args)
        except RedisUnavailable:
            if self._conn.healthy:
                # one failed call is not an outage (a stalled event loop times calls out together):
                # ask Redis again shortly instead of admitting from local limits on top of the shared ones
                return Verdict(False, 0.01, "state", lease=lease)
            self.fallbacks += 1
            return self.local.acquire_now(name, limits.share(self.local_share), tokens, _LOCAL + lease)
        why = reason.decode() if isinstance(reason, bytes) else str(reason)
        return Verdict(bool(ok), float(wait_ms) / 1000, why, bool(probe), lease)

    async def take(self, buckets: Sequence[tuple[str, float, int]]) -> Verdict:
        """:meth:`LocalState.take_now` in one script on Redis' clock, shared by every process.

        The buckets' keys share one hash slot (``{take}``), so a Redis Cluster runs the script too.
        While Redis is unusable each process admits from its own buckets at ``local_share`` of each rate.
        """
        keys = [f"{self._prefix}{{take}}:{name}" for name, _, _ in buckets]
        args: list[str] = []
        for _, rpm, burst in buckets:
            interval = 60_000.0 / rpm
            args += [repr(interval), repr((burst - 1) * interval)]

        async def run(_: Redis) -> Any:
            async with asyncio.timeout(self._timeout):
                return await self._take(keys=keys, args=args)

        try:
            ok, wait_ms, why = await self._conn.call(run)
        except RedisUnavailable:
            self.fallbacks += 1
            share = self.local_share
            return self.local.take_now([(n, rpm * share, burst) for n, rpm, burst in buckets])
        if ok:
            return Verdict(True, 0.0, "ok")
        return Verdict(False, float(wait_ms) / 1000, buckets[int(why) - 1][0])

    async def charge(self, buckets: Sequence[tuple[str, float, int]], age_s: float = 0.0) -> list[float] | None:
        """Add ``n`` requests, admitted without asking over the last ``age_s`` seconds, to each
        ``(name, rpm, n)`` bucket of :meth:`take` (``n`` 0 only reads it); returns each bucket's debt in
        seconds afterwards, ``None`` while Redis is unusable.  One call for many buckets: how a process
        that admits from its own view of the buckets tells the others what it admitted, and learns what
        they did."""
        keys = [f"{self._prefix}{{take}}:{name}" for name, _, _ in buckets]
        args: list[str] = []
        for _, rpm, n in buckets:
            args += [repr(60_000.0 / rpm), str(n)]
        args.append(repr(max(0.0, age_s) * 1000))

        async def run(_: Redis) -> Any:
            async with asyncio.timeout(self._timeout):
                return await self._charge(keys=keys, args=args)

        try:
            out = await self._conn.call(run)
        except RedisUnavailable:
            self.fallbacks += 1
            return None
        return [float(x) / 1000 for x in out]

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
        if lease.startswith(_LOCAL):
            return await self.local.settle(
                name,
                limits.share(self.local_share),
                lease,
                outcome,
                charged=charged,
                used=used,
                retry_after=retry_after,
                probe=probe,
            )
        args = [
            lease,
            outcome,
            charged,
            -1 if used is None else used,
            -1 if retry_after is None else int(retry_after * 1000),
            _num(limits.tpm),
            _num(limits.headroom),
            "1" if limits.adaptive else "0",
            limits.breaker_failures,
            int(limits.cooldown_s * 1000),
            "1" if probe else "0",
        ]
        try:
            out = await self._call(self._settle, name, args)
        except RedisUnavailable:
            # the lease lapses on its own; keep this process's breaker and floor informed meanwhile
            if outcome == OK:
                return ""
            return await self.local.settle(
                name, limits.share(self.local_share), _LOCAL, outcome, retry_after=retry_after
            )
        return out.decode() if isinstance(out, bytes) else str(out)

    async def in_flight(self, names: Sequence[str]) -> list[int]:
        keys = [self._keys(n)[1] for n in names]

        async def run(_: Redis) -> list[int]:
            async with asyncio.timeout(self._timeout):
                return [int(x) for x in await self._counts(keys=keys, args=[])]

        try:
            return await self._conn.call(run)
        except RedisUnavailable:
            return await self.local.in_flight(names)

    async def wait_release(self, timeout_s: float) -> None:
        await asyncio.sleep(min(timeout_s, 0.005))  # leases of other processes: poll, briefly

    async def snapshot(self, name: str, limits: Limits) -> dict[str, Any]:
        try:
            raw = await self._call(self._snapshot, name, [])
        except RedisUnavailable:
            return await self.local.snapshot(name, limits.share(self.local_share))
        now, f, until, open_until, half, probe_until, opens, n = raw
        return describe(
            float(now),
            float(f),
            float(until),
            float(open_until),
            int(half) == 1,
            float(probe_until),
            int(opens),
            int(n),
            self.mode,
        )

    async def aclose(self) -> None:
        await self._conn.close()
