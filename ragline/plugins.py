"""Entry-point registry for embedders, LLMs and stores.

Built-in components register through the same entry points as third-party
ones (see pyproject.toml), so ``embedder.provider: local`` and a plugin's
``embedder.provider: my-embedder`` resolve the same way.  Each factory is called
with its settings section (stores: with the data dir and vector width).
``reload()`` re-reads the entry points, for plugin reload without a restart.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points
from typing import Any

from ragline.errors import ConfigError

GROUPS = ("ragline.embedders", "ragline.llms", "ragline.stores")

_cache: dict[str, dict[str, Any]] = {}

_BUILTIN: dict[str, dict[str, str]] = {"ragline.embedders": {"onnx": "ragline.embed.onnx:OnnxEmbedder"}}
"""Built-ins newer than an installed copy's entry-point metadata (an editable install made before
they existed): found by name even then.  pyproject.toml registers them as entry points too."""


def available(group: str) -> dict[str, Any]:
    """name → entry point for one group (cached until ``reload``)."""
    if group not in _cache:
        _cache[group] = {ep.name: ep for ep in entry_points(group=group)}
    return _cache[group]


def load(group: str, name: str) -> Any:
    """The factory registered under ``name``; ConfigError lists the known names."""
    eps = available(group)
    ep = eps.get(name)
    if ep is None and name in _BUILTIN.get(group, {}):
        from importlib import import_module

        module, _, attr = _BUILTIN[group][name].partition(":")
        return getattr(import_module(module), attr)
    if ep is None:
        known = ", ".join(sorted(eps)) or "none"
        raise ConfigError(f"no {group.split('.')[-1][:-1]} named {name!r} (installed: {known})")
    return ep.load()


def reload() -> list[str]:
    """Re-read the entry points (a plugin installed since is found) and re-import the third-party
    plugin modules loaded so far (a plugin's edited code takes effect; ragline's own modules are never
    re-imported).  Returns the re-imported module names; an import error propagates (hot reload then
    keeps the running components)."""
    loaded = {ep.module for eps in _cache.values() for ep in eps.values()}
    _cache.clear()
    importlib.invalidate_caches()
    redone: list[str] = []
    for name in sorted(loaded):
        mod = sys.modules.get(name)
        if mod is not None and not (name == "ragline" or name.startswith("ragline.")):
            importlib.reload(mod)
            redone.append(name)
    return redone
