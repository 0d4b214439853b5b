"""GPTQ (Frantar et al., 2022) for the contract's symmetric int4 weights, per group or per channel.

Columns are quantized one at a time and each one's rounding error is spread over the columns not yet
quantized, weighted by the inverse Hessian ``H = 2/n X^T X`` of the layer's inputs, so the layer *output*
error on the calibration data is what gets minimised, not the weight error.

Scales: per channel they are fixed up front; per group they are taken when the first column of a group is
reached, from the already-updated weights (as in the reference implementation). With ``act_order``
(columns in decreasing Hessian-diagonal order) group scales are fixed up front from the original weights
("static groups"), since a group's columns are then no longer quantized together. Optional clipping-ratio
search chooses each scale (see :mod:`.rtn`). The result is a :class:`reference.QuantizedTensor`: the kernels
compute exactly this quantized weight.
"""
from __future__ import annotations

import contextlib

import torch

from .. import reference
from .rtn import clip_groups, round_to_grid, search_weight_clip


class HessianAccumulator:
    """Running ``2/n X^T X`` over calibration inputs [*, K]."""

    def __init__(self, k: int) -> None:
        self.h = torch.zeros(k, k, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.h.addmm_(x.t(), x)  # fp32 sums of a few thousand tokens a call; GPTQ then works in float64
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return (2.0 / max(self.n, 1)) * self.h.double()


def _scales_for(w: torch.Tensor, group: int, scale_dtype: torch.dtype, clip: bool,
                importance: torch.Tensor) -> torch.Tensor:
    """Scales [N, K/group] of ``w`` [N, K] as RTN (with optional clip search) would choose them."""
    if clip:
        w = clip_groups(w, group, search_weight_clip(w, group, scale_dtype, importance))
    return reference.quantize_weight(w.float(), group, scale_dtype).scales


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, group: int, scale_dtype: torch.dtype, *,
                  act_order: bool = False, clip: bool = False, block_size: int = 128,
                  damp: float = 0.01) -> reference.QuantizedTensor:
    """Quantize ``w`` [N, K] given the input Hessian [K, K]."""
    n, k = w.shape
    g = reference.check_group(group, k)
    W = w.detach().double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = torch.diag(H).float()

    static = g == k or act_order
    scales = _scales_for(W, g, scale_dtype, clip, importance) if static else \
        torch.zeros(n, k // g, dtype=scale_dtype)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    eye = torch.eye(k, dtype=H.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_solve(eye, torch.linalg.cholesky(H)), upper=True)
    new_scales = None if static else (lambda cols, imp: _scales_for(cols, g, scale_dtype, clip, imp)[:, 0])
    with _one_thread():
        Q = _quantize_columns(W, hinv, scales, perm, g, new_scales, importance, block_size)
    inverse = torch.argsort(perm)
    return reference.QuantizedTensor(q=Q[:, inverse].contiguous(), scales=scales, group=g)


@contextlib.contextmanager
def _one_thread():
    """The column loop is thousands of tiny ops: intra-op threads only add synchronisation (measured 18x
    slower with 2 threads on a busy 2-core machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _quantize_columns(W: torch.Tensor, hinv: torch.Tensor, scales: torch.Tensor, perm: torch.Tensor, g: int,
                      new_scales, importance: torch.Tensor, block_size: int) -> torch.Tensor:
    """The GPTQ sweep over the (permuted) columns of ``W``; returns the int8 values in ``perm`` order.
    ``new_scales(columns, importance)``, when given, fills a group's ``scales`` as its first column comes."""
    n, k = W.shape
    # a group's scale is taken from the columns still in the current block: blocks hold whole groups
    block = max(block_size // g, 1) * g if g < k else block_size
    Q = torch.zeros(n, k, dtype=torch.int8)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if new_scales is not None and col % g == 0:
                scales[:, col // g] = new_scales(W1[:, i:i + g], importance[i1 + i:i1 + i + g])
            s = scales[:, col // g].float().double()
            q = round_to_grid(W1[:, i], s)
            Q[:, i1 + i] = q
            err = (W1[:, i] - q.double() * s) / hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return Q
