"""Kernel families: what a template can instantiate, and the facts legality and the planner need about it.

A family module (``sm80.py``, ``sm90.py``) registers one :class:`Family` per template. Decisions (which tiles,
how much shared memory) are made here in Python; templates get plain values from ``render``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..granularity import Granularity
from .config import ACT_BITS, OUT_DTYPES, KernelConfig

ACT_FORMATS = ("s4", "s8", "e4m3", "raw")  # packed int4 / int8 a value / e4m3 a value / fused quantization


@dataclass(frozen=True)
class TileShape:
    tile_m: int
    tile_n: int
    tile_k: int
    warps_m: int
    warps_n: int


@dataclass(frozen=True)
class Family:
    name: str
    archs: tuple[str, ...]
    path: str                       # int4 | int8 | fp8 (tensor-core type the kernel computes on)
    granularity: str                # "group" | "channel": which kind of Granularity the template serves
    template: str                   # file name under templates/
    act_format: str                 # activation storage the kernel reads (see ACT_FORMATS)
    weight_layout: str              # "canonical" or the name of a pack function in apex4gen.kernels.layouts
    align_k: int                    # K must be a multiple of this (elements)
    align_n: int                    # N must be a multiple of this (elements)
    tiles: tuple[TileShape, ...]
    stages: tuple[int, ...]
    split_k: tuple[int, ...]
    smem_bytes: Callable[[KernelConfig], int]
    render: Callable[[KernelConfig], dict]
    max_m: int | None = None        # a decode-only family serves M <= max_m
    groups: tuple[int, ...] | None = None  # the group sizes a group-wise template serves (None: any)
    schedulers: tuple[str, ...] = ("persistent",)  # KernelConfig.scheduler values the template implements
    m_step: int | None = None       # set when the launcher picks an instantiation per M (padding M to a multiple
                                    # of m_step) and splits K at run time to fill the GPU, ignoring tile_m/split_k
    act_bits: tuple[int, ...] = (4,)  # activation precisions the template takes (KernelConfig.act_bits)
    k_rule: Callable[[KernelConfig, int, int], str | None] | None = None  # (cfg, K, shared memory limit) -> why a
                                    # launcher that picks its K split at run time finds none for this K, or None

    def configs(self, arch: str, granularity: Granularity, out_dtype: str, act_bits: int = 4) -> list[KernelConfig]:
        """Every instance of this family for one arch/granularity/dtype/activation precision (legality filters
        them later)."""
        if not self.serves(granularity) or act_bits not in self.act_bits:
            return []
        return [
            KernelConfig(self.name, arch, self.path, granularity, t.tile_m, t.tile_n, t.tile_k, t.warps_m, t.warps_n,
                         s, k, out_dtype, sched, act_bits)
            for t in self.tiles for s in self.stages for k in self.split_k for sched in self.schedulers
        ]

    def serves(self, granularity: Granularity) -> bool:
        """Per-channel families serve per-channel; group-wise ones the group sizes they list (None: any)."""
        if granularity.is_channel != (self.granularity == "channel"):
            return False
        return self.groups is None or granularity.group in self.groups


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"kernel family {family.name!r} registered twice")
    if family.act_format not in ACT_FORMATS:
        raise ValueError(f"family {family.name}: act_format {family.act_format!r} not in {ACT_FORMATS}")
    FAMILIES[family.name] = family
    return family


def act_bits_served(kernel_arch: str) -> tuple[int, ...]:
    """The activation precisions some family of ``kernel_arch`` takes: a plan never asks for another one there."""
    return tuple(sorted({b for f in FAMILIES.values() if kernel_arch in f.archs for b in f.act_bits}))


def family_of(cfg: KernelConfig) -> Family:
    try:
        return FAMILIES[cfg.family]
    except KeyError:
        raise ValueError(f"unknown kernel family {cfg.family!r}; known: {', '.join(sorted(FAMILIES))}") from None


def configs_by_name(kernel_arch: str, granularities) -> dict[str, KernelConfig]:
    """Every configuration the families offer ``kernel_arch`` at these granularities (names, as plans spell
    them), for any output dtype and activation precision, by procedural name: what a recorded kernel name was."""
    return {cfg.procedural_name(): cfg
            for fam in FAMILIES.values() if kernel_arch in fam.archs
            for name in sorted(granularities) for dtype in OUT_DTYPES for bits in ACT_BITS
            for cfg in fam.configs(kernel_arch, Granularity.parse(name), dtype, bits)}
