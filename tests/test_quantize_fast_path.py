"""runtime/quantize.cuh (the quantizers of quantize.cu and fused_quantize.cu) rounds y = x * RN(1/s) and
divides only for values near a rounding boundary (quantize_value). Its fast path must give the reference's
clamp(rint(x / s)) wherever it is taken: emulated here in IEEE float32 on the CPU, on values aimed at the
boundaries (k + 1/2) * s within a few ulps."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from apex4gen import reference as ref

from _helpers import boundary_values

SOURCE = Path(__file__).resolve().parents[1] / "runtime" / "quantize.cuh"
MAGIC = 12582912.0  # 1.5 * 2**23, as kRoundMagic
MAGIC_BITS = 0x4B400000


def _margin(name: str = "kFastMargin") -> float:
    found = re.search(rf"constexpr float {name} = 1\.0f / (\d+)\.0f;", SOURCE.read_text())
    assert found, f"{name}'s definition changed: update this test's parser"
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


def test_8bit_fast_path_agrees_with_the_division_wherever_taken():
    """8-bit activations (qmax 127) with their margin kFastMargin8: the same emulation on the 8-bit grid."""
    gen = torch.Generator().manual_seed(2)
    x = torch.cat([boundary_values(gen, 256, 4352, qmax=127), torch.randn(256, 4352, generator=gen) * 3])
    want = ref.quantize_activation(x, x.shape[1], 8)
    s = want.scales
    y = x * (torch.ones_like(s) / s)
    t = y + MAGIC
    fast = (y - (t - MAGIC)).abs() <= 0.5 - _margin("kFastMargin8")
    q = (t.view(torch.int32) - MAGIC_BITS).clamp(-128, 127).to(torch.int8)
    assert fast.float().mean() > 0.5 and (~fast).any()
    assert torch.equal(q[fast], want.q[fast])
    exact = x.double() / s.double()
    assert float((y.double() - exact).abs().max()) <= 1.52e-5
    assert float(((x / s).double() - exact).abs().max()) <= 3.9e-6
    assert 2 * (1.52e-5 + 3.9e-6) < _margin("kFastMargin8")
    assert not torch.equal(torch.round(y).clamp(-128, 127).to(torch.int8), want.q)
