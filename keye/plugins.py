"""``"package.module:name"`` strings from configs → the Python object they name (rewards, engines, factories)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """Import ``module:attr`` and return it; errors say which ``what`` (e.g. "reward", "engine") was being loaded."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r}: {exc}") from None
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no callable {attr!r}")
    return obj
