"""Editing methods as plug-ins. A method is one module in this folder that defines `METHODS`, a
tuple of `Method`s (base.py): its closed form, its own options and what it does around the solve.
The registry below is built from the folder, so adding a method is adding a file; `register`
adds one from elsewhere (a test, a user's package). The CLI's choices, `alphaedit methods`, the
config's check of a method name and the tests all read the registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Method, NoOptions
from .projection import projected_solve

__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "NoOptions", "get_method", "projected_solve", "register"]


def _discover() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        for method in getattr(importlib.import_module(f"{__name__}.{module.name}"), "METHODS", ()):
            found[method.name] = method
    return found


METHODS: dict[str, Method] = _discover()
DEFAULT_METHOD = "alphaedit"  # the paper's: MEMIT-seq with the null-space projection


def register(method: Method) -> Method:
    """Add (or replace) a method by name; returns it."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {name!r}")
    return METHODS[name]
