"""Round-to-nearest weight quantization and the clipping-ratio searches for weights and activations.

All quantization goes through :mod:`apex4gen.reference`: clipping only chooses *which* tensor is handed to
the contract's quantizers (a weight clamped to ``ratio * absmax`` of its group gets the scale
``ratio * absmax / 7``), so a clipped model is still exactly what the kernels compute.
"""
from __future__ import annotations

import torch

from .. import reference
from ..nn import clip_activation, fake_quant_activation

WEIGHT_CLIP_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(17))  # 1.0 .. 0.6
ACT_CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(7))  # 1.0 .. 0.7


def round_to_grid(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 ``clamp(rint(w / s), -8, 7)`` with given scales (broadcast): the contract's rounding, for GPTQ,
    which fixes scales before it quantizes column by column."""
    return reference._round_clamp(w.float(), scales.float())  # noqa: SLF001 (one rounding rule for all)


def clip_groups(w: torch.Tensor, group: int, ratio: torch.Tensor | float) -> torch.Tensor:
    """Clamp each (row, group) of ``w`` [N, K] to ``ratio`` (scalar or [N, K/group]) times its absmax."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    ratio = torch.as_tensor(ratio, dtype=torch.float32)
    bound = wg.abs().amax(dim=-1) * ratio
    bound = bound.unsqueeze(-1)
    return torch.maximum(torch.minimum(wg, bound), -bound).reshape(n, k)


def rtn_quantize(w: torch.Tensor, group: int, scale_dtype: torch.dtype, *, clip: bool = False,
                 importance: torch.Tensor | None = None) -> reference.QuantizedTensor:
    """RTN of ``w`` [N, K]; with ``clip`` each (row, group) gets the clipping ratio that minimises
    ``sum_k importance[k] * (w - deq)**2`` (importance: the inputs' mean square, diag of the GPTQ Hessian)."""
    g = reference.check_group(group, w.shape[1])
    if clip:
        w = clip_groups(w, g, search_weight_clip(w, g, scale_dtype, importance))
    return reference.quantize_weight(w.float(), g, scale_dtype)


def search_weight_clip(w: torch.Tensor, group: int, scale_dtype: torch.dtype,
                       importance: torch.Tensor | None = None,
                       grid: tuple[float, ...] = WEIGHT_CLIP_GRID) -> torch.Tensor:
    """Best clipping ratio per (row, group), shape [N, K/group]."""
    n, k = w.shape
    w32 = w.float()
    imp = torch.ones(k) if importance is None else importance.float().clamp_min(0)
    best_err = torch.full((n, k // group), float("inf"))
    best_ratio = torch.ones(n, k // group)
    for ratio in grid:
        deq = reference.dequantize(reference.quantize_weight(clip_groups(w32, group, ratio), group, scale_dtype))
        err = ((w32 - deq) ** 2 * imp).reshape(n, k // group, group).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def search_act_clip(x: torch.Tensor, w: torch.Tensor, wq: reference.QuantizedTensor,
                    grid: tuple[float, ...] = ACT_CLIP_GRID, act_bits: int = reference.DEFAULT_ACT_BITS) -> float:
    """The activation clipping ratio (one per layer) that minimises the quantized output error (activations
    at ``act_bits``) against the full-precision output ``x @ w^T`` on calibration inputs ``x`` [T, K]."""
    x = x.float()
    target = x @ w.float().t()
    wdq = reference.dequantize(wq)
    errs = []
    for ratio in grid:
        xc = clip_activation(x, wq.group, ratio) if ratio < 1.0 else x
        y = fake_quant_activation(xc, wq.group, act_bits) @ wdq.t()
        errs.append(float(((y - target) ** 2).sum()))
    return grid[min(range(len(grid)), key=errs.__getitem__)]
