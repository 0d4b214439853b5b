"""The numerics contract (apex4gen.reference) against an independent float64 oracle."""
import pytest
import torch

from apex4gen import reference as ref


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh data each run, reproducible on failure


def _oracle(x_q, x_s, w_q, w_s, group):
    """Dequantize everything to float64 and do one dense matmul: a different route to the same sum."""
    xd = (x_q.double().reshape(x_q.shape[0], -1, group) * x_s.double().unsqueeze(-1)).reshape(x_q.shape)
    wd = (w_q.double().reshape(w_q.shape[0], -1, group) * w_s.double().unsqueeze(-1)).reshape(w_q.shape)
    return xd @ wd.T


@pytest.mark.parametrize("group", [64, 128, 512])  # 512 = K: per-channel
@pytest.mark.parametrize("m", [1, 3, 17])
def test_gemm_matches_float64_oracle(gen, m, group):
    n, k = 48, 512
    x = torch.randn(m, k, generator=gen, dtype=torch.float32).half()
    w = torch.randn(n, k, generator=gen, dtype=torch.float32).half()
    xq, wq = ref.quantize_activation(x, group), ref.quantize_weight(w, group)
    y = ref.gemm(xq, wq, out_dtype=torch.float16)
    oracle = _oracle(xq.q, xq.scales, wq.q, wq.scales, xq.group)
    assert torch.allclose(y.double(), oracle, rtol=2**-10, atol=1e-6)
    assert torch.allclose(ref._gemm_f64(xq, wq), oracle, rtol=1e-12, atol=1e-12)


def test_quantization_properties(gen):
    x = torch.randn(5, 256, generator=gen) * torch.logspace(-3, 3, 5).unsqueeze(1)
    q = ref.quantize_activation(x, 128)
    assert q.q.dtype == torch.int8 and int(q.q.abs().max()) <= 7
    absmax = x.reshape(5, 2, 128).abs().amax(-1)
    assert torch.equal(q.scales, absmax / 7.0)
    err = (ref.dequantize(q) - x).abs().reshape(5, 2, 128)
    assert bool((err <= q.scales.unsqueeze(-1) / 2 * (1 + 1e-6)).all())


def test_weight_scales_are_stored_in_model_dtype_and_used_rounded(gen):
    w = torch.randn(8, 128, generator=gen).to(torch.bfloat16)
    q = ref.quantize_weight(w, 64)
    assert q.scales.dtype == torch.bfloat16
    groups = w.float().reshape(8, 2, 64)
    assert torch.equal(q.scales, (groups.abs().amax(-1) / 7).to(torch.bfloat16))  # RN_bf16(absmax / 7)
    expect = torch.round(groups / q.scales.float().unsqueeze(-1)).clamp(-8, 7)
    assert torch.equal(q.q.reshape(8, 2, 64).float(), expect)


def test_zero_group_gives_zero_scale_and_values():
    x = torch.zeros(2, 128)
    x[1, 64:] = 3.0
    q = ref.quantize_activation(x, 64)
    assert q.scales[0].tolist() == [0.0, 0.0] and q.scales[1, 0] == 0.0
    assert int(q.q[0].abs().sum()) == 0 and bool((q.q[1, 64:] == 7).all())


def test_round_half_to_even():
    # 0.5 and 2.5 units round to 0 and 2 (half to even), as __float2int_rn does
    x = torch.tensor([[7.0, 0.5, 2.5, -2.5, 1.5, 0.0, 0.0, 0.0]])
    assert ref.quantize_activation(x, 8).q.tolist() == [[7, 0, 2, -2, 2, 0, 0, 0]]


@pytest.mark.parametrize("k", [2, 64, 130])
def test_pack_unpack_round_trip(gen, k):
    q = torch.randint(-8, 8, (7, k), generator=gen, dtype=torch.int8)
    p = ref.pack_int4(q)
    assert p.shape == (7, k // 2) and p.dtype == torch.uint8
    assert torch.equal(ref.unpack_int4(p), q)


def test_packing_is_low_nibble_first_twos_complement():
    q = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)
    assert ref.pack_int4(q).tolist() == [[0xF1, 0x78]]


def test_pack_rejects_out_of_range_and_odd_k():
    with pytest.raises(ValueError, match="-8..7"):
        ref.pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="even"):
        ref.pack_int4(torch.zeros(1, 3, dtype=torch.int8))


def test_group_must_divide_k():
    with pytest.raises(ValueError, match="not a multiple of the group size 128"):
        ref.quantize_activation(torch.zeros(1, 200), 128)


def test_worst_case_partials_are_exact():
    # every value -8: |P| = 64 * K, the largest a group can make; int64 partials hold it exactly
    k = 512
    xq = ref.QuantizedTensor(torch.full((3, k), -8, dtype=torch.int8), torch.ones(3, k // 128), 128)
    wq = ref.QuantizedTensor(torch.full((5, k), -8, dtype=torch.int8), torch.ones(5, k // 128, dtype=torch.half), 128)
    p = ref.group_partials(xq.q, wq.q, 128)
    assert bool((p == 64 * 128).all())
    assert bool((ref.gemm(xq, wq, out_dtype=torch.float16) == 64 * k).all())  # 32768: exact in fp16


def _fp32_kernel_emulation(xq, wq, order):
    """What a kernel does: exact int partials, fp32 scale products and fp32 accumulation in some order."""
    p = ref.group_partials(xq.q, wq.q, xq.group).float()
    acc = torch.zeros(p.shape[:2])
    for g in order:
        acc = acc + p[:, :, g] * (xq.scales[:, g:g + 1] * wq.scales[:, g].float().unsqueeze(0))
    return acc


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_tolerance_covers_fp32_accumulation_in_any_order(gen, out_dtype):
    m, n, k, group = 9, 16, 2048, 64
    x = torch.randn(m, k, generator=gen) * 4
    w = torch.randn(n, k, generator=gen).to(out_dtype)
    xq, wq = ref.quantize_activation(x, group), ref.quantize_weight(w, group)
    tol = ref.gemm_tolerance(xq, wq, out_dtype)
    want = ref.gemm(xq, wq, out_dtype=out_dtype).double()
    for order in (range(k // group), reversed(range(k // group)), torch.randperm(k // group, generator=gen).tolist()):
        got = _fp32_kernel_emulation(xq, wq, list(order)).to(out_dtype).double()
        assert bool(((got - want).abs() <= tol).all())


def test_tolerance_catches_a_wrong_scale(gen):
    x, w = torch.randn(4, 256, generator=gen), torch.randn(8, 256, generator=gen).half()
    xq, wq = ref.quantize_activation(x, 128), ref.quantize_weight(w, 128)
    wrong = ref.QuantizedTensor(xq.q, xq.scales * 1.01, 128)
    diff = (ref.gemm(wrong, wq).double() - ref.gemm(xq, wq).double()).abs()
    assert bool((diff > ref.gemm_tolerance(xq, wq, torch.float16)).any())


def test_bias_and_reference_linear(gen):
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    w = ref.quantize_weight(torch.randn(10, 256, generator=gen).to(torch.bfloat16), 256)
    bias = torch.randn(10, generator=gen).to(torch.bfloat16)
    y = ref.reference_linear(x, w, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 10)
    assert torch.equal(y, ref.gemm(ref.quantize_activation(x, 256), w, bias, torch.bfloat16))
    without = ref.gemm(ref.quantize_activation(x, 256), w, None, torch.bfloat16)
    assert torch.allclose(y.double() - without.double(), bias.double(), rtol=2**-6, atol=2**-6 * y.abs().max().item())
