"""The group rotation (--group-rotation): one Hadamard per activation group of the residual's readers, over
channels ordered by how strongly the layers read them; exact in full precision, and better than one Hadamard
across the residual where a few massive channels are read lightly."""
import pytest
import torch
from click.testing import CliRunner

from apex4gen.accuracy import QuantConfig, quantize_model
from apex4gen.accuracy.pipeline import residual_rotation
from apex4gen.accuracy.rotation import channel_order, group_rotation, random_orthogonal, rotate_model
from apex4gen.cli import cli
from apex4gen.granularity import Granularity
from apex4gen.nn import fake_quant_activation
from tiny_llama import token_batch, tiny_causal_lm, tiny_llama


def test_group_rotation_is_orthogonal_and_rotates_each_group_of_ordered_channels_alone():
    order = torch.randperm(96, generator=torch.Generator().manual_seed(3))
    q = group_rotation(order, 32, seed=0)
    assert torch.allclose(q @ q.t(), torch.eye(96, dtype=q.dtype), atol=1e-12)
    for j in range(3):  # output group j is a mix of exactly the channels order[32j : 32j + 32]
        rows = q[:, 32 * j:32 * (j + 1)].abs().sum(1).nonzero().flatten()
        assert sorted(rows.tolist()) == sorted(order[32 * j:32 * (j + 1)].tolist())
    assert torch.equal(q, group_rotation(order, 32, seed=0))
    assert not torch.equal(q, group_rotation(order, 32, seed=1))
    with pytest.raises(ValueError, match="does not divide"):
        group_rotation(order, 64, seed=0)


def test_channel_order_puts_heavily_read_channels_first_and_damped_ones_last():
    model = tiny_llama(seed=4)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj):
                lin.weight[:, 7] *= 10.0
            layer.input_layernorm.weight[30] = 0.01  # the way models damp their massive channels
            layer.post_attention_layernorm.weight[30] = 0.01
    order = channel_order(model)
    assert sorted(order.tolist()) == list(range(model.config.hidden_size))
    assert int(order[0]) == 7 and int(order[-1]) == 30


def _relative_output_error(x, w, q, group):
    y = x @ w.t()
    yq = (fake_quant_activation(x @ q, group) @ q.t()) @ w.t()
    return float((yq - y).norm() / y.norm())


def test_massive_lightly_read_channels_cost_less_under_the_group_rotation():
    """The case of the real models (SmolLM2: two residual channels hold about half of the normalised residual's
    energy, and the norm weights damp them): a full Hadamard spreads them into every group's scale, the group
    rotation confines them to one group whose channels are read lightly."""
    gen = torch.Generator().manual_seed(0)
    d, group = 576, 64
    x = torch.randn(256, d, generator=gen)
    x[:, [5, 300]] = 25.0 * torch.randn(256, 2, generator=gen)
    w = torch.randn(128, d, generator=gen) / d ** 0.5
    w[:, [5, 300]] *= 0.02
    w[:, :200] *= 0.3  # channels read less than others: they share the groups of the massive two
    order = torch.argsort(w.double().pow(2).sum(0), descending=True, stable=True)
    full = _relative_output_error(x, w, random_orthogonal(d, 0).float(), group)
    grouped = _relative_output_error(x, w, group_rotation(order, group, 0).float(), group)
    assert grouped < 0.8 * full, (grouped, full)


@torch.no_grad()
@pytest.mark.parametrize("arch,attention_bias", [("llama", False), ("qwen2", True)])
def test_the_group_rotated_model_is_the_same_function(arch, attention_bias):
    model = tiny_causal_lm(arch, tie=True, attention_bias=attention_bias)
    ids = token_batch(2, 40)
    before = model(input_ids=ids).logits
    cfg = QuantConfig.uniform(Granularity.parse("g16"), rotate=True, group_rotation=True)
    q = residual_rotation(model, cfg)
    assert q.shape == (48, 48) and torch.count_nonzero(q) == 48 * 16  # K=48, g16: three 16-channel Hadamards
    rotate_model(model, seed=0, residual=q)
    after = model(input_ids=ids).logits
    assert float((after - before).abs().max()) <= 1e-4 * float(before.abs().max())


@torch.no_grad()
def test_group_rotation_quantizes_every_linear_and_names_itself():
    model = tiny_llama(seed=7)
    ids = token_batch(2, 32, seed=8)
    ref = model(input_ids=ids).logits
    cfg = QuantConfig.uniform(Granularity.parse("g16"), rotate=True, group_rotation=True, gptq=True,
                              clip_acts=True)
    assert cfg.describe() == "g16 + rotation + group-rotation + gptq + clip-a"
    quantize_model(model, cfg, token_batch(4, 32, seed=9))
    logits = model(input_ids=ids).logits
    assert 0 < float((logits - ref).norm() / ref.norm()) < 0.5


def test_group_rotation_without_rotation_is_refused():
    flags = CliRunner().invoke(cli, ["eval", "ppl", "--group-rotation", "--model-path", "nope"])
    methods = CliRunner().invoke(cli, ["eval", "table", "--methods", "gptq+group-rotation"])
    calibrate = CliRunner().invoke(cli, ["calibrate", "--group-rotation", "--model-path", "nope", "-o", "s.yaml"])
    for result, where in ((flags, "--group-rotation"), (methods, "--methods 'gptq+group-rotation'"),
                          (calibrate, "--group-rotation")):
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert f"{where}: group-rotation is a rotation option: add rotation" in result.output


@torch.no_grad()
def test_a_group_rotated_model_round_trips_through_the_checkpoint(tmp_path):
    """The group rotation lives in the folded weights only: the checkpoint stores it as any rotated model."""
    from apex4gen.checkpoint import load_quantized, save_quantized

    model = tiny_llama(seed=4)
    cfg = QuantConfig.uniform(Granularity.parse("g16"), rotate=True, group_rotation=True, clip_acts=True)
    quantize_model(model, cfg, token_batch(4, 32, seed=5))
    loaded = load_quantized(save_quantized(model, tmp_path / "ckpt"))
    ids = token_batch(2, 24, seed=6)
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
