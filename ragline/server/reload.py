"""Hot reload: new settings and plugins without a restart and without a failed request.

A server's pipeline lives in a :class:`Live` holder.  Each HTTP request takes the generation serving
at its arrival (the :class:`Routing` middleware) and runs on it to the end, streamed bodies included;
the routes reach the pipeline through :func:`Live.proxy`, which resolves to that request's generation.

:meth:`Live.reload` (``SIGHUP`` or ``POST /v1/admin/reload``):

1. reads the configuration again (``RAGLINE_CONFIG`` YAML + ``RAGLINE_*`` environment, as at start)
   and the plugin entry points (:func:`ragline.plugins.reload`); invalid settings raise
   ``InvalidInput`` (400) and change nothing;
2. keeps the running value of every setting that needs a restart (:data:`RESTART_ONLY`: the listening
   socket, the workers, the middleware's limits, the store and the embedding model the index was built
   with) and reports each one that differs, so the operator knows a restart is pending;
3. builds and starts the new pipeline off to the side while the old one serves: the store is shared,
   the embedder reused unless its settings or plugin changed, the LLM reused unless its settings or
   plugin changed, the admission limits shared; a failure here leaves the old one serving;
4. swaps: one assignment under the lock (``swap_ms`` in the report), from then on new requests go to
   the new pipeline;
5. in the background, waits for the old generation's requests to finish (at most ``drain_s``), closes
   what the new one did not take over, then lets the new pipeline's job runner adopt the jobs the old
   one handed back.

The cache keys carry the settings fingerprint (:meth:`ragline.config.Settings.fingerprint`), so a
reload that changes what an answer contains (LLM model, retrieval, context, prompt) never serves an
answer cached under the old configuration; the old entries expire by TTL.  The new pipeline's L1
starts empty (entries it finds in L2/L3 are promoted on first read).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any, cast

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from ragline import plugins
from ragline.config import Settings
from ragline.errors import ConfigError, InvalidInput, ServiceUnavailable
from ragline.pipeline import AsyncRAG

__all__ = ["RESTART_ONLY", "Generation", "Live", "Routing", "changed_paths"]

log = logging.getLogger("ragline.reload")

RESTART_ONLY = (
    "server",
    "limits",
    "data_dir",
    "store",
    "postgres_dsn",
    "postgres_pool_size",
    "log_level",
    "embedder.provider",
    "embedder.model",
    "embedder.base_url",
    "embedder.dim",
)
"""Settings a reload cannot change (their running values stay; a difference is reported): the
listening socket, workers, keys and request limits (uvicorn and the middleware read them at start),
where the index lives, and which model embedded it (a new one needs a re-index)."""

DRAIN_S = 60.0
"""How long an old generation's requests may run after a swap before its components are closed anyway."""

_REQUEST: contextvars.ContextVar[Generation | None] = contextvars.ContextVar("ragline_generation", default=None)


class Generation:
    """One built pipeline, its settings, and how many requests are running on it."""

    __slots__ = ("_idle", "in_flight", "number", "rag", "retired", "settings")

    def __init__(self, rag: AsyncRAG, settings: Settings, number: int) -> None:
        self.rag = rag
        self.settings = settings
        self.number = number
        self.in_flight = 0
        self.retired = False
        self._idle: asyncio.Event | None = None

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no request runs on this generation; False if some still did after ``timeout_s``."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return self.in_flight == 0


_get = object.__getattribute__


class _Proxy:
    """What the routes call ``pipeline``: the pipeline of the request being served (the current one
    outside a request: lifespan, background work)."""

    __slots__ = ("_live",)

    def __init__(self, live: Live) -> None:
        self._live = live

    def __getattribute__(self, name: str) -> Any:  # not __getattr__: that runs after a failed lookup (+3 µs)
        g = _REQUEST.get()
        return getattr((g or _get(self, "_live").current).rag, name)


class Routing:
    """Pure-ASGI middleware: a request runs on the generation serving when it arrived."""

    def __init__(self, app: ASGIApp, live: Live) -> None:
        self.app = app
        self.live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        g = self.live.current
        g.in_flight += 1
        token = _REQUEST.set(g)
        try:
            await self.app(scope, receive, send)
        finally:
            _REQUEST.reset(token)
            g.leave()


def _dump(value: Any) -> Any:
    """A settings value as comparable plain data (secrets by value, never printed)."""
    if isinstance(value, SecretStr):
        return ("secret", value.get_secret_value())
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_dump(v) for v in value]
    return value


def changed_paths(old: Settings, new: Settings) -> list[str]:
    """Dotted names of the settings that differ (names only: values may be secrets)."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            out.append(path)

    walk(_dump(old.model_dump()), _dump(new.model_dump()), "")
    return out


def _restart_only(path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p in RESTART_ONLY)


def pin_restart_only(old: Settings, new: Settings) -> Settings:
    """``new`` with the running value of every :data:`RESTART_ONLY` setting."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for path in RESTART_ONLY:
        section, _, field = path.partition(".")
        if field:
            sections.setdefault(section, {})[field] = getattr(getattr(old, section), field)
        else:
            top[section] = getattr(old, section)
    for section, fields in sections.items():
        top[section] = getattr(new, section).model_copy(update=fields)
    return new.model_copy(update=top)


Loader = Callable[[], Settings]


class Live:
    """The serving generation of one server process, and its reload (see the module docstring)."""

    def __init__(self, rag: AsyncRAG, settings: Settings, load: Loader | None = None, drain_s: float = DRAIN_S) -> None:
        self.current = Generation(rag, settings, 1)
        self._load = load or Settings.load
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self.drain_s = drain_s
        self.reloads = 0
        self.last: dict[str, Any] | None = None

    def proxy(self) -> AsyncRAG:
        """The object the routes use as their pipeline (resolves per request)."""
        return cast(AsyncRAG, _Proxy(self))

    def load_settings(self) -> Settings:
        """The configuration as it is now on disk and in the environment; ``InvalidInput`` if invalid."""
        try:
            return self._load()
        except ConfigError as exc:
            raise InvalidInput(f"reload refused, the running configuration is unchanged: {exc.message}") from None

    async def reload(self, reason: str = "api") -> dict[str, Any]:
        """Re-read settings and plugins, build a new pipeline, swap it in; the report says what changed."""
        if self._lock.locked():
            raise ServiceUnavailable("a reload is already under way; try again when it has finished", retry_after=1.0)
        async with self._lock:
            t0 = time.perf_counter()
            old = self.current
            loaded = self.load_settings()
            changed = changed_paths(old.settings, loaded)
            pending = [p for p in changed if _restart_only(p)]
            new_settings = pin_restart_only(old.settings, loaded)
            factories = _factories(old.settings)
            try:
                await asyncio.to_thread(plugins.reload)
            except Exception as exc:  # a plugin that no longer imports: keep serving the old one
                log.warning("reload (%s) refused: a plugin failed to reload: %s", reason, type(exc).__name__)
                raise InvalidInput(f"reload refused, plugins unchanged: a plugin failed to load ({exc})") from None
            rag = _build(old, new_settings, factories)
            try:
                await rag.start()
            except BaseException as exc:
                await rag.aclose(keep=_shared(old.rag, rag))
                log.warning("reload (%s) failed while building; still serving the old pipeline: %s", reason, exc)
                if isinstance(exc, ConfigError):
                    raise InvalidInput(
                        f"reload refused, the running configuration is unchanged: {exc.message}"
                    ) from None
                raise
            built = time.perf_counter()
            new = Generation(rag, new_settings, old.number + 1)
            s0 = time.perf_counter_ns()
            self.current = new  # the swap: requests arriving from now on run on the new pipeline
            old.retired = True
            swap_ms = (time.perf_counter_ns() - s0) / 1e6
            at_swap = rag.store.version()
            task = asyncio.get_running_loop().create_task(self._retire(old, new, at_swap), name="ragline-retire")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            self.reloads += 1
            fp_old, fp_new = old.settings.fingerprint(), new_settings.fingerprint()
            report: dict[str, Any] = {
                "reloaded": True,
                "generation": new.number,
                "reason": reason,
                "changed": [p for p in changed if p not in pending],
                "restart_required": pending,
                "fingerprint": {"old": fp_old, "new": fp_new, "changed": fp_old != fp_new},
                "reused": sorted(_reused_names(old.rag, rag)),
                "build_ms": round((built - t0) * 1000, 3),
                "swap_ms": round(swap_ms, 4),
                "draining": old.in_flight,
            }
            self.last = report
            level = logging.WARNING if pending else logging.INFO
            note = f"; needs a restart to apply: {pending}" if pending else ""
            log.log(level, "reload (%s): generation %d, changed %s%s", reason, new.number, report["changed"], note)
            return report

    async def _retire(self, old: Generation, new: Generation, at_swap: int) -> None:
        """Close the old generation once its requests are done, keeping what the new one took over.

        A write that ran on the old generation after the swap went through the old one's invalidation
        only, and the shared store does not report it to the new one's follower as another process's
        change: so the changes logged since the swap are applied to the new generation's invalidation
        as foreign ones (idempotent for those it made itself), like another process's."""
        if not await old.drained(self.drain_s):
            log.warning("reload: %d request(s) still running on generation %d after %.0f s; closing it",
                        old.in_flight, old.number, self.drain_s)  # fmt: skip
        await _replay(new.rag, at_swap)
        try:
            await old.rag.aclose(keep=_shared(old.rag, new.rag))
        except Exception:
            log.exception("reload: closing generation %d failed", old.number)
        if new is self.current:
            await new.rag.jobs.start()  # adopts the jobs the old one handed back

    async def retiring(self) -> None:
        """Wait for every old generation to be closed (tests, shutdown)."""
        while self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)

    async def aclose(self) -> None:
        await self.retiring()
        await self.current.rag.aclose()

    def handle_sighup(self) -> bool:
        """Reload on SIGHUP (each worker process handles its own); False where signals are unavailable."""
        loop = asyncio.get_running_loop()

        def on_hup() -> None:
            task = loop.create_task(self._reload_logged("SIGHUP"))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

        try:
            loop.add_signal_handler(signal.SIGHUP, on_hup)
        except (NotImplementedError, RuntimeError, ValueError, AttributeError):  # not the main thread, or Windows
            return False
        return True

    async def _reload_logged(self, reason: str) -> None:
        try:
            await self.reload(reason)
        except Exception as exc:  # logged, never raised into the loop: the old pipeline keeps serving
            log.error("reload (%s) failed; still serving generation %d: %s", reason, self.current.number, exc)


async def _replay(rag: AsyncRAG, since: int) -> None:
    """Apply the store's changes after seq ``since`` to ``rag``'s cache invalidation."""
    store, inv = rag.store, rag._invalidation
    if inv is None or store.version() == since:
        return
    changes = [c for c in await asyncio.to_thread(store.recent_changes, 2048) if c.seq > since]
    for change in changes:
        added = list(change.added)
        vecs = await asyncio.to_thread(store.vectors, change.tenant, added) if added else None
        await inv.changed(change, vecs, foreign=True)


def _factories(s: Settings) -> dict[str, Any]:
    """The embedder and LLM factories before a plugin reload (a reloaded plugin module has new ones)."""
    out: dict[str, Any] = {}
    for name, group, provider in (("embedder", "ragline.embedders", s.embedder.provider),
                                  ("llm", "ragline.llms", s.llm.provider)):  # fmt: skip
        try:
            out[name] = plugins.load(group, provider)
        except ConfigError:
            out[name] = None
    return out


def _build(old: Generation, s: Settings, before: dict[str, Any]) -> AsyncRAG:
    """The new pipeline (not started): the old store, and the old embedder/LLM where unchanged."""
    o = old.settings
    rag = old.rag

    def same(name: str, group: str, provider: str) -> bool:
        if getattr(o, name) != getattr(s, name):
            return False
        try:
            return plugins.load(group, provider) is before[name]  # the plugin module was not reloaded
        except ConfigError:
            return False

    embedder = rag.embedder if same("embedder", "ragline.embedders", s.embedder.provider) else None
    llm = rag.llm if same("llm", "ragline.llms", s.llm.provider) else None
    new = AsyncRAG(s, embedder=embedder, llm=llm, store=rag.store)
    new.admission = rag.admission  # limits are restart-only: one admission budget across the swap
    return new


def _parts(rag: AsyncRAG) -> dict[str, object]:
    """A pipeline's components by name (those built so far: a failed start may have built none)."""
    return {"store": rag._store, "embedder": rag._embedder, "llm": rag._llm}


def _reused_names(old: AsyncRAG, new: AsyncRAG) -> list[str]:
    a, b = _parts(old), _parts(new)
    return [name for name in a if a[name] is not None and a[name] is b[name]]


def _shared(old: AsyncRAG, new: AsyncRAG) -> tuple[object, ...]:
    """What the two pipelines share (closing either must leave it open): the store at least."""
    return (
        old._store,
        *(c for c in _parts(new).values() if c is not None and any(c is o for o in _parts(old).values())),
    )


def supervisor_pid() -> int | None:
    """The ``ragline serve --workers N`` master that forwards SIGHUP to every worker, if any."""
    raw = os.environ.get("RAGLINE_SUPERVISOR_PID")
    return int(raw) if raw and raw.isdigit() and int(raw) == os.getppid() else None
