"""The planner: per layer a granularity and compute path, per (GEMM, M bucket) a kernel configuration.

Decisions, in order:

1. Each activation tensor of the decoder layer (see :mod:`apex4gen.graph`) gets one granularity and one path,
   shared by every GEMM that reads it. Candidates: the granularities the accuracy budget allows for the layer
   kind (:mod:`apex4gen.budget`) times the GPU's compute paths (native INT4, else INT8/FP8).
2. Each candidate is scored by the cost model at every workload point, with the kernel each M bucket would get:
   ``cost = sum_points weight * (W4A4 time of these layers) / (FP16 time of all linear layers)``, i.e. its
   share of the model's end-to-end time, so the choice per activation is exact for the end-to-end objective.
3. Per granularity the path with the most M buckets served by a registered kernel wins, then the cheaper one.
   Granularities a registered family can build beat ones it cannot (a plan must build where kernels exist).
4. Coarsening costs accuracy, so going coarser is worth it only when it cuts the cost by ``min_gain``: walking
   from the reference granularity to coarser ones, a step is kept only if it is that much cheaper than the last
   kept one; the cheapest kept one wins. With a sensitivity file, the combination over layer kinds with the
   lowest cost whose summed accuracy increase fits ``max_total_increase`` wins (at equal cost, the one with
   fewer 8-bit activations, then the more accurate one).
   Activation precision: each option is also 4- or 8-bit; 8 only where the budget's sensitivity file has
   evidence for the kind and some kernel family of the GPU's arch takes 8-bit activations
   (:func:`apex4gen.kernels.families.act_bits_served`); the coverage rule of 3. then drops an 8-bit option whose
   M buckets lack kernels (Hopper's g128 prefill kernel computes on FP8 and takes 4 bits only).
5. Every (N, K, group, path) problem gets, per M bucket (:data:`apex4gen.plan.BUCKET_BOUNDS`), the fastest
   legal configuration from :func:`apex4gen.kernels.legality.legal_configs`, or ``kernel: null`` with a
   rationale when no registered family has one. The planner never fails for lack of kernels.

Predictions cover the decoder's linear layers only (attention, norms and the LM head are not W4A4 GEMMs here).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

from . import __version__
from .budget import Budget, load_budget
from .costmodel import DEFAULT_CONSTANTS, CostConstants, Estimate, fp16_time, w4a4_time
from .errors import SpecError
from .granularity import Granularity
from .graph import ActivationGroup, Linear, activation_groups, layer_graph
from .kernels import FAMILIES
from .kernels.config import KernelConfig
from .kernels.families import act_bits_served
from .kernels.legality import legal_configs, violations
from .plan import (BUCKET_BOUNDS, PLAN_VERSION, UNBOUNDED_REPRESENTATIVE_M, Bucket, GemmPlan, LayerPlan, Plan,
                   PointPrediction, Totals)
from .specs import GpuSpec, ModelSpec, WorkloadSpec, load_gpu, load_model, load_workload

DEFAULT_WORKLOAD = "default"
_UNBOUNDED_M = 2**31 - 1   # the dispatcher's M is an int32: no family with a max_m serves the last bucket


def _us(x: float) -> float:
    return round(x, 3)


def _ratio(x: float) -> float:
    return round(x, 4)


@dataclass(frozen=True)
class _Problem:
    n: int
    k: int
    granularity: Granularity
    path: str
    act_bits: int = 4


@dataclass(frozen=True)
class _Option:
    """One (granularity, path, activation precision) for one activation group, fully predicted."""

    granularity: Granularity
    path: str
    act_bits: int
    cost: float                          # share of the model's FP16 linear-layer time, workload-weighted
    coverage: int                        # M buckets served by a kernel, over the group's layers
    increase: float                      # accuracy cost from the sensitivity file (0 without one)
    predictions: tuple[tuple[PointPrediction, ...], ...]   # per linear of the group


def _ranking(est) -> tuple[float, float]:
    """Fastest first; among equal estimates (one bound hides the others) the config whose other resources are
    less loaded, e.g. a larger wgmma tile when the g128 promotion bounds both: its tensor work is not free in
    reality, the overlap is imperfect (measured: 64x128 ran 0.76x of 128x128; bench/notes/sm90-prefill.md,
    "v3 g128")."""
    return est.us, est.tensor_us + est.dequant_us + est.memory_us


class _Planner:
    """One planning run; caches bucket choices, which families cannot change during a run."""

    def __init__(self, gpu: GpuSpec, model: ModelSpec, workload: WorkloadSpec, budget: Budget,
                 constants: CostConstants, fused: bool):
        self.gpu, self.model, self.workload, self.budget, self.c = gpu, model, workload, budget, constants
        self.fused = fused
        self.groups = activation_groups(layer_graph(model, fused))
        self.weights = workload.normalised_weights()
        self._buckets: dict[_Problem, tuple[Bucket, ...]] = {}
        self.fp16_totals = tuple(
            sum(model.num_layers * fp16_time(gpu, p.m, lin.n, lin.k, constants).us
                for grp in self.groups for lin in grp.linears)
            for p in workload.points)

    # ------------------------------------------------------------------------------------ kernels per bucket

    def buckets(self, prob: _Problem) -> tuple[Bucket, ...]:
        if prob not in self._buckets:
            self._buckets[prob] = tuple(self._bucket(prob, m_max) for m_max in BUCKET_BOUNDS)
        return self._buckets[prob]

    def _estimate(self, prob: _Problem, m: int, cfg: KernelConfig | None) -> Estimate:
        path = prob.path if cfg is None else cfg.path
        return w4a4_time(self.gpu, m, prob.n, prob.k, prob.granularity, path, cfg, self.c, act_bits=prob.act_bits)

    def _bucket(self, prob: _Problem, m_max: int | None) -> Bucket:
        """Each M bucket may compute on any tensor-core path the GPU has (Hopper: int8 decode kernels, fp8
        prefill kernels); the activation format follows the kernel, the weights stay 4-bit."""
        m = m_max or UNBOUNDED_REPRESENTATIVE_M
        legal = sorted(cfg for path in self.gpu.compute_paths
                       for cfg in legal_configs(self.gpu, path, prob.granularity, prob.n, prob.k, self.model.out_dtype,
                                                m=m_max or _UNBOUNDED_M, act_bits=prob.act_bits))
        if not legal:
            return Bucket(m_max, None, _us(self._estimate(prob, m, None).us), self._no_kernel_reason(prob, m_max))
        timed = sorted((_ranking(self._estimate(prob, m, cfg)), cfg) for cfg in legal)
        (us, _), best = timed[0]
        return Bucket(m_max, best, _us(us),
                      f"fastest of {len(legal)} legal configs at M={m}: {best.family} {best.tile_m}x{best.tile_n}"
                      f"x{best.tile_k} s{best.stages} split-k {best.split_k}, {self._estimate(prob, m, best).bound}"
                      f"-bound")

    def _no_kernel_reason(self, prob: _Problem, m_max: int | None) -> str:
        kind = "per-channel" if prob.granularity.is_channel else "group-wise"
        fams = [f for f in sorted(FAMILIES.values(), key=lambda f: f.name)
                if f.path == prob.path and self.gpu.kernel_arch in f.archs
                and (f.granularity == "channel") == prob.granularity.is_channel]
        if not fams:
            return f"kernel: null: no {kind} {prob.path} kernel family is registered for {self.gpu.kernel_arch}"
        if not any(prob.act_bits in f.act_bits for f in fams):
            return (f"kernel: null: no {kind} {prob.path} kernel family takes {prob.act_bits}-bit activations "
                    f"({', '.join(f.name for f in fams)}: {'/'.join(map(str, fams[0].act_bits))}-bit only)")
        fams = [f for f in fams if prob.act_bits in f.act_bits]
        if all(f.max_m is not None and (m_max is None or m_max > f.max_m) for f in fams):
            return f"kernel: null: {', '.join(f.name for f in fams)} serve only smaller M"
        names = ", ".join(f.name for f in fams)
        configs = [c for f in fams
                   for c in f.configs(self.gpu.kernel_arch, prob.granularity, self.model.out_dtype, prob.act_bits)]
        if not configs:
            return f"kernel: null: {names} offer no configuration for group {prob.granularity.size(prob.k)}"
        reasons = violations(configs[0], self.gpu, prob.n, prob.k)
        return f"kernel: null: no legal {names} config for N={prob.n} K={prob.k} ({'; '.join(reasons[:2])})"

    # ------------------------------------------------------------------------------------ options per group

    def predictions(self, lin: Linear, prob: _Problem) -> tuple[PointPrediction, ...]:
        buckets = self.buckets(prob)
        out = []
        for point, weight in zip(self.workload.points, self.weights):
            bucket = next(b for b in buckets if b.covers(point.m))
            fp16 = fp16_time(self.gpu, point.m, lin.n, lin.k, self.c).us
            w4a4 = self._estimate(prob, point.m, bucket.kernel).us
            out.append(PointPrediction(point.phase, point.m, weight, fp16, w4a4, fp16 / w4a4))
        return tuple(out)

    def served(self, preds: tuple[PointPrediction, ...], prob: _Problem) -> tuple[PointPrediction, ...]:
        """The predictions a plan reports: a GEMM without a kernel runs at FP16 in the user's engine, so it adds
        no speedup (the cost that ranks options keeps the estimate: coverage ranks them first)."""
        buckets = self.buckets(prob)
        return tuple(p if next(b for b in buckets if b.covers(p.m)).kernel is not None
                     else replace(p, w4a4_us=p.fp16_us, speedup=1.0) for p in preds)

    def option(self, grp: ActivationGroup, granularity: Granularity, path: str, act_bits: int = 4) -> _Option:
        preds, coverage, cost = [], 0, 0.0
        for lin in grp.linears:
            prob = _Problem(lin.n, lin.k, granularity, path, act_bits)
            p = self.predictions(lin, prob)
            preds.append(self.served(p, prob))
            coverage += sum(b.kernel is not None for b in self.buckets(prob))
            cost += sum(x.weight * self.model.num_layers * x.w4a4_us / total
                        for x, total in zip(p, self.fp16_totals))
        increase = self.budget.increase(grp.kind_name, granularity, grp.linears[0].k, act_bits)
        return _Option(granularity, self.compute_bound_path(prob), act_bits, cost, coverage, increase, tuple(preds))

    def compute_bound_path(self, prob: _Problem) -> str:
        """A layer's path is that of its largest-M (compute-bound) kernel; smaller buckets may use another."""
        last = self.buckets(prob)[-1].kernel
        return prob.path if last is None else last.path

    def candidates(self, grp: ActivationGroup) -> list[_Option]:
        """Per allowed granularity and activation precision its best path; only those with the best kernel
        coverage. 4-bit options first, each precision fine to coarse."""
        served = sorted({4, *act_bits_served(self.gpu.kernel_arch)})  # 4 is planned even where nothing serves it
        allowed = self.budget.allowed(grp.kind_name, grp.linears[0].k)
        per_choice = []
        for bits in served:
            for g in allowed:
                if bits not in self.budget_act_bits(grp.kind_name, g):
                    continue
                options = [self.option(grp, g, path, bits) for path in self.gpu.compute_paths]
                per_choice.append(min(options, key=lambda o: (-o.coverage, o.cost, o.path)))
        best_coverage = max(o.coverage for o in per_choice)
        return [o for o in per_choice if o.coverage == best_coverage]

    def budget_act_bits(self, kind: str, granularity: Granularity) -> tuple[int, ...]:
        """The budget's precisions for a kind; one it fixes to 8 where no family of the arch takes 8 bits plans 4."""
        wanted = self.budget.act_bits(kind, granularity)
        served = act_bits_served(self.gpu.kernel_arch)
        return wanted if any(b in served for b in wanted) or 4 in wanted else (4,)

    def worthwhile(self, options: list[_Option]) -> list[_Option]:
        """Per activation precision, fine to coarse, keep a coarser step only if it beats the last kept one by
        ``min_gain``."""
        kept: list[_Option] = []
        for bits in sorted({o.act_bits for o in options}):
            chain = [o for o in options if o.act_bits == bits]
            kept.append(chain[0])
            for o in chain[1:]:
                if o.cost * (1 + self.budget.min_gain) < kept[-1].cost:
                    kept.append(o)
        return kept

    # ------------------------------------------------------------------------------------ choice

    def choose(self) -> tuple[tuple[_Option, list[_Option]], ...]:
        chains = [self.worthwhile(self.candidates(grp)) for grp in self.groups]
        if self.budget.sensitivity is None:  # one precision a kind (4, or the fixed one): its last kept step
            return tuple((chain[-1], chain) for chain in chains)
        combo = _best_combination(chains, self.budget.max_total_increase)
        return tuple(zip(combo, chains))

    def layer_plans(self, choices) -> tuple[LayerPlan, ...]:
        out = []
        for grp, (chosen, chain) in zip(self.groups, choices):
            why = self.rationale(grp, chosen, chain)
            for lin, preds in zip(grp.linears, chosen.predictions):
                out.append(LayerPlan(lin.name, lin.activation, lin.n, lin.k, self.model.num_layers,
                                     chosen.granularity, chosen.path,
                                     tuple(_rounded(p) for p in preds), why, chosen.act_bits))
        return tuple(out)

    def rationale(self, grp: ActivationGroup, chosen: _Option, chain: list[_Option]) -> str:
        lin = grp.linears[0]
        m = max(p.m for p in self.workload.points)
        first = chain[0]
        est = w4a4_time(self.gpu, m, lin.n, lin.k, first.granularity, first.path, None, self.c)
        rho = self.gpu.rho_of(chosen.path)
        dq = f"at M={m} {first.granularity.name} dequant is {est.dequant_us / est.tensor_us:.2f}x tensor time (rho {rho:.0f})"
        if chosen.granularity == first.granularity:
            allowed = self.budget.allowed(grp.kind_name, lin.k)
            faster = any(o.granularity > chosen.granularity and o.cost < chosen.cost for o in chain)
            tail = "no coarser granularity allowed" if len(allowed) == 1 else \
                "faster coarser groups exceed the accuracy budget" if faster else \
                f"coarser groups gain < {self.budget.min_gain:.0%}"
            why = f"{chosen.granularity.name}: {tail}; {dq}"
        else:
            why = (f"{chosen.granularity.name}: {first.cost / chosen.cost:.2f}x less time than {first.granularity.name};"
                   f" {dq}; coarsest allowed {dict(self.budget.coarsest)[grp.kind_name].name}")
        dropped = (len(self.budget.allowed(grp.kind_name, lin.k))
                   - sum(o.act_bits == 4 for o in self.candidates(grp)))
        if dropped:
            why += f"; {dropped} allowed granularities have fewer M buckets with a registered kernel"
        if chosen.act_bits == 8:
            why += f"; 8-bit activations: {self.act8_cost(chosen, chain)}"
        elif dict(self.budget.fixed_act_bits).get(grp.kind_name) == 8:
            why += (f"; the budget fixes 8-bit activations, but no kernel family for {self.gpu.kernel_arch} takes "
                    "them: 4-bit")
        if self.budget.sensitivity is not None:
            why += f"; accuracy increase {chosen.increase:g} ({self.budget.sensitivity.metric})"
        if chosen.path != "int4":
            why += f"; {chosen.path} tensor cores: {self.gpu.name} has no native INT4"
        return why

    def act8_cost(self, chosen: _Option, chain: list[_Option]) -> str:
        """What the 8 bits cost: time and accuracy against 4 bits at the same granularity, else against the
        cheapest 4-bit option."""
        four = [o for o in chain if o.act_bits == 4]
        if not four:
            return "the only option with the best kernel coverage"
        same = [o for o in four if o.granularity == chosen.granularity]
        other = same[0] if same else min(four, key=lambda o: o.cost)
        return (f"{chosen.cost / other.cost:.3f}x the time of 4-bit {other.granularity.name}, accuracy change "
                f"{chosen.increase:g} against {other.increase:g}")

    def gemm_plans(self, layers: tuple[LayerPlan, ...]) -> tuple[GemmPlan, ...]:
        users: dict[_Problem, list[str]] = {}
        for lp in layers:
            users.setdefault(_Problem(lp.n, lp.k, lp.granularity, lp.path, lp.act_bits), []).append(lp.name)
        return tuple(GemmPlan(p.n, p.k, p.granularity, p.path, self.model.out_dtype, tuple(names), self.buckets(p),
                              p.act_bits)
                     for p, names in sorted(users.items(), key=lambda item: _gemm_order(item[0])))

    def totals(self, choices) -> Totals:
        per_point = []
        for i, (point, weight) in enumerate(zip(self.workload.points, self.weights)):
            w4a4 = sum(self.model.num_layers * preds[i].w4a4_us
                       for chosen, _ in choices for preds in chosen.predictions)
            fp16 = self.fp16_totals[i]
            per_point.append(PointPrediction(point.phase, point.m, weight, fp16, w4a4, fp16 / w4a4))
        end_to_end = 1.0 / sum(p.weight * p.w4a4_us / p.fp16_us for p in per_point)
        return Totals(tuple(_rounded(p) for p in per_point), _ratio(end_to_end))


def _gemm_order(p: _Problem) -> tuple:
    """Plans list GEMMs by shape, per-channel before group-wise (groups fine to coarse), then path."""
    return p.n, p.k, not p.granularity.is_channel, p.granularity, p.path, p.act_bits


def _rounded(p: PointPrediction) -> PointPrediction:
    return PointPrediction(p.phase, p.m, _ratio(p.weight), _us(p.fp16_us), _us(p.w4a4_us), _ratio(p.speedup))


def _best_combination(chains: list[list[_Option]], limit: float) -> tuple[_Option, ...]:
    """Cheapest combination within the accuracy limit (at equal cost fewer 8-bit activations: 4 bits is the
    default, 8 only where the limit needs them; then the more accurate); if none fits, the least inaccurate one."""
    combos = list(itertools.product(*chains))
    fitting = [c for c in combos if sum(o.increase for o in c) <= limit + 1e-12]

    def eight(c) -> int:
        return sum(o.act_bits == 8 for o in c)
    if fitting:
        return min(fitting, key=lambda c: (sum(o.cost for o in c), eight(c), sum(o.increase for o in c)))
    return min(combos, key=lambda c: (sum(o.increase for o in c), sum(o.cost for o in c), eight(c)))


def _check_sensitivity_model(budget: Budget, model: ModelSpec) -> None:
    if budget.sensitivity is not None and budget.sensitivity.model != model.name:
        raise SpecError(f"the sensitivity file is for model {budget.sensitivity.model!r}, not {model.name!r}")


def make_plan(gpu: str | Path | GpuSpec, model: str | Path | ModelSpec,
              workload: str | Path | WorkloadSpec | None = None, budget: str | Path | Budget | None = None,
              *, fused: bool = True, constants: CostConstants = DEFAULT_CONSTANTS) -> Plan:
    """Plan a model on a GPU. Each argument is a shipped name, a path to a YAML file, or a spec object."""
    gpu_spec, model_spec = load_gpu(gpu), load_model(model)
    work = load_workload(workload if workload is not None else DEFAULT_WORKLOAD)
    budget_spec = load_budget(budget)
    _check_sensitivity_model(budget_spec, model_spec)
    planner = _Planner(gpu_spec, model_spec, work, budget_spec, constants, fused)
    choices = planner.choose()
    layers = planner.layer_plans(choices)
    return Plan(PLAN_VERSION, __version__, gpu_spec.name, gpu_spec.sha256(), model_spec.name, model_spec.sha256(),
                fused, model_spec.out_dtype, work, budget_spec, constants, planner.totals(choices), layers,
                planner.gemm_plans(layers))
