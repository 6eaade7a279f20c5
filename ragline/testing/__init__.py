"""Test helpers shipped with ragline: a fake OpenAI-compatible upstream and fast fake components.

``FakeUpstream`` (``ragline.testing.fake_upstream``) is imported lazily so that
``python -m ragline.testing.fake_upstream`` does not import the module twice;
``HashEmbedder`` and ``ScriptedLLM`` (``ragline.testing.fakes``) stand in for
the model-backed embedder and LLM in fast pipeline tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ragline.testing.fake_upstream import FakeUpstream, UpstreamConfig
    from ragline.testing.fakes import HashEmbedder, ScriptedLLM

__all__ = ["FakeUpstream", "HashEmbedder", "ScriptedLLM", "UpstreamConfig"]

_HOMES = {
    "FakeUpstream": "fake_upstream",
    "UpstreamConfig": "fake_upstream",
    "HashEmbedder": "fakes",
    "ScriptedLLM": "fakes",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is not None:
        import importlib

        return getattr(importlib.import_module(f"ragline.testing.{home}"), name)
    raise AttributeError(f"module 'ragline.testing' has no attribute {name!r}")
