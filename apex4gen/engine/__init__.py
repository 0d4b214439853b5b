"""Inference on a build's W4A4 kernels: a LLaMA-architecture decoder, a static KV cache, CUDA-graph decode
steps, greedy generation and the end-to-end benchmark against the same model in 16 bits.

Runtime only: nothing here imports the compiler (planner, cost model, emit, build); a build is loaded by
:func:`apex4gen.load` and handed in.
"""
from .cache import KVCache
from .config import DecoderConfig
from .model import Decoder
from .runner import DecodeStep, generate
from .weights import ModelWeights, load_checkpoint, random_weights

__all__ = ["Decoder", "DecoderConfig", "DecodeStep", "KVCache", "ModelWeights", "generate", "load_checkpoint",
           "random_weights"]
