"""Loading a LLaMA-family causal LM from local files only (a transformers directory or a .gguf file)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import SpecError
from .data import smollm2_gguf

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub, whatever a config says


def resolve_model_path(model_path: str | None, fetch: bool = True) -> Path:
    """``None`` -> the SmolLM2-135M GGUF (fetched into the cache if needed)."""
    if model_path is None:
        return smollm2_gguf(fetch=fetch)
    path = Path(model_path)
    if not path.exists():
        raise SpecError(f"model path {path} does not exist (local files only: a transformers directory "
                        f"or a .gguf file)")
    return path


def load_model(model_path: str | None = None, dtype: torch.dtype = torch.float32, fetch: bool = True):
    """(model, tokenizer) in eval mode on the CPU; a GGUF is dequantized to ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_path, fetch)
    if path.is_file():
        if path.suffix != ".gguf":
            raise SpecError(f"{path}: a model file must be .gguf (else pass the transformers directory)")
        kwargs = {"gguf_file": path.name}
        folder = str(path.parent)
    else:
        kwargs, folder = {}, str(path)
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                     attn_implementation="sdpa", **kwargs)
    except (OSError, ValueError) as err:
        raise SpecError(f"cannot load a model from {path}: {str(err).splitlines()[0]}") from err
    if getattr(model.config, "quantization_config", None) is not None and path.suffix == ".gguf":
        del model.config.quantization_config  # the GGUF was dequantized on load: the model is plain float now
    if model.config.model_type not in ("llama", "mistral", "qwen2"):
        raise SpecError(f"{path}: model type {model.config.model_type!r} is not a LLaMA-family causal LM")
    model.eval()
    return model, tok
