"""Per-layer sensitivity to the quantization granularity and activation precision, on real activations.

For every linear of the decoder (after the optional rotation, which changes what the layers see), every
granularity of :data:`apex4gen.granularity.GRANULARITIES` that divides its K and both activation precisions
(4 and 8 bits; weights 4-bit), the round-to-nearest output (fake-quant, :class:`apex4gen.nn.W4A4Linear`
numerics) is compared with the full-precision output on calibration tokens: ``err = ||Y_q - Y||^2 / ||Y||^2``
summed over the tokens. A layer kind's error is the mean over its linears (q, k and v are qkv_proj; gate and up
are gate_up_proj) and over the model's layers.

The sensitivity file (format: :mod:`.sensitivity`) gives, per kind, the change of that error against the kind's
reference (4-bit activations at the budget's finest granularity, g128, or the nearest finer one that divides K:
g64 for K=576): for each coarser granularity at 4 bits (an increase), and for each granularity at 8 bits
(``act8``: usually a decrease). The planner sums these against ``max_total_increase``.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
import yaml
from torch import nn

from .. import reference
from ..budget import DEFAULT_BUDGET, Budget
from ..granularity import GRANULARITIES, Granularity
from ..reference import ACT_BITS
from ..graph import FUSED_KINDS
from . import rotation
from .pipeline import KIND_OF
from .progress import progress
from .sensitivity import Sensitivity

METRIC = ("relative output error ||Y_q-Y||^2/||Y||^2 of W4A4 RTN, mean over the kind's linears, increase over "
          "the reference granularity (act8: W4A8 at each granularity, against the same 4-bit reference)")

Choice = tuple[Granularity, int]  # (granularity, activation bits)


class _LayerError:
    """Accumulates one linear's error at each granularity that fits its K, with 4- and 8-bit activations."""

    def __init__(self, linear: nn.Module) -> None:
        k = linear.in_features
        self.module = linear
        self.weights = {g: reference.dequantize(reference.quantize_weight(linear.weight.detach().float(),
                                                                          g.size(k), torch.float16))
                        for g in GRANULARITIES if g.fits(k)}
        self.num: dict[Choice, float] = defaultdict(float)
        self.den = 0.0

    def add(self, x: torch.Tensor) -> None:
        lin = self.module
        x = rotation.linear_input(lin, x).reshape(-1, lin.in_features).float()
        y = x @ lin.weight.detach().float().t()
        self.den += float((y ** 2).sum())
        for gran, wdq in self.weights.items():
            for bits in ACT_BITS:
                xq = reference.quantize_activation(x, gran.size(lin.in_features), bits)
                yq = reference.dequantize(xq) @ wdq.t()
                self.num[gran, bits] += float(((yq - y) ** 2).sum())

    def errors(self) -> dict[Choice, float]:
        return {(g, bits): self.num[g, bits] / self.den for g in self.weights for bits in ACT_BITS}


@torch.no_grad()
def layer_errors(model: nn.Module, calib_ids: torch.Tensor) -> dict[str, dict[Choice, float]]:
    """``{module name: {(granularity, activation bits): relative output error}}`` for every decoder linear."""
    trackers = {name: _LayerError(m) for name, m in model.named_modules()
                if name.rpartition(".")[2] in KIND_OF and isinstance(m, nn.Linear)}
    handles = [t.module.register_forward_pre_hook(lambda _m, args, t=t: t.add(args[0])) for t in trackers.values()]
    try:
        for row in progress(calib_ids, "calibrate (per-layer error)"):
            model(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: t.errors() for name, t in trackers.items()}


def kind_errors(errors: dict[str, dict[Choice, float]]) -> dict[str, dict[Choice, float]]:
    """Mean error per layer kind, granularity and activation precision."""
    sums: dict[str, dict[Choice, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, per_gran in errors.items():
        kind = KIND_OF[name.rpartition(".")[2]]
        for gran, err in per_gran.items():
            sums[kind][gran].append(err)
    return {kind: {g: sum(v) / len(v) for g, v in grans.items()} for kind, grans in sums.items()}


def sensitivity(errors: dict[str, dict[Choice, float]], k_of: dict[str, int], model_name: str,
                budget: Budget = DEFAULT_BUDGET) -> Sensitivity:
    """The planner's :class:`Sensitivity`: per kind, each coarser granularity's error increase (>= 0) with 4-bit
    activations, and each granularity's change (signed) with 8-bit ones, both against the 4-bit reference."""
    layers, act8 = [], []
    for kind in (k for k in FUSED_KINDS if k in errors):
        ref = budget.reference(kind, k_of[kind])
        base = errors[kind][ref, 4]
        coarser = GRANULARITIES[GRANULARITIES.index(ref) + 1:]
        layers.append((kind, tuple((g, round(max(errors[kind][g, 4] - base, 0.0), 6))
                                   for g in coarser if (g, 4) in errors[kind])))
        act8.append((kind, tuple((g, round(errors[kind][g, 8] - base, 6)) for g in GRANULARITIES
                                 if (g, 8) in errors[kind])))
    return Sensitivity(model=model_name, metric=METRIC, layers=tuple(layers), act8=tuple(act8))


def write_sensitivity(sens: Sensitivity, path: str | Path, kind_errs: dict[str, dict[Choice, float]]) -> Path:
    """The YAML the budget file's ``sensitivity:`` points at, with the absolute errors as a comment."""
    path = Path(path)
    lines = ["# apex4gen calibrate: absolute errors per kind (the values below are relative to the kind's first "
             "4-bit one, its reference granularity)"]
    for kind, choices in sorted(kind_errs.items()):
        for bits in ACT_BITS:
            lines.append(f"#   {kind} a{bits}: " + ", ".join(f"{g.name}={e:.5f}" for (g, b), e in choices.items()
                                                           if b == bits))
    path.write_text("\n".join(lines) + "\n" + yaml.safe_dump(sens.to_dict(), sort_keys=False))
    return path


def kind_in_features(model: nn.Module) -> dict[str, int]:
    """K of each layer kind (the same in every decoder layer)."""
    return {KIND_OF[name.rpartition(".")[2]]: m.in_features for name, m in model.named_modules()
            if name.rpartition(".")[2] in KIND_OF and isinstance(m, nn.Linear)}
