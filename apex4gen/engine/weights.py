"""What the decoder is made of, as frozen records: from an ``apex4gen quantize`` checkpoint or random at a model's
real shapes.

q/k/v and gate/up are fused here, once, at load: their weights (int4 values and scales, or FP rows) are
concatenated along N, so the model runs one GEMM each, as a fused plan built it. Layers are produced one at a
time (:meth:`ModelWeights.layer`), so a model is packed for the kernels layer by layer and never holds a second
copy of its weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import reference
from ..errors import SpecError
from . import hadamard
from .config import DecoderConfig, from_hf

KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_PARTS = {"qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "o_proj": ("self_attn.o_proj",),
          "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
          "down_proj": ("mlp.down_proj",)}
INIT_STD = 0.02  # transformers' initializer_range for LLaMA: random models keep activations in range


@dataclass(frozen=True)
class Projection:
    """One GEMM's weight [N, K]: int4 (:class:`reference.QuantizedTensor`) or a plain 16-bit tensor."""

    weight: torch.Tensor | reference.QuantizedTensor
    bias: torch.Tensor | None = None
    act_clip: float = 1.0  # < 1: each (token, group) of the input is clamped to this fraction of its absmax
    act_bits: int = 4      # the input's precision (a plan's 8-bit layers: input_activations.num_bits 8)

    @property
    def quantized(self) -> bool:
        return isinstance(self.weight, reference.QuantizedTensor)


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    projections: dict  # kind (KINDS) -> Projection
    online: hadamard.OnlineHadamard | None  # applied to down_proj's input


@dataclass(frozen=True)
class ModelWeights:
    config: DecoderConfig
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    make_layer: Callable[[int], LayerWeights]

    def layer(self, index: int) -> LayerWeights:
        return self.make_layer(index)


# ---------------------------------------------------------------------------------------------- random


def random_weights(config: DecoderConfig, groups: dict | None, device: torch.device | str,
                   seed: int = 0, act_bits: dict | None = None) -> ModelWeights:
    """Random weights at ``config``'s shapes (normal with transformers' LLaMA std; norms near 1): 16-bit with
    ``groups=None`` (the baseline), else that same model quantized to W4A4 with ``groups`` (kind -> group size,
    the build's plan) and rotated as a checkpoint of ``apex4gen quantize --rotate`` is where it matters for run
    time: an online Hadamard ``T`` before down_proj, down_proj's weight ``W T``. Layer ``i`` is the same for any
    order of calls (its own seed). ``act_bits`` (kind -> 4 or 8, the plan's; default 4) is each projection's
    input precision."""
    device = torch.device(device)
    dtype = config.dtype
    online = None if groups is None else hadamard.for_size(config.intermediate_size, seed).to(device)
    shapes = {"qkv_proj": (config.q_dim + 2 * config.kv_dim, config.hidden_size),
              "o_proj": (config.hidden_size, config.q_dim),
              "gate_up_proj": (2 * config.intermediate_size, config.hidden_size),
              "down_proj": (config.hidden_size, config.intermediate_size)}

    def projection(kind: str, gen: torch.Generator) -> Projection:
        w = torch.randn(*shapes[kind], generator=gen, device=device, dtype=dtype) * INIT_STD
        if groups is None:
            return Projection(w)
        if kind == "down_proj":
            w = online(w)  # rows times T: the model computes (x T)(W T)^T = x W^T
        bits = (act_bits or {}).get(kind, 4)
        return Projection(reference.quantize_weight(w, groups[kind]), act_bits=bits)  # scales: 16-bit, fp16 for fp32

    def norm_weight(gen: torch.Generator) -> torch.Tensor:
        return 1.0 + 0.1 * torch.rand(config.hidden_size, generator=gen, device=device, dtype=dtype)

    def make_layer(index: int) -> LayerWeights:
        gen = torch.Generator(device=device).manual_seed(seed * 100_003 + index + 1)
        norms = norm_weight(gen), norm_weight(gen)
        return LayerWeights(*norms, {kind: projection(kind, gen) for kind in KINDS}, online)

    gen = torch.Generator(device=device).manual_seed(seed * 100_003)
    embed = torch.randn(config.vocab_size, config.hidden_size, generator=gen, device=device, dtype=dtype) * INIT_STD
    head = torch.randn(config.vocab_size, config.hidden_size, generator=gen, device=device, dtype=dtype) * INIT_STD
    return ModelWeights(config, embed, norm_weight(gen), head, make_layer)


# ---------------------------------------------------------------------------------------------- checkpoint


def _read_config(path: Path) -> dict:
    """config.json as an object; a file cut short or hand-edited is refused in one line."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SpecError(f"{path} is not valid JSON ({err}); write the checkpoint again with "
                        "`apex4gen quantize`") from None
    if not isinstance(config, dict):
        raise SpecError(f"{path} is not a model config (a JSON object); write the checkpoint again with "
                        "`apex4gen quantize`")
    return config


def _read_tensors(path: Path, load_file) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise SpecError(f"{path} is not a readable safetensors file ({err}); write the checkpoint again with "
                        "`apex4gen quantize`") from None


def load_checkpoint(ckpt_dir: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> ModelWeights:
    """An ``apex4gen quantize`` checkpoint (compressed-tensors pack-quantized, see :mod:`apex4gen.checkpoint`):
    every decoder projection must be quantized; embeddings, norms and lm_head stay in ``dtype``: by default the
    weight scales' 16-bit dtype, which the kernels compute in (the fake-quant path also runs float32)."""
    from safetensors.torch import load_file

    from ..checkpoint import WEIGHTS_FILE, act_bits_of, extras, unpack_int32

    root = Path(ckpt_dir)
    if not (root / "config.json").is_file() or not (root / WEIGHTS_FILE).is_file():
        raise SpecError(f"{root} is not an apex4gen checkpoint (config.json and {WEIGHTS_FILE} expected); "
                        "write one with `apex4gen quantize`")
    hf = _read_config(root / "config.json")
    qconfig = hf.get("quantization_config") or {}
    if qconfig.get("format") != "pack-quantized":
        raise SpecError(f"{root}/config.json has no pack-quantized quantization_config; write it with "
                        "`apex4gen quantize`")
    extra = extras(hf)
    groups = {name: scheme["weights"]["group_size"] for scheme in qconfig["config_groups"].values()
              for name in scheme["targets"]}
    bits = {name: act_bits_of(scheme, f"{root}/config.json {key}")
            for key, scheme in qconfig["config_groups"].items() for name in scheme["targets"]}
    tensors = _read_tensors(root / WEIGHTS_FILE, load_file)
    dtype = dtype or _scale_dtype(tensors, groups, root)
    config = from_hf(hf, dtype, str(root / "config.json"))
    device = torch.device(device)
    transforms: dict[str, hadamard.OnlineHadamard] = {}

    def plain(name: str) -> torch.Tensor:
        if name not in tensors:
            raise SpecError(f"{root}: checkpoint lacks {name}")
        return tensors[name].to(device=device, dtype=dtype)

    def quantized(name: str) -> tuple[reference.QuantizedTensor, torch.Tensor | None, float, int]:
        if name not in groups:
            raise SpecError(f"{root}: {name} is not quantized; the engine runs every decoder projection on W4A4 "
                            "kernels (quantize the whole decoder)")
        n, k = (int(v) for v in tensors[f"{name}.weight_shape"])
        q = unpack_int32(tensors[f"{name}.weight_packed"], k)
        w = reference.QuantizedTensor(q.to(device), tensors[f"{name}.weight_scale"].to(device), groups[name] or k)
        bias = tensors.get(f"{name}.bias")
        return (w, None if bias is None else bias.to(device=device, dtype=dtype), extra["act_clip"].get(name, 1.0),
                bits[name])

    def online(name: str) -> hadamard.OnlineHadamard | None:
        key = extra["input_transform"].get(name)
        if key is None:
            return None
        if key not in transforms:
            transforms[key] = hadamard.from_dense(tensors[key], f"{root}: {key}").to(device)
        return transforms[key]

    def make_layer(i: int) -> LayerWeights:
        prefix = f"model.layers.{i}"
        projections = {kind: _fuse([quantized(f"{prefix}.{part}") for part in _PARTS[kind]], f"{prefix} {kind}")
                       for kind in KINDS}
        return LayerWeights(plain(f"{prefix}.input_layernorm.weight"),
                            plain(f"{prefix}.post_attention_layernorm.weight"), projections,
                            online(f"{prefix}.mlp.down_proj"))

    embed = plain("model.embed_tokens.weight")
    head = embed if config.tie_word_embeddings or "lm_head.weight" not in tensors else plain("lm_head.weight")
    return ModelWeights(config, embed, plain("model.norm.weight"), head, make_layer)


def _scale_dtype(tensors: dict, groups: dict, root: Path) -> torch.dtype:
    """The kernels' output dtype: the quantized layers' scale dtype (one for the whole model)."""
    dtypes = {tensors[f"{name}.weight_scale"].dtype for name in groups}
    if len(dtypes) != 1:
        raise SpecError(f"{root}: weight scales mix {sorted(map(str, dtypes))}; one 16-bit dtype expected")
    return dtypes.pop()


def _fuse(parts: list, where: str) -> Projection:
    """One Projection from q/k/v (or gate/up): rows concatenated; one granularity, clipping ratio and activation
    precision, since the fused GEMM quantizes its input once."""
    weights, biases, clips, bits = zip(*parts)
    if len({w.group for w in weights}) != 1 or len({w.scales.dtype for w in weights}) != 1:
        raise SpecError(f"{where}: the fused projections differ in granularity or scale dtype; quantize them "
                        "alike (a fused plan's granularity per layer kind)")
    if len(set(clips)) != 1:
        raise SpecError(f"{where}: the fused projections have different activation clipping ratios {clips}")
    if len(set(bits)) != 1:
        raise SpecError(f"{where}: the fused projections have different activation precisions {bits}; quantize "
                        "them alike (a fused plan's act_bits per layer kind)")
    weight = reference.QuantizedTensor(torch.cat([w.q for w in weights]), torch.cat([w.scales for w in weights]),
                                       weights[0].group)
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else w.scales.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
    return Projection(weight, bias, clips[0], bits[0])
