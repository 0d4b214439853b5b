"""Predicted time of one W4A4 GEMM (and of its FP16 baseline) on one GPU, from the GPU spec.

A group-wise W4A4 GEMM ``Y[M,N] = X[M,K] W[N,K]^T`` does three things that overlap:

* tensor-core work: ``2*M*N*K`` operations on the path's tensor cores (native INT4, or 4-bit values computed
  on INT8 / FP8 tensor cores where INT4 is not native);
* CUDA-core dequantization: each group's partial sum, for each output element, is turned into float and
  multiplied by an activation scale and a weight scale: ``M*N*(K/group)`` partials, each costing
  ``dequant_ops`` FP32-pipe instructions (int partials: int->float convert + 2 FMA-class ops; FP8 partials are
  already float: 2) times ``dequant_slots_*`` issue slots for what surrounds them (scale loads, fragment
  shuffles, register pressure). Its ratio to tensor time is ``ops * slots * rho / group``: APEX4's ρ effect;
* DRAM traffic: int4 weights, weight scales (model dtype), activations (int4, a byte where the kernel reads
  int8/e4m3, the model dtype where it quantizes them itself), activation scales (fp32), the output (model dtype) and split-K partials.

``time = max(compute, memory) + launch`` with ``compute = max(tc, dq) + (1 - dequant_overlap) * min(tc, dq)``:
CUDA-core dequantization of some warps runs while others issue MMAs, so the slower unit sets the pace.

Every constant is in :class:`CostConstants`; a measured set (a later ``apex4gen probe``) replaces
:data:`DEFAULT_CONSTANTS` through ``constants=``. The defaults, and what they are fitted to:

* ``fp16_tensor_efficiency`` 0.75: cuBLAS FP16 reaches 0.68-0.72 of peak on the H100 (NOTES.md section 1),
  about 0.8 on the A100.
* ``int4_tensor_efficiency`` 0.25: a group-wise mainloop drains its int32 accumulators every group; with the
  slots below this reproduces APEX4's compute-bound W4A4-g128 speedups (RTX 3090 2.0-2.5x, A100 0.43-0.47x)
  and the ~3x of Atom's g128 kernel over FP16 on the RTX 4090.
* ``fp8_tensor_efficiency`` 0.62: cuBLAS FP8 1230 of 1979 TOPS at M=4096 (NOTES.md).
* ``dequant_slots_sm80`` 8.0 (mma.sync kernels, sm_80/86/89): fitted to APEX4's A100 0.45x at g128.
  ``dequant_slots_sm90`` 7.0 (wgmma kernels): fitted to apex4gen's ``sm90_prefill_group`` on the H100, whose
  measured time at M=256..4096 was 1.32-1.36x the prediction of the earlier 5.2 (that one fitted to CUTLASS's
  FP8 blockwise g128 kernel at 830 TFLOPS, NOTES.md); bench/NOTES-sm90-prefill.md, session 2.
* ``dram_efficiency`` 0.70: cuBLAS FP16 at M=16 streams weights at 2.26 of 3.35 TB/s (NOTES.md).
* ``launch_us`` 2.0: launch and tail of one kernel.

Without a kernel configuration the estimate assumes ideal tiling (M padded to one MMA, full waves); with one,
it pads M and N to the tile, counts waves over the SMs (a hybrid stream-K kernel's waves are whole), derates small
tiles (operand reuse) and needs one CTA per SM to stream DRAM at full rate.
``full_reuse_tile`` 32 (a 64x64 tile): below it, operand reuse in shared memory limits the tensor cores.
``full_reuse_tile_sm90`` 85 (a 256x128 tile): measured on the H100 (bench/sm90_prefill_h100_v1.json), the
wgmma per-channel kernel ran 1466 TOPS with 256x128 tiles and ~990 with 128x128 at M=4096.
``partial_tile_bandwidth_sm90`` 0.55: a wgmma kernel whose M tile is mostly padding streamed weights at 54% of
copy bandwidth at M=1 and 4 and 60% at M=16 (gate_up, 64-row tiles, H100), against 89% for the decode kernel
that sizes itself to M (bench/results-h100.md). It applies up to ``small_m_sm90`` 64 tokens as well: at M=64
(full 64-row tiles) the wgmma kernels streamed 20-33% of copy bandwidth on qkv, o and down and 50% on gate_up
(bench/h100/*.json, run 15), 1.3-1.9x the time predicted without it, 0.8-1.3x with it.
``small_m_bandwidth_sm90`` 0.70 replaces it there for full tiles since the per-channel kernel's quantizer was
rewritten (run 15's channel times at M=64 were mostly that quantizer): per-channel at M=64 end to end (stream-K
qkv/o/down, data-parallel gate_up; bench/h100/h3/bench-channel-c.json) 36.1/33.4/84.1/125.9 us for predictions
of 34/29/81/150 at 0.70 (at 0.55: 43/36/102/190). Half-empty tiles (M <= 16) keep 0.55.

Runtime-tiled families (``m_step``: the sm90 decode kernels) issue warp-level ``mma.sync`` with the tokens as the
8-wide operand, so their operand reuse follows ``full_reuse_tile`` (the mma.sync constant), not the wgmma one,
and they promote group partials in the warps that issue the MMAs, between them: compute is tensor + dequant.
Measured at M=64 (bench/NOTES-sm90-decode.md, v3): per-channel 30.5-177.7 us for predictions of 27-177 us,
group-wise 37.1-233.1 us for 43-286 us; at M <= 16 they are memory-bound as before.
``int8_tensor_efficiency`` 0.74 is that 1466 of 1979 TOPS.
``streamk_efficiency_sm90`` 0.90: a stream-K kernel (``scheduler: streamk``) keeps every SM busy whatever the
tile count, at this fraction of a full data-parallel wave's speed (partial tiles summed through the workspace,
uneven K shares). Measured on the H100 (bench/NOTES-sm90-prefill.md, probe run of 2026-11-22): the per-channel
256x128 kernel stream-K against data-parallel where the data-parallel grid was >= 97% full (M = 1024, 4096;
o, gate_up, down, and qkv at 4096): 0.84-1.0, mean 0.91. Its split tiles also move partial sums: at most one
int32 tile written and read per SM. ``scheduler: hybrid`` (stream-K only for a partial last wave) is counted as
whole waves at full speed, as measured for the g128 family (bench/NOTES-sm90-prefill.md, v3), except a grid of
fewer tiles than SMs: it runs data-parallel on part of the SMs or splits every tile, each SM streaming I = tiles x
K iterations / SMs and then paying a fixup worth ``hybrid_fixup_iters_sm90`` K iterations, I / (I + 13), whichever is
faster. 13 is the geometric mean of the fits to the g128 256-token tile at M = 256 against its own M = 4096 rate
(H200, session 6): qkv (80 tiles, I = 39) ran at 0.64 of that, o (64, I = 31) 0.70, down (64, I = 109) 0.93: 22, 13
and 8 iterations.
``widening_share_sm90`` 0.26: the part of ``dequant_slots_sm90`` that widens the weights, paid once per K tile for
all of a wgmma tile's tokens, so a tile of tile_m tokens pays it times 128 / tile_m. Fitted to the g128 kernel's
256-token tile (GEMM 0.85-0.90x the 128-token time at M = 1024 and 4096, H200, session 6); it predicts 1.26x for
the 64-token tile (measured 1.32x, session 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .errors import SpecError
from .kernels.config import KernelConfig
from .kernels.families import FAMILIES
from .schema import Fields
from .specs import GpuSpec

GRANULARITIES = ("g64", "g128", "g256", "g512", "g1024", "channel")
PATHS = ("int4", "int8", "fp8")
# Activation bytes a value and whether the kernel reads separate activation scales, per family act_format:
# "raw" kernels read the model-dtype activations and quantize them in-kernel.
ACT_TRAFFIC = {"s4": (0.5, True), "s8": (1.0, True), "e4m3": (1.0, True), "raw": (2.0, False)}
_PATH_ACT_FORMAT = {"int4": "s4", "int8": "s8", "fp8": "e4m3"}
_OUT_BYTES = 2          # fp16 / bf16 output
_WEIGHT_SCALE_BYTES = 2  # weight scales in the model dtype (reference.py)
_ACT_SCALE_BYTES = 4     # activation scales in fp32 (reference.py)
_SPLITK_BYTES = 4        # fp32 partial outputs between split-K slices


def group_size(granularity: str, k: int) -> int:
    """Elements a scale covers along K; per-channel is one group of K."""
    return k if granularity == "channel" else int(granularity[1:])


def group_field(granularity: str) -> int:
    """The plan's and KernelConfig's ``group``: 0 means per-channel."""
    return 0 if granularity == "channel" else int(granularity[1:])


def granularity_of(group: int) -> str:
    return "channel" if group == 0 else f"g{group}"


def fits(granularity: str, k: int) -> bool:
    return k % group_size(granularity, k) == 0


@dataclass(frozen=True)
class CostConstants:
    fp16_tensor_efficiency: float = 0.75
    int4_tensor_efficiency: float = 0.25
    int8_tensor_efficiency: float = 0.74
    fp8_tensor_efficiency: float = 0.62
    dequant_ops_int: float = 3.0
    dequant_ops_float: float = 2.0
    dequant_slots_sm80: float = 8.0
    dequant_slots_sm90: float = 7.0
    dequant_overlap: float = 1.0
    dram_efficiency: float = 0.70
    launch_us: float = 2.0
    mma_m: int = 16                 # rows one MMA computes: smaller M still pays for 16
    full_reuse_tile: float = 32.0   # tm*tn/(tm+tn) of a 64x64 tile: smaller tiles starve the tensor cores
    full_reuse_tile_sm90: float = 85.0   # ... of a 256x128 tile: wgmma needs larger tiles
    partial_tile_bandwidth_sm90: float = 0.55  # weight streaming of a wgmma kernel whose M tile is mostly padding
    small_m_sm90: int = 64          # ... or whose M is at most this (one row of 64-row tiles, under a wave of CTAs)
    small_m_bandwidth_sm90: float = 0.70  # ... the latter with full tiles (H100, per-channel, measured)
    streamk_efficiency_sm90: float = 0.90   # stream-K against a full data-parallel wave (H100, measured)
    widening_share_sm90: float = 0.26       # of dequant_slots_sm90: the weight widening, paid per 128-token tile
    hybrid_fixup_iters_sm90: float = 13.0   # a hybrid grid under one wave: each SM's fixup, in K iterations

    def tensor_efficiency(self, path: str) -> float:
        return getattr(self, f"{path}_tensor_efficiency")

    def dequant_slots(self, kernel_arch: str) -> float:
        return self.dequant_slots_sm90 if kernel_arch == "sm_90a" else self.dequant_slots_sm80

    def reuse_tile(self, kernel_arch: str) -> float:
        return self.full_reuse_tile_sm90 if kernel_arch == "sm_90a" else self.full_reuse_tile

    def partial_tile_bandwidth(self, kernel_arch: str, m: int, tile_m: int) -> float:
        """Bandwidth derating of a kernel whose M tile is less than half full or whose M is small (sm_90a:
        measured)."""
        if kernel_arch != "sm_90a":
            return 1.0
        if 2 * m < tile_m:
            return self.partial_tile_bandwidth_sm90
        return self.small_m_bandwidth_sm90 if m <= self.small_m_sm90 else 1.0

    def dequant_factor(self, kernel_arch: str, tile_m: int) -> float:
        """A wgmma kernel (sm_90a) widens a K tile's weights once for its tile_m tokens: the widening share of the
        slots (fitted at 128 tokens) scales with 128 / tile_m."""
        if kernel_arch != "sm_90a":
            return 1.0
        return 1.0 - self.widening_share_sm90 + self.widening_share_sm90 * 128 / tile_m

    def dequant_ops(self, path: str) -> float:
        return self.dequant_ops_float if path == "fp8" else self.dequant_ops_int

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: object, file: str = "cost constants") -> "CostConstants":
        """Strictly read a measured set (what ``probe`` writes): every field, each > 0 (overlap may be 0).
        Constants added after plans were first written (:data:`_LATER_FIELDS`) may be absent: the default."""
        names = [f.name for f in fields(cls)]
        reader = Fields(data, file, "", names)
        values = {f.name: reader.take(f.name, int if f.type == "int" else float,
                                      *((f.default,) if f.name in _LATER_FIELDS else ()))
                  for f in fields(cls)}
        for name, value in values.items():
            if value < 0 or (value == 0 and name != "dequant_overlap"):
                raise reader.error(name, f"must be > 0, got {value}")
        return cls(**values)


DEFAULT_CONSTANTS = CostConstants()
# Read as their default from plans written before they existed (the small-M deratings and the per-config sm90
# stream-K scheduler came later).
_LATER_FIELDS = frozenset({"small_m_sm90", "small_m_bandwidth_sm90", "streamk_efficiency_sm90",
                           "widening_share_sm90", "hybrid_fixup_iters_sm90"})


@dataclass(frozen=True)
class Estimate:
    """Predicted microseconds, with the parts the planner's rationale quotes."""

    us: float
    tensor_us: float
    dequant_us: float
    memory_us: float

    @property
    def bound(self) -> str:
        parts = {"tensor": self.tensor_us, "dequant": self.dequant_us, "memory": self.memory_us}
        return max(parts, key=parts.get)


@dataclass(frozen=True)
class _Tiling:
    """How a GEMM is cut into CTAs: padded sizes and the efficiencies that follow."""

    m: int
    n: int
    wave_efficiency: float
    reuse_efficiency: float
    bandwidth_share: float
    split_k: int
    serial_dequant: bool = False  # promotion issued by the MMA warps between their MMAs (no overlap)
    dequant_factor: float = 1.0   # the tile's share of the dequant slots (wgmma: widening amortised over tile_m)


def _ideal_tiling(m: int, n: int, c: CostConstants) -> _Tiling:
    return _Tiling(math.ceil(m / c.mma_m) * c.mma_m, n, 1.0, 1.0, 1.0, 1)


def _config_tiling(m: int, n: int, k: int, gpu: GpuSpec, cfg: KernelConfig, c: CostConstants) -> _Tiling:
    fam = FAMILIES.get(cfg.family)
    if fam is not None and fam.m_step:
        return _runtime_tiling(m, n, gpu, cfg, fam.m_step, c)
    tiles_m, tiles_n = math.ceil(m / cfg.tile_m), math.ceil(n / cfg.tile_n)
    ctas = tiles_m * tiles_n * cfg.split_k
    waves = math.ceil(ctas / gpu.sm_count)
    reuse = cfg.tile_m * cfg.tile_n / (cfg.tile_m + cfg.tile_n) / c.reuse_tile(cfg.arch)
    if cfg.scheduler == "streamk":  # per-config stream-K: every SM streams an equal share of all K iterations
        return _Tiling(tiles_m * cfg.tile_m, tiles_n * cfg.tile_n, c.streamk_efficiency_sm90, min(1.0, reuse),
                       c.partial_tile_bandwidth(cfg.arch, m, cfg.tile_m), cfg.split_k)
    # hybrid stream-K spreads the K iterations of a partial wave over every SM: whole waves, every SM streams;
    # a grid of fewer tiles than SMs splits every tile, and each SM pays a fixup (hybrid_fixup_iters_sm90).
    busy = 1.0 if cfg.scheduler == "hybrid" else min(1.0, ctas / gpu.sm_count)
    wave_efficiency = ctas / (waves * gpu.sm_count)
    if cfg.scheduler == "hybrid":
        split = _split_efficiency(ctas, k, gpu, cfg, c)
        wave_efficiency = 1.0 if ctas >= gpu.sm_count else max(wave_efficiency, split)
    share = busy * c.partial_tile_bandwidth(cfg.arch, m, cfg.tile_m)
    return _Tiling(tiles_m * cfg.tile_m, tiles_n * cfg.tile_n, wave_efficiency, min(1.0, reuse), share,
                   cfg.split_k, dequant_factor=c.dequant_factor(cfg.arch, cfg.tile_m))


def _split_efficiency(ctas: int, k: int, gpu: GpuSpec, cfg: KernelConfig, c: CostConstants) -> float:
    """Every SM streams its share of the grid's K iterations and then pays a fixed fixup (the split tile's
    partial sums written, waited for and read), counted in K iterations of the same tile."""
    iterations = ctas * math.ceil(k / cfg.tile_k) / gpu.sm_count
    return iterations / (iterations + c.hybrid_fixup_iters_sm90)


def _runtime_tiling(m: int, n: int, gpu: GpuSpec, cfg: KernelConfig, m_step: int, c: CostConstants) -> _Tiling:
    """A launcher that pads M to ``m_step`` and splits K until the GPU is full: whole waves, full bandwidth;
    warp-level mma.sync with the tokens as the narrow operand, group promotion between the MMAs."""
    reuse = m_step * cfg.tile_n / (m_step + cfg.tile_n) / c.full_reuse_tile
    return _Tiling(math.ceil(m / m_step) * m_step, math.ceil(n / cfg.tile_n) * cfg.tile_n, 1.0, min(1.0, reuse),
                   1.0, 1, serial_dequant=True)


def _tiling(m: int, n: int, k: int, gpu: GpuSpec, cfg: KernelConfig | None, c: CostConstants) -> _Tiling:
    return _ideal_tiling(m, n, c) if cfg is None else _config_tiling(m, n, k, gpu, cfg, c)


def _act_traffic(path: str, cfg: KernelConfig | None) -> tuple[float, bool]:
    """What the kernel reads: its family's activation format, else the path's natural one."""
    if cfg is not None and cfg.family in FAMILIES:
        return ACT_TRAFFIC[FAMILIES[cfg.family].act_format]
    return ACT_TRAFFIC[_PATH_ACT_FORMAT[path]]


def w4a4_bytes(m: int, n: int, k: int, group: int, path: str, cfg: KernelConfig | None = None,
               sm_count: int = 0) -> float:
    """DRAM bytes; a stream-K kernel (``sm_count`` given) adds one int32 tile written and read per SM."""
    groups = k // group
    weights = n * k * 0.5 + n * groups * _WEIGHT_SCALE_BYTES
    act_bytes, act_scales = _act_traffic(path, cfg)
    acts = m * k * act_bytes + (m * groups * _ACT_SCALE_BYTES if act_scales else 0)
    split_k = cfg.split_k if cfg is not None else 1
    partials = 2 * m * n * _SPLITK_BYTES * split_k if split_k > 1 else 0
    if cfg is not None and cfg.scheduler == "streamk":
        partials += 2 * sm_count * cfg.tile_m * cfg.tile_n * _SPLITK_BYTES
    return weights + acts + m * n * _OUT_BYTES + partials


def _memory_us(nbytes: float, gpu: GpuSpec, share: float, c: CostConstants) -> float:
    return nbytes / (gpu.dram_bandwidth_gbs * 1e3 * c.dram_efficiency * share)


def _compute_us(tensor_us: float, dequant_us: float, c: CostConstants) -> float:
    return max(tensor_us, dequant_us) + (1.0 - c.dequant_overlap) * min(tensor_us, dequant_us)


def _check_problem(m: int, n: int, k: int, granularity: str, path: str, gpu: GpuSpec) -> None:
    if min(m, n, k) <= 0:
        raise SpecError(f"GEMM M={m} N={n} K={k}: every size must be > 0")
    if granularity not in GRANULARITIES:
        raise SpecError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if not fits(granularity, k):
        raise SpecError(f"granularity {granularity} does not divide K={k}")
    if path not in gpu.compute_paths:
        raise SpecError(f"{gpu.name} has no {path} W4A4 path (it has {', '.join(gpu.compute_paths)})")


def w4a4_time(gpu: GpuSpec, m: int, n: int, k: int, granularity: str, path: str,
              cfg: KernelConfig | None = None, constants: CostConstants = DEFAULT_CONSTANTS) -> Estimate:
    _check_problem(m, n, k, granularity, path, gpu)
    c = constants
    group = group_size(granularity, k)
    t = _tiling(m, n, k, gpu, cfg, c)
    tensor_rate = gpu.tops(path) * 1e6 * c.tensor_efficiency(path) * t.reuse_efficiency * t.wave_efficiency
    tensor_us = 2.0 * t.m * t.n * k / tensor_rate
    partials = t.m * t.n * (k // group)
    slots = c.dequant_ops(path) * c.dequant_slots(gpu.kernel_arch) * t.dequant_factor
    dequant_us = partials * slots / (gpu.fp32_tflops * 1e6 / 2.0 * t.wave_efficiency)
    memory_us = _memory_us(w4a4_bytes(m, n, k, group, path, cfg, gpu.sm_count), gpu, t.bandwidth_share, c)
    compute_us = tensor_us + dequant_us if t.serial_dequant else _compute_us(tensor_us, dequant_us, c)
    us = max(compute_us, memory_us) + c.launch_us * (1 + (t.split_k > 1))
    return Estimate(us, tensor_us, dequant_us, memory_us)


def fp16_time(gpu: GpuSpec, m: int, n: int, k: int, constants: CostConstants = DEFAULT_CONSTANTS) -> Estimate:
    """The FP16/BF16 baseline (cuBLAS-class GEMM with FP32 accumulation)."""
    c = constants
    m_pad = math.ceil(m / c.mma_m) * c.mma_m
    tensor_us = 2.0 * m_pad * n * k / (gpu.tops("fp16") * 1e6 * c.fp16_tensor_efficiency)
    memory_us = _memory_us(2.0 * (m * k + n * k + m * n), gpu, 1.0, c)
    return Estimate(max(tensor_us, memory_us) + c.launch_us, tensor_us, 0.0, memory_us)


def speedup(gpu: GpuSpec, m: int, n: int, k: int, granularity: str, path: str,
            constants: CostConstants = DEFAULT_CONSTANTS) -> float:
    """Predicted FP16 time over W4A4 time with ideal tiling."""
    return fp16_time(gpu, m, n, k, constants).us / w4a4_time(gpu, m, n, k, granularity, path, None, constants).us
