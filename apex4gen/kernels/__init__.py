"""Kernel families, configurations and legality. Importing this package registers every family module."""
from __future__ import annotations

from .config import KernelConfig
from .families import FAMILIES, Family, TileShape, family_of, register

# The family modules, by name: importing one registers its families in FAMILIES (in this order).
from . import sm80, sm90_decode, sm90_prefill  # noqa: F401

__all__ = ["FAMILIES", "Family", "KernelConfig", "TileShape", "family_of", "register"]
