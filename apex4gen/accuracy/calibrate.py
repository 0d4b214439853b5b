"""Per-layer sensitivity to the quantization granularity, measured on real activations.

For every linear of the decoder (after the optional rotation, which changes what the layers see) and every
granularity of :data:`apex4gen.granularity.GRANULARITIES` that divides its K, the W4A4 round-to-nearest output
(fake-quant, :class:`apex4gen.nn.W4A4Linear` numerics) is compared with the full-precision output on
calibration tokens: ``err = ||Y_q - Y||^2 / ||Y||^2`` summed over the tokens. A layer kind's error is the
mean over its linears (q, k and v are qkv_proj; gate and up are gate_up_proj) and over the model's layers.

The sensitivity file (format: :mod:`.sensitivity`) gives, per kind and coarser granularity, the increase
of that error over the kind's reference granularity (the budget's finest, g128, or the nearest finer one that
divides K: g64 for K=576), which is what the planner sums against ``max_total_increase``.
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
from ..graph import FUSED_KINDS
from . import rotation
from .pipeline import KIND_OF
from .progress import progress
from .sensitivity import Sensitivity

METRIC = ("relative output error ||Y_q-Y||^2/||Y||^2 of W4A4 RTN, mean over the kind's linears, increase over "
          "the reference granularity")


class _LayerError:
    """Accumulates one linear's error at each granularity that fits its K."""

    def __init__(self, linear: nn.Module) -> None:
        k = linear.in_features
        self.module = linear
        self.weights = {g: reference.dequantize(reference.quantize_weight(linear.weight.detach().float(),
                                                                          g.size(k), torch.float16))
                        for g in GRANULARITIES if g.fits(k)}
        self.num = defaultdict(float)
        self.den = 0.0

    def add(self, x: torch.Tensor) -> None:
        lin = self.module
        x = rotation.linear_input(lin, x).reshape(-1, lin.in_features).float()
        y = x @ lin.weight.detach().float().t()
        self.den += float((y ** 2).sum())
        for gran, wdq in self.weights.items():
            yq = reference.dequantize(reference.quantize_activation(x, gran.size(lin.in_features))) @ wdq.t()
            self.num[gran] += float(((yq - y) ** 2).sum())

    def errors(self) -> dict[Granularity, float]:
        return {g: self.num[g] / self.den for g in self.weights}


@torch.no_grad()
def layer_errors(model: nn.Module, calib_ids: torch.Tensor) -> dict[str, dict[Granularity, float]]:
    """``{module name: {granularity: relative output error}}`` for every decoder linear."""
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


def kind_errors(errors: dict[str, dict[Granularity, float]]) -> dict[str, dict[Granularity, float]]:
    """Mean error per layer kind and granularity."""
    sums: dict[str, dict[Granularity, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, per_gran in errors.items():
        kind = KIND_OF[name.rpartition(".")[2]]
        for gran, err in per_gran.items():
            sums[kind][gran].append(err)
    return {kind: {g: sum(v) / len(v) for g, v in grans.items()} for kind, grans in sums.items()}


def sensitivity(errors: dict[str, dict[Granularity, float]], k_of: dict[str, int], model_name: str,
                budget: Budget = DEFAULT_BUDGET) -> Sensitivity:
    """The planner's :class:`Sensitivity`: per kind, each coarser granularity's error increase (>= 0)."""
    layers = []
    for kind in (k for k in FUSED_KINDS if k in errors):
        ref = budget.reference(kind, k_of[kind])
        base = errors[kind][ref]
        coarser = GRANULARITIES[GRANULARITIES.index(ref) + 1:]
        increases = tuple((g, round(max(errors[kind][g] - base, 0.0), 6)) for g in coarser if g in errors[kind])
        layers.append((kind, increases))
    return Sensitivity(model=model_name, metric=METRIC, layers=tuple(layers))


def write_sensitivity(sens: Sensitivity, path: str | Path, kind_errs: dict[str, dict[Granularity, float]]) -> Path:
    """The YAML the budget file's ``sensitivity:`` points at, with the absolute errors as a comment."""
    path = Path(path)
    lines = ["# apex4gen calibrate: absolute errors per kind (the increases below are relative to the first)"]
    for kind, grans in sorted(kind_errs.items()):
        lines.append(f"#   {kind}: " + ", ".join(f"{g.name}={e:.5f}" for g, e in grans.items()))
    path.write_text("\n".join(lines) + "\n" + yaml.safe_dump(sens.to_dict(), sort_keys=False))
    return path


def kind_in_features(model: nn.Module) -> dict[str, int]:
    """K of each layer kind (the same in every decoder layer)."""
    return {KIND_OF[name.rpartition(".")[2]]: m.in_features for name, m in model.named_modules()
            if name.rpartition(".")[2] in KIND_OF and isinstance(m, nn.Linear)}
