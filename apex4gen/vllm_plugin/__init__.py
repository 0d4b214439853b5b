"""A vLLM plugin: ``vllm serve <apex4gen checkpoint> --quantization apex4gen`` runs apex4gen's kernels.

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point (pyproject.toml) in every
process it starts; it adds the quantization method ``apex4gen`` (:mod:`apex4gen.vllm_plugin.config`):

* the checkpoint is what ``apex4gen quantize`` writes (compressed-tensors pack-quantized, W4A4 int per group
  or channel); one whose quant_method says ``compressed-tensors`` is taken with ``--quantization apex4gen``,
  a rotated one (quant_method ``apex4gen``, see ``apex4gen.checkpoint``) without it;
* the build is the directory in the environment variable ``APEX4GEN_BUILD`` (``apex4gen build`` for the
  GPU and the model; plan it fused, as vLLM runs q/k/v and gate/up as one GEMM each). Without it the
  plugin runs only on vLLM's CPU backend, through the fake-quant path (the reference arithmetic).
"""
from __future__ import annotations

NAME = "apex4gen"


def register() -> None:
    """The entry point: add the ``apex4gen`` quantization method to vLLM (idempotent)."""
    from vllm.model_executor.layers.quantization import register_quantization_config

    from .config import Apex4genConfig

    register_quantization_config(NAME)(Apex4genConfig)
