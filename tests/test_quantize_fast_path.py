"""runtime/quantize.cu rounds y = x * RN(1/s) and divides only for values near a rounding boundary
(quantize_value). Its fast path must give the reference's clamp(rint(x / s)) wherever it is taken: emulated
here in IEEE float32 on the CPU, on values aimed at the boundaries (k + 1/2) * s within a few ulps."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from apex4gen import reference as ref

from _helpers import boundary_values

SOURCE = Path(__file__).resolve().parents[1] / "runtime" / "quantize.cu"
MAGIC = 12582912.0  # 1.5 * 2**23, as kRoundMagic
MAGIC_BITS = 0x4B400000


def _margin() -> float:
    found = re.search(r"constexpr float kFastMargin = 1\.0f / (\d+)\.0f;", SOURCE.read_text())
    assert found, "kFastMargin's definition changed: update this test's parser"
    return 1.0 / int(found.group(1))


def test_fast_path_agrees_with_the_division_wherever_taken():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([boundary_values(gen, 4096), torch.randn(4096, 320, generator=gen) * 3])
    want = ref.quantize_activation(x, x.shape[1])
    s = want.scales  # [rows, 1]: one group a row
    inv = torch.ones_like(s) / s  # RN(1/s), as __frcp_rn
    y = x * inv
    t = y + MAGIC
    fast = (y - (t - MAGIC)).abs() <= 0.5 - _margin()
    q = (t.view(torch.int32) - MAGIC_BITS).clamp(ref.QMIN, ref.QMAX).to(torch.int8)
    assert fast.float().mean() > 0.5
    assert (~fast).any(), "no value reached the division: the boundary values miss the boundaries"
    assert torch.equal(q[fast], want.q[fast])


def test_the_bound_behind_the_margin_holds_and_is_needed():
    """y and RN(x / s) stay within the source's stated distances of x / s (float64), and right at the boundaries
    rint(y) and rint(RN(x / s)) do disagree: without the margin the fast path would be wrong."""
    gen = torch.Generator().manual_seed(1)
    x = boundary_values(gen, 20000)
    want = ref.quantize_activation(x, x.shape[1])
    y = x * (torch.ones_like(want.scales) / want.scales)
    exact = x.double() / want.scales.double()
    assert float((y.double() - exact).abs().max()) <= 8.4e-7
    assert float(((x / want.scales).double() - exact).abs().max()) <= 4.2e-7
    assert 2 * (8.4e-7 + 4.2e-7) < _margin()
    assert not torch.equal(torch.round(y).clamp(ref.QMIN, ref.QMAX).to(torch.int8), want.q)
