"""Every registered plugin entry point loads and names a class implementing its group's protocol.

Nothing is instantiated (no model is loaded): the check is on the class's members and their signatures,
so a broken ``module:attr`` in pyproject.toml, or a built-in that drifts from its protocol, fails here.
"""

from __future__ import annotations

import inspect
from importlib.metadata import EntryPoint, entry_points

import pytest

from ragline import plugins
from ragline.embed.base import Embedder
from ragline.llm.base import LLM
from ragline.store.base import Store

PROTOCOLS: dict[str, type] = {"ragline.embedders": Embedder, "ragline.llms": LLM, "ragline.stores": Store}
BUILT_IN = {
    "ragline.embedders": {"local"},
    "ragline.llms": {"extractive", "openai"},
    "ragline.stores": {"embedded", "postgres"},
}
ALL = [(group, ep) for group in plugins.GROUPS for ep in entry_points(group=group)]


def test_groups_are_the_ones_the_registry_reads() -> None:
    assert set(PROTOCOLS) == set(plugins.GROUPS)


@pytest.mark.parametrize("group", sorted(BUILT_IN))
def test_built_ins_are_registered(group: str) -> None:
    assert BUILT_IN[group] <= {ep.name for ep in entry_points(group=group)}


def _members(proto: type) -> dict[str, bool]:
    """Protocol member name → whether it is a method (else an attribute such as ``id``/``dim``)."""
    names = set(getattr(proto, "__protocol_attrs__", ())) or {n for n in vars(proto) if not n.startswith("_")} | set(
        getattr(proto, "__annotations__", {})
    )
    return {n: callable(getattr(proto, n, None)) for n in names}


@pytest.mark.parametrize(("group", "ep"), ALL, ids=[f"{g}:{ep.name}" for g, ep in ALL])
def test_entry_point_loads_a_class_implementing_the_protocol(group: str, ep: EntryPoint) -> None:
    cls = ep.load()
    assert inspect.isclass(cls), f"{ep.value} is not a class"
    proto = PROTOCOLS[group]
    members = _members(proto)
    assert members, proto
    init = inspect.signature(cls.__init__)
    for name, is_method in members.items():
        if is_method:
            impl = getattr(cls, name, None)
            assert callable(impl), f"{ep.value} lacks method {name}"
            want = inspect.signature(getattr(proto, name))
            have = inspect.signature(impl)
            assert list(have.parameters)[: len(want.parameters)] == list(want.parameters), (
                f"{ep.value}.{name}{have} does not match {proto.__name__}.{name}{want}"
            )
            assert inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(getattr(proto, name)), (
                f"{ep.value}.{name}: sync/async differs from the protocol"
            )
        else:
            # an attribute (e.g. ``id``, ``dim``): a class attribute, a property, or set in __init__
            source = inspect.getsource(cls)
            assert hasattr(cls, name) or f"self.{name}" in source or name in init.parameters, (
                f"{ep.value} never sets attribute {name}"
            )
