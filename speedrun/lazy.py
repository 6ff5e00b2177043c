"""A package's exports loaded on first use (PEP 562), for packages whose modules are costly to import:
a run imports only the model, optimizer and data source it uses, and a tool that needs one light
submodule does not pay for torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """The `__getattr__` for `package` that imports `exports[name]` (a module path) when `name` is used."""

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
