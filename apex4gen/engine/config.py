"""The decoder's dimensions: from a shipped model spec (random weights at its real shapes) or a checkpoint's
``config.json``."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import SpecError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DecoderConfig:
    """A LLaMA-architecture decoder. ``rope_theta`` of a shipped spec is LLaMA-2's 10000 (the spec files do not
    carry it; with random weights it changes no timing)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    vocab_size: int
    dtype: torch.dtype
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def with_layers(self, layers: int | None) -> "DecoderConfig":
        """The first ``layers`` decoder layers (``--layers``); None keeps them all."""
        if layers is None:
            return self
        if not 1 <= layers <= self.num_layers:
            raise SpecError(f"--layers {layers}: {self.name} has 1..{self.num_layers} layers")
        return replace(self, num_layers=layers)


def from_spec(spec) -> DecoderConfig:
    """A :class:`apex4gen.specs.ModelSpec` (shipped name or YAML)."""
    if spec.architecture not in ("llama", "mistral"):
        raise SpecError(f"model {spec.name} is a {spec.architecture} model; the engine runs LLaMA-architecture "
                        "decoders (llama, mistral)")
    if spec.attention_bias:
        raise SpecError(f"model {spec.name} has attention biases; random-weight models are LLaMA without biases")
    return DecoderConfig(spec.name, spec.hidden_size, spec.intermediate_size, spec.num_attention_heads,
                         spec.num_key_value_heads, spec.head_dim, spec.num_layers, spec.vocab_size,
                         DTYPES[spec.dtype], tie_word_embeddings=spec.tie_word_embeddings)


def from_hf(config: dict, dtype: torch.dtype, where: str) -> DecoderConfig:
    """A transformers ``config.json`` of a LLaMA-family model (RoPE in ``rope_parameters``, transformers >= 5, or
    ``rope_theta``); ``dtype``: the model's compute dtype."""
    if config.get("model_type") not in ("llama", "mistral"):
        raise SpecError(f"{where}: model_type {config.get('model_type')!r} is not a LLaMA-architecture decoder")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise SpecError(f"{where}: RoPE scaling {rope} is not supported (plain RoPE only)")
    if config.get("mlp_bias"):
        raise SpecError(f"{where}: MLP biases are not supported")
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return DecoderConfig(
            name=str(config.get("_name_or_path") or config["model_type"]), hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]), num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads), num_layers=int(config["num_hidden_layers"]),
            vocab_size=int(config["vocab_size"]), dtype=dtype, rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as err:
        raise SpecError(f"{where}: config.json lacks or mistypes {err}") from None
