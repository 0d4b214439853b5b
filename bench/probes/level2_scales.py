"""Probe (bench/notes/accuracy.md, "Integer level-2 group scales"): the perplexity of SmolLM2-135M when every
group scale is a row scale times a small integer, s[row, g] = s_row * r[row, g] with r in 1..R (R = 16), for the
weights (per output channel) and the activations (per token). Then q * r fits int8 for 4-bit q, so a kernel can
accumulate all of K in int32 with no per-group promotion (bench/notes/sm90-prefill.md). The probe replaces
apex4gen.reference's two quantizers and runs `apex4gen eval ppl` with the given arguments, e.g.

    PYTHONPATH=. python3 bench/probes/level2_scales.py --granularity g128 --rotate --group-rotation --gptq \
        --act-order --clip-weights --clip-acts --tokens 2048 --calib-samples 4 --calib-seq-len 256 --seed 0

Environment: SIDES = "both" (default), "acts" or "weights" (which quantizer is replaced); PICK = "ceil" (default:
r = ceil(absmax_g / (qmax * s_row)), so no value clips) or "mse" (r or r - 1, whichever quantizes the group with
less squared error); R (16).
"""
import os
import sys

import torch

from apex4gen import reference as ref
from apex4gen.cli import main

R = int(os.environ.get("R", "16"))
SIDES = os.environ.get("SIDES", "both")
PICK = os.environ.get("PICK", "ceil")


def level2_scales(xg: torch.Tensor, qmax: int, row_dtype: torch.dtype) -> torch.Tensor:
    """Group scales s_row * r for groups xg [rows, groups, g] (fp32): s_row maps the row's absmax to qmax * R."""
    gmax = xg.abs().amax(dim=-1)
    s = ref._scale_of(gmax.amax(dim=-1), qmax * R).to(row_dtype).float().unsqueeze(-1)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    r = torch.ceil(gmax / (qmax * safe) * (1 - 2**-20)).clamp(1, R)  # the margin keeps exact multiples at r
    if PICK == "mse":
        def error(rr: torch.Tensor) -> torch.Tensor:
            sc = (s * rr).unsqueeze(-1)
            return ((ref._round_clamp(xg, sc, -qmax - 1, qmax).float() * sc - xg) ** 2).sum(-1)
        lower = (r - 1).clamp(min=1)
        r = torch.where(error(lower) < error(r), lower, r)
    return s * r


def quantize_weight(w: torch.Tensor, group: int, scale_dtype: torch.dtype | None = None) -> ref.QuantizedTensor:
    scale_dtype = scale_dtype or (w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16)
    g = ref.check_group(group, w.shape[1])
    wg = ref._grouped(w.float(), g)
    s = level2_scales(wg, ref.QMAX, scale_dtype)  # fp32: s_row * r is exact there
    return ref.QuantizedTensor(q=ref._round_clamp(wg, s.unsqueeze(-1)).reshape(w.shape), scales=s, group=g)


def quantize_activation(x: torch.Tensor, group: int, bits: int = ref.DEFAULT_ACT_BITS) -> ref.QuantizedTensor:
    qmin, qmax = ref.act_range(bits)
    g = ref.check_group(group, x.shape[1])
    xg = ref._grouped(x.float(), g)
    s = level2_scales(xg, qmax, torch.float32)
    return ref.QuantizedTensor(q=ref._round_clamp(xg, s.unsqueeze(-1), qmin, qmax).reshape(x.shape), scales=s,
                               group=g)


if SIDES in ("both", "weights"):
    ref.quantize_weight = quantize_weight
if SIDES in ("both", "acts"):
    ref.quantize_activation = quantize_activation
sys.argv = ["apex4gen", "eval", "ppl", *sys.argv[1:]]
main()
