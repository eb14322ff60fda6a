"""The method registry itself: name -> method class. `methods/__init__.py` registers the built-in methods;
method files that need another method's class look it up here at run time (importing the package
from inside it would run back up: a circle)."""

from __future__ import annotations

METHODS: dict[str, type] = {}
DEFAULT_METHOD = "prefix"  # what `prefixtune train` trains without --method: the paper's prefix-tuning


def register(cls: type) -> type:
    """Add a method class to the registry (usable as a decorator by third-party methods)."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return METHODS[key]
