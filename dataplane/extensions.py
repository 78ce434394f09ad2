"""Import of the Cython extension modules built by `make setup`."""
from __future__ import annotations

import importlib
from types import ModuleType


def extension(name: str) -> ModuleType:
    """The compiled module `name`, or an ImportError that says how to build it.

    Callers import lazily so that the pure-Python references keep working
    without a build."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"{name} (Cython) is not built; run `make setup`") from exc
