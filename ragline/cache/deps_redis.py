"""The dependency index shared by every instance through Redis (DESIGN.md §3.1, §6).

:class:`RedisDependencyIndex` implements :class:`~ragline.cache.deps.DepsIndex`
on redis-py asyncio (a client from :func:`~ragline.infra.redis_conn.make_client`,
guarded by a :class:`~ragline.infra.redis_conn.RedisConn`).

The records live in the same Redis as L2, so the instance that ingests
finds the entries *every* instance wrote, deletes them from L2 and its own
L1/L3, and publishes their keys so the others drop their local copies.
Layout, under the tenant's key prefix ``rl:v1:{tenant}:`` (so a tenant or
``rl:`` clear of the tiers removes the records with the entries)::

    rl:v1:{t}:dep:rec:{entry_key}   string  DepRecord bytes, PX = entry TTL + grace
    rl:v1:{t}:dep:chunk:{chunk_id}  set     entry keys with that chunk among their candidates
    rl:v1:{t}:dep:term:{term}       set     entry keys whose query has that term
                                            (a keyed hash of it with encryption at rest)
    rl:v1:{t}:dep:all               hash    entry key → random token of its current record
    rl:v1:{t}:dep:ver               string  random token, replaced on every add/remove
    rl:v1:_dep:tenants              set     tenants with records (``_`` can never start a tenant)

Writes are one ``MULTI`` (plus one ``GET`` of the record being replaced);
lookups are pipelined ``SUNION`` s.  Sets and the hash get the TTL of their
longest-lived member (a Lua max-extend), so they vanish with their records;
members whose record expired are skipped (``EXISTS``, Redis's clock decides)
and removed lazily when met.  The dense check keeps the tenant's
query-vector matrix in memory under the tenant's ``ver`` token: while it is
unchanged a check costs one ``GET``; after some instance added or removed a
record, one ``HGETALL`` of ``all`` and an ``MGET`` of just the records whose
token changed (a refreshed record keeps its key but may change its cutoff).
Tokens are random rather than ``INCR`` counters so that a counter deleted
by a prefix clear and counted up again can never match a stale matrix.

Failure policy of :class:`RedisDependencyIndex` (FAIL OPEN, but never silently stale)
    Redis calls are bounded (socket timeouts, a blocking pool of a few
    connections, a circuit breaker that opens on the first failure so a dead
    Redis costs nothing until ``reset_s``) and never raise to callers.

    * **Adds** that cannot reach Redis go to a local SQLite index (a
      :class:`~ragline.cache.deps_sqlite.DependencyIndex`, same file as the
      single-instance index) and
      ``add`` returns False.  :class:`~ragline.cache.layer.CacheLayer` then
      writes the entry to this instance's *local* tiers (L1, L3) only.  It is
      not enough to rely on the L2 tier dropping writes while *its* breaker is
      open: :class:`~ragline.cache.redis.RedisTier` has its own client,
      a 50 ms timeout (this index uses ≥ 1 s), its own breaker and its own
      recovery probe, so the two can disagree (a slow Redis, a saturated pool,
      a recovery between the two calls).  An entry in L2 without a shared
      record would be invisible to other instances' invalidations, so the
      layer makes the rule hold by construction instead.
    * **Such local-only entries** are unknown to other instances, so their
      invalidation events can never name them.  Every lookup here therefore
      also consults the local index (this instance's own changes find them),
      and once Redis answers again :meth:`RedisDependencyIndex.take_local_only`
      hands their keys to the layer, which drops them everywhere and publishes
      the drop (the local file is shared by the uvicorn workers of one data
      dir, so a worker may hand over another's keys: the publish reaches that
      worker too).  A restart finds leftovers in the file and drops them the
      same way.  Until then (at most the outage plus the layer's ~1 s
      reconcile interval) such an entry can miss a change ingested by another
      instance; a full Redis outage also disconnects the pub/sub subscriber,
      whose resync then drops all local copies anyway.
    * **Lookups** (``by_chunks``, ``by_terms``, ``records``, ``dense_entered``,
      ``tenant_keys``) that cannot consult Redis return what the local index
      knows and increment :attr:`RedisDependencyIndex.lookup_failures`.  The
      layer compares the counter around an invalidation and, if it moved,
      drops *more*: every answer and retrieval entry of the tenant, in every
      tier (L1/L3 at once, L2 through RedisTier's remembered prefix deletes
      replayed before its breaker closes, other instances through the bus,
      whose failed publishes are retried).  Documents are never lost, only
      cached results.
    * **Removes** that fail leave records that point at deleted entries: they
      only cause extra re-checks and expire with their TTL.

    Not supported: Redis Cluster (writes touch several keys of a tenant in one
    ``MULTI`` and a Lua script without hash tags).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import numpy as np
from redis.asyncio import Redis

from ragline.cache.deps import DepRecord, batched, dense_hits, load_record, record_bytes, term_names
from ragline.cache.deps_sqlite import DependencyIndex
from ragline.cache.keys import KEY_ROOT, SCHEMA_VERSION
from ragline.infra.breaker import CircuitBreaker
from ragline.infra.redis_conn import RedisConn, RedisUnavailable, scan_unlink
from ragline.types import Vectors

if TYPE_CHECKING:
    from ragline.cache.crypto import ValueCipher

T = TypeVar("T")

__all__ = ["RedisDependencyIndex"]

_EXTEND_LUA: Final = """
local ms = tonumber(ARGV[1])
for _, k in ipairs(KEYS) do
  local t = redis.call('PTTL', k)
  if t ~= -2 and t < ms then redis.call('PEXPIRE', k, ms) end
end
return 0
"""
"""Give each existing key at least ``ARGV[1]`` ms to live (a key without expiry gets one):
a set lives as long as its longest-lived member's record."""

_TENANTS_KEY: Final = f"{KEY_ROOT}v{SCHEMA_VERSION}:_dep:tenants"
_BATCH: Final = 500


def _root(tenant: str) -> str:
    return f"{KEY_ROOT}v{SCHEMA_VERSION}:{tenant}:dep:"


def _tenant_of(entry_key: str) -> str | None:
    """The tenant of a ragline key ``rl:v{n}:{tenant}:…`` (None for other strings)."""
    parts = entry_key.split(":", 3)
    if len(parts) == 4 and parts[0] + ":" == KEY_ROOT and parts[1][:1] == "v":
        return parts[2]
    return None


def _parse(entry_key: str, tenant: str, raw: Any, cipher: ValueCipher | None) -> DepRecord | None:
    """A stored record, or None for a missing (expired), foreign or unopenable value."""
    return load_record(entry_key, tenant, raw, cipher)


def _sets(root: str, rec: DepRecord, cipher: ValueCipher | None, every: bool = False) -> set[str]:
    """The reverse-index sets naming ``rec`` (term sets under the current key's names, or under
    ``every`` key's: what to undo for a record a previous key may have written)."""
    terms = term_names(cipher, rec.tenant, rec.terms, every)
    return {root + "chunk:" + x for x in rec.candidate_ids} | {root + "term:" + x for x in terms}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _DenseCache:
    """One tenant's query vectors as rows ``entry key → (record token, vector, cutoff)`` and the
    matrix built from the rows of dimension ``dim``; ``ver`` is the tenant's token it matches
    (None: no token in Redis, so never trusted without a look at the hash)."""

    __slots__ = ("cutoffs", "dim", "keys", "qvecs", "rows", "ver")

    def __init__(self, ver: bytes | None, dim: int, rows: dict[str, tuple[bytes, Vectors, float]]) -> None:
        self.ver = ver
        self.dim = dim
        self.rows = rows
        self.keys = [k for k, (_, v, _) in rows.items() if v.shape == (dim,)]
        self.qvecs: Vectors = np.stack([rows[k][1] for k in self.keys]) if self.keys else np.zeros((0, dim), np.float32)
        self.cutoffs = np.asarray([rows[k][2] for k in self.keys], dtype=np.float32)


# --------------------------------------------------------------------------- Redis operations
# Each runs on a client inside RedisConn.call and raises on failure.


async def _tenants(c: Redis) -> list[str]:
    return sorted(_text(t) for t in await c.smembers(_TENANTS_KEY))


async def _alive(
    c: Redis, root: str, members: Iterable[str], sets: Iterable[str] = (), hashes: Iterable[str] = ()
) -> set[str]:
    """The members whose record still exists; the others are removed from ``sets`` and
    ``hashes`` (lazily: an expired record's memberships go only when they are met)."""
    ms = list(members)
    async with c.pipeline(transaction=False) as p:
        for m in ms:
            p.exists(root + "rec:" + m)
        live = {m for m, n in zip(ms, await p.execute(), strict=True) if n}
    stale = [m for m in ms if m not in live]
    if stale:
        async with c.pipeline(transaction=False) as p:
            for s in sets:
                p.srem(s, *stale)
            for h in hashes:
                p.hdel(h, *stale)
            await p.execute()
    return live


async def _live_members(c: Redis, root: str, set_keys: list[str]) -> set[str]:
    """SUNION of the sets, minus members whose record expired (removed from the sets lazily)."""
    async with c.pipeline(transaction=False) as p:
        for batch in batched(set_keys, _BATCH):
            p.sunion(batch)
        found = {_text(m) for res in await p.execute() for m in res}
    return await _alive(c, root, found, set_keys) if found else set()


async def _fetch(c: Redis, tenant: str, keys: list[str], cipher: ValueCipher | None) -> dict[str, DepRecord]:
    """The records that exist, by entry key (expired or foreign values are skipped)."""
    root = _root(tenant)
    out: dict[str, DepRecord] = {}
    for batch in batched(keys, _BATCH):
        for k, raw in zip(batch, await c.mget([root + "rec:" + k for k in batch]), strict=True):
            rec = _parse(k, tenant, raw, cipher)
            if rec is not None:
                out[k] = rec
    return out


async def _tenant_keys(c: Redis, tenant: str) -> list[str]:
    root = _root(tenant)
    members = [_text(m) for m in await c.hkeys(root + "all")]
    live = await _alive(c, root, members, hashes=(root + "all",))
    return [m for m in members if m in live]


async def _add_shared(c: Redis, rec: DepRecord, ttl_ms: int, cipher: ValueCipher | None) -> None:
    t = rec.tenant
    root = _root(t)
    rk = root + "rec:" + rec.entry_key
    sets = _sets(root, rec, cipher)
    stale: set[str] = set()
    old = await c.get(rk)
    prev = _parse(rec.entry_key, t, old, cipher)  # the record being replaced: undo its memberships
    if prev is not None:
        stale = _sets(root, prev, cipher, every=True) - sets
    async with c.pipeline(transaction=True) as p:
        p.set(rk, record_bytes(rec, cipher), px=ttl_ms)
        for s in stale:
            p.srem(s, rec.entry_key)
        for s in sets:
            p.sadd(s, rec.entry_key)
        p.hset(root + "all", rec.entry_key, secrets.token_bytes(8))
        # EVAL, not EVALSHA: a pipeline with a Script object first asks SCRIPT EXISTS (a round trip)
        extend = [*sets, root + "all"]
        p.eval(_EXTEND_LUA, len(extend), *extend, ttl_ms)
        p.set(root + "ver", secrets.token_bytes(8))
        p.sadd(_TENANTS_KEY, t)
        await p.execute()


async def _remove_shared(c: Redis, keys: list[str], cipher: ValueCipher | None) -> None:
    by_tenant: dict[str, list[str]] = {}
    unknown: list[str] = []
    for k in keys:
        t = _tenant_of(k)
        if t is None:
            unknown.append(k)
        else:
            by_tenant.setdefault(t, []).append(k)
    if unknown:  # not a ragline key: look for it under every tenant
        for t in await _tenants(c):
            by_tenant.setdefault(t, []).extend(unknown)
    for t, tkeys in by_tenant.items():
        root = _root(t)
        for batch in batched(tkeys, _BATCH):
            raws = await c.mget([root + "rec:" + k for k in batch])
            drops: dict[str, set[str]] = {}
            for k, raw in zip(batch, raws, strict=True):
                rec = _parse(k, t, raw, cipher)
                if rec is None:
                    continue
                for s in _sets(root, rec, cipher, every=True):
                    drops.setdefault(s, set()).add(k)
            async with c.pipeline(transaction=True) as p:
                p.unlink(*[root + "rec:" + k for k in batch])
                for s, members in drops.items():
                    p.srem(s, *members)
                p.hdel(root + "all", *batch)
                p.set(root + "ver", secrets.token_bytes(8))
                await p.execute()


async def _clear_shared(c: Redis, tenant: str | None) -> None:
    tenants = await _tenants(c) if tenant is None else [tenant]
    for t in tenants:
        await scan_unlink(c, _root(t))
        await c.srem(_TENANTS_KEY, t)
    if tenant is None:
        await c.unlink(_TENANTS_KEY)


class RedisDependencyIndex:
    """The dependency index shared by every instance through Redis (see the module docstring).

    Same interface as :class:`~ragline.cache.deps_sqlite.DependencyIndex`; used from
    one event loop; never raises on a Redis failure (falls back to the local index
    ``local_path``).
    """

    def __init__(
        self,
        url: str | None,
        local_path: Path,
        *,
        client: Redis | None = None,
        timeout_s: float = 1.0,
        connect_timeout_s: float = 1.0,
        max_connections: int = 16,
        failure_threshold: int = 1,
        reset_s: float = 1.0,
        ttl_grace_s: float = 300.0,
        cipher: ValueCipher | None = None,
    ) -> None:
        self.cipher = cipher
        """Encryption at rest (:mod:`ragline.cache.crypto`): records sealed, term sets named by keyed hashes."""
        # socket timeout = timeout_s: unlike the L2 tier, calls here carry no asyncio deadline
        self.conn = RedisConn(
            url,
            client=client,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_connections=max_connections,
            socket_timeout_s=timeout_s,
            failure_threshold=failure_threshold,
            reset_s=reset_s,
        )
        self.client: Redis = self.conn.client
        self.breaker: CircuitBreaker = self.conn.breaker
        self.local = DependencyIndex(local_path, cipher)
        self.ttl_grace_s = ttl_grace_s
        """Records outlive their entry by this much: a promoted copy's TTL is computed from the
        writer's clock, so some skew between instances must not leave an entry without its record."""
        self._local_lock = asyncio.Lock()  # local-only records and their flag change together
        self._dense: dict[str, _DenseCache] = {}
        self._has_local = self.local.known_count() > 0
        self._lookup_failures = 0
        self._shared_count = 0
        self._count_task: asyncio.Task[None] | None = None
        self.dense_refreshes = 0
        """Dense checks that found the tenant's records changed (``ver``) and refreshed the matrix."""
        self.dense_records_fetched = 0

    @property
    def errors(self) -> int:
        return self.conn.errors

    @property
    def last_error(self) -> str | None:
        return self.conn.last_error

    # -- the guarded call -------------------------------------------------------------

    async def _run(self, fn: Callable[[Redis], Awaitable[T]]) -> T:
        """``await fn(client)`` behind the breaker; raises ``RedisUnavailable`` instead of any failure."""
        return await self.conn.call(fn)

    def _failed_lookup(self) -> None:
        self._lookup_failures += 1

    @property
    def lookup_failures(self) -> int:
        return self._lookup_failures

    @property
    def healthy(self) -> bool:
        return self.breaker.closed

    # -- writes -----------------------------------------------------------------------

    async def add(self, rec: DepRecord, expires: float) -> bool:
        ttl_ms = max(1, int((expires - time.time() + self.ttl_grace_s) * 1000))
        try:
            await self._run(lambda c: _add_shared(c, rec, ttl_ms, self.cipher))
        except RedisUnavailable:
            async with self._local_lock:
                await self.local.add(rec, expires)
                self._has_local = True
            return False
        if self._has_local:  # the shared record now covers it (a put overwrites every tier next)
            async with self._local_lock:
                await self.local.remove([rec.entry_key])
        return True

    async def remove(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        await self.local.remove(keys)
        # on failure, the records left behind point at deleted entries: extra re-checks, then TTL
        with contextlib.suppress(RedisUnavailable):
            await self._run(lambda c: _remove_shared(c, list(dict.fromkeys(keys)), self.cipher))

    async def clear(self, tenant: str | None = None) -> None:
        await self.local.clear(tenant)
        if tenant is None:
            self._dense.clear()
        else:
            self._dense.pop(tenant, None)
        # on failure: the callers clear the same prefix in the tiers, which RedisTier replays on recovery
        with contextlib.suppress(RedisUnavailable):
            await self._run(lambda c: _clear_shared(c, tenant))

    # -- lookups ----------------------------------------------------------------------

    async def by_chunks(self, tenant: str, chunk_ids: Iterable[str]) -> set[str]:
        return await self._members(tenant, "chunk:", chunk_ids, self.local.by_chunks)

    async def by_terms(self, tenant: str, terms: Iterable[str]) -> set[str]:
        items = list(dict.fromkeys(terms))
        shared = term_names(self.cipher, tenant, items, every=True)
        return await self._members(tenant, "term:", items, self.local.by_terms, shared)

    async def _members(
        self,
        tenant: str,
        kind: str,
        names: Iterable[str],
        local: Callable[[str, list[str]], Awaitable[set[str]]],
        shared: list[str] | None = None,
    ) -> set[str]:
        """Members of the local index's sets ``names`` and of the shared sets ``shared`` (default: the same names)."""
        items = list(dict.fromkeys(names))
        out = await local(tenant, items)
        shared = items if shared is None else shared
        if not shared:
            return out
        root = _root(tenant)
        try:
            out |= await self._run(lambda c: _live_members(c, root, [root + kind + x for x in shared]))
        except RedisUnavailable:
            self._failed_lookup()
        return out

    async def records(self, tenant: str, keys: Iterable[str]) -> list[DepRecord]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return []
        try:
            found = await self._run(lambda c: _fetch(c, tenant, wanted, self.cipher))
        except RedisUnavailable:
            self._failed_lookup()
            found = {}
        missing = [k for k in wanted if k not in found]
        local = {r.entry_key: r for r in await self.local.records(tenant, missing)} if missing else {}
        return [r for k in wanted if (r := found.get(k) or local.get(k)) is not None]

    async def dense_entered(self, tenant: str, vectors: Vectors) -> set[str]:
        """Entries (of every instance) whose dense candidate list one of ``vectors`` would enter."""
        if len(vectors) == 0:
            return set()
        out = await self.local.dense_entered(tenant, vectors)

        async def op(c: Redis) -> set[str]:
            hits = dense_hits(*await self._dense_of(c, tenant, vectors.shape[1]), vectors)
            # a cached matrix may still hold entries whose record expired since: ask Redis (its
            # clock decides expiry, never this host's) and forget the dead ones
            return await _alive(c, _root(tenant), hits, hashes=(_root(tenant) + "all",)) if hits else hits

        try:
            return out | await self._run(op)
        except RedisUnavailable:
            self._failed_lookup()
            return out

    async def _dense_of(self, c: Redis, tenant: str, dim: int) -> tuple[list[str], Vectors, np.ndarray]:
        """The tenant's query-vector matrix, kept in memory and refreshed incrementally: while the
        tenant's ``ver`` token is unchanged it costs one GET; otherwise one HGETALL of the
        entry → record-token hash, and an MGET of only the records whose token changed."""
        root = _root(tenant)
        ver = await c.get(root + "ver")
        cached = self._dense.get(tenant)
        if cached is not None and isinstance(ver, bytes) and cached.ver == ver and cached.dim == dim:
            return cached.keys, cached.qvecs, cached.cutoffs
        # read the token *before* the records: a change made meanwhile leaves this matrix
        # tagged with the old token, so the next check looks again
        tokens = {
            _text(k): v if isinstance(v, bytes) else str(v).encode() for k, v in (await c.hgetall(root + "all")).items()
        }
        old = cached.rows if cached is not None else {}
        rows = {k: old[k] for k, tok in tokens.items() if k in old and old[k][0] == tok}
        todo = [k for k in tokens if k not in rows]
        found = await _fetch(c, tenant, todo, self.cipher)
        gone = [k for k in todo if k not in found]
        if gone:
            await c.hdel(root + "all", *gone)
        for k, r in found.items():
            rows[k] = (tokens[k], r.qvec, -np.inf if r.dense_cutoff is None else r.dense_cutoff)
        fresh = _DenseCache(ver if isinstance(ver, bytes) else None, dim, rows)
        self.dense_refreshes += 1
        self.dense_records_fetched += len(todo)
        self._dense[tenant] = fresh
        return fresh.keys, fresh.qvecs, fresh.cutoffs

    async def tenant_keys(self, tenant: str) -> list[str]:
        out = dict.fromkeys(await self.local.tenant_keys(tenant))
        try:
            out.update(dict.fromkeys(await self._run(lambda c: _tenant_keys(c, tenant))))
        except RedisUnavailable:
            self._failed_lookup()
        return list(out)

    async def all_keys(self) -> list[str]:
        async def op(c: Redis) -> list[str]:
            return [k for t in await _tenants(c) for k in await _tenant_keys(c, t)]

        out = dict.fromkeys(await self.local.all_keys())
        try:
            out.update(dict.fromkeys(await self._run(op)))
        except RedisUnavailable:
            self._failed_lookup()
        return list(out)

    # -- counts -----------------------------------------------------------------------

    async def count(self) -> int:
        """Local records plus the shared entry-key hashes' sizes (which may still count members
        whose record just expired).  Without Redis I/O while the breaker is not closed: the last
        known shared count is used."""
        n = await self.local.count()
        if self.breaker.closed:
            await self._refresh_count()
        return n + self._shared_count

    async def _refresh_count(self) -> None:
        async def op(c: Redis) -> int:
            tenants = await _tenants(c)
            async with c.pipeline(transaction=False) as p:
                for t in tenants:
                    p.hlen(_root(t) + "all")
                return sum(int(x) for x in await p.execute())

        with contextlib.suppress(RedisUnavailable):
            self._shared_count = await self._run(op)

    def known_count(self) -> int:
        """Local records plus the shared count last seen, without waiting for Redis; with the
        breaker closed and an event loop running, a refresh is started in the background (so
        the next call sees it)."""
        if self.breaker.closed and (self._count_task is None or self._count_task.done()):
            with contextlib.suppress(RuntimeError):  # no running loop: keep the last value
                self._count_task = asyncio.get_running_loop().create_task(
                    self._refresh_count(), name="ragline-deps-count"
                )
        return self.local.known_count() + self._shared_count

    # -- local-only records (written while Redis was unreachable) ---------------------

    @property
    def has_local_only(self) -> bool:
        return self._has_local

    async def local_only(self, key: str) -> bool:
        return await self.local.has(key)

    async def take_local_only(self) -> list[str]:
        if not self._has_local:
            return []
        try:
            await self._run(lambda c: c.ping())
        except RedisUnavailable:
            return []
        async with self._local_lock:
            keys = await self.local.all_keys()
            await self.local.remove(keys)
            self._has_local = await self.local.count() > 0
        return keys

    async def close(self) -> None:
        task = self._count_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self.local.close()
        await self.conn.close()
