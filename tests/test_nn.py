"""W4A4Linear: its fake-quant path has the contract's numerics (apex4gen.reference)."""
import pytest
import torch
from torch import nn

from apex4gen import reference as ref
from apex4gen.errors import SpecError
from apex4gen.granularity import Granularity
from apex4gen.nn import W4A4Linear, clip_activation, effective_granularity


def _linear(n, k, seed=0, bias=False):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    lin.weight.data = torch.randn(n, k) * 0.05
    return lin


def _bound(xq, wq, bias, out_dtype):
    """The fake path sums K fp32 products (the kernels: K/group exact int32 partials), so K roundings of the
    absolute sum; both results are then rounded to ``out_dtype``, which can split them by one ulp."""
    k = xq.q.shape[1]
    eps = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[out_dtype]
    exact = ref._gemm_f64(xq, wq) + bias.double()
    abssum = ref.gemm_abs(xq, wq) + bias.double().abs()
    return (k + 4) * 2.0 ** -23 * abssum + 2 * eps * exact.abs() + torch.finfo(out_dtype).tiny


@pytest.mark.parametrize("granularity,group", [("g64", 64), ("g128", 128), ("channel", 256)])
def test_weights_are_the_reference_quantization(granularity, group):
    lin = _linear(96, 256)
    layer = W4A4Linear.from_linear(lin, Granularity.parse(granularity))
    want = ref.quantize_weight(lin.weight.detach(), group, torch.float16)
    got = layer.quantized_weight()
    assert torch.equal(got.q, want.q) and torch.equal(got.scales, want.scales) and got.group == want.group
    assert layer.granularity.name == granularity


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", [Granularity(64), Granularity(None)])
def test_fake_quant_matches_reference_gemm(dtype, granularity):
    lin = _linear(80, 384, bias=True).to(dtype)
    layer = W4A4Linear.from_linear(lin, granularity)
    x = torch.randn(2, 7, 384).to(dtype)
    y = layer(x)
    assert y.shape == (2, 7, 80) and y.dtype == dtype
    x2 = x.reshape(-1, 384)
    xq, wq = ref.quantize_activation(x2, layer.group), layer.quantized_weight()
    want = ref.gemm(xq, wq, lin.bias.detach(), out_dtype=dtype)
    diff = (y.reshape(-1, 80).double() - want.double()).abs()
    assert torch.all(diff <= _bound(xq, wq, lin.bias.detach(), dtype))


def test_fake_quant_fp16_is_close_to_reference_linear():
    lin = _linear(64, 256).half()
    layer = W4A4Linear.from_linear(lin, Granularity.parse("g128"))
    x = torch.randn(9, 256).half()
    want = ref.reference_linear(x, layer.quantized_weight())
    assert torch.allclose(layer(x).float(), want.float(), rtol=2e-3, atol=1e-3)


def test_fp32_input_keeps_fp32_output():
    layer = W4A4Linear.from_linear(_linear(32, 128), Granularity.parse("g64"))
    assert layer(torch.randn(3, 128)).dtype == torch.float32


def test_act_clip_and_input_transform_feed_the_contract():
    lin = _linear(32, 128)
    q, _ = torch.linalg.qr(torch.randn(128, 128))
    layer = W4A4Linear.from_linear(lin, Granularity.parse("g64"), act_clip=0.8, input_transform=q)
    x = torch.randn(5, 128)
    xin = clip_activation(x @ q, 64, 0.8)
    want = ref.dequantize(ref.quantize_activation(xin, 64)) @ ref.dequantize(layer.quantized_weight()).t()
    assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-5)
    assert (xin.reshape(5, 2, 64).abs().amax(-1) <= (x @ q).reshape(5, 2, 64).abs().amax(-1) * 0.8 + 1e-6).all()


class _CpuBackend:
    """Stands in for apex4gen.loader's Build: pack once, then linear = the reference op."""

    def __init__(self):
        self.calls = 0

    def pack(self, w, act_bits=4):
        return w, act_bits

    def linear(self, x, packed, bias=None):
        self.calls += 1
        w, act_bits = packed
        return ref.reference_linear(x, w, bias, act_bits)


def test_attached_backend_is_called_and_detach_returns_to_fake_quant():
    layer = W4A4Linear.from_linear(_linear(32, 128, bias=True).half(), Granularity.parse("g64"))
    x = torch.randn(4, 128).half()
    fake = layer(x)
    backend = _CpuBackend()
    layer.attach(backend)
    via_backend = layer(x)
    assert backend.calls == 1
    assert torch.equal(via_backend, ref.reference_linear(x, layer.quantized_weight(), layer.bias))
    assert torch.allclose(via_backend.float(), fake.float(), rtol=2e-3, atol=2e-3)
    layer.attach(None)
    assert torch.equal(layer(x), fake) and backend.calls == 1


def test_state_dict_round_trip():
    layer = W4A4Linear.from_linear(_linear(32, 128), Granularity.parse("channel"))
    other = W4A4Linear(128, 32, 128)
    x = torch.randn(3, 128)
    other(x)  # fills the dequantized-weight cache, which loading must invalidate
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))


def test_granularity_parsing_and_fallback():
    g128, channel = Granularity.parse("g128"), Granularity.parse("channel")
    assert g128.group == 128 and channel.is_channel and g128 < Granularity(256) < channel
    assert (g128.size(576), channel.size(576), channel.template_group) == (128, 576, 0)
    assert effective_granularity(g128, 576) == Granularity(64) and effective_granularity(g128, 1536) == g128
    assert effective_granularity(channel, 576) == channel
    for bad in ("group128", "g0", "g-1", "128"):
        with pytest.raises(SpecError, match="unknown granularity"):
            Granularity.parse(bad)


def test_quantize_input_false_leaves_activations_fp_and_refuses_kernels():
    torch.manual_seed(3)
    lin = nn.Linear(64, 16, bias=False)
    layer = W4A4Linear.from_linear(lin, Granularity.parse("g32"))
    x = torch.randn(5, 64)
    w = ref.dequantize(layer.quantized_weight())
    quantized = layer(x)
    layer.quantize_input = False
    torch.testing.assert_close(layer(x), x @ w.t())
    assert not torch.allclose(quantized, layer(x))
    with pytest.raises(ValueError, match="always quantize"):
        layer.attach(object())


def test_weight_override_multiplies_full_precision_weights_and_refuses_kernels():
    torch.manual_seed(4)
    lin = nn.Linear(64, 16, bias=False)
    layer = W4A4Linear.from_linear(lin, Granularity.parse("g32"))
    x = torch.randn(5, 64)
    layer.weight_override = lin.weight.detach()
    torch.testing.assert_close(layer(x), ref.dequantize(ref.quantize_activation(x, 32)) @ lin.weight.detach().t())
    with pytest.raises(ValueError, match="int4 weights"):
        layer.attach(object())
