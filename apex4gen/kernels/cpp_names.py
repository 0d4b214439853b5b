"""The C++ spellings of apex4gen's names (CUTLASS ``library.py`` style): templates never spell a type.

Family ``render`` functions look names up here and hand templates plain strings. The C ABI's enum spellings
(``*_ENUM``) are keyed like their numeric values in :mod:`apex4gen.abi`.
"""
from __future__ import annotations

ELEMENT_OUT = {"f16": "cutlass::half_t", "bf16": "cutlass::bfloat16_t"}
CUDA_OUT = {"f16": "__half", "bf16": "__nv_bfloat16"}
DTYPE_ENUM = {"f16": "APEX4GEN_F16", "bf16": "APEX4GEN_BF16"}
ACT_FORMAT_ENUM = {"s4": "APEX4GEN_ACT_S4", "s8": "APEX4GEN_ACT_S8", "e4m3": "APEX4GEN_ACT_E4M3",
                   "raw": "APEX4GEN_ACT_RAW"}
WEIGHT_LAYOUT_ENUM = {"canonical": "APEX4GEN_LAYOUT_CANONICAL", "sm90_decode": "APEX4GEN_LAYOUT_SM90_DECODE",
                      "sm90_prefill": "APEX4GEN_LAYOUT_SM90_PREFILL"}
ELEMENT_OPERAND = {"int4": "cutlass::int4b_t", "int8": "int8_t", "fp8": "cutlass::float_e4m3_t"}
ELEMENT_ACCUMULATOR = {"int4": "int32_t", "int8": "int32_t", "fp8": "float"}
ARCH_TAG = {"sm_80": "cutlass::arch::Sm80", "sm_86": "cutlass::arch::Sm86",
            "sm_89": "cutlass::arch::Sm89", "sm_90a": "cutlass::arch::Sm90"}
# nvcc -gencode values: (virtual arch, real arch)
GENCODE = {"sm_80": ("compute_80", "sm_80"), "sm_86": ("compute_86", "sm_86"),
           "sm_89": ("compute_89", "sm_89"), "sm_90a": ("compute_90a", "sm_90a")}
SM_NUMBER = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90a": 90}
# fp32 math of the epilogues (scales, bias) for each tensor-core path
ELEMENT_COMPUTE = {"int4": "float", "int8": "float", "fp8": "float"}
# CUTLASS 3 tile schedulers (sm90 kernels) for KernelConfig.scheduler, and the stream-K scheduler's mode
TILE_SCHEDULER = {"persistent": "cutlass::gemm::PersistentScheduler", "streamk": "cutlass::gemm::StreamKScheduler",
                  "hybrid": "cutlass::gemm::StreamKScheduler"}
STREAMK_DECOMPOSITION = {"streamk": "cutlass::gemm::kernel::detail::DecompositionMode::StreamK",
                         "hybrid": "cutlass::gemm::kernel::detail::DecompositionMode::Heuristic"}


def cute_static_layout(shape: tuple, stride: tuple) -> str:
    """A static cute layout type from nested (shape, stride) tuples of ints, e.g. ((8, 2), 4), ((64, 4), 1)
    -> ``cute::Layout<cute::Shape<cute::Shape<cute::_8, cute::_2>, cute::_4>, cute::Stride<...>>``."""
    def spell(kind: str, t) -> str:
        if isinstance(t, int):
            return f"cute::Int<{t}>"
        return f"cute::{kind}<{', '.join(spell(kind, x) for x in t)}>"
    return f"cute::Layout<{spell('Shape', shape)}, {spell('Stride', stride)}>"
