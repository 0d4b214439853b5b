"""Decode (small M) W4A4 kernel families for Hopper (sm_90a): int8 mma.sync on 4-bit storage, memory-bound.

``sm90_decode`` (group-wise, g64 ... g1024) and ``sm90_decode_channel`` (per-channel) read raw activations
(act format "raw": the kernel quantizes x itself with the reference numerics) and weights packed by
``apex4gen.kernels.layouts.pack_sm90_decode``. One rendered kernel serves every M <= ``MAX_M``: it holds one
instantiation per token-tile count (8, 16, 32, 64 tokens) and its launcher picks by M, then picks the
cluster split of K that fills the GPU (templates/sm90_decode.cu.jinja).

Why these tiles: at M <= 16 a block of 16 warps owns 512 weight rows, so the x slice each block quantizes is
small next to the weights it streams (x bytes / weight bytes = 4 M / rows); four 64-wide chunks of each of two
row tiles are in flight per thread (128 B). Larger M needs more accumulator registers, so fewer rows a warp.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import cpp_names
from .config import KernelConfig
from .families import Family, TileShape, register

ARCHS = ("sm_90a",)
MAX_M = 64
CHUNK_K = 64          # K elements of one 16-byte weight load (two m16n8k32 steps)
WINDOW_K = 256        # K elements of one token a warp quantizes at once; a K-slice is a multiple of it
ALIGN_N = 16          # one mma row tile
NOMINAL_SLICE_K = 4096  # footprint reported to legality; the launcher only picks splits whose slice fits


@dataclass(frozen=True)
class Variant:
    """One instantiation: tokens in n8 tiles (mt), warps per block, 16-row tiles per warp, chunks in flight."""

    mt: int
    warps: int
    rt: int
    p: int

    @property
    def tokens(self) -> int:
        return 8 * self.mt

    @property
    def rows(self) -> int:
        return 16 * self.warps * self.rt


# ptxas caps 512-thread blocks at 128 registers: 32 and 64 tokens fit with one row tile a warp (64 tokens x
# 2 row tiles spilled in a 256-thread block). Measured on the H100 (bench/NOTES-sm90-decode.md): faster than
# cuBLAS FP16 for M <= 16 only; M = 32 is ~0.9x and M = 64 ~0.5x, because each N-block re-quantizes x.
VARIANTS = (
    Variant(mt=1, warps=16, rt=2, p=4),
    Variant(mt=2, warps=16, rt=2, p=4),
    Variant(mt=4, warps=16, rt=1, p=4),
    Variant(mt=8, warps=16, rt=1, p=4),
)

# The nominal tile of the configuration record: the M <= 16 variant (the one the targets are about).
TILES = (TileShape(tile_m=MAX_M, tile_n=VARIANTS[1].rows, tile_k=CHUNK_K * VARIANTS[1].p, warps_m=1,
                   warps_n=VARIANTS[1].warps),)


def _round16(v: int) -> int:
    return (v + 15) // 16 * 16


def variant_smem_bytes(v: Variant, group: int, slice_k: int) -> int:
    """Mirrors smem_layout() in the template: int4 x slice, weight scales, unit maxima | reduction buffer,
    then activation scales and per-token maxima."""
    groups = slice_k // group if group else 1
    sws = _round16(v.tokens * slice_k // 2)
    umax = _round16(sws + (groups * v.rows * 2 if group else 0))
    loop_end = umax + v.tokens * (slice_k // CHUNK_K) * 4
    red_end = v.tokens * (v.rows + 4) * 4
    sxs = _round16(max(loop_end, red_end))
    cmax = _round16(sxs + groups * v.tokens * 4)
    return _round16(cmax + v.tokens * 4)


def smem_bytes(cfg: KernelConfig) -> int:
    return max(variant_smem_bytes(v, cfg.group, NOMINAL_SLICE_K) for v in VARIANTS)


def _check_group(cfg: KernelConfig, channel: bool) -> None:
    if channel and cfg.group != 0:
        raise ValueError(f"{cfg.family} is per-channel; got group={cfg.group}")
    if not channel and (cfg.group < CHUNK_K or cfg.group & (cfg.group - 1)):
        raise ValueError(f"{cfg.family} takes power-of-two groups >= {CHUNK_K}; got group={cfg.group}")
    if cfg.split_k != 1:
        raise ValueError(f"{cfg.family} picks its K split at run time; configure split_k=1, got {cfg.split_k}")


def _render(cfg: KernelConfig, channel: bool) -> dict:
    _check_group(cfg, channel)
    return {
        "element_out": cpp_names.CUDA_OUT[cfg.out_dtype],
        "group": cfg.group,
        "max_m": MAX_M,
        "align_n": ALIGN_N,
        "align_k": WINDOW_K,
        "variants": [{"mt": v.mt, "warps": v.warps, "rt": v.rt, "p": v.p} for v in VARIANTS],
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
    stages=(VARIANTS[1].p,),
    split_k=(1,),
    smem_bytes=smem_bytes,
    max_m=MAX_M,
)

SM90_DECODE = register(Family(name="sm90_decode", granularity="group", render=render_group, **_COMMON))
SM90_DECODE_CHANNEL = register(Family(name="sm90_decode_channel", granularity="channel", render=render_channel,
                                      **_COMMON))
