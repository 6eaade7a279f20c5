"""``@ragline.cached``: a user's own functions (sync or async) on ragline's cache tiers, L1 → L2 → L3.

    rag = AsyncRAG(settings)              # or RAG(settings)

    @rag.cached(ttl=600, tenant="acme")   # or @ragline.cached(...) : the last started AsyncRAG/RAG
    async def lookup(sku: str) -> dict:
        ...

    await lookup("A-1")                   # computed once, then served from the tiers
    await lookup.invalidate("A-1")        # this call's entry, on every instance
    await lookup.invalidate_function()    # every entry of the function, every tenant, every instance

**Where the cache comes from** (resolved at call time, so decorating at import time is fine):
``cached(rag=...)`` or ``rag.cached(...)`` (an ``AsyncRAG``, a ``RAG`` or a :class:`FunctionCache`), else
the module default, which every ``AsyncRAG`` binds when it starts (the most recent one wins) and unbinds
when it closes.  Nothing bound (or a closed cache) is a :class:`~ragline.errors.ConfigError`; a RAG whose
cache is disabled (``cache.enabled: false``) runs the function uncached.

**Keys**: ``rl:v1:{tenant}:function:{h(module.qualname, version)}{h(arguments, generation)}`` (16 + 16 hex).
Arguments are bound to the signature (``f(1)``, ``f(x=1)`` and ``f()`` with default ``x=1`` share a key) and
encoded canonically with type tags (``1``, ``1.0``, ``True`` and ``"1"`` differ): str, int, float, bool,
None, bytes, enums, and tuples / frozensets of them.  Anything else (lists, dicts, sets, objects) raises
``TypeError`` before any work; pass ``key=`` (a function of the same arguments returning such a value) to
choose what identifies a call.  The function's own part of the key is a prefix, so
``invalidate_function(tenant=t)`` is one prefix clear; ``invalidate_function()`` (every tenant) replaces the
function's *generation*, a random token stored in the tiers under a key no tenant can name and folded into
every argument hash, so old entries become unreachable everywhere at once (they age out by their TTL).

**Values** are stored as JSON (orjson) and must be JSON data exactly: dict with str keys, list, str, int
(64-bit), finite float, bool, None.  Anything else (tuples, sets, dataclasses, NaN) raises ``TypeError``
naming the path, because a hit would return something else than the miss did; both return the decoded
JSON, so a hit and a miss are indistinguishable.  Not pickle: L2 is shared by every instance, and
unpickling bytes from a shared store runs whatever code whoever can write to it put there.

**Concurrency**: concurrent identical calls run the function once (in-process single-flight; with Redis a
short lock elects one instance, as for answers).  An async function awaits the cache on its own loop, or
through ``run_coroutine_threadsafe`` when the cache lives on another loop (a sync ``RAG``'s).  A sync
function is called from any thread but the cache's event loop thread (blocking that loop on itself would
deadlock: ``TypeError``; make the function async or call it with ``asyncio.to_thread``); concurrent threads
calling it with the same arguments compute once.  A sync call waits for the cache's reads (L1, Redis, and
L3's synchronous reads) but not for its write, so it never holds an executor thread the write needs.

**Generations and L1**: an instance reads a function's generation through its tiers; another instance's
``invalidate_function()`` reaches its L1 through the invalidation bus (milliseconds), and L1 copies live at
most ``cache.l1_max_ttl_s`` if an event is lost.  Without Redis, a generation evicted from a full L3 brings
back the entries it retired until they expire: prefer ``invalidate_function(tenant=...)`` there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import functools
import hashlib
import inspect
import math
import secrets
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, Generic, ParamSpec, TypeVar, cast, overload

import orjson

from ragline.cache.keys import SCHEMA_VERSION, validate_tenant
from ragline.cache.redis import RedisTier
from ragline.cache.singleflight import DistributedSingleFlight, SingleFlight
from ragline.cache.tiered import TieredCache, build_cache
from ragline.config import MAX_TTL_S, Settings
from ragline.errors import ConfigError
from ragline.types import DEFAULT_TENANT

if TYPE_CHECKING:
    from ragline.cache.layer import CacheLayer

__all__ = ["CachedFunction", "FunctionCache", "bind_default", "cached", "invalidate_function", "unbind_default"]

P = ParamSpec("P")
R = TypeVar("R")

_GEN_TENANT: Final = "_fn"
"""The tenant component of generation keys: invalid as a user tenant, so no tenant can name it."""
_NO_GENERATION: Final = b"0"
_SYNC_TIMEOUT_S: Final = 60.0
_MAX_INT: Final = 2**63


class FunctionCache:
    """The tiers ``@cached`` functions store in, and the event loop they live on.

    Built by an ``AsyncRAG`` over its own tiers (:meth:`of_layer`: shared with answers, so ``rag.invalidate``
    of a tenant drops that tenant's function entries too), or standalone from settings
    (:meth:`from_settings`, used as ``async with``)."""

    def __init__(
        self, tiers: TieredCache, *, default_ttl_s: float, wait_s: float = 10.0, lock_s: float = 3.0, own: bool = False
    ) -> None:
        self.tiers = tiers
        self.default_ttl_s = default_ttl_s
        self.own = own
        """Its tiers are its own (started and closed with it), not an ``AsyncRAG``'s."""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        redis = next((t for t in tiers.tiers if isinstance(t, RedisTier)), None)
        self.flight: DistributedSingleFlight[bytes] = DistributedSingleFlight(redis, lock_s=lock_s, wait_s=wait_s)
        self._l1_gen_ttl = tiers.l1.max_ttl_s if tiers.l1 is not None else 0.0

    @classmethod
    def of_layer(cls, layer: CacheLayer) -> FunctionCache:
        cs = layer.cs
        return cls(layer.tiers, default_ttl_s=layer.ttls["function"], wait_s=cs.singleflight_wait_s,
                   lock_s=cs.singleflight_lock_s)  # fmt: skip

    @classmethod
    def from_settings(cls, settings: Settings) -> FunctionCache:
        """Its own tiers as ``settings.cache`` configures them (L3 under ``data_dir/cache``)."""
        cs = settings.cache
        tiers = build_cache(cs, settings.data_dir, metrics=False)
        return cls(tiers, default_ttl_s=cs.ttl_for("function"), wait_s=cs.singleflight_wait_s,
                   lock_s=cs.singleflight_lock_s, own=True)  # fmt: skip

    async def start(self) -> FunctionCache:
        """Bind to the running loop (and start its own tiers' invalidation subscriber)."""
        self.loop = asyncio.get_running_loop()
        self.closed = False
        if self.own:
            await self.tiers.start()
        return self

    async def close(self) -> None:
        self.closed = True
        unbind_default(self)
        if self.own:
            await self.tiers.close()

    async def __aenter__(self) -> FunctionCache:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the operations a cached call needs (all on self.loop) -----------------------------
    async def generation(self, fn_id: str) -> bytes:
        """The function's current generation token (``b"0"`` until the first ``invalidate_function()``)."""
        key = _gen_key(fn_id)
        found = self.tiers.get_l1(key)
        if found is None:
            found = await self.tiers.get(key, skip_l1=True)
            if found is None:  # remembered in L1 only: a bump anywhere drops it through the bus
                found = _NO_GENERATION
                if self.tiers.l1 is not None:
                    self.tiers.l1.set(key, found, self._l1_gen_ttl)
        return found

    async def bump(self, fn_id: str) -> None:
        """A new generation for the function: every entry written under an older one is unreachable."""
        key = _gen_key(fn_id)
        await self.tiers.set_many({key: secrets.token_hex(8).encode()}, MAX_TTL_S)
        if self.tiers.bus is not None:  # other instances drop their L1/L3 copy and read the new one
            await self.tiers.bus.publish(keys=[key])

    async def get(self, key: str) -> bytes | None:
        return await self.tiers.get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self.tiers.set_many({key: value}, ttl)

    async def delete(self, key: str) -> None:
        await self.tiers.delete_many([key])

    async def clear(self, prefix: str) -> int:
        return await self.tiers.clear(prefix)

    # -- from other threads or loops ---------------------------------------------------------
    def usable(self, coro: Coroutine[Any, Any, Any] | None = None) -> asyncio.AbstractEventLoop:
        """The cache's loop; ``ConfigError`` (closing ``coro``, which will not run) if it is not open."""
        loop = self.loop
        if loop is None or self.closed or loop.is_closed():
            if coro is not None:
                coro.close()
            raise ConfigError("the cache of this @cached function is not open: start its RAG (or FunctionCache) first")
        return loop

    async def run(self, coro: Coroutine[Any, Any, R]) -> R:
        """Await ``coro`` on this cache's loop, from whatever loop the caller runs on."""
        loop = self.usable(coro)
        if asyncio.get_running_loop() is loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def run_sync(self, coro: Coroutine[Any, Any, R]) -> R:
        """Block the calling thread (never the cache's loop thread) until ``coro`` ran on the cache's loop."""
        loop = self.usable(coro)
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise TypeError(
                "a sync @cached function was called on its cache's event loop thread, which it would block: "
                "make the function async, or call it with asyncio.to_thread"
            )
        return asyncio.run_coroutine_threadsafe(coro, loop).result(_SYNC_TIMEOUT_S)

    def submit(self, coro: Coroutine[Any, Any, R]) -> concurrent.futures.Future[R]:
        """Start ``coro`` on the cache's loop from another thread without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.usable(coro))

    def __repr__(self) -> str:
        is_open = self.loop is not None and not self.closed
        return f"FunctionCache(tiers={[t.name for t in self.tiers.tiers]}, open={is_open})"


_default: FunctionCache | None = None
_default_lock = threading.Lock()


def bind_default(cache: FunctionCache) -> None:
    """Make ``cache`` the one ``@ragline.cached`` (without ``rag=``) uses (AsyncRAG.start does this)."""
    global _default
    with _default_lock:
        _default = cache


def unbind_default(cache: FunctionCache) -> None:
    """Forget ``cache`` as the default, if it is (AsyncRAG.aclose does this)."""
    global _default
    with _default_lock:
        if _default is cache:
            _default = None


def _resolve(target: object) -> FunctionCache | None:
    """The cache a call uses: ``target``'s (None: its cache is disabled), else the module default."""
    if target is None:
        if _default is None:
            raise ConfigError(
                "no cache for @ragline.cached: start an AsyncRAG or RAG first, or pass rag= (or use @rag.cached)"
            )
        return _default
    if isinstance(target, FunctionCache):
        return target
    fc: FunctionCache | None = target.function_cache  # type: ignore[attr-defined]  # AsyncRAG / RAG
    return fc


# -- keys ------------------------------------------------------------------------------------------
def _h16(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _gen_key(fn_id: str) -> str:
    return f"rl:v{SCHEMA_VERSION}:{_GEN_TENANT}:function:{fn_id}{'0' * 16}"


def function_prefix(tenant: str, fn_id: str) -> str:
    """Prefix of every entry of one function of one tenant."""
    return f"rl:v{SCHEMA_VERSION}:{validate_tenant(tenant)}:function:{fn_id}"


def canonical_arg(value: object, where: str) -> Any:
    """A JSON value identifying ``value`` exactly (type-tagged where JSON would merge types);
    ``TypeError`` for values that are not hashable plain data."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, enum.Enum):
        return {"e": [f"{type(value).__module__}.{type(value).__qualname__}", canonical_arg(value.value, where)]}
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if -_MAX_INT <= value < _MAX_INT else {"i": str(value)}
    if isinstance(value, float):
        return value if math.isfinite(value) else {"f": repr(value)}
    if isinstance(value, bytes):
        return {"b": value.hex()}
    if isinstance(value, tuple):
        return [canonical_arg(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, frozenset):
        items = sorted(orjson.dumps(canonical_arg(v, where), option=orjson.OPT_SORT_KEYS) for v in value)
        return {"s": [i.decode() for i in items]}
    hashable = "unhashable" if getattr(type(value), "__hash__", None) is None else "not plain data"
    raise TypeError(
        f"{where} ({type(value).__name__}, {hashable}) cannot be part of a cache key: pass str, int, float, bool, "
        "None, bytes, an enum, or a tuple/frozenset of them, or give @cached a key= function"
    )


def check_json(value: object, where: str = "the return value") -> None:
    """``TypeError`` unless ``value`` is JSON data that orjson round-trips to an equal value."""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int) and type(value) is int:
        if not -_MAX_INT <= value < _MAX_INT:
            raise TypeError(f"{where}: integer {value} is beyond 64 bits (JSON numbers): return it as a str")
        return
    if type(value) is float:
        if not math.isfinite(value):
            raise TypeError(f"{where}: {value!r} is not JSON (return None or a str)")
        return
    if type(value) is list:
        for i, v in enumerate(value):
            check_json(v, f"{where}[{i}]")
        return
    if type(value) is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise TypeError(f"{where}: key {k!r} is not a str (JSON objects have str keys)")
            check_json(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}: @cached stores JSON (dict with str keys, list, str, int, float, "
        "bool, None) so that a hit returns what the miss did; convert it (e.g. a tuple to a list)"
    )


def _check_options(ttl: float | None, tenant: object) -> None:
    if ttl is not None and not 0 < ttl <= MAX_TTL_S:
        raise ValueError(f"ttl must be > 0 and <= {MAX_TTL_S:.0f} s (365 days), got {ttl!r}")
    if isinstance(tenant, str):
        validate_tenant(tenant)


# -- the decorator ----------------------------------------------------------------------------------
class CachedFunction(Generic[P, R]):
    """A function wrapped by :func:`cached`: call it as the original; ``invalidate(*args, **kwargs)``
    drops one call's entry, ``invalidate_function(tenant=None)`` all of them (awaitables for an async
    function, plain calls for a sync one)."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        ttl: float | None,
        tenant: str | Callable[..., str],
        key: Callable[..., object] | None,
        rag: object,
        version: str,
    ) -> None:
        _check_options(ttl, tenant)
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.ttl = ttl
        self.tenant = tenant
        self.key = key
        self.rag = rag
        self.is_async = inspect.iscoroutinefunction(fn)
        self.name = f"{fn.__module__}.{fn.__qualname__}"
        self.fn_id = _h16(f"{self.name}\0{version}".encode())
        self.signature = inspect.signature(fn)
        self.computed = 0
        """Times this process ran the function (misses that were not joined to another call)."""
        self._flights: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SingleFlight[bytes]] = (
            weakref.WeakKeyDictionary()
        )
        self._threads: dict[str, concurrent.futures.Future[bytes]] = {}
        self._threads_lock = threading.Lock()
        self._writes: set[concurrent.futures.Future[None]] = set()
        """Writes of sync calls not yet landed (an invalidation waits for them first)."""

    def __get__(self, obj: object, owner: type | None = None) -> Any:  # as a method: bind like a function
        return self if obj is None else functools.partial(self.__call__, obj)  # type: ignore[arg-type]

    # -- identity of a call -----------------------------------------------------------------
    def _identity(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, bytes]:
        """(tenant, canonical bytes of the arguments) of one call; TypeError before any work."""
        tenant = self.tenant if isinstance(self.tenant, str) else validate_tenant(self.tenant(*args, **kwargs))
        if self.key is not None:
            material: Any = canonical_arg(self.key(*args, **kwargs), f"{self.name}: key()'s result")
        else:
            try:
                bound = self.signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{self.name}(): {exc}") from None
            bound.apply_defaults()
            material = []
            for name, value in bound.arguments.items():
                kind = self.signature.parameters[name].kind
                where = f"{self.name}: argument {name!r}"
                if kind is inspect.Parameter.VAR_KEYWORD:
                    value = {k: canonical_arg(v, f"{where}[{k!r}]") for k, v in sorted(value.items())}
                    material.append([name, {"k": value}])
                else:
                    material.append([name, canonical_arg(value, where)])
        return tenant, orjson.dumps(material, option=orjson.OPT_SORT_KEYS)

    def _entry_key(self, tenant: str, args: bytes, generation: bytes) -> str:
        return function_prefix(tenant, self.fn_id) + _h16(args + b"\0" + generation)

    def _ttl(self, fc: FunctionCache) -> float:
        return fc.default_ttl_s if self.ttl is None else self.ttl

    def _encode(self, value: object) -> bytes:
        check_json(value, f"{self.name}'s return value")
        return orjson.dumps(value)

    # -- calls ------------------------------------------------------------------------------------
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.is_async:
            return cast(R, self._acall(args, kwargs))
        return cast(R, self._scall(args, kwargs))

    async def _acall(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fc = _resolve(self.rag)
        tenant, material = self._identity(args, kwargs)
        if fc is None:
            return await cast(Callable[..., Awaitable[Any]], self.fn)(*args, **kwargs)
        key = self._entry_key(tenant, material, await fc.run(fc.generation(self.fn_id)))
        hit = await fc.run(fc.get(key))
        if hit is not None:
            return orjson.loads(hit)

        async def compute() -> bytes:
            self.computed += 1
            value = await cast(Callable[..., Awaitable[Any]], self.fn)(*args, **kwargs)
            body = self._encode(value)
            await fc.run(fc.set(key, body, self._ttl(fc)))
            return body

        loop = asyncio.get_running_loop()
        if loop is fc.loop:  # one computation across instances too (a Redis lock, as for answers)
            body = await fc.flight.do(key, compute, lambda: fc.get(key))
        else:
            flight = self._flights.get(loop)
            if flight is None:
                flight = self._flights[loop] = SingleFlight()
            body = await flight.do(key, compute)
        return orjson.loads(body)

    def _scall(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fc = _resolve(self.rag)
        tenant, material = self._identity(args, kwargs)
        if fc is None:
            return self.fn(*args, **kwargs)
        key = self._entry_key(tenant, material, fc.run_sync(fc.generation(self.fn_id)))
        hit = fc.run_sync(fc.get(key))
        if hit is not None:
            return orjson.loads(hit)
        with self._threads_lock:
            flight = self._threads.get(key)
            leader = flight is None
            if flight is None:
                flight = self._threads[key] = concurrent.futures.Future()
        if not leader:
            return orjson.loads(flight.result())
        try:
            self.computed += 1
            body = self._encode(self.fn(*args, **kwargs))
        except BaseException as exc:
            flight.set_exception(exc)
            self._forget(key)
            raise
        flight.set_result(body)  # joined threads go on now; the write must not wait for them
        # not awaited: a thread of the cache loop's executor (asyncio.to_thread) blocking on a write that
        # needs such a thread (L3) could deadlock; the flight stays joinable until the write is done
        written = fc.submit(fc.set(key, body, self._ttl(fc)))
        with self._threads_lock:
            self._writes.add(written)
        written.add_done_callback(lambda w: self._forget(key, w))
        return orjson.loads(body)

    def _forget(self, key: str, written: concurrent.futures.Future[None] | None = None) -> None:
        with self._threads_lock:
            self._threads.pop(key, None)
            if written is not None:
                self._writes.discard(written)

    async def _settle_writes(self) -> None:
        """Wait for sync calls' writes still in flight, so an invalidation is not overtaken by one."""
        with self._threads_lock:
            pending = [asyncio.wrap_future(w) for w in self._writes]
        if pending:
            await asyncio.wait(pending, timeout=_SYNC_TIMEOUT_S)

    # -- invalidation ------------------------------------------------------------------------------
    async def _ainvalidate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        fc = _resolve(self.rag)
        if fc is not None:
            await self._settle_writes()
            tenant, material = self._identity(args, kwargs)
            key = self._entry_key(tenant, material, await fc.run(fc.generation(self.fn_id)))
            await fc.run(fc.delete(key))

    async def _ainvalidate_function(self, tenant: str | None) -> None:
        fc = _resolve(self.rag)
        if fc is None:
            return
        await self._settle_writes()
        if tenant is None:
            await fc.run(fc.bump(self.fn_id))
        else:
            await fc.run(fc.clear(function_prefix(tenant, self.fn_id)))

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Drop the entry of the call ``f(*args, **kwargs)`` from every tier (and other instances' L1)."""
        coro = self._ainvalidate(args, kwargs)
        return coro if self.is_async else self._sync(coro)

    def invalidate_function(self, tenant: str | None = None) -> Any:
        """Drop every entry of this function: of one ``tenant`` (a prefix clear), or of all (a new generation)."""
        coro = self._ainvalidate_function(tenant)
        return coro if self.is_async else self._sync(coro)

    def _sync(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run an invalidation to completion from a sync caller, on the cache's own loop."""
        try:
            fc = _resolve(self.rag)
        except BaseException:
            coro.close()
            raise
        if fc is None:
            coro.close()
            return
        fc.run_sync(coro)


@overload
def cached(fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


@overload
def cached(
    fn: None = None,
    /,
    *,
    ttl: float | None = None,
    tenant: str | Callable[..., str] = DEFAULT_TENANT,
    key: Callable[..., object] | None = None,
    rag: object = None,
    version: str = "",
) -> Callable[[Callable[P, R]], CachedFunction[P, R]]: ...


def cached(
    fn: Callable[P, R] | None = None,
    /,
    *,
    ttl: float | None = None,
    tenant: str | Callable[..., str] = DEFAULT_TENANT,
    key: Callable[..., object] | None = None,
    rag: object = None,
    version: str = "",
) -> CachedFunction[P, R] | Callable[[Callable[P, R]], CachedFunction[P, R]]:
    """Cache a sync or async function's results on ragline's tiers (see the module docstring).

    ``ttl``: seconds (default ``cache.ttls.function``, 1 h).  ``tenant``: a tenant name, or a function of
    the call's arguments returning one.  ``key``: a function of the call's arguments returning what
    identifies the call (default: all of them).  ``rag``: an ``AsyncRAG``, ``RAG`` or ``FunctionCache``
    (default: the last started one).  ``version``: bump it when the function's results change meaning."""

    _check_options(ttl, tenant)  # at decoration, not at the first call

    def wrap(f: Callable[P, R]) -> CachedFunction[P, R]:
        return CachedFunction(f, ttl=ttl, tenant=tenant, key=key, rag=rag, version=version)

    return wrap(fn) if fn is not None else wrap


def invalidate_function(fn: CachedFunction[..., Any], tenant: str | None = None) -> Any:
    """``fn.invalidate_function(tenant)``: the seeds' spelling."""
    return fn.invalidate_function(tenant)
