"""Turn a transformers LLaMA-family model into a W4A4 fake-quant model, with the switchable methods.

``quantize_model(model, QuantConfig(...), calib_ids)``:

1. optional rotation (:mod:`.rotation`), exact in full precision;
2. if GPTQ or a clipping search is on, a sequential pass over the decoder layers on calibration tokens:
   each layer sees the outputs of the already-quantized layers before it (as at inference), its linears'
   input Hessians / samples are collected in full precision, its linears are quantized and replaced by
   :class:`apex4gen.nn.W4A4Linear`, and its quantized outputs feed the next layer;
3. otherwise plain RTN of every linear.

lm_head and the embeddings stay in full precision (as in QuaRot and Atom). The online Hadamard before
down_proj runs as a fast Kronecker transform while calibrating (:func:`rotation.apply_transform`); the
returned model holds plain :class:`W4A4Linear` layers (call :func:`rotation.set_fast_online_rotation` to
evaluate it fast: same function up to fp32 rounding). Granularity is chosen per
layer kind with the plan's names: qkv_proj (q, k, v), o_proj, gate_up_proj (gate, up), down_proj.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..granularity import G128, Granularity
from ..reference import DEFAULT_ACT_BITS
from ..nn import W4A4Linear, effective_granularity
from . import rotation
from .gptq import HessianAccumulator, gptq_quantize
from .progress import progress
from .rtn import rtn_quantize, search_act_clip

KIND_OF = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
           "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
PLAN_KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_ACT_SAMPLE_TOKENS = 2048  # inputs kept per linear for the activation clipping search


@dataclass
class QuantConfig:
    """What to do; ``granularity`` maps each plan layer kind (or, for unfused plans, each projection such as
    q_proj) to a granularity, ``act_bits`` likewise to an activation precision (8; absent: 4, pure W4A4);
    ``seed`` drives every random choice: the Hadamard signs here and the calibration windows
    (:func:`.options.calibration_ids`)."""

    granularity: dict[str, Granularity] = field(default_factory=lambda: {k: G128 for k in PLAN_KINDS})
    act_bits: dict[str, int] = field(default_factory=dict)
    rotate: bool = False
    gptq: bool = False
    act_order: bool = False
    clip_weights: bool = False
    clip_acts: bool = False
    group_rotation: bool = False
    seed: int = 0

    @classmethod
    def uniform(cls, granularity: Granularity, **kwargs) -> "QuantConfig":
        return cls(granularity={k: granularity for k in PLAN_KINDS}, **kwargs)

    @property
    def needs_calibration(self) -> bool:
        return self.gptq or self.clip_weights or self.clip_acts

    def describe(self) -> str:
        grans = sorted({g.name for g in self.granularity.values()})
        parts = [grans[0] if len(grans) == 1 else
                 ",".join(f"{k}={g.name}" for k, g in self.granularity.items())]
        eight = [k for k, bits in self.act_bits.items() if bits == 8]
        if eight:
            parts[0] += f" (8-bit activations: {','.join(eight)})"
        parts += [name for name, on in (("rotation", self.rotate), ("group-rotation", self.group_rotation),
                                        ("gptq", self.gptq),
                                        ("act-order", self.gptq and self.act_order),
                                        ("clip-w", self.clip_weights), ("clip-a", self.clip_acts)) if on]
        return " + ".join(parts) if len(parts) > 1 else parts[0] + " + rtn"


def decoder_linears(layer: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{'self_attn.q_proj': (parent, 'q_proj'), ...}`` for the linears of one decoder layer."""
    found = {}
    for parent_name, parent in layer.named_modules():
        for child_name, child in parent.named_children():
            if child_name in KIND_OF and isinstance(child, nn.Linear):
                found[f"{parent_name}.{child_name}" if parent_name else child_name] = (parent, child_name)
    return found


def group_for(cfg: QuantConfig, proj: str, k: int) -> int:
    """A projection's group size (K: per-channel): its own entry (unfused plans) or its kind's."""
    gran = cfg.granularity.get(proj) or cfg.granularity[KIND_OF[proj]]
    return effective_granularity(gran, k).size(k)


def act_bits_for(cfg: QuantConfig, proj: str) -> int:
    """A projection's activation precision: its own entry (unfused plans), its kind's, else 4."""
    return cfg.act_bits.get(proj) or cfg.act_bits.get(KIND_OF[proj], DEFAULT_ACT_BITS)


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor | None = None) -> nn.Module:
    """Quantize ``model`` in place; ``calib_ids`` [n_samples, seq_len] is needed for GPTQ / clipping."""
    if cfg.rotate:
        rotation.rotate_model(model, seed=cfg.seed, residual=residual_rotation(model, cfg))
    if cfg.needs_calibration:
        if calib_ids is None:
            raise ValueError("GPTQ and the clipping searches need calibration tokens")
        _sequential(model, cfg, calib_ids)
    else:
        for layer in progress(model.model.layers, "RTN"):
            for parent, attr in decoder_linears(layer).values():
                _replace_rtn(parent, attr, cfg)
    # calibration ran the online Hadamard fast; the result is plain W4A4Linear, bit-identical to a saved and
    # reloaded checkpoint (rotation.set_fast_online_rotation switches evaluation to the fast transform)
    return rotation.set_fast_online_rotation(model, fast=False)


def residual_rotation(model: nn.Module, cfg: QuantConfig) -> torch.Tensor | None:
    """The residual stream's matrix: None (the default randomized Hadamard of order d) or, with
    ``group_rotation``, one Hadamard per activation group of the residual's readers (q/k/v and gate/up) over
    channels ordered by how strongly those read them (:func:`rotation.channel_order`); the finer of the two
    groups where they differ (per-channel on both: one Hadamard of order d). Folded into the weights like the
    default, so the kernels and the checkpoint are unchanged."""
    if not cfg.group_rotation:
        return None
    d = model.config.hidden_size
    block = min(group_for(cfg, "q_proj", d), group_for(cfg, "gate_proj", d))
    return rotation.group_rotation(rotation.channel_order(model), block, cfg.seed)


def quantized_digest(model: nn.Module) -> str:
    """A short hash of every quantized layer's int4 weights, scales, bias and activation clipping ratio: two runs
    (machines, thread counts, seeds) made the same model exactly when their digests agree."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        if isinstance(module, W4A4Linear):
            bits = "" if module.act_bits == DEFAULT_ACT_BITS else f":a{module.act_bits}"  # 4-bit digests unchanged
            digest.update(f"{name}:{module.act_clip!r}{bits}".encode())
            for tensor in (module.qweight, module.weight_scale, module.bias):
                if tensor is not None:
                    digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_kinds(kinds) -> None:
    """Plan layer kinds only (the CLI checks its option with this before any model work)."""
    unknown = set(kinds) - set(PLAN_KINDS)
    if unknown:
        raise ValueError(f"known kinds are {', '.join(PLAN_KINDS)}; unknown layer kinds {sorted(unknown)}")


def keep_activations_fp(model: nn.Module, kinds) -> int:
    """Diagnostic: leave the inputs of the given plan kinds (e.g. 'down_proj') in full precision on the
    fake-quant path, weights still 4-bit; the perplexity change attributes the cost of 4-bit activations
    per kind. Returns how many layers were switched."""
    check_kinds(kinds)
    switched = 0
    for name, module in model.named_modules():
        if isinstance(module, W4A4Linear) and KIND_OF.get(name.rpartition(".")[2]) in kinds:
            module.quantize_input = False
            switched += 1
    return switched


def keep_weights_fp(model: nn.Module, reference: nn.Module) -> int:
    """Diagnostic: the fake-quant path of every :class:`W4A4Linear` in ``model`` multiplies with the weight of
    the same-named linear of ``reference`` (the full-precision model, rotated as ``model`` was) while its
    activations stay 4-bit (W16A4): the perplexity then measures what 4-bit activations cost on their own,
    a bound no weight method (GPTQ, clipping) can pass. Returns how many layers were switched."""
    fp = dict(reference.named_modules())
    switched = 0
    for name, module in model.named_modules():
        if isinstance(module, W4A4Linear):
            weight = fp[name].weight.detach()
            if weight.shape != (module.out_features, module.in_features):
                raise ValueError(f"{name}: reference weight {tuple(weight.shape)} does not match the layer")
            module.weight_override = weight
            switched += 1
    return switched


def _replace_rtn(parent: nn.Module, attr: str, cfg: QuantConfig) -> None:
    lin = getattr(parent, attr)
    group = group_for(cfg, attr, lin.in_features)
    w = rtn_quantize(lin.weight.detach(), group, _scale_dtype(lin))
    setattr(parent, attr, _w4a4(lin).from_quantized(w, lin.bias, input_transform=_transform(lin),
                                                    act_bits=act_bits_for(cfg, attr)))


def _scale_dtype(lin: nn.Linear) -> torch.dtype:
    dt = lin.weight.dtype
    return dt if dt in (torch.float16, torch.bfloat16) else torch.float16


def _w4a4(lin: nn.Module) -> type[W4A4Linear]:
    """W4A4Linear, or its subclass applying the online Hadamard as a fast Kronecker transform."""
    return W4A4Linear if _transform(lin) is None else rotation.OnlineRotatedW4A4Linear


def _transform(lin: nn.Module) -> torch.Tensor | None:
    return getattr(lin, "input_transform", None)


class _Stop(Exception):
    """Raised by the capture hook: the forward pass is needed only up to the first decoder layer."""


def _capture_first_layer_inputs(model: nn.Module, calib_ids: torch.Tensor):
    layer0 = model.model.layers[0]
    hidden, kwargs = [], {}

    def hook(_module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in calib_ids:
            try:
                model(input_ids=row.unsqueeze(0), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    return hidden, kwargs


def _run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    outs = []
    for h in hidden:
        out = layer(h, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _sequential(model: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor) -> None:
    hidden, kwargs = _capture_first_layer_inputs(model, calib_ids)
    for layer in progress(model.model.layers, "calibrate+quantize layers"):
        linears = decoder_linears(layer)
        inputs = _shared_inputs(linears, cfg)
        hessians, samples = _collect(layer, linears, hidden, kwargs, cfg)
        clips = {key: _act_clip(cfg, [linears[n] for n in names], samples.get(key[0]), key[1], key[2])
                 for key, names in inputs.items()}
        for key, names in inputs.items():
            for name in names:
                parent, attr = linears[name]
                _replace_calibrated(parent, attr, cfg, hessians.get(key[0]), clips[key])
        hidden = _run_layer(layer, hidden, kwargs)


# projections that read the same activation as another one: their statistics are computed once
_SAME_INPUT_AS = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def _source(name: str, attr: str) -> str:
    """The projection whose input hook sees ``name``'s input."""
    return name.rpartition(".")[0] + "." + _SAME_INPUT_AS[attr] if attr in _SAME_INPUT_AS else name


def _shared_inputs(linears, cfg: QuantConfig) -> dict[tuple[str, int, int], list[str]]:
    """``{(source, group, act_bits): [projections]}``: one activation, quantized one way, read by fused
    projections (q, k, v; gate, up), which therefore share one activation clipping ratio, as a fused kernel
    must."""
    inputs: dict[tuple[str, int, int], list[str]] = {}
    for name, (parent, attr) in linears.items():
        k = getattr(parent, attr).in_features
        key = (_source(name, attr), group_for(cfg, attr, k), act_bits_for(cfg, attr))
        inputs.setdefault(key, []).append(name)
    return inputs


def _collect(layer, linears, hidden, kwargs, cfg):
    """Run the (full-precision) layer on ``hidden``; per input source: the Hessian (when GPTQ or the weight
    clipping uses it) and a sample of inputs (for the activation clipping search)."""
    keep_hessian = cfg.gptq or cfg.clip_weights
    readers = {name: getattr(p, a) for name, (p, a) in linears.items() if a not in _SAME_INPUT_AS}
    hessians = {name: HessianAccumulator(m.in_features) for name, m in readers.items()} if keep_hessian else {}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in readers}
    if not keep_hessian and not cfg.clip_acts:
        return hessians, {}

    def make_hook(name, module):
        def hook(_m, args):
            x = rotation.linear_input(module, args[0]).reshape(-1, module.in_features)
            if keep_hessian:
                hessians[name].add(x)
            kept = sum(s.shape[0] for s in samples[name])
            if cfg.clip_acts and kept < _ACT_SAMPLE_TOKENS:
                samples[name].append(x[: _ACT_SAMPLE_TOKENS - kept].float().clone())
        return hook

    _run_hooked(layer, readers, make_hook, hidden, kwargs)
    return hessians, {name: torch.cat(s) for name, s in samples.items() if s}


def _run_hooked(layer, readers, make_hook, hidden, kwargs) -> None:
    handles = [m.register_forward_pre_hook(make_hook(n, m)) for n, m in readers.items()]
    try:
        _run_layer(layer, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()


def _act_clip(cfg: QuantConfig, readers: list[tuple[nn.Module, str]], samples, group: int, act_bits: int) -> float:
    """One clipping ratio for an activation, searched against its readers' RTN weights (stacked)."""
    if not cfg.clip_acts:
        return 1.0
    lins = [getattr(parent, attr) for parent, attr in readers]
    w = torch.cat([lin.weight.detach() for lin in lins])
    return search_act_clip(samples, w, rtn_quantize(w, group, _scale_dtype(lins[0])), act_bits=act_bits)


def _replace_calibrated(parent, attr, cfg: QuantConfig, hessian: HessianAccumulator | None,
                        act_clip: float) -> None:
    lin = getattr(parent, attr)
    group = group_for(cfg, attr, lin.in_features)
    w = lin.weight.detach()
    if cfg.gptq:
        wq = gptq_quantize(w, hessian.hessian(), group, _scale_dtype(lin), act_order=cfg.act_order,
                           clip=cfg.clip_weights)
    else:
        importance = torch.diag(hessian.hessian()).float() if cfg.clip_weights else None
        wq = rtn_quantize(w, group, _scale_dtype(lin), clip=cfg.clip_weights, importance=importance)
    setattr(parent, attr, _w4a4(lin).from_quantized(wq, lin.bias, act_clip=act_clip,
                                                    input_transform=_transform(lin),
                                                    act_bits=act_bits_for(cfg, attr)))
