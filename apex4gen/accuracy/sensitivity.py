"""The sensitivity file: per layer kind, what each coarser granularity and 8-bit activations cost in accuracy
(measured by ``apex4gen calibrate``, :mod:`apex4gen.accuracy.calibrate`; read by the budget,
:mod:`apex4gen.budget`)::

    apex4gen_sensitivity: 2
    model: llama2-70b                 # must be the planned model
    metric: "perplexity increase over W4A4-g128, 8k tokens of Pride and Prejudice"
    layers:                           # per layer kind: the metric's increase at each granularity (>= 0)
      qkv_proj: {g256: 0.01, g512: 0.02, g1024: 0.04, channel: 0.10,
                 act8: {g128: -0.02, channel: -0.01}}   # 8-bit activations at a granularity (W4A8)
      down_proj: {g256: 0.05}

Every value is the change of the metric against the kind's reference: 4-bit activations at its finest
granularity. ``act8`` (optional) gives it for 8-bit activations at each granularity it lists, usually a
decrease (negative). A kind without ``act8`` has no evidence for 8 bits: the planner keeps it 4-bit. Version 1
files (no ``act8``) still read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..granularity import GRANULARITY_NAMES, Granularity
from ..graph import FUSED_KINDS
from ..schema import Fields, read_yaml

SENSITIVITY_VERSION = 2
_READABLE_VERSIONS = (1, 2)
ACT8_KEY = "act8"

Increases = tuple[tuple[Granularity, float], ...]  # ((granularity, increase),) fine to coarse


@dataclass(frozen=True)
class Sensitivity:
    model: str
    metric: str
    layers: tuple[tuple[str, Increases], ...]        # (kind, 4-bit activations per coarser granularity)
    act8: tuple[tuple[str, Increases], ...] = ()     # (kind, 8-bit activations per granularity)

    def increase(self, kind: str, granularity: Granularity, act_bits: int = 4) -> float | None:
        """The metric's change, or None where the file gives no evidence."""
        table = self.layers if act_bits == 4 else self.act8
        return dict(dict(table).get(kind, ())).get(granularity)

    def to_dict(self) -> dict:
        act8 = dict(self.act8)
        layers = {}
        for kind in FUSED_KINDS:
            entry = {g.name: v for g, v in dict(self.layers).get(kind, ())}
            if kind in act8:
                entry[ACT8_KEY] = {g.name: v for g, v in act8[kind]}
            if kind in dict(self.layers) or kind in act8:
                layers[kind] = entry
        return {"apex4gen_sensitivity": SENSITIVITY_VERSION, "model": self.model, "metric": self.metric,
                "layers": layers}


def _values(sub: Fields, signed: bool) -> Increases:
    values = {name: sub.take(name, float) for name in GRANULARITY_NAMES if sub.has(name)}
    for name, v in values.items():
        if v < 0 and not signed:
            raise sub.error(name, f"an increase must be >= 0, got {v} (only {ACT8_KEY} entries may be negative)")
    return tuple(sorted(((Granularity.parse(name), v) for name, v in values.items()), key=lambda item: item[0]))


def _kind(fields: Fields, kind: str) -> tuple[Increases, Increases | None]:
    """A kind's 4-bit increases and its 8-bit entries (None: no act8 evidence)."""
    sub = fields.sub(kind, GRANULARITY_NAMES + (ACT8_KEY,))
    act8 = _values(sub.sub(ACT8_KEY, GRANULARITY_NAMES), signed=True) if sub.has(ACT8_KEY) else None
    return _values(sub, signed=False), act8


def parse_sensitivity(data: object, file: str | Path) -> Sensitivity:
    fields = Fields(data, file, "", ("apex4gen_sensitivity", "model", "metric", "layers"))
    version = fields.take("apex4gen_sensitivity", int)
    if version not in _READABLE_VERSIONS:
        raise fields.error("apex4gen_sensitivity", f"version {version} is not {SENSITIVITY_VERSION}; re-run "
                           "`apex4gen calibrate`")
    layers = fields.sub("layers", FUSED_KINDS)
    kinds = {kind: _kind(layers, kind) for kind in FUSED_KINDS if layers.has(kind)}
    return Sensitivity(fields.take("model", str), fields.take("metric", str),
                       tuple((kind, four) for kind, (four, _) in kinds.items()),
                       tuple((kind, eight) for kind, (_, eight) in kinds.items() if eight is not None))


def load_sensitivity(path: str | Path) -> Sensitivity:
    path = Path(path)
    return parse_sensitivity(read_yaml(path), path)
