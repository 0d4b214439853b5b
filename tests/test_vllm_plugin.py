"""The vLLM plugin against the real vLLM 0.33.0 package, on its CPU backend (no kernels: the fake-quant path).

Checkpoints are written by ``apex4gen quantize`` from a one-layer LLaMA of SmolLM2-135M's real dimensions
(hidden 576, FFN 1536, 9 heads, 3 KV heads; K = 576 takes g64 for g128, as in the accuracy table). vLLM's own
layer classes (QKVParallelLinear, MergedColumnParallelLinear, RowParallelLinear) are built with the plugin's
config, loaded through their weight loaders the way vLLM's Llama ``load_weights`` calls them, and run through
their forward; the outputs are compared with the fake-quant model ``apex4gen.checkpoint.load_quantized`` makes.
Skipped when vLLM is not installed (README: `pip install --no-deps vllm==0.33.0`; CI installs it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # read when vLLM first resolves its platform
pytest.importorskip("vllm")

from click.testing import CliRunner  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from apex4gen import manifest  # noqa: E402
from apex4gen import reference as ref  # noqa: E402
from apex4gen.accuracy.rotation import set_fast_online_rotation  # noqa: E402
from apex4gen.checkpoint import load_quantized  # noqa: E402
from apex4gen.cli import cli  # noqa: E402
from apex4gen.granularity import CHANNEL, Granularity  # noqa: E402
from apex4gen.vllm_plugin import core  # noqa: E402
from test_loader import _manifest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 9, 3, 64
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
ATTN, MLP = "model.layers.0.self_attn", "model.layers.0.mlp"


def _model_dir(root: Path) -> Path:
    """A one-layer random LLaMA with SmolLM2-135M's dimensions and a word-level tokenizer, saved as a
    transformers directory (what `apex4gen quantize --model-path` reads)."""
    import transformers
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                                   max_position_embeddings=128, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.rand_like(p))
    out = root / "fp"
    model.save_pretrained(out)
    vocab = {f"w{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``apex4gen quantize`` outputs: g128, per-channel, and g128 with the rotation (online Hadamard)."""
    root = tmp_path_factory.mktemp("vllm")
    fp = _model_dir(root)
    out = {}
    for name, flags in {"g128": ["--granularity", "g128"], "channel": ["--granularity", "channel"],
                        "rotated": ["--granularity", "g128", "--rotate"],
                        "act8": ["--granularity", "g128", "--act8", "qkv_proj,down_proj"]}.items():
        out[name] = root / name
        result = CliRunner().invoke(cli, ["quantize", "--model-path", str(fp), *flags, "-o", str(out[name])])
        assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def vllm_env():
    """vLLM's config context and a one-process (gloo) tensor-parallel group, as a CPU worker has."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    from apex4gen.vllm_plugin import register

    register()
    with set_current_vllm_config(VllmConfig()), tempfile.TemporaryDirectory() as tmp:
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{tmp}/init")
        initialize_model_parallel(1)
        try:
            yield
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


def _quant_config(ckpt: Path):
    """What vLLM does with the checkpoint: the registered class, from_config, maybe_update_config."""
    from vllm.model_executor.layers.quantization import get_quantization_config

    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    config = get_quantization_config("apex4gen").from_config(qcfg)
    config.maybe_update_config(str(ckpt))
    config.packed_modules_mapping = dict(PACKED)  # LlamaForCausalLM's, set by vLLM when it builds the model
    return config


@contextlib.contextmanager
def _tensor_parallel(rank: int, size: int):
    """Build layers as rank ``rank`` of ``size`` would (vLLM reads both when it builds a layer)."""
    with mock.patch("vllm.model_executor.layers.linear.get_tensor_model_parallel_rank", return_value=rank), \
            mock.patch("vllm.model_executor.layers.linear.get_tensor_model_parallel_world_size", return_value=size):
        yield


def _layers(config, tp: tuple[int, int] = (0, 1), only: tuple[str, ...] | None = None) -> dict[str, torch.nn.Module]:
    """vLLM's layers of one LLaMA decoder layer (``only``: those named), as tensor-parallel rank ``tp``."""
    from vllm.model_executor.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                                   RowParallelLinear)

    kw = {"bias": False, "quant_config": config, "params_dtype": torch.float16}
    makers = {
        "qkv_proj": lambda: QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, prefix=f"{ATTN}.qkv_proj", **kw),
        "o_proj": lambda: RowParallelLinear(HEADS * HEAD_DIM, HIDDEN, prefix=f"{ATTN}.o_proj", **kw),
        "gate_up_proj": lambda: MergedColumnParallelLinear(HIDDEN, [FFN, FFN], prefix=f"{MLP}.gate_up_proj", **kw),
        "down_proj": lambda: RowParallelLinear(FFN, HIDDEN, prefix=f"{MLP}.down_proj", **kw),
    }
    with _tensor_parallel(*tp):
        return {name: make() for name, make in makers.items() if only is None or name in only}


# checkpoint module -> (vLLM layer, shard id), as LlamaForCausalLM.load_weights' stacked_params_mapping says
SHARDS = {f"{ATTN}.q_proj": ("qkv_proj", "q"), f"{ATTN}.k_proj": ("qkv_proj", "k"),
          f"{ATTN}.v_proj": ("qkv_proj", "v"), f"{ATTN}.o_proj": ("o_proj", None),
          f"{MLP}.gate_proj": ("gate_up_proj", 0), f"{MLP}.up_proj": ("gate_up_proj", 1),
          f"{MLP}.down_proj": ("down_proj", None)}


def _load(layers: dict[str, torch.nn.Module], ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    for module, (layer_name, shard) in SHARDS.items():
        if layer_name not in layers:
            continue
        layer = layers[layer_name]
        params = dict(layer.named_parameters())
        for suffix in ("weight_packed", "weight_scale", "weight_shape"):
            param = params[suffix]
            args = () if shard is None else (shard,)
            param.weight_loader(param, tensors[f"{module}.{suffix}"], *args)
    for layer in layers.values():
        layer.quant_method.process_weights_after_loading(layer)


def _fake_quant_outputs(ckpt: Path, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fake-quant model's projections on the same inputs, fused the way vLLM fuses them."""
    model = set_fast_online_rotation(load_quantized(ckpt))  # the online Hadamard as the fast transform
    block = model.model.layers[0]
    att, mlp = block.self_attn, block.mlp
    with torch.no_grad():
        return {
            "qkv_proj": torch.cat([m(inputs["qkv_proj"]) for m in (att.q_proj, att.k_proj, att.v_proj)], -1),
            "o_proj": att.o_proj(inputs["o_proj"]),
            "gate_up_proj": torch.cat([m(inputs["gate_up_proj"]) for m in (mlp.gate_proj, mlp.up_proj)], -1),
            "down_proj": mlp.down_proj(inputs["down_proj"]),
        }


def _inputs(layers, tokens: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {name: torch.randn(tokens, layer.input_size, generator=gen).to(torch.float16)
            for name, layer in layers.items()}


def test_entry_point_is_found_by_vllms_plugin_loader(tmp_path):
    """Installed from pyproject.toml, the package's vllm.general_plugins entry point is what vLLM loads."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True)
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from vllm.model_executor.layers.quantization import get_quantization_config; "
            "cls = get_quantization_config('apex4gen'); import sys; print(cls.__module__, sys.modules[cls.__module__].__file__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *sys.path]), "VLLM_PLUGINS": "apex4gen"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    module, path = out.stdout.split()[-2:]
    assert module == "apex4gen.vllm_plugin.config" and path.startswith(str(target))


@pytest.mark.parametrize("kind", ["g128", "channel", "rotated"])
def test_config_from_the_checkpoint(vllm_env, checkpoints, kind):
    config = _quant_config(checkpoints[kind])
    assert len(config.layers) == 7
    g64, g128 = Granularity(64), Granularity(128)
    expected = {"g128": (g64, g128), "channel": (CHANNEL, CHANNEL), "rotated": (g64, g128)}[kind]
    assert config.layers[f"{ATTN}.q_proj"].granularity == expected[0]  # K = 576: g128 falls back to g64
    assert config.layers[f"{MLP}.down_proj"].granularity == expected[1]
    rotation = config.layers[f"{MLP}.down_proj"].rotation
    assert (rotation is not None) == (kind == "rotated")
    assert all(s.rotation is None for name, s in config.layers.items() if not name.endswith("down_proj"))


def test_quantization_argument_overrides_compressed_tensors(vllm_env, checkpoints):
    from vllm.model_executor.layers.quantization import get_quantization_config

    cls = get_quantization_config("apex4gen")
    plain = json.loads((checkpoints["g128"] / "config.json").read_text())["quantization_config"]
    assert plain["quant_method"] == "compressed-tensors"
    assert cls.override_quantization_method(plain, "apex4gen") == "apex4gen"
    assert cls.override_quantization_method(plain, None) is None  # stock compressed-tensors stays the default
    rotated = json.loads((checkpoints["rotated"] / "config.json").read_text())["quantization_config"]
    assert rotated["quant_method"] == "apex4gen"  # no override needed: the checkpoint names the method


@pytest.mark.parametrize("kind", ["g128", "channel", "rotated", "act8"])
def test_vllm_layers_load_the_checkpoint_and_match_fake_quant(vllm_env, checkpoints, kind):
    config = _quant_config(checkpoints[kind])
    # the act8 checkpoint's 8-bit layers (input_activations.num_bits 8): the expected outputs below are the
    # fake-quant model's at 8 bits, which 4-bit activations would miss by far more than the tolerance
    eight = {name.rpartition(".")[2] for name, s in config.layers.items() if s.act_bits == 8}
    assert eight == ({"q_proj", "k_proj", "v_proj", "down_proj"} if kind == "act8" else set())
    layers = _layers(config)
    assert {type(layer.quant_method).__name__ for layer in layers.values()} == {"Apex4genLinearMethod"}
    _load(layers, checkpoints[kind])
    inputs = _inputs(layers)
    expected = _fake_quant_outputs(checkpoints[kind], inputs)
    for name, layer in layers.items():
        with torch.no_grad():
            got = layer(inputs[name])[0]  # vLLM's forward -> the plugin's apply
        # the same fp32 arithmetic; the fused GEMM may sum K in another order, one fp16 rounding apart
        torch.testing.assert_close(got, expected[name], rtol=2 ** -10, atol=1e-3, msg=f"{kind} {name}")


@pytest.mark.parametrize("kind", ["g128", "rotated"])
def test_vllms_model_loader_loads_the_whole_model(vllm_env, checkpoints, kind):
    """vLLM's LlamaForCausalLM built from the checkpoint's config and loaded by vLLM's DefaultModelLoader
    (weight names, fused shards, the stored rotation dropped from the weight stream), then processed: its
    projections match the fake-quant model's."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.models.llama import LlamaForCausalLM

    extra = {} if kind == "rotated" else {"quantization": "apex4gen"}
    model_config = ModelConfig(model=str(checkpoints[kind]), dtype="float16", **extra)
    vllm_config = VllmConfig(model_config=model_config)
    with set_current_vllm_config(vllm_config):
        model = LlamaForCausalLM(vllm_config=vllm_config)
        DefaultModelLoader(vllm_config.load_config).load_weights(model, model_config)
        process_weights_after_loading(model, model_config, torch.device("cpu"))
    block = model.model.layers[0]
    layers = {"qkv_proj": block.self_attn.qkv_proj, "o_proj": block.self_attn.o_proj,
              "gate_up_proj": block.mlp.gate_up_proj, "down_proj": block.mlp.down_proj}
    assert (block.mlp.down_proj.quant_method.prepared.rotation is not None) == (kind == "rotated")
    inputs = _inputs(layers)
    expected = _fake_quant_outputs(checkpoints[kind], inputs)
    for name, layer in layers.items():
        with torch.no_grad():
            torch.testing.assert_close(layer(inputs[name])[0], expected[name], rtol=2 ** -10, atol=1e-3,
                                       msg=f"{kind} {name}")


def test_rotated_down_proj_applies_the_online_rotation(vllm_env, checkpoints):
    """Without the rotation the rotated checkpoint's down_proj is far off: the test above would notice it."""
    config = _quant_config(checkpoints["rotated"])
    layers = _layers(config)
    _load(layers, checkpoints["rotated"])
    down = layers["down_proj"]
    x = _inputs(layers)["down_proj"]
    prepared = down.quant_method.prepared
    assert prepared.rotation is not None
    without = core.forward(down, dataclasses.replace(prepared, rotation=None), x, None)
    with torch.no_grad():
        rotated = down(x)[0]
    assert float((rotated - without).norm() / rotated.norm()) > 0.5


def test_tensor_parallel_partitions_load_their_slices(vllm_env, checkpoints):
    """TP=2 for the row-parallel down_proj (K 1536 -> 768: six g128 groups each) and TP=3 for the q/k/v
    layer (3 query heads and one KV head each): each rank computes the fake-quant product of its slice."""
    ckpt = checkpoints["g128"]
    config = _quant_config(ckpt)
    fake = load_quantized(ckpt).model.layers[0]
    gen = torch.Generator().manual_seed(5)
    x_down = torch.randn(4, FFN, generator=gen).to(torch.float16)
    w_down = ref.dequantize(fake.mlp.down_proj.quantized_weight())
    for rank in range(2):
        layers = _layers(config, tp=(rank, 2), only=("down_proj",))
        _load(layers, ckpt)
        part = slice(rank * FFN // 2, (rank + 1) * FFN // 2)
        got = layers["down_proj"].quant_method.apply(layers["down_proj"], x_down[:, part])
        want = core.fake_quant_linear(x_down[:, part], w_down[:, part], 128, None)
        torch.testing.assert_close(got, want, rtol=2 ** -10, atol=1e-3)
    x_qkv = torch.randn(4, HIDDEN, generator=gen).to(torch.float16)
    rank, q_rows, kv_rows = 1, HEADS // 3 * HEAD_DIM, HEAD_DIM
    layers = _layers(config, tp=(rank, 3), only=("qkv_proj",))
    _load(layers, ckpt)
    got = layers["qkv_proj"].quant_method.apply(layers["qkv_proj"], x_qkv)
    att = fake.self_attn
    rows = [ref.dequantize(att.q_proj.quantized_weight())[rank * q_rows:(rank + 1) * q_rows],
            ref.dequantize(att.k_proj.quantized_weight())[rank * kv_rows:(rank + 1) * kv_rows],
            ref.dequantize(att.v_proj.quantized_weight())[rank * kv_rows:(rank + 1) * kv_rows]]
    want = core.fake_quant_linear(x_qkv, torch.cat(rows), 64, None)
    torch.testing.assert_close(got, want, rtol=2 ** -10, atol=1e-3)


@pytest.mark.parametrize(("kind", "layer", "tp", "message"), [
    ("g128", "o_proj", 2, "splits a g64 group"),            # K = 576 -> 288 per GPU: 4.5 groups of 64
    ("channel", "down_proj", 2, "splits a per-channel"),    # one group spanning K
    ("rotated", "down_proj", 2, "tensor-parallel size 1"),  # whole groups, but the Hadamard mixes all of K
])
def test_tensor_parallel_size_that_splits_a_group_is_refused(vllm_env, checkpoints, kind, layer, tp, message):
    config = _quant_config(checkpoints[kind])
    with pytest.raises(ValueError, match=message) as err:
        _layers(config, tp=(0, tp), only=(layer,))
    assert "\n" not in str(err.value)


def test_stock_vllm_refuses_a_rotated_checkpoint(checkpoints):
    """Without the plugin, vLLM's own config parsing stops at the rotated checkpoint's quant_method (it would
    otherwise read it as compressed-tensors and skip the rotation); the unrotated one parses as
    compressed-tensors' W4A4 int scheme."""
    code = ("import sys; from vllm.config import ModelConfig\n"
            "try:\n    ModelConfig(model=sys.argv[1], dtype='float16')\n"
            "except Exception as err:\n    print('REFUSED', type(err).__name__, ' '.join(str(err).split()))\n"
            "else:\n    print('ACCEPTED')\n")
    env = {**os.environ, "VLLM_PLUGINS": "", "PYTHONPATH": os.pathsep.join(sys.path)}
    outputs = {}
    for kind in ("rotated", "g128"):
        run = subprocess.run([sys.executable, "-c", code, str(checkpoints[kind])], env=env, capture_output=True,
                             text=True, cwd=checkpoints[kind].parent)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs[kind] = run.stdout.strip().splitlines()[-1]
    assert outputs["rotated"].startswith("REFUSED") and "Unknown quantization method: apex4gen" in outputs["rotated"]
    assert outputs["g128"] == "ACCEPTED", outputs


def test_vllm_model_config_takes_the_plugin(vllm_env, checkpoints):
    """vLLM's own config resolution, with the plugin registered: a rotated checkpoint names it; a plain one
    stays compressed-tensors unless `--quantization apex4gen` asks for the plugin (no mismatch error)."""
    from vllm.config import ModelConfig

    def method(kind: str, **kw) -> str:
        return ModelConfig(model=str(checkpoints[kind]), dtype="float16", **kw).quantization

    assert method("rotated") == "apex4gen"
    assert method("g128", quantization="apex4gen") == "apex4gen"
    assert method("g128") == "compressed-tensors"


def test_weight_stream_drops_the_stored_rotation(vllm_env, checkpoints):
    """The rotation's one tensor has no module in vLLM's model (its loader would stop at it); the layers read
    it from the checkpoint file instead."""
    config = _quant_config(checkpoints["rotated"])
    mapper = config.get_checkpoint_weight_mapper()
    assert mapper.map_name("apex4gen.input_transform.0") is None
    assert mapper.map_name(f"{MLP}.down_proj.weight_packed") == f"{MLP}.down_proj.weight_packed"


def test_fused_shards_with_different_schemes_are_refused(vllm_env, checkpoints):
    config = _quant_config(checkpoints["g128"])
    q = config.layers[f"{ATTN}.q_proj"]
    config.layers[f"{ATTN}.k_proj"] = core.LayerScheme(CHANNEL, q.act_clip, q.rotation)
    with pytest.raises(ValueError, match="one quantization scheme"):
        _layers(config, only=("qkv_proj",))


def test_build_location(vllm_env, tmp_path, monkeypatch):
    from vllm.model_executor.layers.quantization import get_quantization_config

    cls = get_quantization_config("apex4gen")
    qcfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}}
    monkeypatch.setenv(core.BUILD_ENV, str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="APEX4GEN_BUILD=.*unreadable.*apex4gen build") as err:
        cls.from_config(qcfg)
    assert "\n" not in str(err.value)
    (tmp_path / "plan.yaml").write_text("plan\n")
    (tmp_path / manifest.NAME).write_text(_manifest(manifest.plan_sha256("plan\n")).to_json())  # an sm_90a build
    monkeypatch.setenv(core.BUILD_ENV, str(tmp_path))
    assert cls.get_min_capability() == 90
    monkeypatch.delenv(core.BUILD_ENV)
    assert cls.get_min_capability() == 0  # CPU: fake-quant, any device


def test_non_w4a4_config_group_is_refused(vllm_env, checkpoints):
    from vllm.model_executor.layers.quantization import get_quantization_config

    qcfg = json.loads((checkpoints["g128"] / "config.json").read_text())["quantization_config"]
    acts = next(iter(qcfg["config_groups"].values()))["input_activations"]
    acts["num_bits"] = 6
    with pytest.raises(ValueError, match="not apex4gen's W4A4 scheme"):
        get_quantization_config("apex4gen").from_config(qcfg)
