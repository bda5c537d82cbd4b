"""The public API is exactly `gateway.__all__`: complete, sorted, and documented (as httpx checks its own)."""

from __future__ import annotations

import inspect
import types

import gateway


def test_all_imports_are_exported() -> None:
    included_private_members = ["__version__"]
    public = [
        name
        for name, value in vars(gateway).items()
        if (not name.startswith("_") or name in included_private_members) and not isinstance(value, types.ModuleType)
    ]
    assert gateway.__all__ == sorted(public)


def test_exported_members_are_documented() -> None:
    for name in gateway.__all__:
        member = getattr(gateway, name)
        if inspect.isclass(member) or inspect.isfunction(member):
            assert inspect.getdoc(member), f"gateway.{name} has no docstring"
