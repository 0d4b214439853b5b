"""Checkpoints: compressed-tensors packing, a save/load round trip, and compressed-tensors reading them."""
import json

import pytest
import torch

from safetensors import safe_open
from safetensors.torch import load_file

from apex4gen import reference as ref
from apex4gen.accuracy import QuantConfig, quantize_model
from apex4gen.checkpoint import (ROTATED_QUANT_METHOD, load_quantized, pack_int32, quantized_layers, save_quantized,
                                 unpack_int32)
from apex4gen.granularity import Granularity
from apex4gen.nn import W4A4Linear
from tiny_llama import token_batch, tiny_llama


def _values(rows, k, seed=0):
    return torch.randint(-8, 8, (rows, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.mark.parametrize("k", [64, 576, 20])
def test_pack_int32_round_trip_and_layout(k):
    q = _values(5, k)
    packed = pack_int32(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-k // 8))
    assert torch.equal(unpack_int32(packed, k), q)
    # element 0 in the low nibble of word 0, stored with the +8 offset
    assert int(packed[0, 0]) & 0xF == int(q[0, 0]) + 8


def test_pack_int32_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = _values(7, 576, seed=1)
    assert torch.equal(pack_int32(q), helpers.pack_to_int32(q, 4))
    assert torch.equal(helpers.unpack_from_int32(pack_int32(q), 4, torch.Size([7, 576])).to(torch.int8), q)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model, rotated (online down_proj rotation), activation clipping searched, mixed granularities,
    8-bit activations for o_proj and gate_up_proj (gate_up at g16 like qkv: one granularity, two config groups)."""
    model = tiny_llama(seed=4)
    grans = {"qkv_proj": "g16", "o_proj": "channel", "gate_up_proj": "g16", "down_proj": "g32"}
    cfg = QuantConfig(granularity={kind: Granularity.parse(g) for kind, g in grans.items()}, rotate=True,
                      clip_acts=True, act_bits={"o_proj": 8, "gate_up_proj": 8})
    quantize_model(model, cfg, token_batch(4, 32, seed=5))
    out = save_quantized(model, tmp_path_factory.mktemp("ckpt"))
    return model, out


@torch.no_grad()
def test_round_trip_gives_the_same_model(saved):
    model, out = saved
    loaded = load_quantized(out)
    ids = token_batch(2, 24, seed=6)
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    for name, layer in quantized_layers(model).items():
        other = loaded.get_submodule(name)
        assert isinstance(other, W4A4Linear) and other.act_clip == layer.act_clip
        assert other.act_bits == layer.act_bits == (8 if name.endswith(("o_proj", "gate_proj", "up_proj")) else 4)
        assert torch.equal(other.qweight, layer.qweight) and torch.equal(other.weight_scale, layer.weight_scale)
    generated = loaded.generate(ids[:1, :8], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 13)


def test_online_rotation_is_stored_once(saved):
    _, out = saved
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if k.startswith("apex4gen.input_transform")]
    assert keys == ["apex4gen.input_transform.0"]


def test_compressed_tensors_reads_our_weights(saved):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model, out = saved
    config = json.loads((out / "config.json").read_text())
    qconfig = QuantizationConfig.model_validate(config["quantization_config"])
    assert qconfig.format == "pack-quantized" and qconfig.quant_method == ROTATED_QUANT_METHOD
    tensors = load_file(str(out / "model.safetensors"))
    layers = quantized_layers(model)
    seen = set()
    for scheme in qconfig.config_groups.values():
        assert scheme.weights.num_bits == 4 and scheme.weights.symmetric
        assert scheme.input_activations.dynamic
        assert {scheme.input_activations.num_bits} == {layers[name].act_bits for name in scheme.targets}
        for name in scheme.targets:
            state = {k: tensors[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
            weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
            ours = ref.dequantize(layers[name].quantized_weight())
            # compressed-tensors multiplies in the scale dtype (fp16): one rounding away from our fp32 product
            assert torch.allclose(weight.float(), ours, rtol=2 ** -10, atol=0), name
            seen.add(name)
    assert seen == set(layers)
    bits = sorted(s.input_activations.num_bits for s in qconfig.config_groups.values())
    assert bits.count(8) == 2 and bits.count(4) == 2  # (channel, 8): o; (g16, 8): gate/up; (g16, 4): qkv; (g32, 4)


def test_only_a_rotated_checkpoint_names_apex4gen(saved, tmp_path):
    """An engine that reads the rotated checkpoint as compressed-tensors would skip the online rotation, so
    its quant_method is apex4gen's; without a rotation it stays compressed-tensors."""
    _, out = saved
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == ROTATED_QUANT_METHOD and qconfig["apex4gen"]["input_transform"]
    model = tiny_llama(seed=2)
    quantize_model(model, QuantConfig.uniform(Granularity.parse("g16")))
    plain = json.loads((save_quantized(model, tmp_path / "plain") / "config.json").read_text())
    assert plain["quantization_config"]["quant_method"] == "compressed-tensors"
    assert plain["quantization_config"]["apex4gen"] == {"act_clip": {}, "input_transform": {}}


@torch.no_grad()
def test_checkpoint_with_the_apex4gen_entry_at_the_top_level_loads(saved, tmp_path):
    """The layout written before the entry moved into quantization_config: the rotation is not lost."""
    import shutil

    model, out = saved
    old = tmp_path / "old"
    shutil.copytree(out, old)
    config = json.loads((old / "config.json").read_text())
    config["apex4gen"] = config["quantization_config"].pop("apex4gen")
    config["quantization_config"]["quant_method"] = "compressed-tensors"
    (old / "config.json").write_text(json.dumps(config))
    ids = token_batch(2, 16, seed=7)
    assert torch.equal(load_quantized(old)(input_ids=ids).logits, model(input_ids=ids).logits)
