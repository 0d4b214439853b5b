"""Quantized checkpoints in compressed-tensors' ``pack-quantized`` layout, so other engines can read them.

Per quantized linear ``<name>``:

* ``<name>.weight_packed``: int32 [N, ceil(K/8)], eight int4 values a word, each stored as ``q + 8`` in
  4 bits, element 8j+i in bits 4i..4i+3 (low nibble first);
* ``<name>.weight_scale``: [N, K/group] in the scale dtype (fp16/bf16); ``<name>.weight_shape``: [N, K];
* ``<name>.bias`` if any.

``config.json`` is the model's config plus ``quantization_config`` (``quant_method: compressed-tensors``,
``format: pack-quantized``, one config group per (granularity, activation precision) with an explicit scheme:
weights int4 symmetric group/channel, input activations int4 (or, for a plan's 8-bit layers, int8:
``input_activations.num_bits``) symmetric dynamic group/token) holding an ``apex4gen`` entry
for what compressed-tensors has no field for: per-layer activation clipping ratios and the online rotation of
down_proj's input (its matrix is stored once as ``apex4gen.input_transform.<i>``).
Everything else (embeddings, norms, lm_head) is stored as is.

A checkpoint with an online rotation says ``quant_method: apex4gen`` instead: an engine that reads it as
plain compressed-tensors would load the weights and skip the rotation (wrong outputs, no error), so engines
that do not know apex4gen refuse it; the vLLM plugin (``apex4gen.vllm_plugin``) serves it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import reference
from .errors import SpecError
from .nn import W4A4Linear

WEIGHTS_FILE = "model.safetensors"
ROTATED_QUANT_METHOD = "apex4gen"  # quant_method of a checkpoint with an online rotation (module docstring)
_PER_WORD = 8  # int4 values in one int32


def pack_int32(q: torch.Tensor) -> torch.Tensor:
    """int values -8..7 [rows, K] -> int32 [rows, ceil(K/8)] (compressed-tensors' pack_to_int32, 4 bits)."""
    rows, k = q.shape
    words = -(-k // _PER_WORD)
    u = torch.zeros(rows, words * _PER_WORD, dtype=torch.int64)
    u[:, :k] = q.to(torch.int64) + 8
    shifts = torch.arange(_PER_WORD, dtype=torch.int64) * 4
    packed = (u.reshape(rows, words, _PER_WORD) << shifts).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)  # two's complement wrap


def unpack_int32(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int8 [rows, k]."""
    shifts = torch.arange(_PER_WORD, dtype=torch.int64) * 4
    u = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    return (u.reshape(packed.shape[0], -1)[:, :k] - 8).to(torch.int8)


def _weight_args(layer: W4A4Linear) -> dict:
    if layer.granularity.is_channel:
        return {"strategy": "channel", "group_size": None}
    return {"strategy": "group", "group_size": layer.group}


def _scheme(layer: W4A4Linear, targets: list[str]) -> dict:
    common = {"type": "int", "symmetric": True}
    acts = {"strategy": "token", "group_size": None} if layer.granularity.is_channel else \
        {"strategy": "group", "group_size": layer.group}
    return {
        "targets": targets,
        "weights": {"num_bits": 4, **common, **_weight_args(layer), "dynamic": False, "observer": "minmax"},
        "input_activations": {"num_bits": layer.act_bits, **common, **acts, "dynamic": True, "observer": None},
        "output_activations": None,
        "format": "pack-quantized",
    }


def quantization_config(layers: dict[str, W4A4Linear]) -> dict:
    """The ``quantization_config`` entry: one config group per (granularity, activation precision), targets by
    module name."""
    by_scheme: dict[tuple[str, int], list[str]] = {}
    for name, layer in layers.items():
        by_scheme.setdefault((layer.granularity.name, layer.act_bits), []).append(name)
    groups = {f"group_{i}": _scheme(layers[names[0]], names)
              for i, (_, names) in enumerate(sorted(by_scheme.items()))}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }


def extras(config: dict) -> dict:
    """The ``apex4gen`` entry of a checkpoint's config.json: ``{"act_clip": {name: ratio},
    "input_transform": {name: tensor key}}``. Checkpoints written before the entry moved into
    quantization_config keep it at the top level."""
    entry = (config.get("quantization_config") or {}).get("apex4gen") or config.get("apex4gen")
    return entry or {"act_clip": {}, "input_transform": {}}


def quantized_layers(model: nn.Module) -> dict[str, W4A4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, W4A4Linear)}


def save_quantized(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write ``config.json``, ``model.safetensors`` (and the tokenizer) of a model with W4A4Linear layers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = quantized_layers(model)
    if not layers:
        raise SpecError("the model has no W4A4Linear layer: quantize it first")
    tensors, transforms, clips = {}, {}, {}
    transform_keys: dict[int, str] = {}
    for name, layer in layers.items():
        tensors.update(_layer_tensors(name, layer))
        if layer.input_transform is not None:
            ptr = layer.input_transform.data_ptr()
            key = transform_keys.setdefault(ptr, f"apex4gen.input_transform.{len(transform_keys)}")
            tensors.setdefault(key, layer.input_transform.contiguous())
            transforms[name] = key
        if layer.act_clip < 1.0:
            clips[name] = layer.act_clip
    tensors.update(_plain_tensors(model, layers))
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    config = model.config.to_dict()
    qconfig = quantization_config(layers)
    qconfig["apex4gen"] = {"act_clip": clips, "input_transform": transforms}
    if transforms:
        qconfig["quant_method"] = ROTATED_QUANT_METHOD
    config["quantization_config"] = qconfig
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _layer_tensors(name: str, layer: W4A4Linear) -> dict[str, torch.Tensor]:
    w = layer.quantized_weight()
    out = {
        f"{name}.weight_packed": pack_int32(w.q),
        f"{name}.weight_scale": w.scales.contiguous(),
        f"{name}.weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.contiguous()
    return out


def _plain_tensors(model: nn.Module, layers: dict[str, W4A4Linear]) -> dict[str, torch.Tensor]:
    """Every other parameter/buffer; a tied lm_head is stored once (as the embeddings)."""
    prefixes = tuple(f"{name}." for name in layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefixes) or (tied and key == "lm_head.weight"):
            continue
        out[key] = value.detach().contiguous()
    return out


def load_quantized(ckpt_dir: str | Path) -> nn.Module:
    """A transformers causal LM with W4A4Linear layers (fake-quant path) from :func:`save_quantized`'s files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(ckpt_dir)
    if not (root / "config.json").is_file() or not (root / WEIGHTS_FILE).is_file():
        raise SpecError(f"{root} is not an apex4gen checkpoint (config.json and {WEIGHTS_FILE} expected)")
    config = json.loads((root / "config.json").read_text())
    extra = extras(config)
    qconfig = config.pop("quantization_config", None)
    config.pop("apex4gen", None)
    if not qconfig or qconfig.get("format") != "pack-quantized":
        raise SpecError(f"{root}/config.json has no pack-quantized quantization_config")
    model_type = config.pop("model_type")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    tensors = load_file(str(root / WEIGHTS_FILE))
    names = []
    for scheme in qconfig["config_groups"].values():
        for name in scheme["targets"]:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, _load_layer(tensors, name, scheme, extra))
            names.append(name)
    prefixes = tuple(f"{name}." for name in names) + ("apex4gen.",)
    plain = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    tied = bool(model.config.tie_word_embeddings)
    missing = [k for k in missing if not k.startswith(prefixes) and not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise SpecError(f"{root}: checkpoint does not match the model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    return model.eval()


def act_bits_of(scheme: dict, where: str) -> int:
    """A config group's activation precision (``input_activations.num_bits``): 4 or 8."""
    bits = (scheme.get("input_activations") or {}).get("num_bits", 4)
    if bits not in reference.ACT_BITS:
        raise SpecError(f"{where}: input_activations.num_bits is {bits}; apex4gen quantizes activations to "
                        f"{' or '.join(map(str, reference.ACT_BITS))} bits")
    return bits


def _load_layer(tensors: dict, name: str, scheme: dict, extra: dict) -> W4A4Linear:
    n, k = (int(v) for v in tensors[f"{name}.weight_shape"])
    group = scheme["weights"]["group_size"] or k
    q = unpack_int32(tensors[f"{name}.weight_packed"], k)
    w = reference.QuantizedTensor(q=q, scales=tensors[f"{name}.weight_scale"], group=group)
    key = extra["input_transform"].get(name)
    return W4A4Linear.from_quantized(w, tensors.get(f"{name}.bias"), act_clip=extra["act_clip"].get(name, 1.0),
                                     input_transform=tensors[key] if key else None,
                                     act_bits=act_bits_of(scheme, name))
