"""Decode (small M) W4A4 kernel families for Hopper (sm_90a): int8 mma.sync on 4-bit storage, memory-bound.

``sm90_decode`` (group-wise, power-of-two groups >= 64) and ``sm90_decode_channel`` (per-channel) read raw
activations (act format "raw") and weights packed by ``apex4gen.kernels.layouts.pack_sm90_decode``. The
launcher quantizes x once (reference numerics, 4- or 8-bit: ``KernelConfig.act_bits``, a template parameter
because the x layout in the workspace and in shared memory doubles at 8 bits) into the workspace, then launches the GEMM with programmatic
dependent launch so that its weight stream starts while x is still being quantized. One rendered kernel
serves every M <= ``MAX_M``: it holds one GEMM instantiation per token-tile count (8, 16, 32, 64 tokens) and K
class (``variants``) and its launcher picks by M and K, then picks the cluster split of K that fills the GPU
(templates/sm90_decode.cu.jinja).

Why these tiles: small blocks, several a SM (<= 128 registers), so one block's start-up (first loads, wait
for the quantization, copy of the x slice) and cluster reduction overlap the others' weight streams; four or
eight 64-wide chunks of each row tile are in flight per thread, as asynchronous copies into the thread's own
shared-memory slots (so the depth costs no registers) or in registers. Larger M needs more accumulator registers,
so fewer rows a warp.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from . import cpp_names
from .config import KernelConfig
from .families import Family, TileShape, register

ARCHS = ("sm_90a",)
MAX_M = 64            # the launcher serves M <= 64 (exact, tested)
# The planner may route every M <= 64 here; the cost model picks it or the prefill kernel per GEMM at the 64-token
# bucket. The ~2-3x slow sets seen at M >= 32 came on one machine with and without programmatic dependent
# launch, and on another machine 0 of 144 sets (clock probed) were slow (bench/notes/sm90-decode.md, "Slow sets").
PLANNER_MAX_M = 64
CHUNK_K = 64          # K elements of one 16-byte weight load (two m16n8k32 steps)
WINDOW_K = 256        # K elements of one token a warp of the quantizing block covers: K is a multiple of it
QUANT_ITERS = 16      # 8-value units a thread of the 512-thread quantizing block holds: K <= 65536
ALIGN_N = 16          # one mma row tile
MAX_SPLIT = 8         # the launcher's largest K split (a portable cluster)
NOMINAL_SLICE_K = 4096  # footprint reported to legality (of 4-bit x; 8-bit x: the same bytes, half the K); the
                        # launcher only picks splits whose slice fits


@dataclass(frozen=True)
class Variant:
    """One instantiation: tokens in n8 tiles (mt), warps per block, 16-row tiles per warp, chunks in flight,
    held in registers or (smem_stream) streamed into shared memory by asynchronous copies."""

    mt: int
    warps: int
    rt: int
    p: int
    smem_stream: bool = False

    @property
    def tokens(self) -> int:
        return 8 * self.mt

    @property
    def rows(self) -> int:
        return 16 * self.warps * self.rt

    @property
    def slot_bytes(self) -> int:
        """Shared memory of the weight chunks in flight: p chunks of each row tile, 16 bytes a lane."""
        return self.p * self.rt * self.warps * 32 * 16 if self.smem_stream else 0


# Blocks a SM = 512 / threads, so registers are capped at 128 (v1: 64 tokens x 2 row tiles spilled). One variant a
# token-tile count (mt = 1, 2, 4, 8 in order), picked per granularity and K class from H100 sweeps
# (bench/notes/sm90-decode.md, "Variants"): M <= 16 fastest with 128-thread blocks (4 a SM); M <= 32 per-channel
# with two row tiles a warp (27.7-105 us vs 33-125 us for qkv, o, gate_up; its group-wise build spills), group-wise
# with 8 chunks in flight; M <= 64 with 256 threads. K >= LARGE_K (down_proj, K = 28672): larger blocks at
# M >= 9 (M = 16: 58 vs 79 us group-wise, 57 vs 64 us per-channel; M = 64: 148 vs 159 / 110 vs 116 us).
# Chunks in flight at M <= 16 (bench/notes/sm90-decode.md, "Shared-memory stream"; H100): per-channel streams 8
# through shared memory (smem_stream), 1.3-2.6 us faster at M = 1 on qkv, o and down than 4 in registers: the stream
# runs on while the block waits for the per-channel quantizer. Group-wise does so at M <= 8 for K < LARGE_K (against 4
# in registers, both with the scales copied first: qkv 19.8 vs 21.0 us, o 17.1 vs 18.4, gate_up 86.1 vs 85.1); at
# M = 9..16 and for down_proj's K 4 in registers were faster (down: 51.0 vs 53.7 us, qkv M = 16: 23.1 vs 24.3). At
# M > 16 (mt 4, 8) registers are kept: the shared-memory stream was 0.8-3 us slower at M = 64.
VARIANTS_GROUP = (
    Variant(mt=1, warps=4, rt=2, p=8, smem_stream=True),
    Variant(mt=2, warps=4, rt=2, p=4),
    Variant(mt=4, warps=8, rt=1, p=8),
    Variant(mt=8, warps=8, rt=1, p=4),
)
VARIANTS_CHANNEL = (
    Variant(mt=1, warps=4, rt=2, p=8, smem_stream=True),
    Variant(mt=2, warps=4, rt=2, p=8, smem_stream=True),
    Variant(mt=4, warps=4, rt=2, p=4),
    Variant(mt=8, warps=8, rt=1, p=4),
)
LARGE_K = 16384
VARIANTS_GROUP_LARGE_K = (
    Variant(mt=1, warps=4, rt=2, p=4),
    Variant(mt=2, warps=8, rt=2, p=4),
    Variant(mt=4, warps=8, rt=1, p=8),
    Variant(mt=8, warps=16, rt=1, p=4),
)
VARIANTS_CHANNEL_LARGE_K = (Variant(mt=1, warps=4, rt=2, p=8, smem_stream=True),) + VARIANTS_GROUP_LARGE_K[1:]


def variants(group: int, large_k: bool, act_bits: int = 4) -> tuple[Variant, ...]:
    """The launcher's instantiations for one granularity (group 0: per-channel), K class and activation precision,
    by token tiles."""
    if group == 0:
        table = VARIANTS_CHANNEL_LARGE_K if large_k else VARIANTS_CHANNEL
    else:
        table = VARIANTS_GROUP_LARGE_K if large_k else VARIANTS_GROUP
    return table if act_bits == 4 else tuple(_for_8bit(v) for v in table)


def _for_8bit(v: Variant) -> Variant:
    """8-bit x fragments are twice the registers of 4-bit ones: the register-held 32- and 64-token variants keep
    half the weight chunks in flight (with all of them they spilled 20-44 bytes, nvcc 13.0)."""
    return replace(v, p=v.p // 2) if v.mt >= 4 and not v.smem_stream else v


# The nominal tile of the configuration record: the M <= 16 variant (the one the targets are about).
TILES = (TileShape(tile_m=MAX_M, tile_n=VARIANTS_GROUP[1].rows, tile_k=CHUNK_K * VARIANTS_GROUP[1].p, warps_m=1,
                   warps_n=VARIANTS_GROUP[1].warps),)


def _round16(v: int) -> int:
    return (v + 15) // 16 * 16


def _x_bytes(tokens: int, k: int, act_bits: int) -> int:
    """Quantized x of ``tokens`` rows: int4 packed two a byte, or one int8 a value."""
    return tokens * k * act_bits // 8


def variant_smem_bytes(v: Variant, group: int, slice_k: int, act_bits: int = 4) -> int:
    """Mirrors smem_layout() in the template: weight slots, quantized x slice, weight scales | reduction buffer,
    then the activation scales."""
    groups = slice_k // group if group else 1
    sws = _round16(v.slot_bytes + _x_bytes(v.tokens, slice_k, act_bits))
    loop_end = sws + (groups * v.rows * 2 if group else 0)
    red_end = v.tokens * (v.rows + 4) * 4
    sxs = _round16(max(loop_end, red_end))
    return _round16(sxs + groups * v.tokens * 4)


def workspace_bytes(m: int, k: int, group: int, act_bits: int = 4) -> int:
    """Mirrors the launcher's <name>_workspace(): quantized x in the layout of the variant serving M + fp32
    scales."""
    mt = next(v.mt for v in VARIANTS_GROUP if (m + 7) // 8 <= v.mt)  # every table has the same token tiles
    groups = k // group if group else 1
    return _x_bytes(mt * 8, k, act_bits) + _round16(groups * mt * 8 * 4)


def smem_bytes(cfg: KernelConfig) -> int:
    group = cfg.granularity.template_group
    return max(variant_smem_bytes(v, group, NOMINAL_SLICE_K * 4 // cfg.act_bits, cfg.act_bits)
               for large_k in (False, True) for v in variants(group, large_k, cfg.act_bits))


def split_violation(cfg: KernelConfig, k: int, smem_limit: int) -> str | None:
    """Mirrors the launcher's choose_split() for the largest token tile: some split of K into at most MAX_SPLIT
    slices (whole chunks, whole groups) must fit shared memory, else every M the tile serves gets BAD_SHAPE.
    8-bit x doubles the slice's bytes: K = 11008 or 28672 at g128 has no such split for 64 tokens."""
    group = cfg.granularity.template_group
    v = variants(group, k >= LARGE_K, cfg.act_bits)[-1]
    for s in range(1, MAX_SPLIT + 1):
        slice_k = k // s
        if k % s or slice_k % CHUNK_K or (group and slice_k % group):
            continue
        if variant_smem_bytes(v, group, slice_k, cfg.act_bits) <= smem_limit:
            return None
    return (f"no split of K={k} into <= {MAX_SPLIT} slices fits {smem_limit} B of shared memory for {v.tokens} "
            f"tokens at {cfg.act_bits}-bit activations")


def _check_group(cfg: KernelConfig, channel: bool) -> None:
    group = cfg.granularity.template_group
    if channel and not cfg.granularity.is_channel:
        raise ValueError(f"{cfg.family} is per-channel; got {cfg.granularity.name}")
    if not channel and (group < CHUNK_K or group & (group - 1)):
        raise ValueError(f"{cfg.family} takes power-of-two groups >= {CHUNK_K}; got {cfg.granularity.name}")
    if cfg.split_k != 1:
        raise ValueError(f"{cfg.family} picks its K split at run time; configure split_k=1, got {cfg.split_k}")


def _args(v: Variant) -> str:
    """The template arguments <MT, WARPS, RT, P, SMEM> of one instantiation."""
    return f"{v.mt}, {v.warps}, {v.rt}, {v.p}, {'true' if v.smem_stream else 'false'}"


def _render(cfg: KernelConfig, channel: bool) -> dict:
    _check_group(cfg, channel)
    group = cfg.granularity.template_group
    return {
        "element_out": cpp_names.CUDA_OUT[cfg.out_dtype],
        "group": group,
        "act_bits": cfg.act_bits,
        "max_m": MAX_M,
        "align_n": ALIGN_N,
        "align_k": WINDOW_K,
        "quant_iters": QUANT_ITERS,
        "large_k": LARGE_K,
        "variants": [{"mt": small.mt, "small": _args(small), "large": _args(large)}
                     for small, large in zip(variants(group, False, cfg.act_bits),
                                             variants(group, True, cfg.act_bits))],
    }


def render_group(cfg: KernelConfig) -> dict:
    return _render(cfg, channel=False)


def render_channel(cfg: KernelConfig) -> dict:
    return _render(cfg, channel=True)


_COMMON = dict(
    archs=ARCHS,
    path="int8",
    template="sm90_decode.cu.jinja",
    act_format="raw",
    weight_layout="sm90_decode",
    align_k=WINDOW_K,
    align_n=ALIGN_N,
    tiles=TILES,
    stages=(VARIANTS_GROUP[1].p,),
    split_k=(1,),
    smem_bytes=smem_bytes,
    max_m=PLANNER_MAX_M,
    m_step=8,  # one instantiation per 8-token mma tile count; the K split is chosen at launch to fill the GPU
    act_bits=(4, 8),  # the in-kernel quantizer writes int4 or int8 x (template kActBits); int8 mma either way
    k_rule=split_violation,
)

SM90_DECODE = register(Family(name="sm90_decode", granularity="group", render=render_group, **_COMMON))
SM90_DECODE_CHANNEL = register(Family(name="sm90_decode_channel", granularity="channel", render=render_channel,
                                      **_COMMON))
