"""The vLLM side of the plugin: ``Apex4genConfig`` (a ``QuantizationConfig``) and ``Apex4genLinearMethod``.

Imports vLLM; what the method computes lives in :mod:`apex4gen.vllm_plugin.core` (plain PyTorch).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from ..checkpoint import ROTATED_QUANT_METHOD
from ..granularity import CHANNEL, Granularity
from . import NAME, core

_PER_WORD = 8  # int4 values in one int32 of compressed-tensors' pack-quantized format


class Apex4genConfig(QuantizationConfig):
    """An ``apex4gen quantize`` checkpoint's quantization_config, and where the build is (``APEX4GEN_BUILD``).

    ``layers`` maps each quantized module name (the checkpoint's, unfused: q_proj, k_proj, ...) to its
    :class:`core.LayerScheme`; vLLM's fused layers (qkv_proj, gate_up_proj) take their shards' common scheme.
    """

    def __init__(self, layers: dict[str, core.LayerScheme], build_dir: str | None) -> None:
        super().__init__()
        self.layers = layers
        self.build_dir = build_dir
        self.checkpoint_dir: str | None = None  # set by maybe_update_config (read: the online rotation)

    def __repr__(self) -> str:
        return f"Apex4genConfig(layers={len(self.layers)}, build={self.build_dir})"

    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        """The build's SM (80 for an sm_80 build, 90 for sm_90a); 0 without a build (CPU, fake-quant)."""
        build_dir = os.environ.get(core.BUILD_ENV)
        return 0 if not build_dir else _build_sm(build_dir)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Apex4genConfig":
        build_dir = os.environ.get(core.BUILD_ENV) or None
        if build_dir is None and not _on_cpu():
            raise ValueError(f"set {core.BUILD_ENV} to the apex4gen build that serves this model "
                             "(`apex4gen build --gpu <gpu> --model <model>` writes one)")
        if build_dir is not None:
            _build_sm(build_dir)  # a missing or unfinished build fails here, in one line
        return cls(parse_layers(config), build_dir)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        """``--quantization apex4gen`` serves a plain compressed-tensors pack-quantized checkpoint too."""
        if user_quant == NAME and hf_quant_cfg.get("quant_method") == "compressed-tensors" \
                and hf_quant_cfg.get("format") == "pack-quantized":
            return NAME
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        shards = shard_names(prefix, self.packed_modules_mapping)
        schemes = [self.layers.get(name) for name in shards]
        if all(s is None for s in schemes):
            return UnquantizedLinearMethod()
        if any(s is None for s in schemes) or len(set(schemes)) > 1:
            raise ValueError(f"{prefix} runs {', '.join(shards)} as one GEMM on one activation, so they need one "
                             f"quantization scheme (granularity, clipping, rotation, activation bits); the checkpoint has "
                             f"{schemes}: re-quantize with one granularity for them")
        return Apex4genLinearMethod(self, schemes[0], prefix)

    @staticmethod
    def get_checkpoint_weight_mapper():
        from vllm.model_executor.models.utils import WeightsMapper

        # the online rotation is read from the checkpoint file by the layers that use it (core.online_rotation)
        return QuantizationConfig.get_checkpoint_weight_mapper() | \
            WeightsMapper(orig_to_new_prefix={"apex4gen.": None})

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self.layers = hf_to_vllm_mapper.apply_dict(self.layers)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        if Path(model_name).is_dir():
            self.checkpoint_dir = str(model_name)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _build_sm(build_dir: str) -> int:
    from ..errors import LoadError
    from ..manifest import read

    try:
        return read(Path(build_dir)).sm
    except LoadError as err:
        raise ValueError(f"{core.BUILD_ENV}={build_dir}: {err}") from None


def shard_names(prefix: str, packed_modules_mapping: dict[str, list[str]]) -> list[str]:
    """The checkpoint modules a vLLM layer holds: ``...qkv_proj`` -> ``...q_proj, ...k_proj, ...v_proj``."""
    parent, _, leaf = prefix.rpartition(".")
    parts = packed_modules_mapping.get(leaf)
    if not parts:
        return [prefix]
    return [f"{parent}.{p}" if parent else p for p in parts]


def parse_layers(config: dict[str, Any]) -> dict[str, core.LayerScheme]:
    """Per quantized module its scheme, from the quantization_config that ``apex4gen quantize`` writes."""
    method = config.get("quant_method")
    if method not in ("compressed-tensors", ROTATED_QUANT_METHOD) or config.get("format") != "pack-quantized":
        raise ValueError(f"quantization_config is {method!r}/{config.get('format')!r}: the apex4gen plugin serves "
                         "pack-quantized W4A4 checkpoints that `apex4gen quantize` writes")
    extra = config.get("apex4gen") or {}
    clips, transforms = extra.get("act_clip", {}), extra.get("input_transform", {})
    layers = {}
    for group_name, scheme in config.get("config_groups", {}).items():
        granularity, act_bits = _granularity_of(group_name, scheme)
        for name in scheme["targets"]:
            layers[name] = core.LayerScheme(granularity, float(clips.get(name, 1.0)), transforms.get(name), act_bits)
    if not layers:
        raise ValueError("quantization_config has no config_groups with targets: nothing to serve in W4A4")
    return layers


def _granularity_of(group_name: str, scheme: dict[str, Any]) -> tuple[Granularity, int]:
    """The granularity and activation precision of a W4A4 (or a plan's W4A8) int scheme; anything else is
    refused, named."""
    w, a = scheme.get("weights") or {}, scheme.get("input_activations") or {}

    def int_symmetric(args: dict, bits: tuple[int, ...]) -> bool:
        return args.get("num_bits") in bits and args.get("type") == "int" and bool(args.get("symmetric"))

    strategy, size = w.get("strategy"), w.get("group_size")
    acts_match = a.get("dynamic") and ((strategy == "group" and a.get("strategy") == "group"
                                        and a.get("group_size") == size)
                                       or (strategy == "channel" and a.get("strategy") == "token"))
    if not (int_symmetric(w, (4,)) and int_symmetric(a, (4, 8)) and strategy in ("group", "channel")
            and acts_match):
        raise ValueError(f"config group {group_name} is not apex4gen's W4A4 scheme (int4 symmetric weights per group "
                         f"or channel, int4 or int8 dynamic activations per group or token): weights {w}, "
                         f"activations {a}")
    return (Granularity(int(size)) if strategy == "group" else CHANNEL), int(a["num_bits"])


@register_weight_loader_v2_supported_method
class Apex4genLinearMethod(LinearMethodBase):
    """One vLLM linear layer (fused or not, one tensor-parallel partition) on apex4gen's kernels."""

    def __init__(self, config: Apex4genConfig, scheme: core.LayerScheme, prefix: str) -> None:
        self.config = config
        self.scheme = scheme
        self.prefix = prefix
        self.k = 0
        self.prepared: core.Prepared | None = None

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        k = input_size_per_partition
        self._check_partition(k, input_size)
        self.k = k
        n = sum(output_partition_sizes)
        group = self.scheme.granularity.size(k)
        weight_loader = extra_weight_attrs["weight_loader"]
        layer.register_parameter("weight_packed", PackedvLLMParameter(
            data=torch.empty(n, k // _PER_WORD, dtype=torch.int32), input_dim=1, output_dim=0,
            packed_factor=_PER_WORD, packed_dim=1, weight_loader=weight_loader))
        scales = torch.empty(n, k // group, dtype=params_dtype)
        if self.scheme.granularity.is_channel:
            scale = ChannelQuantScaleParameter(data=scales, output_dim=0, weight_loader=weight_loader)
        else:
            scale = GroupQuantScaleParameter(data=scales, output_dim=0, input_dim=1, weight_loader=weight_loader)
        layer.register_parameter("weight_scale", scale)
        # the checkpoint's [N, K] of each module: loaded (vLLM expects a home for it), not needed
        layer.register_parameter("weight_shape", BasevLLMParameter(data=torch.empty(2, dtype=torch.int64),
                                                                   weight_loader=weight_loader))

    def _check_partition(self, k: int, input_size: int) -> None:
        """Tensor parallelism may split K (row-parallel layers) only between whole groups: each GPU quantizes
        its slice of the activations, which must be the groups the checkpoint was quantized with."""
        if k == input_size:
            return
        granularity = self.scheme.granularity
        group = granularity.size(input_size)
        what = "per-channel (one group spanning K)" if granularity.is_channel else granularity.name
        if k % group or k % _PER_WORD:
            raise ValueError(f"{self.prefix}: tensor parallelism gives each GPU K={k} of K={input_size}, which splits "
                             f"a {what} group; use a tensor-parallel size that divides K/{group} = "
                             f"{input_size // group}, or a checkpoint with smaller groups")
        if self.scheme.rotation is not None:
            raise ValueError(f"{self.prefix}: the online rotation mixes all K={input_size} inputs, which tensor "
                             "parallelism splits over GPUs; serve a rotated checkpoint with tensor-parallel size 1")

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        del layer.weight_shape
        self.prepared = core.prepare(layer, self.scheme, self.k, self.config.build_dir, self.config.checkpoint_dir)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return core.forward(layer, self.prepared, x, bias)
