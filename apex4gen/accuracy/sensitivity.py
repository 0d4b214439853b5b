"""The sensitivity file: per layer kind, what each coarser granularity costs in accuracy (measured by
``apex4gen calibrate``, :mod:`apex4gen.accuracy.calibrate`; read by the budget, :mod:`apex4gen.budget`)::

    apex4gen_sensitivity: 1
    model: llama2-70b                 # must be the planned model
    metric: "perplexity increase over W4A4-g128, 8k tokens of Pride and Prejudice"
    layers:                           # per layer kind: the metric's increase at each granularity (>= 0)
      qkv_proj: {g256: 0.01, g512: 0.02, g1024: 0.04, channel: 0.10}
      down_proj: {g256: 0.05}
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..granularity import GRANULARITY_NAMES, Granularity
from ..graph import FUSED_KINDS
from ..schema import Fields, read_yaml

SENSITIVITY_VERSION = 1


@dataclass(frozen=True)
class Sensitivity:
    model: str
    metric: str
    layers: tuple[tuple[str, tuple[tuple[Granularity, float], ...]], ...]  # (kind, ((granularity, increase),))

    def increase(self, kind: str, granularity: Granularity) -> float | None:
        """The metric's increase, or None where the file gives no evidence."""
        return dict(dict(self.layers).get(kind, ())).get(granularity)

    def to_dict(self) -> dict:
        return {"apex4gen_sensitivity": SENSITIVITY_VERSION, "model": self.model, "metric": self.metric,
                "layers": {kind: {g.name: v for g, v in values} for kind, values in self.layers}}


def _increases(fields: Fields, kind: str) -> tuple[tuple[Granularity, float], ...]:
    sub = fields.sub(kind, GRANULARITY_NAMES)
    values = {name: sub.take(name, float) for name in GRANULARITY_NAMES if sub.has(name)}
    for name, v in values.items():
        if v < 0:
            raise sub.error(name, f"an increase must be >= 0, got {v}")
    return tuple(sorted(((Granularity.parse(name), v) for name, v in values.items()), key=lambda item: item[0]))


def parse_sensitivity(data: object, file: str | Path) -> Sensitivity:
    fields = Fields(data, file, "", ("apex4gen_sensitivity", "model", "metric", "layers"))
    version = fields.take("apex4gen_sensitivity", int)
    if version != SENSITIVITY_VERSION:
        raise fields.error("apex4gen_sensitivity", f"version {version} is not {SENSITIVITY_VERSION}")
    layers = fields.sub("layers", FUSED_KINDS)
    return Sensitivity(fields.take("model", str), fields.take("metric", str),
                       tuple((kind, _increases(layers, kind)) for kind in FUSED_KINDS if layers.has(kind)))


def load_sensitivity(path: str | Path) -> Sensitivity:
    path = Path(path)
    return parse_sensitivity(read_yaml(path), path)
