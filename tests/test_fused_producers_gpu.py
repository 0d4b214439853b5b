"""The fused producer ops (runtime/fused_quantize.cu: apex4gen_rmsnorm_quantize_act, apex4gen_silu_mul_quantize_act)
against the reference, on the GPU: ``quantize_activation(rms_norm(x, w, eps))`` and
``quantize_activation(silu_mul(gate_up))`` (apex4gen/reference.py), fresh random data each run (the seed is
printed on failure), outputs poisoned before the kernel runs (the C ABI called on our own buffers).

Bound: the kernels' arithmetic is the reference's step for step (tests/test_fused_producers.py emulates it), but
for rms_norm the sum of squares, summed in another order (compensated float32, within ~2^-46 of exact), rounds
to the reference's mean square except where it lies that close to a float32 rounding boundary (about 2^-22 of
rows); such a row's y moves by at most one ulp of the dtype, its scales by one ulp of the dtype relative and its
values by one step. silu's float64 path differs from the reference only by the two float64 exps (CPU and GPU,
within an ulp each). So every case must match exactly but for at most one row, and that row within those bounds.
The unfused paths are compared too: the build's quantize_act on the reference's y (exact) and on the engine's
ops' y (F.rms_norm, F.silu(g) * u: their own float32 order, one ulp at a few values).

Builds come from APEX4GEN_TEST_BUILDS, as tests/test_kernels_gpu.py; any build serves (the runtime is the same).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apex4gen import abi
from apex4gen import reference as ref
from apex4gen.errors import ShapeError
from apex4gen.loader.ops import dtype_enum, quantized_act_shape

from test_kernels_gpu import _load_activations, build, gen  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu

MS = (1, 3, 16, 17, 100, 1024, 4096)
KS = (4096, 8192, 28672)
DTYPES = (torch.float16, torch.bfloat16)
# (act_bits, format): 4-bit values in every storage, 8-bit ones in s8 (the only storage that holds them)
PRECISIONS = ((4, "s4"), (4, "s8"), (4, "e4m3"), (8, "s8"))
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
EPS = 1e-5


def _outputs(m: int, k: int, group: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized outputs filled with values no kernel writes (0x55 bytes, NaN scales)."""
    shape, dtype = quantized_act_shape(m, k, group, abi.ACT_FORMAT[fmt])
    qx = torch.full(shape, 0x55, dtype=torch.uint8, device="cuda").view(dtype)
    return qx, torch.full((m, k // group), float("nan"), device="cuda")


def _check(build, status: int) -> None:
    assert status == abi.STATUS["ok"], build.lib.apex4gen_status_string(status).decode()


def rmsnorm_quantize(build, x, w, group, act_bits, fmt):
    m, k = x.shape
    qx, sx = _outputs(m, k, group, fmt)
    _check(build, build.lib.apex4gen_rmsnorm_quantize_act(
        x.data_ptr(), x.stride(0), w.data_ptr(), EPS, dtype_enum(x.dtype), m, k, group, act_bits,
        abi.ACT_FORMAT[fmt], qx.data_ptr(), sx.data_ptr(), torch.cuda.current_stream().cuda_stream))
    return qx, sx


def silu_mul_quantize(build, gate_up, group, act_bits, fmt):
    m, k = gate_up.shape[0], gate_up.shape[1] // 2
    qx, sx = _outputs(m, k, group, fmt)
    _check(build, build.lib.apex4gen_silu_mul_quantize_act(
        gate_up.data_ptr(), gate_up.stride(0), dtype_enum(gate_up.dtype), m, k, group, act_bits,
        abi.ACT_FORMAT[fmt], qx.data_ptr(), sx.data_ptr(), torch.cuda.current_stream().cuda_stream))
    return qx, sx


def assert_matches(qx, sx, fmt: str, want: ref.QuantizedTensor, dtype, where: str, rows_allowed: int = 1,
                   steps: int = 1, scale_ulps: float = 1.0, values_allowed: float = 0.0) -> None:
    """The fused output against the reference's quantization: identical but for ``rows_allowed`` rows, where the
    scales are within ``scale_ulps`` ulps of the dtype (relative) and the values within ``steps`` steps; with
    ``values_allowed`` > 0 any row may differ, at that fraction of the values at most."""
    assert not torch.isnan(sx).any(), f"{where}: a scale was never written"
    got = _load_activations(qx, fmt)
    value_differs, scale_differs = got != want.q, sx != want.scales
    rows = (value_differs.any(1) | scale_differs.any(1)).nonzero().flatten()
    if values_allowed:
        share = float(value_differs.float().mean())
        assert share <= values_allowed, f"{where}: {share:.3%} of the values differ"
    else:
        assert len(rows) <= rows_allowed, f"{where}: {len(rows)} rows differ, e.g. {rows[:5].tolist()}"
    steps_seen = int((got.int() - want.q.int()).abs().max())
    assert steps_seen <= steps, f"{where}: values {steps_seen} steps apart"
    rel = float(((sx.double() - want.scales.double()).abs() / want.scales.double().clamp_min(1e-30)).max())
    assert rel <= scale_ulps * ULP[dtype], f"{where}: scales {rel:.3g} apart (relative)"


def _activations(gen, m, k, dtype):
    """Rows of differing scale with a few large channels (a residual stream's shape), a zero row where M > 2."""
    x = torch.randn(m, k, device="cuda", generator=gen) * torch.rand(m, 1, device="cuda", generator=gen).add(0.05) * 4
    x[:, :3] *= 20
    if m > 2:
        x[1] = 0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_rmsnorm_quantize_act_matches_the_reference(build, gen, dtype, k):
    w = (torch.rand(k, device="cuda", generator=gen) + 0.5).to(dtype)
    for m in MS:
        x = _activations(gen, m, k, dtype)
        y = ref.rms_norm(x, w, EPS)
        engine_y = F.rms_norm(x, (k,), w, EPS)
        for group in (128, k):
            for act_bits, fmt in PRECISIONS:
                want = ref.quantize_activation(y, group, act_bits)
                where = f"M={m} K={k} group={group} {act_bits}-bit {fmt} {dtype}"
                qx, sx = rmsnorm_quantize(build, x, w, group, act_bits, fmt)
                assert_matches(qx, sx, fmt, want, dtype, where)
                # the unfused path: the build's quantizer on the reference's y is exact ...
                uq, us = build.quantize_act(y, group, fmt, act_bits)
                assert torch.equal(us, want.scales) and torch.equal(_load_activations(uq, fmt), want.q), where
                # ... and on the engine's F.rms_norm within an ulp of y at a few values
                eq, es = build.quantize_act(engine_y, group, fmt, act_bits)
                assert_matches(eq, es, fmt, want, dtype, f"{where}, F.rms_norm", steps=act_bits // 4,
                               values_allowed=0.02)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_silu_mul_quantize_act_matches_the_reference(build, gen, dtype, k):
    for m in MS:
        gate_up = (torch.randn(m, 2 * k, device="cuda", generator=gen) * 3).to(dtype)
        y = ref.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, -1)
        engine_y = F.silu(gate) * up
        for group in (128, k):
            for act_bits, fmt in PRECISIONS:
                want = ref.quantize_activation(y, group, act_bits)
                where = f"M={m} I={k} group={group} {act_bits}-bit {fmt} {dtype}"
                qx, sx = silu_mul_quantize(build, gate_up, group, act_bits, fmt)
                assert_matches(qx, sx, fmt, want, dtype, where, rows_allowed=0)
                uq, us = build.quantize_act(y, group, fmt, act_bits)
                assert torch.equal(us, want.scales) and torch.equal(_load_activations(uq, fmt), want.q), where
                eq, es = build.quantize_act(engine_y, group, fmt, act_bits)
                assert_matches(eq, es, fmt, want, dtype, f"{where}, F.silu(g) * u", steps=act_bits // 4,
                               scale_ulps=2.0, values_allowed=0.02)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_of_every_gate_value(build, dtype):
    """Every finite 16-bit gate value, each in a group of two with a zero gate (silu 0): the group's scale is
    |silu(g)| / 7, so the scales compare RN(silu(g)) itself with the reference's (float32 and float64 paths, the
    floor below which only float64 is used, the narrow 4-byte vectors of groups that are no multiple of 8)."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[torch.isfinite(values.float())]
    gates = torch.zeros(-(-len(values) // 1024) * 2048, dtype=dtype)
    gates[0:2 * len(values):2] = values
    gate = gates.view(-1, 2048).cuda()
    gate_up = torch.cat([gate, torch.ones_like(gate)], 1)
    want = ref.quantize_activation(ref.silu_mul(gate_up), 2)
    qx, sx = silu_mul_quantize(build, gate_up, 2, 4, "s8")
    assert torch.equal(sx, want.scales) and torch.equal(qx, want.q)


def test_ops_keep_leading_dimensions_and_match_the_abi(build, gen):
    x = _activations(gen, 6, 4096, torch.float16).view(2, 3, 4096)
    w = (torch.rand(4096, device="cuda", generator=gen) + 0.5).half()
    qx, sx = build.rmsnorm_quantize_act(x, w, EPS, 128, "s8")
    aq, asx = rmsnorm_quantize(build, x.view(6, 4096), w, 128, 4, "s8")
    assert qx.shape == (2, 3, 4096) and sx.shape == (2, 3, 32)
    assert torch.equal(qx.view(6, -1), aq) and torch.equal(sx.view(6, -1), asx)
    gate_up = torch.randn(2, 3, 2 * 1024, device="cuda", generator=gen).half()
    qx, sx = build.silu_mul_quantize_act(gate_up, 1024, "s4", act_bits=4)
    aq, asx = silu_mul_quantize(build, gate_up.view(6, -1), 1024, 4, "s4")
    assert qx.shape == (2, 3, 512) and torch.equal(qx.view(6, -1), aq) and torch.equal(sx.view(6, -1), asx)
    torch.library.opcheck(torch.ops.apex4gen.rmsnorm_quantize_act.default,
                          (x, w, EPS, 128, abi.ACT_FORMAT["s4"], build.handle))
    torch.library.opcheck(torch.ops.apex4gen.silu_mul_quantize_act.default,
                          (gate_up, 128, abi.ACT_FORMAT["e4m3"], build.handle))


def test_bad_inputs_get_clear_errors(build):
    x = torch.zeros(4, 256, device="cuda", dtype=torch.float16)
    w = torch.ones(256, device="cuda", dtype=torch.float16)
    with pytest.raises(ShapeError, match="RMSNorm weight must be"):
        build.rmsnorm_quantize_act(x, w[:128], EPS, 128)
    with pytest.raises(ShapeError, match="not a multiple of the group size"):
        build.rmsnorm_quantize_act(x, w, EPS, 96)
    with pytest.raises(ShapeError, match="2I with I a multiple"):
        build.silu_mul_quantize_act(x, 256)
    with pytest.raises(RuntimeError, match="bad argument"):
        build.rmsnorm_quantize_act(x, w, EPS, 128, "s4", act_bits=8)  # 8-bit values need s8 storage
    with pytest.raises(RuntimeError, match="bad argument"):
        build.silu_mul_quantize_act(x, 128, "e4m3", act_bits=8)
    with pytest.raises(RuntimeError, match="bad argument"):
        build.rmsnorm_quantize_act(x, w, -1.0, 128)  # a negative eps
