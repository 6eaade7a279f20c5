"""Test helpers shipped with ragline: a fake OpenAI-compatible upstream.

``FakeUpstream`` is imported lazily so that ``python -m
ragline.testing.fake_upstream`` does not import the module twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ragline.testing.fake_upstream import FakeUpstream, UpstreamConfig

__all__ = ["FakeUpstream", "UpstreamConfig"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ragline.testing import fake_upstream

        return getattr(fake_upstream, name)
    raise AttributeError(f"module 'ragline.testing' has no attribute {name!r}")
