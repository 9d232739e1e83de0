"""The one add/look-up logic of the package's registries by name (criteria, pruning methods)."""

from __future__ import annotations

from typing import Any, MutableMapping, TypeVar

T = TypeVar("T")

__all__ = ["register", "lookup"]


def register(table: MutableMapping[str, T], item: T, cls: type, kind: str, *, overwrite: bool = False) -> T:
    """Add ``item`` (an instance of ``cls`` with a ``name``) to ``table``; ValueError for a wrong type,
    an empty name, or a name already taken (unless ``overwrite``). ``kind`` names it in messages."""
    if not isinstance(item, cls):
        raise ValueError(f"expected a {cls.__name__}, got {type(item).__name__}")
    name = getattr(item, "name", None)
    if not name:
        raise ValueError(f"a {kind} needs a non-empty name")
    if name in table and not overwrite:
        raise ValueError(f"a {kind} named {name!r} is already registered; pass overwrite=True")
    table[name] = item
    return item


def lookup(table: MutableMapping[str, T], name: Any, cls: type) -> T:
    """``table[name]``; an instance of ``cls`` is returned as is; an unknown name is a ValueError listing the valid ones."""
    if isinstance(name, cls):
        return name
    if name not in table:
        raise ValueError(f"unknown pruning method {name!r}; available: {sorted(table)}")
    return table[name]
