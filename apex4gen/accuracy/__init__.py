"""Accuracy methods for W4A4 on real models, each switchable: round-to-nearest (:mod:`.rtn`), QuaRot-style
rotation (:mod:`.rotation`), GPTQ (:mod:`.gptq`) and clipping-ratio search for weights and activations
(:mod:`.rtn`); :mod:`.pipeline` applies them to a transformers LLaMA-family model. Measuring accuracy:
perplexity (:mod:`.evaluation`), per-layer sensitivity to the granularity (:mod:`.calibrate`, written as
:mod:`.sensitivity` files the planner's budget reads); :mod:`.options` builds what the commands ask for."""
from .pipeline import PLAN_KINDS, QuantConfig, quantize_model

__all__ = ["PLAN_KINDS", "QuantConfig", "quantize_model"]
