"""The accuracy budget: which granularities each layer kind may use, and how much coarsening is allowed.

Layer kinds are the fused ones (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``): q/k/v_proj read
one activation and so share one granularity, likewise gate/up_proj (see :mod:`apex4gen.graph`).

Budget file (every key optional; ``default`` applies to kinds not named)::

    finest:   {default: g128}                   # the accuracy reference: no layer kind needs finer than this
    coarsest: {default: channel, o_proj: g1024, down_proj: g512}   # how far coarsening may go
    min_gain: 0.05              # coarsen a layer only if its workload-weighted time drops by at least 5%
    act_bits: {qkv_proj: 8}     # optional: activation precision fixed per kind (4 or 8; default: free, below)
    sensitivity: sens.yaml      # optional: per-layer sensitivities (path relative to this file, or inline)
    max_total_increase: 0.5     # required with sensitivity: the sum over layer kinds may not exceed it
                                # (negative: more accurate than the 4-bit reference, through 8-bit activations)

Defaults (:data:`DEFAULT_BUDGET`): ``finest`` g128 everywhere (APEX4's and Atom's W4A4 accuracy reference);
``coarsest`` channel for qkv_proj and gate_up_proj (they read RMSNorm outputs), g1024 for o_proj and g512 for
down_proj (down_proj reads the SiLU*up product, where activation outliers are largest, so it keeps finer groups);
``min_gain`` 0.05, so a few percent of scale traffic never costs accuracy. Where the finest granularity does not
divide a layer's K (SmolLM2: K=576), the nearest finer one that does stands in for it.

Sensitivity file: :mod:`apex4gen.accuracy.sensitivity` (what ``apex4gen calibrate`` writes).

With a sensitivity file a layer kind may leave its reference granularity only for granularities the file
lists for it (no entry = no evidence = not allowed; a kind absent from the file stays at its reference), and the
plan's summed increase over layer kinds stays within ``max_total_increase``.

Activation precision: 4 bits (pure W4A4) everywhere, unless a sensitivity file has ``act8`` evidence for a kind:
then 8-bit activations at the granularities it lists are options too, each with its measured change (usually a
decrease). ``act_bits`` fixes a kind's precision instead (an explicit target; the sensitivity, where it has the
entry, still counts against the limit): 8 where a kernel family of the GPU takes 8-bit activations, else the
plan stays 4-bit and says why. The planner takes the cheapest plan within ``max_total_increase`` (at equal cost the one with fewer
8-bit kinds), so a limit that the 4-bit options cannot meet, e.g. a negative one, gives 8 bits to the kinds
where they buy the most accuracy for the least time. Without a sensitivity file every activation is 4-bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .accuracy.sensitivity import Sensitivity, load_sensitivity, parse_sensitivity
from .errors import SpecError
from .granularity import CHANNEL, GRANULARITIES, GRANULARITY_NAMES, Granularity
from .graph import FUSED_KINDS
from .kernels.config import ACT_BITS
from .schema import Fields, read_yaml

_KIND_KEYS = ("default",) + FUSED_KINDS
DEFAULT_FINEST = {"default": "g128"}
DEFAULT_COARSEST = {"default": "channel", "o_proj": "g1024", "down_proj": "g512"}
DEFAULT_MIN_GAIN = 0.05


def _rank(granularity: Granularity) -> int:
    return GRANULARITIES.index(granularity)


@dataclass(frozen=True)
class Budget:
    finest: tuple[tuple[str, Granularity], ...]      # (kind, granularity) for every fused kind
    coarsest: tuple[tuple[str, Granularity], ...]
    min_gain: float
    sensitivity: Sensitivity | None = None
    max_total_increase: float | None = None
    fixed_act_bits: tuple[tuple[str, int], ...] = ()  # (kind, 4 | 8): the kinds whose precision the budget fixes

    def reference(self, kind: str, k: int) -> Granularity:
        """The finest granularity ``kind`` needs, or the nearest finer one where it does not divide K."""
        finest = dict(self.finest)[kind]
        finer_fits = [g for g in GRANULARITIES[:_rank(finest) + 1] if g.fits(k)]
        if not finer_fits:
            return CHANNEL
        return finer_fits[-1]

    def allowed(self, kind: str, k: int) -> tuple[Granularity, ...]:
        """Granularities ``kind`` may use at this K, finest first; the reference is always first."""
        ref = self.reference(kind, k)
        coarser = [g for g in GRANULARITIES[_rank(dict(self.finest)[kind]) + 1:_rank(dict(self.coarsest)[kind]) + 1]
                   if g.fits(k) and g != ref]
        if self.sensitivity is not None:
            coarser = [g for g in coarser if self.sensitivity.increase(kind, g) is not None]
        return (ref, *coarser)

    def act_bits(self, kind: str, granularity: Granularity) -> tuple[int, ...]:
        """Activation precisions ``kind`` may use at ``granularity``: the fixed one, else 4, and 8 where the
        sensitivity file has evidence for it."""
        fixed = dict(self.fixed_act_bits).get(kind)
        if fixed is not None:
            return (fixed,)
        if self.sensitivity is None or self.sensitivity.increase(kind, granularity, 8) is None:
            return (4,)
        return (4, 8)

    def increase(self, kind: str, granularity: Granularity, k: int, act_bits: int = 4) -> float:
        """The sensitivity's change for this choice (0 for the reference, and for a fixed precision the file has
        no entry for)."""
        if self.sensitivity is None or (act_bits == 4 and granularity == self.reference(kind, k)):
            return 0.0
        found = self.sensitivity.increase(kind, granularity, act_bits)
        return 0.0 if found is None else found

    def to_dict(self) -> dict:
        return {"finest": _names(self.finest), "coarsest": _names(self.coarsest), "min_gain": self.min_gain,
                "act_bits": dict(self.fixed_act_bits),
                "sensitivity": self.sensitivity.to_dict() if self.sensitivity else None,
                "max_total_increase": self.max_total_increase}


def _names(per_kind: tuple[tuple[str, Granularity], ...]) -> dict[str, str]:
    return {kind: g.name for kind, g in per_kind}


def _per_kind(fields: Fields, key: str, shipped: dict) -> tuple[tuple[str, Granularity], ...]:
    """A user's ``default`` replaces every shipped value; kinds named explicitly win over any default."""
    sub = fields.sub(key, _KIND_KEYS, None)
    given = {} if sub is None else {k: sub.choice(k, GRANULARITY_NAMES) for k in _KIND_KEYS if sub.has(k)}
    base = {"default": given["default"]} if "default" in given else shipped
    return tuple(sorted((kind, Granularity.parse(given.get(kind, base.get(kind, base["default"]))))
                        for kind in FUSED_KINDS))


def _sensitivity(fields: Fields, base_dir: Path) -> Sensitivity | None:
    if not fields.has("sensitivity") or fields.data["sensitivity"] is None:
        return None
    value = fields.data["sensitivity"]
    if isinstance(value, str):
        return load_sensitivity(base_dir / value)
    return parse_sensitivity(fields.take("sensitivity", dict), f"{fields.file} (sensitivity)")


def _check_order(fields: Fields, finest, coarsest) -> None:
    for (kind, fine), (_, coarse) in zip(finest, coarsest):
        if fine > coarse:
            raise fields.error(f"coarsest.{kind}", f"{coarse.name} is finer than finest {fine.name}")


def _fixed_act_bits(fields: Fields) -> tuple[tuple[str, int], ...]:
    sub = fields.sub("act_bits", FUSED_KINDS, None)
    if sub is None:
        return ()
    fixed = {kind: sub.take(kind, int) for kind in FUSED_KINDS if sub.has(kind)}
    for kind, bits in fixed.items():
        if bits not in ACT_BITS:
            raise sub.error(kind, f"{bits} is not one of {', '.join(map(str, ACT_BITS))}")
    return tuple(sorted(fixed.items()))


def parse_budget(data: object, file: str | Path, base_dir: Path | None = None) -> Budget:
    fields = Fields(data, file, "", ("finest", "coarsest", "min_gain", "act_bits", "sensitivity",
                                     "max_total_increase"))
    finest = _per_kind(fields, "finest", DEFAULT_FINEST)
    coarsest = _per_kind(fields, "coarsest", DEFAULT_COARSEST)
    _check_order(fields, finest, coarsest)
    min_gain = fields.take("min_gain", float, DEFAULT_MIN_GAIN)
    if not 0 <= min_gain < 1:
        raise fields.error("min_gain", f"must be in [0, 1), got {min_gain}")
    sensitivity = _sensitivity(fields, base_dir or Path(file).parent)
    limit = fields.take("max_total_increase", float, None)
    if (sensitivity is None) != (limit is None):
        raise fields.error("max_total_increase", "sensitivity and max_total_increase go together")
    if limit is not None and limit < 0 and not sensitivity.act8:
        raise fields.error("max_total_increase", f"{limit} < 0 asks for more accuracy than 4-bit activations give, "
                           "which only 8-bit ones can buy: the sensitivity file has no act8 entries (re-run "
                           "`apex4gen calibrate`), or use a limit >= 0")
    return Budget(finest, coarsest, min_gain, sensitivity, limit, _fixed_act_bits(fields))


def load_budget(ref: str | Path | Budget | None) -> Budget:
    if ref is None:
        return DEFAULT_BUDGET
    if isinstance(ref, Budget):
        return ref
    path = Path(ref).expanduser()
    if not path.is_file():
        raise SpecError(f"budget file {path} does not exist")
    return parse_budget(read_yaml(path), path)


DEFAULT_BUDGET = parse_budget({}, "(default budget)")
