"""Dependency records of cached answers and retrieval results (DESIGN.md §3.1, §6).

Every cached answer or retrieval result is stored with what it depends on:

* the chunk ids of *every candidate* either retriever returned (a change to
  any of them can reorder the fused list, so all of them are dependencies),
* each retriever's cutoff score (the score of its last candidate; ``None``
  when it returned fewer than its depth, i.e. any new match would enter);
  the dense one decides which entries a new vector may enter, the keyword one
  is kept for a tighter BM25-drift bound (docs/NOTES.md) and is not read today,
  because every entry sharing a term with a change is re-checked,
* the query vector and the query's analysed keyword terms,
* the context chunk ids actually used (answers are judged on them as a set,
  retrieval results in order).

Reverse indexes map chunk id → entries and term → entries, so an ingest finds
exactly the entries it may affect instead of flushing everything.  Two
implementations share one interface (:class:`DepsIndex`); every method is
synchronous and callers run it in a worker thread (``asyncio.to_thread``):

:class:`DependencyIndex` (one instance)
    a small SQLite database next to the L3 cache, so it survives restarts as
    long as the cached entries it guards do.  Used when there is no shared L2.

:class:`RedisDependencyIndex` (several instances sharing Redis)
    the records live in the same Redis as L2, so the instance that ingests
    finds the entries *every* instance wrote, deletes them from L2 and its own
    L1/L3, and publishes their keys so the others drop their local copies.
    Layout, under the tenant's key prefix ``rl:v1:{tenant}:`` (so a tenant or
    ``rl:`` clear of the tiers removes the records with the entries)::

        rl:v1:{t}:dep:rec:{entry_key}   string  DepRecord bytes, PX = entry TTL + grace
        rl:v1:{t}:dep:chunk:{chunk_id}  set     entry keys with that chunk among their candidates
        rl:v1:{t}:dep:term:{term}       set     entry keys whose query has that term
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
      :class:`DependencyIndex`, same file as the single-instance index) and
      ``add`` returns False.  :class:`~ragline.cache.layer.CacheLayer` then
      writes the entry to this instance's *local* tiers (L1, L3) only.  It is
      not enough to rely on the L2 tier dropping writes while *its* breaker is
      open: :class:`~ragline.cache.tiers.RedisTier` has its own client,
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

import contextlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import numpy as np
import orjson

from ragline.cache.breaker import CircuitBreaker
from ragline.cache.keys import KEY_ROOT, SCHEMA_VERSION
from ragline.embed.base import Vectors

if TYPE_CHECKING:
    from redis import Redis

T = TypeVar("T")

__all__ = ["DepRecord", "DependencyIndex", "DepsIndex", "RedisDependencyIndex"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    entry_key TEXT PRIMARY KEY, tenant TEXT NOT NULL, record BLOB NOT NULL, expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_tenant ON entries (tenant);
CREATE TABLE IF NOT EXISTS chunk_deps (tenant TEXT NOT NULL, chunk_id TEXT NOT NULL, entry_key TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunk_deps_idx ON chunk_deps (tenant, chunk_id);
CREATE INDEX IF NOT EXISTS chunk_deps_entry ON chunk_deps (entry_key);
CREATE TABLE IF NOT EXISTS term_deps (tenant TEXT NOT NULL, term TEXT NOT NULL, entry_key TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS term_deps_idx ON term_deps (tenant, term);
CREATE INDEX IF NOT EXISTS term_deps_entry ON term_deps (entry_key);
"""

_EPS: Final = 1e-5
"""Float32 index scores and the dense check's scores may differ in the last bits."""


@dataclass(frozen=True, slots=True)
class DepRecord:
    """What one cached entry depends on; enough to re-check it without embedding."""

    entry_key: str
    tenant: str
    query: str
    qvec: Vectors
    terms: tuple[str, ...]
    candidate_ids: tuple[str, ...]
    context_ids: tuple[str, ...]
    dense_cutoff: float | None
    keyword_cutoff: float | None
    k: int
    mmr: bool
    extra_keys: tuple[str, ...] = ()
    """Other cache keys to drop together with this entry (e.g. its semantic record)."""
    doc_level: bool = False
    candidates: int | None = None

    def to_bytes(self) -> bytes:
        return orjson.dumps({
            "q": self.query, "v": self.qvec.astype(np.float32).tobytes().hex(), "t": self.terms,
            "c": self.candidate_ids, "x": self.context_ids, "dc": self.dense_cutoff,
            "kc": self.keyword_cutoff, "k": self.k, "m": self.mmr, "e": self.extra_keys,
            "dl": self.doc_level, "cd": self.candidates,
        })

    @staticmethod
    def from_bytes(entry_key: str, tenant: str, data: bytes) -> DepRecord:
        d = orjson.loads(data)
        return DepRecord(entry_key, tenant, d["q"], np.frombuffer(bytes.fromhex(d["v"]), dtype=np.float32),
                         tuple(d["t"]), tuple(d["c"]), tuple(d["x"]), d["dc"], d["kc"], d["k"], d["m"],
                         tuple(d.get("e", ())), d.get("dl", False), d.get("cd"))


class DepsIndex(Protocol):
    """What :class:`~ragline.cache.layer.CacheLayer` needs of a dependency index."""

    @property
    def lookup_failures(self) -> int:
        """Monotonic count of lookups that could not consult every record (always 0 when local)."""
        ...

    @property
    def has_local_only(self) -> bool:
        """True while some records exist only in this instance's fallback index."""
        ...

    def add(self, rec: DepRecord, expires: float) -> bool:
        """Register (or replace) ``rec``; True if every instance that reads the entry's tiers can see it."""
        ...

    def remove(self, keys: Sequence[str]) -> None: ...

    def by_chunks(self, tenant: str, chunk_ids: Iterable[str]) -> set[str]: ...

    def by_terms(self, tenant: str, terms: Iterable[str]) -> set[str]: ...

    def records(self, tenant: str, keys: Iterable[str]) -> list[DepRecord]: ...

    def dense_entered(self, tenant: str, vectors: Vectors) -> set[str]: ...

    def tenant_keys(self, tenant: str) -> list[str]: ...

    def all_keys(self) -> list[str]: ...

    def count(self) -> int: ...

    def clear(self, tenant: str | None = None) -> None: ...

    def local_only(self, key: str) -> bool:
        """Is ``key`` recorded only locally (its entry must then stay out of shared tiers)?"""
        ...

    def take_local_only(self) -> list[str]:
        """Once the shared index is reachable: the local-only keys, forgotten here; drop their entries."""
        ...

    def close(self) -> None: ...


def _dense_hits(keys: list[str], qvecs: Vectors, cutoffs: np.ndarray, vectors: Vectors) -> set[str]:
    if not keys:
        return set()
    best = (qvecs @ vectors.T).max(axis=1)
    return {keys[i] for i in np.nonzero(best >= cutoffs - _EPS)[0]}


def _dense_matrix(recs: Iterable[DepRecord], dim: int) -> tuple[list[str], Vectors, np.ndarray]:
    """Keys, stacked query vectors and dense cutoffs (-inf for None) of the records of dimension ``dim``
    (a record of another dimension belongs to another embedder, whose keys this one never serves)."""
    keys: list[str] = []
    vecs: list[Vectors] = []
    cut: list[float] = []
    for rec in recs:
        if rec.qvec.shape != (dim,):
            continue
        keys.append(rec.entry_key)
        vecs.append(rec.qvec)
        cut.append(-np.inf if rec.dense_cutoff is None else rec.dense_cutoff)
    return (keys, np.stack(vecs) if vecs else np.zeros((0, dim), np.float32),
            np.asarray(cut, dtype=np.float32))


class DependencyIndex:
    """Persistent reverse indexes chunk → entries and term → entries, per tenant (SQLite).

    Thread-safe; callers run it in a worker thread (``asyncio.to_thread``).
    An in-memory matrix of query vectors per tenant serves the dense check of
    new chunks (one matrix product for a whole ingest batch).
    """

    lookup_failures: Final = 0
    has_local_only: Final = False

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._dense: dict[str, tuple[list[str], Vectors, np.ndarray]] = {}

    def add(self, rec: DepRecord, expires: float) -> bool:
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            self._remove([rec.entry_key])
            db.execute("INSERT INTO entries VALUES (?,?,?,?)", (rec.entry_key, rec.tenant, rec.to_bytes(), expires))
            db.executemany("INSERT INTO chunk_deps VALUES (?,?,?)",
                           [(rec.tenant, c, rec.entry_key) for c in set(rec.candidate_ids)])
            db.executemany("INSERT INTO term_deps VALUES (?,?,?)",
                           [(rec.tenant, t, rec.entry_key) for t in set(rec.terms)])
            db.execute("COMMIT")
            self._dense.pop(rec.tenant, None)
        return True

    def _remove(self, keys: Sequence[str]) -> None:
        for batch in _batched(list(keys), 500):
            marks = ",".join("?" * len(batch))
            for table in ("entries", "chunk_deps", "term_deps"):
                self._db.execute(f"DELETE FROM {table} WHERE entry_key IN ({marks})", batch)

    def remove(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        with self._lock:
            self._db.execute("BEGIN")
            tenants = self._tenants_of(keys)
            self._remove(keys)
            self._db.execute("COMMIT")
            for t in tenants:
                self._dense.pop(t, None)

    def _tenants_of(self, keys: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for batch in _batched(list(keys), 500):
            marks = ",".join("?" * len(batch))
            out.update(r[0] for r in self._db.execute(
                f"SELECT DISTINCT tenant FROM entries WHERE entry_key IN ({marks})", batch))
        return out

    def has(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM entries WHERE entry_key=?", (key,)).fetchone() is not None

    def by_chunks(self, tenant: str, chunk_ids: Iterable[str]) -> set[str]:
        out: set[str] = set()
        with self._lock:
            for batch in _batched(list(chunk_ids), 500):
                marks = ",".join("?" * len(batch))
                out.update(r[0] for r in self._db.execute(
                    f"SELECT entry_key FROM chunk_deps WHERE tenant=? AND chunk_id IN ({marks})", (tenant, *batch)))
        return out

    def by_terms(self, tenant: str, terms: Iterable[str]) -> set[str]:
        out: set[str] = set()
        with self._lock:
            for batch in _batched(list(terms), 500):
                marks = ",".join("?" * len(batch))
                out.update(r[0] for r in self._db.execute(
                    f"SELECT entry_key FROM term_deps WHERE tenant=? AND term IN ({marks})", (tenant, *batch)))
        return out

    def records(self, tenant: str, keys: Iterable[str]) -> list[DepRecord]:
        out: list[DepRecord] = []
        with self._lock:
            for batch in _batched(list(keys), 500):
                marks = ",".join("?" * len(batch))
                out.extend(DepRecord.from_bytes(k, tenant, r) for k, r in self._db.execute(
                    f"SELECT entry_key, record FROM entries WHERE tenant=? AND entry_key IN ({marks})",
                    (tenant, *batch)))
        return out

    def dense_entered(self, tenant: str, vectors: Vectors) -> set[str]:
        """Entries whose dense candidate list at least one of ``vectors`` would enter.

        A new chunk enters when its cosine to the cached query is ≥ the entry's
        dense cutoff, or when the entry's list was not full (cutoff None).
        """
        if len(vectors) == 0:
            return set()
        dim = vectors.shape[1]
        with self._lock:
            cached = self._dense.get(tenant)
            if cached is None or cached[1].shape[1] != dim:
                rows = self._db.execute("SELECT entry_key, record FROM entries WHERE tenant=?", (tenant,))
                cached = _dense_matrix((DepRecord.from_bytes(k, tenant, r) for k, r in rows), dim)
                self._dense[tenant] = cached
        return _dense_hits(*cached, vectors)

    def tenant_keys(self, tenant: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT entry_key FROM entries WHERE tenant=?", (tenant,))]

    def all_keys(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT entry_key FROM entries")]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM entries").fetchone()[0])

    def clear(self, tenant: str | None = None) -> None:
        with self._lock:
            if tenant is None:
                for table in ("entries", "chunk_deps", "term_deps"):
                    self._db.execute(f"DELETE FROM {table}")
                self._dense.clear()
            else:
                for table in ("entries", "chunk_deps", "term_deps"):
                    self._db.execute(f"DELETE FROM {table} WHERE tenant=?", (tenant,))
                self._dense.pop(tenant, None)

    def local_only(self, key: str) -> bool:
        return False  # the only index: nothing is hidden from anyone

    def take_local_only(self) -> list[str]:
        return []

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------- shared (Redis)

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
_GLOB_SPECIALS: Final = frozenset("*?[]\\")


class _Unavailable(Exception):
    """Redis could not be used for this call (breaker open, error or timeout)."""


def _root(tenant: str) -> str:
    return f"{KEY_ROOT}v{SCHEMA_VERSION}:{tenant}:dep:"


def _tenant_of(entry_key: str) -> str | None:
    """The tenant of a ragline key ``rl:v{n}:{tenant}:…`` (None for other strings)."""
    parts = entry_key.split(":", 3)
    if len(parts) == 4 and parts[0] + ":" == KEY_ROOT and parts[1][:1] == "v":
        return parts[2]
    return None


def _parse(entry_key: str, tenant: str, raw: Any) -> DepRecord | None:
    """A stored record, or None for a missing (expired) or foreign value."""
    if not isinstance(raw, bytes):
        return None
    try:
        return DepRecord.from_bytes(entry_key, tenant, raw)
    except (ValueError, KeyError, TypeError):  # orjson.JSONDecodeError is a ValueError
        return None


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
        self.qvecs: Vectors = (np.stack([rows[k][1] for k in self.keys]) if self.keys
                               else np.zeros((0, dim), np.float32))
        self.cutoffs = np.asarray([rows[k][2] for k in self.keys], dtype=np.float32)


class RedisDependencyIndex:
    """The dependency index shared by every instance through Redis (see the module docstring).

    Same interface as :class:`DependencyIndex`; thread-safe; never raises on a
    Redis failure (falls back to the local index ``local_path``).
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
    ) -> None:
        if (url is None) == (client is None):
            raise ValueError("pass exactly one of url or client")
        self.local = DependencyIndex(local_path)
        self._owns_client = client is None
        self.client: Redis = client if client is not None else self.make_client(
            str(url), timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, max_connections=max_connections)
        self.ttl_grace_s = ttl_grace_s
        """Records outlive their entry by this much: a promoted copy's TTL is computed from the
        writer's clock, so some skew between instances must not leave an entry without its record."""
        self.breaker = CircuitBreaker(failure_threshold, reset_s)
        self._lock = threading.Lock()  # breaker, counters, dense cache, local-only flag
        self._dense: dict[str, _DenseCache] = {}
        self._has_local = self.local.count() > 0
        self._lookup_failures = 0
        self._shared_count = 0
        self.errors = 0
        self.dense_refreshes = 0
        """Dense checks that found the tenant's records changed (``ver``) and refreshed the matrix."""
        self.dense_records_fetched = 0
        self.last_error: str | None = None

    @staticmethod
    def make_client(url: str, *, timeout_s: float = 1.0, connect_timeout_s: float = 1.0,
                    max_connections: int = 16) -> Redis:
        """A sync client on a bounded ``BlockingConnectionPool`` (a free connection is awaited
        at most ``timeout_s``); one immediate retry on ``ConnectionError`` only, so a pool of
        sockets killed by a Redis restart reconnects instead of failing once each."""
        from redis import BlockingConnectionPool, Redis
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.retry import Retry

        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, socket_timeout=timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)), health_check_interval=0)
        return Redis.from_pool(pool)

    # -- the guarded call -------------------------------------------------------------

    def _run(self, fn: Callable[[Redis], T]) -> T:
        """Run ``fn(client)`` behind the breaker; raise ``_Unavailable`` instead of any failure."""
        with self._lock:
            allowed = self.breaker.allow()
        if not allowed:
            raise _Unavailable("breaker open")
        try:
            result = fn(self.client)
        except Exception as exc:  # RedisError, OSError, timeouts, protocol surprises
            with self._lock:
                self.breaker.record_failure()
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            raise _Unavailable(str(exc)) from exc
        with self._lock:
            self.breaker.record_success()
        return result

    def _failed_lookup(self) -> None:
        with self._lock:
            self._lookup_failures += 1

    @property
    def lookup_failures(self) -> int:
        return self._lookup_failures

    @property
    def healthy(self) -> bool:
        return self.breaker.closed

    # -- writes -----------------------------------------------------------------------

    def add(self, rec: DepRecord, expires: float) -> bool:
        ttl_ms = max(1, int((expires - time.time() + self.ttl_grace_s) * 1000))
        try:
            self._run(lambda c: self._add_shared(c, rec, ttl_ms))
        except _Unavailable:
            with self._lock:
                self.local.add(rec, expires)
                self._has_local = True
            return False
        if self._has_local:  # the shared record now covers it (a put overwrites every tier next)
            with self._lock:
                self.local.remove([rec.entry_key])
        return True

    def _add_shared(self, c: Redis, rec: DepRecord, ttl_ms: int) -> None:
        t = rec.tenant
        root = _root(t)
        rk = root + "rec:" + rec.entry_key
        sets = {root + "chunk:" + x for x in rec.candidate_ids} | {root + "term:" + x for x in rec.terms}
        stale: set[str] = set()
        old = c.get(rk)
        prev = _parse(rec.entry_key, t, old)  # the record being replaced: undo its memberships
        if prev is not None:
            stale = ({root + "chunk:" + x for x in prev.candidate_ids}
                     | {root + "term:" + x for x in prev.terms}) - sets
        with c.pipeline(transaction=True) as p:
            p.set(rk, rec.to_bytes(), px=ttl_ms)
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
            p.execute()

    def remove(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        with self._lock:
            self.local.remove(keys)
        # on failure, the records left behind point at deleted entries: extra re-checks, then TTL
        with contextlib.suppress(_Unavailable):
            self._run(lambda c: self._remove_shared(c, list(dict.fromkeys(keys))))

    def _remove_shared(self, c: Redis, keys: list[str]) -> None:
        by_tenant: dict[str, list[str]] = {}
        unknown: list[str] = []
        for k in keys:
            t = _tenant_of(k)
            if t is None:
                unknown.append(k)
            else:
                by_tenant.setdefault(t, []).append(k)
        if unknown:  # not a ragline key: look for it under every tenant
            for t in self._tenants(c):
                by_tenant.setdefault(t, []).extend(unknown)
        for t, tkeys in by_tenant.items():
            root = _root(t)
            for batch in _batched(tkeys, _BATCH):
                raws = c.mget([root + "rec:" + k for k in batch])
                drops: dict[str, set[str]] = {}
                for k, raw in zip(batch, raws, strict=True):
                    rec = _parse(k, t, raw)
                    if rec is None:
                        continue
                    for s in {root + "chunk:" + x for x in rec.candidate_ids} | {root + "term:" + x for x in rec.terms}:
                        drops.setdefault(s, set()).add(k)
                with c.pipeline(transaction=True) as p:
                    p.unlink(*[root + "rec:" + k for k in batch])
                    for s, members in drops.items():
                        p.srem(s, *members)
                    p.hdel(root + "all", *batch)
                    p.set(root + "ver", secrets.token_bytes(8))
                    p.execute()

    def clear(self, tenant: str | None = None) -> None:
        with self._lock:
            self.local.clear(tenant)
            if tenant is None:
                self._dense.clear()
            else:
                self._dense.pop(tenant, None)
        # on failure: the callers clear the same prefix in the tiers, which RedisTier replays on recovery
        with contextlib.suppress(_Unavailable):
            self._run(lambda c: self._clear_shared(c, tenant))

    def _clear_shared(self, c: Redis, tenant: str | None) -> None:
        tenants = self._tenants(c) if tenant is None else [tenant]
        for t in tenants:
            pattern = "".join("\\" + ch if ch in _GLOB_SPECIALS else ch for ch in _root(t)) + "*"
            cursor = 0
            while True:
                cursor, found = c.scan(cursor=cursor, match=pattern, count=1000)
                if found:
                    c.unlink(*found)
                if cursor == 0:
                    break
            c.srem(_TENANTS_KEY, t)
        if tenant is None:
            c.unlink(_TENANTS_KEY)

    # -- lookups ----------------------------------------------------------------------

    def by_chunks(self, tenant: str, chunk_ids: Iterable[str]) -> set[str]:
        return self._members(tenant, "chunk:", chunk_ids, self.local.by_chunks)

    def by_terms(self, tenant: str, terms: Iterable[str]) -> set[str]:
        return self._members(tenant, "term:", terms, self.local.by_terms)

    def _members(self, tenant: str, kind: str, names: Iterable[str],
                 local: Callable[[str, list[str]], set[str]]) -> set[str]:
        items = list(dict.fromkeys(names))
        out = local(tenant, items)
        if not items:
            return out
        root = _root(tenant)
        try:
            out |= self._run(lambda c: self._live_members(c, root, [root + kind + x for x in items]))
        except _Unavailable:
            self._failed_lookup()
        return out

    def _live_members(self, c: Redis, root: str, set_keys: list[str]) -> set[str]:
        """SUNION of the sets, minus members whose record expired (removed from the sets lazily)."""
        with c.pipeline(transaction=False) as p:
            for batch in _batched(set_keys, _BATCH):
                p.sunion(batch)
            found = {_text(m) for res in p.execute() for m in res}
        return self._alive(c, root, found, set_keys) if found else set()

    @staticmethod
    def _alive(c: Redis, root: str, members: Iterable[str], sets: Iterable[str] = (),
               hashes: Iterable[str] = ()) -> set[str]:
        """The members whose record still exists; the others are removed from ``sets`` and
        ``hashes`` (lazily: an expired record's memberships go only when they are met)."""
        ms = list(members)
        with c.pipeline(transaction=False) as p:
            for m in ms:
                p.exists(root + "rec:" + m)
            live = {m for m, n in zip(ms, p.execute(), strict=True) if n}
        stale = [m for m in ms if m not in live]
        if stale:
            with c.pipeline(transaction=False) as p:
                for s in sets:
                    p.srem(s, *stale)
                for h in hashes:
                    p.hdel(h, *stale)
                p.execute()
        return live

    def records(self, tenant: str, keys: Iterable[str]) -> list[DepRecord]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return []
        try:
            found = self._run(lambda c: self._fetch(c, tenant, wanted))
        except _Unavailable:
            self._failed_lookup()
            found = {}
        missing = [k for k in wanted if k not in found]
        local = {r.entry_key: r for r in self.local.records(tenant, missing)} if missing else {}
        return [r for k in wanted if (r := found.get(k) or local.get(k)) is not None]

    def _fetch(self, c: Redis, tenant: str, keys: list[str]) -> dict[str, DepRecord]:
        """The records that exist, by entry key (expired or foreign values are skipped)."""
        root = _root(tenant)
        out: dict[str, DepRecord] = {}
        for batch in _batched(keys, _BATCH):
            for k, raw in zip(batch, c.mget([root + "rec:" + k for k in batch]), strict=True):
                rec = _parse(k, tenant, raw)
                if rec is not None:
                    out[k] = rec
        return out

    def dense_entered(self, tenant: str, vectors: Vectors) -> set[str]:
        """Entries (of every instance) whose dense candidate list one of ``vectors`` would enter."""
        if len(vectors) == 0:
            return set()
        out = self.local.dense_entered(tenant, vectors)

        def op(c: Redis) -> set[str]:
            hits = _dense_hits(*self._dense_of(c, tenant, vectors.shape[1]), vectors)
            # a cached matrix may still hold entries whose record expired since: ask Redis (its
            # clock decides expiry, never this host's) and forget the dead ones
            return self._alive(c, _root(tenant), hits, hashes=(_root(tenant) + "all",)) if hits else hits

        try:
            return out | self._run(op)
        except _Unavailable:
            self._failed_lookup()
            return out

    def _dense_of(self, c: Redis, tenant: str, dim: int) -> tuple[list[str], Vectors, np.ndarray]:
        """The tenant's query-vector matrix, kept in memory and refreshed incrementally: while the
        tenant's ``ver`` token is unchanged it costs one GET; otherwise one HGETALL of the
        entry → record-token hash, and an MGET of only the records whose token changed."""
        root = _root(tenant)
        ver = c.get(root + "ver")
        with self._lock:
            cached = self._dense.get(tenant)
        if cached is not None and isinstance(ver, bytes) and cached.ver == ver and cached.dim == dim:
            return cached.keys, cached.qvecs, cached.cutoffs
        # read the token *before* the records: a change made meanwhile leaves this matrix
        # tagged with the old token, so the next check looks again
        tokens = {_text(k): v if isinstance(v, bytes) else str(v).encode()
                  for k, v in c.hgetall(root + "all").items()}
        old = cached.rows if cached is not None else {}
        rows = {k: old[k] for k, tok in tokens.items() if k in old and old[k][0] == tok}
        todo = [k for k in tokens if k not in rows]
        found = self._fetch(c, tenant, todo)
        gone = [k for k in todo if k not in found]
        if gone:
            c.hdel(root + "all", *gone)
        for k, r in found.items():
            rows[k] = (tokens[k], r.qvec, -np.inf if r.dense_cutoff is None else r.dense_cutoff)
        fresh = _DenseCache(ver if isinstance(ver, bytes) else None, dim, rows)
        with self._lock:
            self.dense_refreshes += 1
            self.dense_records_fetched += len(todo)
            self._dense[tenant] = fresh
        return fresh.keys, fresh.qvecs, fresh.cutoffs

    def tenant_keys(self, tenant: str) -> list[str]:
        out = dict.fromkeys(self.local.tenant_keys(tenant))
        try:
            out.update(dict.fromkeys(self._run(lambda c: self._tenant_keys(c, tenant))))
        except _Unavailable:
            self._failed_lookup()
        return list(out)

    def _tenant_keys(self, c: Redis, tenant: str) -> list[str]:
        root = _root(tenant)
        members = [_text(m) for m in c.hkeys(root + "all")]
        live = self._alive(c, root, members, hashes=(root + "all",))
        return [m for m in members if m in live]

    def all_keys(self) -> list[str]:
        out = dict.fromkeys(self.local.all_keys())
        try:
            out.update(dict.fromkeys(self._run(
                lambda c: [k for t in self._tenants(c) for k in self._tenant_keys(c, t)])))
        except _Unavailable:
            self._failed_lookup()
        return list(out)

    @staticmethod
    def _tenants(c: Redis) -> list[str]:
        return sorted(_text(t) for t in c.smembers(_TENANTS_KEY))

    def count(self) -> int:
        """Local records plus the shared entry-key sets' sizes (which may still count members whose
        record just expired).  Without Redis I/O while the breaker is not closed: the last known
        shared count is used (``CacheLayer.stats`` calls this on the event loop)."""
        n = self.local.count()
        if not self.breaker.closed:
            return n + self._shared_count

        def op(c: Redis) -> int:
            tenants = self._tenants(c)
            with c.pipeline(transaction=False) as p:
                for t in tenants:
                    p.hlen(_root(t) + "all")
                return sum(int(x) for x in p.execute())

        with contextlib.suppress(_Unavailable):
            self._shared_count = self._run(op)
        return n + self._shared_count

    # -- local-only records (written while Redis was unreachable) ---------------------

    @property
    def has_local_only(self) -> bool:
        return self._has_local

    def local_only(self, key: str) -> bool:
        return self.local.has(key)

    def take_local_only(self) -> list[str]:
        if not self._has_local:
            return []
        try:
            self._run(lambda c: c.ping())
        except _Unavailable:
            return []
        with self._lock:
            keys = self.local.all_keys()
            self.local.remove(keys)
            self._has_local = self.local.count() > 0
        return keys

    def close(self) -> None:
        self.local.close()
        if self._owns_client:
            with contextlib.suppress(Exception):  # closing is best effort
                self.client.close()


def _batched(items: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]
