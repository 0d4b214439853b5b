"""The producers whose output the fused ops quantize (runtime/fused_quantize.cu), on the CPU: the reference's
rms_norm and silu_mul against float64 and PyTorch's own ops, the kernels' arithmetic emulated in IEEE float32
against the reference (the compensated sum of squares; SiLU's float32 path and the margin that sends values near
a rounding boundary to float64), and nvcc compiles of the runtime source for sm_80 and sm_90a. On a GPU:
tests/test_fused_producers_gpu.py."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apex4gen import reference as ref
from apex4gen.errors import ToolchainError
from apex4gen.paths import runtime_dir

SOURCE = runtime_dir() / "fused_quantize.cu"
DTYPES = [torch.float16, torch.bfloat16]
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}  # relative spacing of the dtype's values


def _constant(name: str) -> float:
    found = re.search(rf"constexpr (?:float|int) {name} = (-?[\d.]+)f?(?: / ([\d.]+)f)?;", SOURCE.read_text())
    assert found, f"{name}'s definition changed: update this test's parser"
    value = float(found.group(1))
    return value / float(found.group(2)) if found.group(2) else value


def _random_rows(gen, m: int, k: int, dtype) -> torch.Tensor:
    """Rows of differing scale, as residual streams have (one row in ten with a few large channels)."""
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen).add(0.05) * 4
    x[::10, :3] *= 50
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_the_exact_norm_rounded_to_the_dtype(dtype):
    gen = torch.Generator().manual_seed(0)
    x, w = _random_rows(gen, 64, 4096, dtype), (torch.rand(4096, generator=gen) + 0.5).to(dtype)
    x64 = x.double()
    exact = x64 / torch.sqrt(x64.square().mean(-1, keepdim=True) + 1e-5) * w.double()
    y = ref.rms_norm(x, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    # the float32 steps add a few float32 ulps before the one rounding to the dtype (half a subnormal step
    # absolute, below the normal range)
    tiny = torch.finfo(dtype).smallest_normal * ULP[dtype] / 2
    assert bool(((y.double() - exact).abs() <= exact.abs() * (ULP[dtype] / 2 + 2.0 ** -21) + tiny).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_torchs_up_to_one_ulp_at_few_values(dtype):
    """The engine's unfused path runs F.rms_norm, whose float32 order differs: one dtype ulp at a few values."""
    gen = torch.Generator().manual_seed(1)
    x, w = _random_rows(gen, 64, 4096, dtype), (torch.rand(4096, generator=gen) + 0.5).to(dtype)
    got, want = ref.rms_norm(x, w, 1e-6), F.rms_norm(x.float(), (4096,), w.float(), 1e-6).to(dtype)
    differ = got != want
    assert float(differ.float().mean()) < 1e-3
    assert bool(((got.double() - want.double()).abs() <= want.double().abs() * ULP[dtype]).all())


def _kernel_threads(vectors: int) -> int:
    """threads_for() of fused_quantize.cu: ~4 vectors a thread, a multiple of 32, 32..512."""
    per = -(-vectors // 4)
    return min(512, max(32, -(-per // 32) * 32))


def _two_sum_add(hi: torch.Tensor, lo: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    total = hi + v
    v_part = total - hi
    return total, lo + ((hi - (total - v_part)) + (v - v_part))


def _kernel_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, compensated: bool = True) -> torch.Tensor:
    """rmsnorm_quantize_kernel's y in float32 on the CPU: thread t sums the squares of vectors t, t + T, ... (8
    values each) with two-sum, the (hi, lo) pairs of all threads are added in float64; the rest in its order."""
    m, k = x.shape
    threads = _kernel_threads(k // 8)
    sq = x.float().square().view(m, -1, threads, 8)  # [rows, rounds, thread, value]: exact squares
    hi = torch.zeros(m, threads)
    lo = torch.zeros(m, threads)
    for r in range(sq.shape[1]):
        for i in range(8):
            if compensated:
                hi, lo = _two_sum_add(hi, lo, sq[:, r, :, i])
            else:
                hi = hi + sq[:, r, :, i]
    ms = ((hi.double() + lo.double()).sum(-1, keepdim=True) / k).float()
    r = torch.rsqrt((ms + torch.tensor(eps, dtype=torch.float32)).double()).float()
    return (x.float() * r * w.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [4096, 28672])
def test_the_kernels_compensated_sum_gives_the_reference(dtype, k):
    """Summed in another order with two-sum, the mean square rounds to the reference's: y is bit for bit the
    reference's. A plain float32 sum in that order moves y by an ulp at some values of long rows: the
    compensation is needed."""
    gen = torch.Generator().manual_seed(2)
    x, w = _random_rows(gen, 256, k, dtype), (torch.rand(k, generator=gen) + 0.5).to(dtype)
    want = ref.rms_norm(x, w, 1e-5)
    assert torch.equal(_kernel_rms_norm(x, w, 1e-5), want)
    if k == 28672:  # long rows: a plain float32 sum drifts far enough to move y (f16: also at K = 4096)
        assert not torch.equal(_kernel_rms_norm(x, w, 1e-5, compensated=False), want)


def test_rms_norm_refuses_a_weight_of_another_width():
    with pytest.raises(ValueError, match="rms_norm weight"):
        ref.rms_norm(torch.zeros(2, 64), torch.ones(32), 1e-5)


def test_fused_contract_is_quantize_of_the_producer():
    """What the fused ops return: quantize_activation of the producer's rounded output (at 4 and 8 bits)."""
    gen = torch.Generator().manual_seed(3)
    x, w = _random_rows(gen, 8, 256, torch.float16), (torch.rand(256, generator=gen) + 0.5).half()
    for bits in (4, 8):
        q = ref.quantize_activation(ref.rms_norm(x, w, 1e-5), 128, bits)
        qmin, qmax = ref.act_range(bits)
        assert int(q.q.max()) == qmax and int(q.q.min()) >= qmin and q.scales.shape == (8, 2)


# ---------------------------------------------------------------------------------------------- silu_mul


def _all_values(dtype) -> torch.Tensor:
    """Every finite value of a 16-bit dtype."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    return values[torch.isfinite(values.float())]


def _kernel_silu(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_rounded() on the CPU: (RN_dtype(silu(g)) as float32, where the float32 path was taken)."""
    dtype = g.dtype
    gf = g.float()
    s = gf / (1 + torch.exp(-gf))
    reach = s.abs() * _constant("kSiluMargin")
    below, above = (s - reach).to(dtype), (s + reach).to(dtype)
    fast = (gf > _constant("kSiluFastFloor")) & (below.float() == above.float())
    g64 = gf.double()
    slow = (g64 / (1 + torch.exp(-g64))).float().to(dtype)
    return torch.where(fast, below.float(), slow.float()), fast


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_float32_path_gives_the_reference_on_every_value(dtype):
    """Every finite gate value: the float32 path where the margin keeps it, float64 elsewhere, is the reference's
    silu; the float64 path is taken rarely; rounding the float32 value alone would be wrong at some values."""
    g = _all_values(dtype)
    want = ref.silu_mul(torch.stack([g, torch.ones_like(g)], -1).view(-1, 2))  # up = 1: y = RN(silu(g))
    got, fast = _kernel_silu(g)
    assert torch.equal(got.to(dtype), want.view(-1))
    above_floor = g.float() > _constant("kSiluFastFloor")
    assert 0 < float((~fast[above_floor]).float().mean()) < {torch.float16: 0.02, torch.bfloat16: 0.01}[dtype]
    s32 = g.float() / (1 + torch.exp(-g.float()))
    assert not torch.equal(s32.to(dtype), want.view(-1))


def test_silu_margin_covers_the_float32_error():
    """The float32 silu (here with the CPU's expf) lies within the source's stated bound, 1.5 * 2^-22 relative,
    and the margin is 10x that."""
    g = _all_values(torch.float16).float()
    g = g[g > _constant("kSiluFastFloor")]
    s32 = g / (1 + torch.exp(-g))
    exact = g.double() / (1 + torch.exp(-g.double()))
    nonzero = exact != 0
    rel = ((s32.double() - exact).abs() / exact.abs())[nonzero]
    assert float(rel.max()) <= 1.5 * 2.0 ** -22
    assert _constant("kSiluMargin") >= 10 * 1.5 * 2.0 ** -22


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_the_engines_order(dtype):
    """silu(gate) rounded, times up rounded again, gate the first half: F.silu(g) * u up to F.silu's own float32
    error (one ulp at a few values)."""
    gen = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(16, 2 * 1024, generator=gen) * 3).to(dtype)
    gate, up = gate_up.chunk(2, -1)
    got, want = ref.silu_mul(gate_up), F.silu(gate) * up
    assert got.shape == (16, 1024)
    assert float((got != want).float().mean()) < 1e-3
    assert bool(((got.double() - want.double()).abs() <= want.double().abs() * 2 * ULP[dtype]).all())
    with pytest.raises(ValueError, match="even last dimension"):
        ref.silu_mul(torch.zeros(2, 7))


# ---------------------------------------------------------------------------------------------- compiles


def _compile(arch: str, tmp_path: Path) -> str:
    from apex4gen.toolchain import nvcc_flags, nvcc_path
    try:
        nvcc = nvcc_path()
    except ToolchainError as err:
        pytest.skip(str(err))
    obj = tmp_path / f"fused_quantize_{arch}.o"
    cmd = [nvcc, *nvcc_flags(arch, [runtime_dir()]), "-Xptxas", "-v", "-c", str(SOURCE), "-o", str(obj)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed for {arch}:\n{result.stderr[-4000:]}"
    assert obj.stat().st_size > 0
    return result.stderr


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_fused_runtime_compiles_without_spills(arch, tmp_path):
    log = _compile(arch, tmp_path)
    usage = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(usage) >= 24, "ptxas -v printed fewer kernels than 2 producers x 2 dtypes x 2 widths x 3 formats"
    assert all(u == ("0", "0") for u in usage), log
    assert not re.search(r"[1-9]\d* bytes stack frame", log), log
