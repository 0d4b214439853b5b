"""The numerics contract of apex4gen, implemented once.

Every kernel, the fake-quant path and the checkpoint exporter are tested against these functions.

Contract (also in README.md, "Numerics"):

* Symmetric INT4 weights, values -8..7 (quantization itself produces -7..7; kernels must accept -8); activations
  INT4 or INT8 (below; likewise -8 / -128 only from hand-made inputs).
* Weights W[N, K]: one scale per (output channel n, group g of ``group`` consecutive k), stored in the
  model's dtype (fp16 or bf16). ``s = absmax / 7`` rounded to that dtype, ``q = clamp(rint(w / s), -8, 7)``
  evaluated in fp32 with the *stored* scale (so dequantization is consistent). ``s == 0`` gives ``q = 0``.
* Activations X[M, K]: quantized at run time per (token m, group g), scale kept in fp32, to ``bits`` = 4 (the
  default, pure W4A4) or 8 (a plan's per-layer choice, W4A8): ``qmax = 7`` or ``127``,
  ``s = absmax(fp32(x)) / qmax`` (fp32 division), ``q = clamp(rint(fp32(x) / s), -qmax - 1, qmax)``
  (-8..7 or -128..127); ``s == 0`` gives 0. rint is round-half-to-even (CUDA ``__float2int_rn``,
  ``torch.round``). Weights are 4-bit either way.
* Per-channel granularity is one group of length K: ``group`` is always the elements a scale covers
  (:meth:`apex4gen.granularity.Granularity.size`, K for per-channel).
* GEMM: ``Y[m, n] = sum_g sX[m,g] * sW[n,g] * P[m,n,g]`` with ``P[m,n,g] = sum_{k in g} qX[m,k] qW[n,k]``
  exact in int32 (|P| <= 8 * 8 * group for 4-bit activations, 128 * 8 * group for 8-bit ones: < 2**31 for
  any group below 2**21), the sum over groups in fp32, then ``+ bias[n]`` and one rounding to
  the output dtype (fp16 or bf16).
* Canonical packing: two values a byte, row-major, K contiguous, element 2i in the low nibble and 2i+1 in
  the high nibble, each nibble two's complement. This is CUTLASS's ``int4b_t`` K-major layout, so the sm_80
  kernels read it as is; a kernel with its own weight layout gets it from a documented ``pack_*`` function.

Tolerance of a kernel against :func:`gemm` (see :func:`gemm_tolerance`): the int32 partials are exact, so
the only differences are float roundings: the fp32 products ``sX*sW*P`` (a few ulp each) and the fp32 sum
over ``K/group`` terms in whatever order the kernel uses (at most ``n_groups`` ulp of the absolute sum),
then one rounding to the output dtype. The reference rounds too, so two correctly rounded values may sit one
ulp of the output dtype apart: the bound allows one ulp (2**-10 relative for fp16, 2**-7 for bf16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QMIN, QMAX = -8, 7
QUANT_MAX = 7.0  # symmetric: the scale maps absmax to 7, so -8 is only reached by hand-made inputs
ACT_BITS = (4, 8)  # activation precisions of the contract; weights are always 4-bit
DEFAULT_ACT_BITS = 4


def act_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of ``bits``-bit activations: (-8, 7) or (-128, 127)."""
    if bits not in ACT_BITS:
        raise ValueError(f"activations are {' or '.join(map(str, ACT_BITS))}-bit, not {bits}-bit")
    qmax = (1 << (bits - 1)) - 1
    return -qmax - 1, qmax

_OUT_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer values (int8 holding -8..7, shape [rows, K]) and scales ([rows, K/group])."""

    q: torch.Tensor
    scales: torch.Tensor
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]


def check_group(group: int, k: int) -> int:
    """``group`` (elements a scale covers; K for per-channel), checked to divide ``k``."""
    if group <= 0 or k % group != 0:
        raise ValueError(f"K={k} is not a multiple of the group size {group}; pad K or choose a divisor of K")
    return group


def _grouped(t: torch.Tensor, group: int) -> torch.Tensor:
    rows, k = t.shape
    return t.reshape(rows, k // group, group)


def _scale_of(absmax: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """absmax / qmax as an IEEE division. Dividing a CUDA tensor by a Python scalar multiplies by the rounded
    reciprocal instead (one ulp off at times), so the divisor is a tensor on the same device."""
    return absmax / torch.full((), float(qmax), dtype=absmax.dtype, device=absmax.device)


def _round_clamp(x: torch.Tensor, s: torch.Tensor, qmin: int = QMIN, qmax: int = QMAX) -> torch.Tensor:
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(x / safe).clamp_(qmin, qmax)
    return torch.where(s == 0, torch.zeros_like(q), q).to(torch.int8)


def quantize_weight(w: torch.Tensor, group: int, scale_dtype: torch.dtype | None = None) -> QuantizedTensor:
    """Quantize a weight matrix [N, K]; scales are stored in ``scale_dtype`` (default: w's dtype if 16-bit)."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    if scale_dtype is None:
        scale_dtype = w.dtype if w.dtype in _OUT_DTYPES else torch.float16
    if scale_dtype not in _OUT_DTYPES:
        raise ValueError(f"weight scales must be float16 or bfloat16, got {scale_dtype}")
    g = check_group(group, w.shape[1])
    wg = _grouped(w.float(), g)
    s = _scale_of(wg.abs().amax(dim=-1)).to(scale_dtype)
    q = _round_clamp(wg, s.float().unsqueeze(-1)).reshape(w.shape)
    return QuantizedTensor(q=q, scales=s, group=g)


def quantize_activation(x: torch.Tensor, group: int, bits: int = DEFAULT_ACT_BITS) -> QuantizedTensor:
    """Quantize activations [M, K] per (token, group) to ``bits`` (4 or 8); scales are fp32 as the kernels
    produce them. Values are int8 either way (-8..7 or -128..127)."""
    if x.dim() != 2:
        raise ValueError(f"activations must be 2-D [M, K], got shape {tuple(x.shape)}")
    qmin, qmax = act_range(bits)
    g = check_group(group, x.shape[1])
    xg = _grouped(x.float(), g)
    s = _scale_of(xg.abs().amax(dim=-1), qmax)
    q = _round_clamp(xg, s.unsqueeze(-1), qmin, qmax).reshape(x.shape)
    return QuantizedTensor(q=q, scales=s, group=g)


def dequantize(t: QuantizedTensor) -> torch.Tensor:
    """fp32 values ``q * s`` (what the fake-quant path multiplies with)."""
    qg = _grouped(t.q.float(), t.group)
    return (qg * t.scales.float().unsqueeze(-1)).reshape(t.q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Canonical packing of int values -8..7 [rows, K] into uint8 [rows, K/2] (low nibble first)."""
    if q.shape[-1] % 2:
        raise ValueError(f"K={q.shape[-1]} must be even to pack two int4 values a byte")
    if q.numel() and (int(q.min()) < QMIN or int(q.max()) > QMAX):
        raise ValueError("pack_int4 takes values in -8..7")
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [rows, K/2] -> int8 [rows, K]."""
    lo = (p & 0xF).to(torch.int16)
    hi = (p >> 4).to(torch.int16)
    both = torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def group_partials(qx: torch.Tensor, qw: torch.Tensor, group: int) -> torch.Tensor:
    """Exact integer partial sums P[m, n, g] (int64 on any device; int32 is enough by the contract)."""
    xg = _grouped(qx.to(torch.int64), group).permute(1, 0, 2)  # [G, M, g]
    wg = _grouped(qw.to(torch.int64), group).permute(1, 2, 0)  # [G, g, N]
    if qx.device.type == "cpu":
        return torch.bmm(xg, wg).permute(1, 2, 0)
    # integer bmm is CPU-only in PyTorch; float64 is exact for |P| < 2**53
    return torch.bmm(xg.double(), wg.double()).round().to(torch.int64).permute(1, 2, 0)


def gemm(x: QuantizedTensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The W4A4 GEMM of the contract, in float64 and rounded once to ``out_dtype``; shape [M, N]."""
    _check_pair(x, w)
    y = _gemm_f64(x, w)
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


def gemm_abs(x: QuantizedTensor, w: QuantizedTensor) -> torch.Tensor:
    """sum_g |sX sW P|: the magnitude that fp32 accumulation errors scale with."""
    _check_pair(x, w)
    p = group_partials(x.q, w.q, x.group).double().abs()
    return torch.einsum("mg,ng,mng->mn", x.scales.double().abs(), w.scales.double().abs(), p)


def _gemm_f64(x: QuantizedTensor, w: QuantizedTensor) -> torch.Tensor:
    p = group_partials(x.q, w.q, x.group).double()
    return torch.einsum("mg,ng,mng->mn", x.scales.double(), w.scales.double(), p)


def _check_pair(x: QuantizedTensor, w: QuantizedTensor) -> None:
    if x.q.shape[1] != w.q.shape[1]:
        raise ValueError(f"K mismatch: activations K={x.q.shape[1]}, weights K={w.q.shape[1]}")
    if x.group != w.group:
        raise ValueError(f"group mismatch: activations g={x.group}, weights g={w.group}")


def gemm_tolerance(x: QuantizedTensor, w: QuantizedTensor, out_dtype: torch.dtype,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element bound on |kernel - gemm()| (float64, shape [M, N]); see the module docstring.

    fp32 part: each of the K/group terms carries a few roundings (scale product, convert, fma) and the
    running sum adds at most one ulp of the absolute sum per term, so ``(n_groups + 4) * 2**-23 * abssum``.
    Output part: the kernel and the reference each round once to the output dtype, so they may differ by one
    ulp: 2**-10 relative for fp16, 2**-7 for bf16; plus the smallest normal number for results near zero.
    """
    n_groups = x.q.shape[1] // x.group
    abssum = gemm_abs(x, w)
    ref = _gemm_f64(x, w)
    if bias is not None:
        ref = ref + bias.double()
        abssum = abssum + bias.double().abs()
    out_eps = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[out_dtype]
    tiny = torch.finfo(out_dtype).tiny
    return (n_groups + 4) * 2.0 ** -23 * abssum * (1 + out_eps) + out_eps * ref.abs() + tiny


def reference_linear(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
                     act_bits: int = DEFAULT_ACT_BITS) -> torch.Tensor:
    """What ``apex4gen.linear`` computes: quantize x per (token, group) to ``act_bits``, then :func:`gemm` in x's
    dtype."""
    out_dtype = x.dtype if x.dtype in _OUT_DTYPES else torch.float16
    return gemm(quantize_activation(x, w.group, act_bits), w, bias, out_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, rounded once to x's dtype: ``ms = RN32(sum(x^2) / K)`` (the sum exact up to
    float64 rounding), ``r = RN32(1 / sqrt(RN32(ms + eps)))``, ``y = RN(RN32(RN32(x * r) * w))``, every step an
    IEEE float32 operation but the sum. A kernel's own summation order may move ``ms`` by one float32 ulp where
    ``sum / K`` lies within its error of a rounding boundary; ``y`` then differs by at most one ulp of the dtype
    at the few values that sit that close to one of its boundaries."""
    if x.shape[-1:] != weight.shape:
        raise ValueError(f"rms_norm weight of shape {tuple(weight.shape)} for activations [..., {x.shape[-1]}]")
    xf = x.float()
    ms = (xf.double().square().sum(-1, keepdim=True) / x.shape[-1]).float()
    r = torch.rsqrt((ms + torch.tensor(eps, dtype=torch.float32)).double()).float()
    return (xf * r * weight.float()).to(x.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` for gate_up [..., 2I] split as ``chunk(2, -1)`` (gate first), in the engine's
    order: ``s = RN(silu(gate))`` (silu evaluated in float64, rounded to float32, then to the dtype, as
    ``F.silu`` rounds), then ``y = RN(RN32(s * up))`` (the product of two 16-bit values is exact in float32)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must have an even last dimension (gate and up halves), got {gate_up.shape[-1]}")
    gate, up = gate_up.chunk(2, dim=-1)
    g = gate.double()
    s = (g / (1 + torch.exp(-g))).float().to(gate_up.dtype)
    return (s.float() * up.float()).to(gate_up.dtype)
