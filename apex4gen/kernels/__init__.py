"""Kernel families, configurations and legality. Importing this package registers every family module."""
from __future__ import annotations

import importlib
import pkgutil

from .config import KernelConfig
from .families import FAMILIES, Family, TileShape, family_of, register

_NOT_FAMILIES = {"config", "families", "legality", "cpp_names", "layouts"}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.name not in _NOT_FAMILIES and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["FAMILIES", "Family", "KernelConfig", "TileShape", "family_of", "register"]
