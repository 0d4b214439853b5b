"""Native-INT4 W4A4 kernel families for Ampere and Ada (sm_80, sm_86, sm_89): mma m16n8k64 s4.

``sm80_group``: group-wise (g64 ... g1024). A hand-tiled mainloop on CuTe's sm80 atoms (cp.async, ldmatrix,
mma) promotes each group's exact int32 partials to fp32 once per group with both scales.
``sm80_channel``: per-channel. CUTLASS 2.x int4 GEMM with an EVT epilogue (token scale x channel scale + bias).

Both read the canonical layout (packed s4, K-major, which is CUTLASS's int4b_t TN layout) and s4 activations.
Shared memory per block is computed here exactly as the kernels lay it out; each template static_asserts that
the value it is given matches its own layout, so legality against a GPU's limit is right.
"""
from __future__ import annotations

from . import cpp_names
from .config import KernelConfig
from .families import Family, TileShape, register

ARCHS = ("sm_80", "sm_86", "sm_89")
MMA_K = 64  # mma m16n8k64: K elements of one tensor-core step

# The group kernel keeps two accumulator sets (the current group's int32 partials and the fp32 sum), so a
# warp tile holds at most 64x32 outputs (2 x 128 registers); 128x128 with 8 warps is the largest CTA tile that
# fits the register file. From decode-sized to prefill-sized M:
GROUP_TILES = (
    TileShape(16, 64, 256, 1, 2),
    TileShape(32, 128, 128, 1, 4),
    TileShape(64, 128, 128, 2, 2),
    TileShape(128, 128, 128, 2, 4),
)

# CUTLASS's own int4 TN tiles (cutlass_library.generator.GenerateSM80_TensorOp_16864_TN) plus a small-M one.
CHANNEL_TILES = (
    TileShape(32, 128, 128, 1, 4),
    TileShape(64, 128, 128, 2, 2),
    TileShape(128, 128, 128, 2, 2),
    TileShape(128, 256, 128, 2, 4),
)

STAGES = (3, 4)

# K: a whole number of 16-byte cp.async chunks (32 int4). N: output stored 8 values (16 bytes) at a time.
GROUP_ALIGN_K, CHANNEL_ALIGN_K = 128, 32
ALIGN_N = 8


def _operand_stage_bytes(cfg: KernelConfig) -> int:
    """A and B tiles of one pipeline stage, packed two int4 a byte."""
    return (cfg.tile_m + cfg.tile_n) * cfg.tile_k // 2


def _groups_per_tile(cfg: KernelConfig) -> int:
    """Groups whose scales one stage holds: those the tile ends (one when a group spans several tiles)."""
    group = cfg.granularity.group
    if group is None:
        raise ValueError(f"{cfg.family} is group-wise; got {cfg.granularity.name}")
    return 1 if group >= cfg.tile_k else cfg.tile_k // group


def group_smem_bytes(cfg: KernelConfig) -> int:
    """Stages x (A tile + B tile + one 32-bit word per row and column per group for sx and sw)."""
    scales = _groups_per_tile(cfg) * (cfg.tile_m + cfg.tile_n) * 4
    return cfg.stages * (_operand_stage_bytes(cfg) + scales)


def channel_smem_bytes(cfg: KernelConfig) -> int:
    """CUTLASS's GemmKernel::SharedStorage: the mainloop stages; the EVT epilogue's (reused) storage is smaller."""
    return cfg.stages * _operand_stage_bytes(cfg)


def _common_values(cfg: KernelConfig) -> dict:
    return {
        "element_out": cpp_names.ELEMENT_OUT[cfg.out_dtype],
        "tile_m": cfg.tile_m, "tile_n": cfg.tile_n, "tile_k": cfg.tile_k,
        "warps_m": cfg.warps_m, "warps_n": cfg.warps_n,
        "stages": cfg.stages,
        "align_n": ALIGN_N,
    }


def render_group(cfg: KernelConfig) -> dict:
    if cfg.split_k != 1:
        raise ValueError(f"sm80_group has no split-K; got split_k={cfg.split_k}")
    _groups_per_tile(cfg)
    return {**_common_values(cfg), "group": cfg.granularity.template_group,
            "smem_bytes": group_smem_bytes(cfg)}


def render_channel(cfg: KernelConfig) -> dict:
    if cfg.split_k != 1:
        raise ValueError(f"sm80_channel has no split-K; got split_k={cfg.split_k}")
    return {
        **_common_values(cfg),
        "element_operand": cpp_names.ELEMENT_OPERAND[cfg.path],
        "element_accumulator": cpp_names.ELEMENT_ACCUMULATOR[cfg.path],
        "element_compute": cpp_names.ELEMENT_COMPUTE[cfg.path],
        # CUTLASS 2.x specialises its default GEMMs for Sm80 only; sm_86/89 run the same code (nvcc's
        # -gencode picks the SASS).
        "arch_tag": cpp_names.ARCH_TAG["sm_80"],
        "align_k": CHANNEL_ALIGN_K,
        "smem_bytes": channel_smem_bytes(cfg),
    }


SM80_GROUP = register(Family(
    name="sm80_group",
    archs=ARCHS,
    path="int4",
    granularity="group",
    template="sm80_group.cu.jinja",
    act_format="s4",
    weight_layout="canonical",
    align_k=GROUP_ALIGN_K,
    align_n=ALIGN_N,
    tiles=GROUP_TILES,
    stages=STAGES,
    split_k=(1,),
    smem_bytes=group_smem_bytes,
    render=render_group,
))

SM80_CHANNEL = register(Family(
    name="sm80_channel",
    archs=ARCHS,
    path="int4",
    granularity="channel",
    template="sm80_channel.cu.jinja",
    act_format="s4",
    weight_layout="canonical",
    align_k=CHANNEL_ALIGN_K,
    align_n=ALIGN_N,
    tiles=CHANNEL_TILES,
    stages=STAGES,
    split_k=(1,),
    smem_bytes=channel_smem_bytes,
    render=render_channel,
))
