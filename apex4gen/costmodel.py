"""Predicted time of one W4A4 GEMM (and of its FP16 baseline) on one GPU, from the GPU spec.

A group-wise W4A4 GEMM ``Y[M,N] = X[M,K] W[N,K]^T`` does three things that overlap:

* tensor-core work: ``2*M*N*K`` operations on the path's tensor cores (native INT4, or 4-bit values computed
  on INT8 / FP8 tensor cores where INT4 is not native);
* CUDA-core dequantization: each group's partial sum, for each output element, is turned into float and
  multiplied by an activation scale and a weight scale: ``M*N*(K/group)`` partials, each costing
  ``dequant_ops`` FP32-pipe instructions (int partials: int->float convert + 2 FMA-class ops; FP8 partials are
  already float: 2) times the arch's ``dequant_slots`` issue slots for what surrounds them (scale loads, fragment
  shuffles, register pressure). Its ratio to tensor time is ``ops * slots * rho / group``: APEX4's ρ effect;
* DRAM traffic: int4 weights, weight scales (model dtype), activations (int4, a byte where the kernel reads
  int8/e4m3, the model dtype where it quantizes them itself), activation scales (fp32), the output (model dtype) and split-K partials.

Activation precision (``act_bits``, 4 or 8): 8-bit activations are a byte each where the kernel stores 4-bit ones
packed (s4), and on the native-INT4 path (sm_80/86/89: s4 ``mma.sync``) they need the INT8 ``mma.sync``, at the
GPU's INT8 rate (half the INT4 one) with the INT4 kernels' efficiency. The sm_90 INT8/FP8 kernels already read a
byte (or the raw 16-bit value) per activation and compute on 8-bit tensor cores: there 8 bits cost nothing.

``time = max(compute, memory) + launch`` with ``compute = max(tc, dq) + (1 - dequant_overlap) * min(tc, dq)``:
CUDA-core dequantization of some warps runs while others issue MMAs, so the slower unit sets the pace.

Rates: each unit's rate is a microbenchmark peak times an efficiency that is a property of the kernels.
The peak comes from the spec's ``measured:`` section where ``apex4gen probe`` wrote one (wgmma / mma.sync rate
per path, FFMA rate, pure 4-bit weight stream, promotion cost); without it, from the datasheet figure times
``datasheet_*_reach`` (what a microbenchmark reaches of the datasheet, measured on the H100 where the repository
has a probe of it). :func:`rates_of` resolves them; :class:`Rates` says which source each came from. The
efficiencies below stay constants: they are what a real kernel reaches of the microbenchmark peak (tiling, wave
quantisation, the instructions around each MMA or promotion), which no microbenchmark measures.

Every constant is in :class:`CostConstants`: those of the GPU and the instruction kinds, and one
:class:`ArchConstants` per kernel architecture (:data:`ARCH_CONSTANTS`: ``sm_80`` for the mma.sync kernels of
sm_80/86/89, ``sm_90a`` for the wgmma kernels of Hopper), as CUTLASS keeps per-CC tables.

Without a kernel configuration the estimate assumes ideal tiling (M padded to one MMA, full waves); with one,
it pads M and N to the tile, counts waves over the SMs (a hybrid stream-K kernel's waves are whole), derates
small tiles (operand reuse: ``tm*tn/(tm+tn)`` against the arch's ``reuse_tile``) and needs one CTA per SM to
stream DRAM at full rate. Runtime-tiled families (``m_step``: the sm90 decode kernels) issue warp-level
``mma.sync`` with the tokens as the 8-wide operand: their reuse follows the sm_80 (mma.sync) entry, and their
promotion of group partials overlaps the MMAs of the other warps (``dequant_overlap``, as for every kernel). They stream
the weights at the probe's rate (the probe's load is theirs) and pay ``decode_start_us`` once a call: the wait
for the quantizer, the first loads and the cluster's reduction and drain. ``scheduler: hybrid`` counts whole
waves at full speed, except a grid of fewer tiles than SMs: data-parallel on part of the SMs, or every tile
split with each SM streaming I = tiles x K iterations / SMs and then paying ``hybrid_fixup_iters``: I / (I + f),
whichever is faster. A wgmma tile of tile_m tokens pays the ``widening_share`` of the slots times 128 / tile_m.

Microbenchmark peaks (``probe``: the spec's ``measured:`` value; the datasheet path otherwise):

| rate | probe | without a probe |
| --- | --- | --- |
| tensor peak per path | ``measured.tensor_tops`` (wgmma on sm_90a, mma.sync elsewhere) | datasheet x ``datasheet_tensor_reach`` |
| FP32 (promotion issue rate) | ``measured.fp32_tflops`` (FFMA) | datasheet x ``datasheet_fp32_reach`` |
| DRAM streaming | ``measured.stream_gbs`` (4-bit weights + scales, read once) | datasheet x ``datasheet_stream_reach`` |
| promotion cost, FP32 instructions a partial | ``measured.dequant_ops_int`` / ``_float`` (FFMA rate / promotion loop rate) | ``dequant_ops_int`` / ``_float`` |

Constants (kernel properties: a fraction of the microbenchmark peak; or the datasheet reach):

| constant | value | probe or fitted to |
| --- | --- | --- |
| ``datasheet_tensor_reach`` | 1.0 | apex4gen probe on the H100 SXM (bench/results/h100/probe.json): wgmma INT8 2,013 / FP8 1,920 / FP16 911 of 1,979 / 1,979 / 989 datasheet (1.02 / 0.97 / 0.92): within 8%, taken as reached |
| ``datasheet_fp32_reach`` | 1.0 | apex4gen probe on the H100 SXM: FFMA 64.3 of 66.9 TFLOPS (0.96), taken as reached |
| ``datasheet_stream_reach`` | 0.928 | apex4gen probe on the H100 SXM: pure stream 3,109 of 3,350 GB/s (242 MB; bench/results/h100/probe.json) |
| ``dequant_ops_int`` | 3.0 | counted (FADD of the magic-number convert + FMUL + FFMA); probe: ``dequant_ops_int`` |
| ``dequant_ops_float`` | 2.0 | counted (FMUL + FFMA); probe: ``dequant_ops_float`` |
| ``fp16_tensor_efficiency`` | 0.75 | cuBLAS FP16 at large M: 0.68-0.72 of peak on the H100, about 0.8 on the A100 |
| ``int4_tensor_efficiency`` | 0.25 | APEX4's compute-bound W4A4-g128 speedups (RTX 3090 2.0-2.5x, A100 0.43-0.47x), Atom's ~3x on the RTX 4090 |
| ``int8_tensor_efficiency`` | 0.74 | sm90_prefill_channel, 256x128 tiles, M=4096: 1466 of 1979 TOPS (bench/results/h100/) |
| ``fp8_tensor_efficiency`` | 0.62 | cuBLAS FP8 at M=4096: 1230 of 1979 TOPS (bench/results/h100/) |
| ``dram_efficiency`` | 0.754 | W4A4 kernels' share of the pure stream (not the decode kernels': theirs is 1, see ``decode_start_us``); 0.70 of the 3.35 TB/s datasheet (0.70 / 0.928); the H100 study's memory-bound W4A4 points: predicted/measured 1.07, ±22% (bench/results/h100/study.md) |
| ``fp16_stream_efficiency`` | 0.94 | cuBLAS FP16's share of the pure stream: 2.65-3.02 TB/s of 3.11 at M <= 64 in the H100 study (bench/results/h100/study.json); with ``dram_efficiency`` it overpredicted FP16 by 1.26x |
| ``launch_us`` | 2.0 | launch and tail of one kernel |
| ``decode_start_us`` | 5.0 | the sm90 decode kernels at M <= 4 on the H100 (16 points, both granularities of bench/results/h100/): time = 6.9 us + bytes / (0.98 x the probe's stream), least squares; 6.9 less ``launch_us``, the slope taken as 1 |
| sm_80 ``dequant_slots`` | 8.0 | APEX4's A100 0.45x FP16 at g128 |
| sm_80 ``reuse_tile`` | 32 | a 64x64 tile; the sm90 decode kernels (mma.sync) at M=64: 31.6 and 45.2 us for predictions of 31.9 and 38.2 (per-channel o, qkv; bench/results/h100/) |
| sm_90a ``dequant_slots`` | 7.0 | sm90_prefill_group at M=256..4096 (bench/notes/sm90-prefill.md) |
| sm_90a ``reuse_tile`` | 85 | a 256x128 tile: sm90_prefill_channel ran 1466 TOPS at 256x128, ~990 at 128x128, M=4096 (bench/notes/sm90-prefill.md) |
| sm_90a ``partial_tile_bandwidth`` | 0.65 | sm90_prefill_group with 64-token tiles at M <= 16 (the H100 study, bench/results/h100/study.json): 0.55 over-predicted gate_up and down by up to 1.41x; 0.65 brings them within ±25% and leaves qkv at 0.73-0.76x (0.83-0.86x at 0.55) and o at 0.75-0.81x. Full tiles at M <= 64 need no derating: sm90_prefill_channel at M = 64 (gate_up 107.1, down 56.4 us; bench/results/h100/) |
| sm_90a ``streamk_efficiency`` | 0.90 | stream-K against a >= 97% full data-parallel grid, 256x128 per-channel, M=1024/4096: 0.84-1.0 (bench/notes/sm90-prefill.md) |
| sm_90a ``widening_share`` | 0.26 | g128 256-token tiles at 0.85-0.90x the 128-token GEMM time, M=1024/4096 (bench/results/h200/); predicts 1.26x for 64 tokens, measured 1.32x |
| sm_90a ``hybrid_fixup_iters`` | 13 | g128 256-token tile at M=256 against its M=4096 rate: qkv 0.64, o 0.70, down 0.93 (fits 22, 13, 8; geometric mean; bench/results/h200/) |

The tensor efficiencies were fitted against datasheet peaks; the H100's probe reaches those peaks within
8% (``datasheet_tensor_reach``), so they read as fractions of the microbenchmark peak too, and a probed spec
of the H100 plans as the shipped one does (bench/results/h100/h100-probed.yaml).

The sm_80 entry has no partial-tile derating, no widening share (mma.sync kernels read their operands once per
K tile whatever M) and no stream-K constants (no sm_80 family has a stream-K scheduler).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

from .errors import SpecError
from .granularity import GRANULARITIES, GRANULARITY_NAMES, Granularity
from .kernels.config import KernelConfig
from .kernels.families import FAMILIES
from .schema import Fields
from .specs import GpuSpec

# Activation bytes a value and whether the kernel reads separate activation scales, per family act_format:
# "raw" kernels read the model-dtype activations and quantize them in-kernel.
ACT_TRAFFIC = {"s4": (0.5, True), "s8": (1.0, True), "e4m3": (1.0, True), "raw": (2.0, False)}
_PATH_ACT_FORMAT = {"int4": "s4", "int8": "s8", "fp8": "e4m3"}
_OUT_BYTES = 2          # fp16 / bf16 output
_WEIGHT_SCALE_BYTES = 2  # weight scales in the model dtype (reference.py)
_ACT_SCALE_BYTES = 4     # activation scales in fp32 (reference.py)
_SPLITK_BYTES = 4        # fp32 partial outputs between split-K slices
MMA_SYNC_ARCH = "sm_80"  # the entry of warp-level mma.sync kernels, on any arch
# Kernel arch -> the entry of ARCH_CONSTANTS its kernels follow (sm_86/89 run sm_80's mma.sync kernels).
_ARCH_ENTRY = {"sm_80": "sm_80", "sm_86": "sm_80", "sm_89": "sm_80", "sm_90a": "sm_90a"}


@dataclass(frozen=True)
class ArchConstants:
    """The constants of one kernel architecture (see the table in the module docstring)."""

    dequant_slots: float            # issue slots around each promotion instruction
    reuse_tile: float               # tm*tn/(tm+tn) of the smallest tile that keeps the tensor cores fed
    partial_tile_bandwidth: float   # weight streaming of a kernel whose M tile is less than half full
    widening_share: float           # of dequant_slots: the weight widening, paid once per 128-token tile
    streamk_efficiency: float | None = None   # stream-K against a full data-parallel wave (None: no stream-K)
    hybrid_fixup_iters: float | None = None   # a hybrid grid under one wave: each SM's fixup, in K iterations

    def bandwidth(self, m: int, tile_m: int) -> float:
        """Bandwidth derating of a kernel whose M tile is less than half full."""
        return self.partial_tile_bandwidth if 2 * m < tile_m else 1.0

    def dequant_factor(self, tile_m: int) -> float:
        """The widening share of the slots (fitted at 128 tokens) scales with 128 / tile_m."""
        return 1.0 - self.widening_share + self.widening_share * 128 / tile_m


_OPTIONAL_ARCH_FIELDS = frozenset({"streamk_efficiency", "hybrid_fixup_iters"})
_MAY_BE_ZERO = frozenset({"dequant_overlap", "widening_share", "decode_start_us"})

ARCH_CONSTANTS: dict[str, ArchConstants] = {
    "sm_80": ArchConstants(dequant_slots=8.0, reuse_tile=32.0, partial_tile_bandwidth=1.0, widening_share=0.0),
    "sm_90a": ArchConstants(dequant_slots=7.0, reuse_tile=85.0, partial_tile_bandwidth=0.65, widening_share=0.26,
                            streamk_efficiency=0.90, hybrid_fixup_iters=13.0),
}


@dataclass(frozen=True)
class CostConstants:
    """Every constant of the model: those of the tensor-core types and the GPU, and one entry per kernel arch."""

    fp16_tensor_efficiency: float = 0.75
    int4_tensor_efficiency: float = 0.25
    int8_tensor_efficiency: float = 0.74
    fp8_tensor_efficiency: float = 0.62
    dequant_ops_int: float = 3.0
    dequant_ops_float: float = 2.0
    dequant_overlap: float = 1.0
    dram_efficiency: float = 0.754
    fp16_stream_efficiency: float = 0.94
    launch_us: float = 2.0
    decode_start_us: float = 5.0
    mma_m: int = 16                 # rows one MMA computes: smaller M still pays for 16
    datasheet_tensor_reach: float = 1.0   # a microbenchmark's fraction of the datasheet, for specs without a probe
    datasheet_fp32_reach: float = 1.0
    datasheet_stream_reach: float = 0.928
    archs: tuple[tuple[str, ArchConstants], ...] = tuple(sorted(ARCH_CONSTANTS.items()))

    def tensor_efficiency(self, path: str) -> float:
        return getattr(self, f"{path}_tensor_efficiency")

    def dequant_ops(self, path: str) -> float:
        return self.dequant_ops_float if path == "fp8" else self.dequant_ops_int

    def arch(self, kernel_arch: str) -> ArchConstants:
        return dict(self.archs)[_ARCH_ENTRY[kernel_arch]]

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "archs"}
        out["archs"] = {name: {f.name: getattr(a, f.name) for f in fields(a)} for name, a in self.archs}
        return out

    @classmethod
    def from_dict(cls, data: object, file: str = "cost constants") -> "CostConstants":
        """Strictly read a measured set (what ``probe`` writes): every field, each > 0 (a few may be 0; an
        arch's stream-K constants may be null where it has no stream-K kernels)."""
        reader = Fields(data, file, "", [f.name for f in fields(cls)])
        values = {f.name: _take_positive(reader, f) for f in fields(cls) if f.name != "archs"}
        sub = reader.sub("archs", sorted(ARCH_CONSTANTS))
        archs = tuple((name, _arch_from(sub.sub(name, [f.name for f in fields(ArchConstants)])))
                      for name in sorted(ARCH_CONSTANTS))
        return cls(**values, archs=archs)


def _take_positive(reader: Fields, f, optional: bool = False):
    value = reader.take(f.name, int if f.type == "int" else float, *((None,) if optional else ()))
    if value is not None and (value < 0 or (value == 0 and f.name not in _MAY_BE_ZERO)):
        raise reader.error(f.name, f"must be > 0, got {value}")
    return value


def _arch_from(reader: Fields) -> ArchConstants:
    return ArchConstants(**{f.name: _take_positive(reader, f, f.name in _OPTIONAL_ARCH_FIELDS)
                            for f in fields(ArchConstants)})


DEFAULT_CONSTANTS = CostConstants()


@dataclass(frozen=True)
class Rates:
    """The peaks one GPU's estimates divide by, and where each came from ("probe" or "datasheet")."""

    tensor_tops: tuple[tuple[str, float], ...]
    fp32_tflops: float
    stream_gbs: float
    dequant_ops_int: float
    dequant_ops_float: float
    sources: tuple[tuple[str, str], ...]

    def tops(self, path: str) -> float:
        return dict(self.tensor_tops)[path]

    def dequant_ops(self, path: str) -> float:
        return self.dequant_ops_float if path == "fp8" else self.dequant_ops_int


@functools.lru_cache(maxsize=64)
def rates_of(gpu: GpuSpec, c: CostConstants = DEFAULT_CONSTANTS) -> Rates:
    """Microbenchmark peaks: the spec's probed values where it has them, else the datasheet times its reach."""
    m = gpu.measured
    paths = [p for p in ("int4", "int8", "fp8", "fp16") if getattr(gpu.tensor_tops, p) is not None]
    probed = {p: m.tops(p) if m is not None else None for p in paths}
    tensor = tuple((p, probed[p] if probed[p] is not None else gpu.tops(p) * c.datasheet_tensor_reach)
                   for p in paths)
    sources = tuple((f"tensor_tops.{p}", "probe" if probed[p] is not None else "datasheet") for p in paths)
    if m is None:
        return Rates(tensor, gpu.fp32_tflops * c.datasheet_fp32_reach,
                     gpu.dram_bandwidth_gbs * c.datasheet_stream_reach, c.dequant_ops_int, c.dequant_ops_float,
                     sources + tuple((k, "datasheet") for k in _UNIT_RATES))
    return Rates(tensor, m.fp32_tflops, m.stream_gbs, m.dequant_ops_int, m.dequant_ops_float,
                 sources + tuple((k, "probe") for k in _UNIT_RATES))


_UNIT_RATES = ("fp32_tflops", "stream_gbs", "dequant_ops_int", "dequant_ops_float")


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
    decode: bool = False          # a runtime-tiled decode kernel (see _runtime_tiling)
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
    arch = c.arch(cfg.arch)
    reuse = cfg.tile_m * cfg.tile_n / (cfg.tile_m + cfg.tile_n) / arch.reuse_tile
    if cfg.scheduler == "streamk":  # per-config stream-K: every SM streams an equal share of all K iterations
        return _Tiling(tiles_m * cfg.tile_m, tiles_n * cfg.tile_n, arch.streamk_efficiency, min(1.0, reuse),
                       arch.bandwidth(m, cfg.tile_m), cfg.split_k)
    # hybrid stream-K spreads the K iterations of a partial wave over every SM: whole waves, every SM streams;
    # a grid of fewer tiles than SMs splits every tile, and each SM pays a fixup (hybrid_fixup_iters).
    busy = 1.0 if cfg.scheduler == "hybrid" else min(1.0, ctas / gpu.sm_count)
    wave_efficiency = ctas / (waves * gpu.sm_count)
    if cfg.scheduler == "hybrid":
        split = _split_efficiency(ctas, k, gpu, cfg, arch)
        wave_efficiency = 1.0 if ctas >= gpu.sm_count else max(wave_efficiency, split)
    share = busy * arch.bandwidth(m, cfg.tile_m)
    return _Tiling(tiles_m * cfg.tile_m, tiles_n * cfg.tile_n, wave_efficiency, min(1.0, reuse), share,
                   cfg.split_k, dequant_factor=arch.dequant_factor(cfg.tile_m))


def _split_efficiency(ctas: int, k: int, gpu: GpuSpec, cfg: KernelConfig, arch: ArchConstants) -> float:
    """Every SM streams its share of the grid's K iterations and then pays a fixed fixup (the split tile's
    partial sums written, waited for and read), counted in K iterations of the same tile."""
    iterations = ctas * math.ceil(k / cfg.tile_k) / gpu.sm_count
    return iterations / (iterations + arch.hybrid_fixup_iters)


def _runtime_tiling(m: int, n: int, gpu: GpuSpec, cfg: KernelConfig, m_step: int, c: CostConstants) -> _Tiling:
    """A launcher that pads M to ``m_step`` and splits K until the GPU is full: whole waves, full bandwidth;
    warp-level mma.sync with the tokens as the narrow operand, group promotion between the MMAs."""
    reuse = m_step * cfg.tile_n / (m_step + cfg.tile_n) / c.arch(MMA_SYNC_ARCH).reuse_tile
    return _Tiling(math.ceil(m / m_step) * m_step, math.ceil(n / cfg.tile_n) * cfg.tile_n, 1.0, min(1.0, reuse),
                   1.0, 1, decode=True)


def _tiling(m: int, n: int, k: int, gpu: GpuSpec, cfg: KernelConfig | None, c: CostConstants) -> _Tiling:
    return _ideal_tiling(m, n, c) if cfg is None else _config_tiling(m, n, k, gpu, cfg, c)


def _act_traffic(path: str, cfg: KernelConfig | None, act_bits: int = 4) -> tuple[float, bool]:
    """What the kernel reads: its family's activation format, else the path's natural one; 8-bit activations
    take at least a byte each."""
    fmt = FAMILIES[cfg.family].act_format if cfg is not None and cfg.family in FAMILIES else _PATH_ACT_FORMAT[path]
    act_bytes, act_scales = ACT_TRAFFIC[fmt]
    return max(act_bytes, act_bits / 8), act_scales


def _mma_type(path: str, act_bits: int) -> str:
    """The tensor-core instruction's type: 8-bit activations on the INT4 path need INT8 MMA (4-bit weights widened)."""
    return "int8" if path == "int4" and act_bits == 8 else path


def w4a4_bytes(m: int, n: int, k: int, granularity: Granularity, path: str, cfg: KernelConfig | None = None,
               sm_count: int = 0, act_bits: int = 4) -> float:
    """DRAM bytes; a stream-K kernel (``sm_count`` given) adds one int32 tile written and read per SM."""
    groups = k // granularity.size(k)
    weights = n * k * 0.5 + n * groups * _WEIGHT_SCALE_BYTES
    act_bytes, act_scales = _act_traffic(path, cfg, act_bits)
    acts = m * k * act_bytes + (m * groups * _ACT_SCALE_BYTES if act_scales else 0)
    split_k = cfg.split_k if cfg is not None else 1
    partials = 2 * m * n * _SPLITK_BYTES * split_k if split_k > 1 else 0
    if cfg is not None and cfg.scheduler == "streamk":
        partials += 2 * sm_count * cfg.tile_m * cfg.tile_n * _SPLITK_BYTES
    return weights + acts + m * n * _OUT_BYTES + partials


def _memory_us(nbytes: float, r: Rates, share: float, efficiency: float) -> float:
    return nbytes / (r.stream_gbs * 1e3 * efficiency * share)


def _compute_us(tensor_us: float, dequant_us: float, c: CostConstants) -> float:
    return max(tensor_us, dequant_us) + (1.0 - c.dequant_overlap) * min(tensor_us, dequant_us)


def _check_problem(m: int, n: int, k: int, granularity: Granularity, path: str, gpu: GpuSpec) -> None:
    if min(m, n, k) <= 0:
        raise SpecError(f"GEMM M={m} N={n} K={k}: every size must be > 0")
    if granularity not in GRANULARITIES:
        raise SpecError(f"granularity {granularity.name!r} is not one of {', '.join(GRANULARITY_NAMES)}")
    if not granularity.fits(k):
        raise SpecError(f"granularity {granularity} does not divide K={k}")
    if path not in gpu.compute_paths:
        raise SpecError(f"{gpu.name} has no {path} W4A4 path (it has {', '.join(gpu.compute_paths)})")


def w4a4_time(gpu: GpuSpec, m: int, n: int, k: int, granularity: Granularity, path: str,
              cfg: KernelConfig | None = None, constants: CostConstants = DEFAULT_CONSTANTS,
              act_bits: int | None = None) -> Estimate:
    """``act_bits``: the activation precision (default: the kernel's, else 4)."""
    _check_problem(m, n, k, granularity, path, gpu)
    c, r = constants, rates_of(gpu, constants)
    bits = act_bits if act_bits is not None else (cfg.act_bits if cfg is not None else 4)
    group = granularity.size(k)
    t = _tiling(m, n, k, gpu, cfg, c)
    tensor_rate = (r.tops(_mma_type(path, bits)) * 1e6 * c.tensor_efficiency(path) * t.reuse_efficiency
                   * t.wave_efficiency)
    tensor_us = 2.0 * t.m * t.n * k / tensor_rate
    partials = t.m * t.n * (k // group)
    slots = r.dequant_ops(path) * c.arch(gpu.kernel_arch).dequant_slots * t.dequant_factor
    dequant_us = partials * slots / (r.fp32_tflops * 1e6 / 2.0 * t.wave_efficiency)
    nbytes = w4a4_bytes(m, n, k, granularity, path, cfg, gpu.sm_count, bits)
    # the decode kernels' load is the probe's stream: no efficiency below it (their start-up is decode_start_us)
    memory_us = _memory_us(nbytes, r, t.bandwidth_share, 1.0 if t.decode else c.dram_efficiency)
    compute_us = _compute_us(tensor_us, dequant_us, c)
    us = max(compute_us, memory_us) + c.launch_us * (1 + (t.split_k > 1)) + (c.decode_start_us if t.decode else 0.0)
    return Estimate(us, tensor_us, dequant_us, memory_us)


def fp16_time(gpu: GpuSpec, m: int, n: int, k: int, constants: CostConstants = DEFAULT_CONSTANTS) -> Estimate:
    """The FP16/BF16 baseline (cuBLAS-class GEMM with FP32 accumulation)."""
    c, r = constants, rates_of(gpu, constants)
    m_pad = math.ceil(m / c.mma_m) * c.mma_m
    tensor_us = 2.0 * m_pad * n * k / (r.tops("fp16") * 1e6 * c.fp16_tensor_efficiency)
    memory_us = _memory_us(2.0 * (m * k + n * k + m * n), r, 1.0, c.fp16_stream_efficiency)
    return Estimate(max(tensor_us, memory_us) + c.launch_us, tensor_us, 0.0, memory_us)


def speedup(gpu: GpuSpec, m: int, n: int, k: int, granularity: Granularity, path: str,
            constants: CostConstants = DEFAULT_CONSTANTS) -> float:
    """Predicted FP16 time over W4A4 time with ideal tiling."""
    return fp16_time(gpu, m, n, k, constants).us / w4a4_time(gpu, m, n, k, granularity, path, None, constants).us
