"""What `apex4gen probe` measures: one entry per throughput loop (its kernel in runtime/probe/probe.cuh, the
instruction it counts, the grid it runs on, the SASS that proves the instruction is there) and the weight-stream
grid shapes. The template (templates/probe.cu.jinja) instantiates the entries of one arch in this order; the C
ABI indexes them by that order and the Python side counts operations from the same entries.
"""
from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90a")
FP8_ARCHS = ("sm_89", "sm_90a")
WGMMA_ARCHS = ("sm_90a",)

MMA_SYNC_CHAINS = 4        # independent accumulators a warp
MMA_SYNC_WARPS = 8         # a CTA
WGMMA_PER_COMMIT = 4       # wgmmas a warpgroup issues per commit group
CUDA_CHAINS, CUDA_UNROLL, CUDA_THREADS = 8, 8, 256


@dataclass(frozen=True)
class Probe:
    """One throughput loop. ``ops_per_cta_iteration`` counts what the rate is in: tensor probes count dense
    operations (2 x M x N x K per instruction), CUDA-core probes count the instruction (sequence) named."""

    name: str
    unit: str                      # "tensor" (rate in TOPS) or "cuda" (rate in operations a second)
    path: str | None               # the tensor type a tensor probe stands for
    instruction: str               # what one counted operation is
    kernel: str                    # the C++ instantiation in runtime/probe/probe.cuh
    threads: int
    max_ctas_per_sm: int
    ops_per_cta_iteration: int
    archs: tuple[str, ...]
    sass: tuple[tuple[str, str], ...]  # (opcode prefix, text in its modifiers): the SASS must hold each; CUDA-core
                                       # loops hold the first once per step at least

    def sass_on(self, arch: str) -> tuple[tuple[str, str], ...]:
        return _EMULATED.get((self.name, arch), self.sass)


# What ptxas emits for sm_90a where Hopper lacks the warp-level instruction: INT4 MMA widened to INT8 IMMA
# (bench/results/h100/results.md), FP8 mma.sync converted to FP16 HMMA (its FP8 tensor cores take wgmma only).
_EMULATED = {("mma_sync_int4", "sm_90a"): (("IMMA", ".S8.S8"),), ("mma_sync_fp8", "sm_90a"): (("HMMA", ".F32"),)}


def _mma_sync(name: str, path: str, struct: str, shape: tuple[int, int, int], ptx: str,
              sass: tuple[tuple[str, str], ...], archs: tuple[str, ...] = ARCHS) -> Probe:
    m, n, k = shape
    return Probe(name, "tensor", path, f"mma.sync.aligned.m{m}n{n}k{k}.{ptx}",
                 f"mma_sync_loop<{struct}, {MMA_SYNC_CHAINS}>", MMA_SYNC_WARPS * 32, 4,
                 MMA_SYNC_WARPS * MMA_SYNC_CHAINS * 2 * m * n * k, archs, sass)


def _wgmma(name: str, path: str, struct: str, k: int, ptx: str, sass: tuple[tuple[str, str], ...]) -> Probe:
    return Probe(name, "tensor", path, f"wgmma.mma_async.sync.aligned.m64n256k{k}.{ptx} (operands in shared memory)",
                 f"wgmma_loop<{struct}, {WGMMA_PER_COMMIT}>", 128, 2, WGMMA_PER_COMMIT * 2 * 64 * 256 * k,
                 WGMMA_ARCHS, sass)


def _cuda(name: str, struct: str, instruction: str, sass: tuple[tuple[str, str], ...]) -> Probe:
    return Probe(name, "cuda", None, instruction, f"cuda_core_loop<{struct}, {CUDA_CHAINS}, {CUDA_UNROLL}>",
                 CUDA_THREADS, 64, CUDA_THREADS * CUDA_CHAINS * CUDA_UNROLL, ARCHS, sass)


PROBES: tuple[Probe, ...] = (
    _mma_sync("mma_sync_int4", "int4", "MmaS4", (16, 8, 64), "row.col.s32.s4.s4.s32", (("IMMA", ".S4.S4"),)),
    _mma_sync("mma_sync_int8", "int8", "MmaS8", (16, 8, 32), "row.col.s32.s8.s8.s32", (("IMMA", ".S8.S8"),)),
    _mma_sync("mma_sync_fp16", "fp16", "MmaF16", (16, 8, 16), "row.col.f32.f16.f16.f32", (("HMMA", ".F32"),)),
    _mma_sync("mma_sync_fp8", "fp8", "MmaE4M3", (16, 8, 32), "row.col.f32.e4m3.e4m3.f32", (("QMMA", ".E4M3"),),
              FP8_ARCHS),
    _wgmma("wgmma_int8", "int8", "WgmmaS8", 32, "s32.s8.s8", (("IGMMA", ".64x256x32.S8.S8"),)),
    _wgmma("wgmma_fp8", "fp8", "WgmmaE4M3", 32, "f32.e4m3.e4m3", (("QGMMA", ".64x256x32.F32.E4M3.E4M3"),)),
    _wgmma("wgmma_fp16", "fp16", "WgmmaF16", 16, "f32.f16.f16", (("HGMMA", ".64x256x16.F32"),)),
    _cuda("ffma", "Ffma", "FFMA (fma.rn.f32)", (("FFMA", ""),)),
    _cuda("i2f", "I2f", "I2F (cvt.rn.f32.s32)", (("I2F", ""),)),  # I2FP.F32.S32 on sm_89 and newer
    _cuda("magic_convert", "MagicConvert", "int -> float by the magic number: IADD + FADD",
          (("FADD", ""), ("IADD3", ""))),
    _cuda("promote_int", "PromoteInt", "one int32 group partial promoted: magic convert + FMUL + FFMA",
          (("FFMA", ""), ("IADD3", ""), ("FADD", ""), ("FMUL", ""))),
    _cuda("promote_float", "PromoteFloat", "one float group partial promoted: FMUL + FFMA",
          (("FMUL", ""), ("FFMA", ""))),
)


def probes_for(arch: str) -> tuple[Probe, ...]:
    """The loops built for one kernel arch, in the C ABI's order."""
    return tuple(p for p in PROBES if arch in p.archs)


def tensor_probe_for(arch: str, path: str) -> Probe | None:
    """The instruction whose rate stands for a tensor path in a GPU spec: wgmma where the arch has it (what
    the prefill kernels and cuBLAS run), else mma.sync."""
    candidates = [p for p in probes_for(arch) if p.path == path]
    wgmma = [p for p in candidates if p.name.startswith("wgmma")]
    return (wgmma or candidates or [None])[0]


@dataclass(frozen=True)
class StreamGrid:
    """A grid shape of the weight-stream loop: CTAs per SM, threads, and whether pieces are dealt in turn."""

    ctas_per_sm: int
    threads: int
    stride: bool

    @property
    def label(self) -> str:
        return f"{self.ctas_per_sm} x {self.threads} a SM, {'16 KB pieces in turn' if self.stride else 'contiguous'}"


# The best grid shapes of the stand-alone stream probe this one replaced (bench/notes/sm90-decode.md, "streaming bound")
STREAM_GRIDS = (StreamGrid(2, 256, False), StreamGrid(2, 256, True), StreamGrid(4, 128, False),
                StreamGrid(1, 512, False), StreamGrid(8, 256, True))
STREAM_DEPTH = 8  # 16-byte loads in flight a thread

# The stream rate's GEMM (N, K, group): llama2-70b's gate_up, the largest decode weight stream (242 MB)
STREAM_SHAPE = (57344, 8192, 128)
