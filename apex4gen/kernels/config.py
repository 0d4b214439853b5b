"""Kernel configurations: the frozen, serialisable record of one generated kernel, and its procedural name.

A configuration is shape-generic (M, N, K are run-time arguments); the plan maps each (GEMM, M bucket) to one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..granularity import Granularity

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90a")
PATHS = ("int4", "int8", "fp8")
OUT_DTYPES = ("f16", "bf16")
# How a kernel's CTAs walk the output tiles: "persistent" (CUTLASS's data-parallel persistent scheduler, or a
# family's own grid), "streamk" (CUTLASS's stream-K: every SM takes an equal share of all K iterations, tiles cut
# across SMs summed through a workspace; fills the GPU when there are fewer tiles than SMs or a partial wave),
# "hybrid" (CUTLASS's stream-K scheduler in its heuristic mode: whole waves data-parallel, only a partial last
# wave's K iterations spread over every SM).
SCHEDULERS = ("persistent", "streamk", "hybrid")
ACT_BITS = (4, 8)  # activation precisions (apex4gen.reference): 4 is pure W4A4, 8 a plan's per-layer W4A8


@dataclass(frozen=True, order=True)
class KernelConfig:
    """One kernel instance."""

    family: str
    arch: str
    path: str
    granularity: Granularity
    tile_m: int
    tile_n: int
    tile_k: int
    warps_m: int
    warps_n: int
    stages: int
    split_k: int
    out_dtype: str
    scheduler: str = "persistent"   # trailing, with a default: plans and names written before it stay valid
    act_bits: int = 4               # activation precision the kernel reads (trailing, default: as scheduler)

    def __post_init__(self) -> None:
        if not isinstance(self.granularity, Granularity):
            raise ValueError(f"kernel granularity must be a Granularity, got {self.granularity!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"kernel arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.path not in PATHS:
            raise ValueError(f"kernel path {self.path!r} is not one of {', '.join(PATHS)}")
        if self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"kernel out_dtype {self.out_dtype!r} is not one of {', '.join(OUT_DTYPES)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"kernel scheduler {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.act_bits not in ACT_BITS:
            raise ValueError(f"kernel act_bits {self.act_bits!r} is not one of {', '.join(map(str, ACT_BITS))}")

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    def procedural_name(self) -> str:
        """Every field, in a fixed order, so two configs share a name only if they are equal. The default
        scheduler and 4-bit activations add nothing (names from before those fields are unchanged); any other
        scheduler adds ``_<scheduler>``, 8-bit activations ``_a8``."""
        scheduler = "" if self.scheduler == "persistent" else f"_{self.scheduler}"
        act = "" if self.act_bits == 4 else f"_a{self.act_bits}"
        return (
            f"apex4gen_{self.family}_{self.arch.replace('_', '')}_{self.path}_{self.granularity.name}"
            f"_{self.tile_m}x{self.tile_n}x{self.tile_k}_w{self.warps_m}x{self.warps_n}"
            f"_s{self.stages}_k{self.split_k}{scheduler}{act}_{self.out_dtype}"
        )

    def to_dict(self) -> dict:
        """Plain values, the granularity by name (as plans spell it)."""
        return {**asdict(self), "granularity": self.granularity.name}
