"""The rotation is exact in full precision, and its matrices are orthogonal at SmolLM2's sizes."""
import pytest
import torch

from apex4gen.accuracy.rotation import RotatedInputLinear, hadamard, random_orthogonal, rotate_model
from tiny_llama import token_batch, tiny_llama


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
