"""RTN and the clipping-ratio searches: still the contract's quantization, and never worse than no clipping."""
import torch

from apex4gen import reference as ref
from apex4gen.nn import clip_activation
from apex4gen.accuracy.rtn import (ACT_CLIP_GRID, clip_groups, rtn_quantize, search_act_clip,
                                   search_weight_clip)


def _heavy_tailed(n, k, seed=0):
    """Weights with outliers, where clipping pays (cubed Gaussians)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=gen) ** 3) * 0.02


def _err(w, wq, imp):
    return float((((w - ref.dequantize(wq)) ** 2) * imp).sum())


def test_rtn_without_clip_is_reference():
    w = _heavy_tailed(64, 256)
    got, want = rtn_quantize(w, 128, torch.float16), ref.quantize_weight(w, 128, torch.float16)
    assert torch.equal(got.q, want.q) and torch.equal(got.scales, want.scales)


def test_weight_clip_lowers_weighted_error_and_stays_in_contract():
    w = _heavy_tailed(64, 256)
    imp = torch.rand(256) + 0.1
    plain = rtn_quantize(w, 64, torch.float16)
    clipped = rtn_quantize(w, 64, torch.float16, clip=True, importance=imp)
    assert _err(w, clipped, imp) < 0.95 * _err(w, plain, imp)  # the grid holds 1.0: never worse
    assert int(clipped.q.abs().max()) <= 7  # clipping happens before quantizing: still the symmetric -7..7
    ratios = search_weight_clip(w, 64, torch.float16, imp)
    again = ref.quantize_weight(clip_groups(w, 64, ratios), 64, torch.float16)
    assert torch.equal(again.q, clipped.q) and torch.equal(again.scales, clipped.scales)


def test_act_clip_search_picks_a_grid_ratio_no_worse_than_none():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 128, generator=gen)
    x[:, 5] *= 30.0  # an outlier channel
    w = torch.randn(32, 128, generator=gen) * 0.05
    wq = ref.quantize_weight(w, 64, torch.float16)
    ratio = search_act_clip(x, w, wq)
    assert ratio in ACT_CLIP_GRID

    def err(r):
        xc = clip_activation(x, 64, r)
        y = ref.dequantize(ref.quantize_activation(xc, 64)) @ ref.dequantize(wq).t()
        return float(((y - x @ w.t()) ** 2).sum())

    assert err(ratio) <= err(1.0)
