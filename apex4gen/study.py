"""`apex4gen study`: a model's W4A4 GEMMs measured per granularity and M on the current GPU, against cuBLAS FP16
in the same run and next to the cost model's prediction (APEX4's speedup-vs-M figure, for this GPU).

Plans. One plan per granularity, made by the normal planner with every layer forced to it (a budget whose
finest and coarsest are that granularity). Per GEMM and M bucket its routes give the planner's kernel; an M is
served by the bucket it falls in, as the dispatcher serves it.

Candidates. For a bucket the planner ranks, with the cost model, the ``legal_configs`` of every tensor-core path
the GPU has, at the bucket's upper M (the unbounded bucket: any M), and keeps the fastest. The study times that
same set at each M of the bucket: the planner's choice and the others, so whether the choice is the fastest is
measured, not predicted. On sm_90a that is at most 7 configurations (per-channel at M <= 64: the decode kernel
and six prefill configurations). Where a GPU has more (the sm_80 families' tile lists), the study keeps the
``max_candidates`` fastest by prediction at that M, the planner's choice always among them: each distinct
configuration is one more compile (about a minute of one core), and configurations the model predicts far slower
are not the planner's near misses.

Builds. Each granularity's plan goes through the normal build stage into ``<out>/<gpu>-<model>-<granularity>``,
with the candidates its routes do not name as ``extra_kernels``: compiled into the library without a route and
called by index (``Build.linear(..., kernel=)``). Objects come from the shared object cache, so a rerun compiles
nothing. The builds run concurrently, one ninja each, so that their compiles share the machine's cores.

Timing. :mod:`apex4gen.bench`'s method: inputs rotated over enough copies that the weights cannot stay in L2,
CUDA-graph replays, the median over samples; the W4A4 op end to end (activation quantization included) and
cuBLAS FP16 on the same inputs in the same run. Replays per sample and samples shrink with the predicted time
(:func:`timing_for`): the bench's 20 x 15 up to 250 µs a call, down to 2 x 7 for calls of milliseconds.
For llama2-70b on the H100 spec that is six builds holding 15 distinct kernels (nine prefill kernels of about a
minute of one core each, six decode kernels of about 10 s), 128 points, 384 kernel timings and 32 of FP16; the
cost model puts the timing at about 25 s of GPU time (:func:`expected_seconds`; tests/test_study.py holds it).

Summaries (:func:`summarize`, from the points alone, so a recorded JSON gives the same): the share of points
whose prediction is within ±25% of the measured time (target 80%), the share of points with more than one
candidate where the planner's choice is within 10% of the fastest measured one (target 90%), the worst points
of each, and per regime (what bounds the prediction: memory, tensor cores, dequantization; W4A4 candidates
and FP16 apart) the geometric-mean ratio predicted / measured and the spread around it, naming the cost
constants that set that regime.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from . import __version__
from . import build as build_stage
from . import planner
from .budget import Budget, parse_budget
from .costmodel import DEFAULT_CONSTANTS, CostConstants, Estimate, fp16_time, w4a4_time
from .errors import Apex4genError, SpecError
from .granularity import GRANULARITIES, GRANULARITY_NAMES, Granularity
from .kernels import family_of
from .kernels.config import KernelConfig
from .kernels.families import configs_by_name
from .kernels.cpp_names import SM_NUMBER
from .kernels.legality import legal_configs
from .paths import user_cache_dir
from .plan import GemmPlan, Plan
from .specs import GpuSpec, ModelSpec

DEFAULT_MS = (1, 4, 16, 64, 256, 1024, 4096, 8192)
DEFAULT_MAX_CANDIDATES = 8
PREDICTION_TOLERANCE, PREDICTION_TARGET = 0.25, 0.80
CHOICE_TOLERANCE, CHOICE_TARGET = 0.10, 0.90
WORST = 5                      # worst points listed per summary
FORMAT = "apex4gen-study/1"    # the JSON's format tag
# Constants that set each regime's predictions (costmodel.py's table)
REGIME_CONSTANTS = {
    ("w4a4", "memory"): ("dram_efficiency", "partial_tile_bandwidth", "launch_us", "decode_start_us"),
    ("w4a4", "tensor"): ("<path>_tensor_efficiency", "reuse_tile", "streamk_efficiency", "hybrid_fixup_iters"),
    ("w4a4", "dequant"): ("dequant_ops_int", "dequant_ops_float", "dequant_slots", "widening_share",
                          "dequant_overlap"),
    ("fp16", "memory"): ("fp16_stream_efficiency", "launch_us"),
    ("fp16", "tensor"): ("fp16_tensor_efficiency",),
}


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class KernelTime:
    """One kernel measured at one point, next to its prediction (``bound``: what bounds the prediction)."""

    kernel: str
    measured_us: float
    predicted_us: float
    bound: str


@dataclass(frozen=True)
class StudyPoint:
    """One (GEMM, granularity, M): the planner's kernel, FP16, and every candidate timed (the planner's too)."""

    gemm: str
    n: int
    k: int
    m: int
    granularity: str
    kernel: str
    measured_us: float
    predicted_us: float
    fp16_measured_us: float
    fp16_predicted_us: float
    fp16_bound: str
    candidates: tuple[KernelTime, ...]

    @property
    def chosen(self) -> KernelTime:
        return next(c for c in self.candidates if c.kernel == self.kernel)

    @property
    def fastest(self) -> KernelTime:
        return min(self.candidates, key=lambda c: c.measured_us)

    @property
    def choice_ratio(self) -> float:
        """The planner's kernel's time over the fastest candidate's (1.0: it is the fastest)."""
        return self.measured_us / self.fastest.measured_us

    @property
    def measured_speedup(self) -> float:
        return self.fp16_measured_us / self.measured_us

    @property
    def predicted_speedup(self) -> float:
        return self.fp16_predicted_us / self.predicted_us


@dataclass(frozen=True)
class StudyResult:
    meta: dict
    points: tuple[StudyPoint, ...]
    unserved: tuple[tuple[str, str, int], ...]   # (gemm, granularity, M) that no kernel family serves


# ---------------------------------------------------------------------------------------------- setup (no GPU)


@dataclass(frozen=True)
class Case:
    """What is timed at one (GEMM, granularity, M): the planner's kernel and the candidates (fastest predicted
    first, the planner's among them)."""

    gemm: str
    n: int
    k: int
    m: int
    granularity: Granularity
    chosen: KernelConfig
    candidates: tuple[KernelConfig, ...]


@dataclass(frozen=True)
class StudyBuild:
    granularity: Granularity
    plan: Plan
    extra_kernels: tuple[KernelConfig, ...]   # candidates no route of the plan names
    build_dir: Path

    @property
    def kernels(self) -> tuple[KernelConfig, ...]:
        return tuple(sorted(set(self.plan.kernels()) | set(self.extra_kernels)))


@dataclass(frozen=True)
class Setup:
    gpu: GpuSpec
    model: ModelSpec
    constants: CostConstants
    ms: tuple[int, ...]
    gemms: tuple[tuple[str, int, int], ...]    # (layer name, N, K) of the fused plan
    builds: tuple[StudyBuild, ...]
    cases: tuple[Case, ...]
    unserved: tuple[tuple[str, str, int], ...]
    max_candidates: int

    @property
    def granularities(self) -> tuple[Granularity, ...]:
        return tuple(b.granularity for b in self.builds)

    def distinct_kernels(self) -> int:
        return len({cfg for b in self.builds for cfg in b.kernels})


def forced_budget(granularity: Granularity) -> Budget:
    """Every layer kind at exactly ``granularity``."""
    only = {"default": granularity.name}
    return parse_budget({"finest": only, "coarsest": only}, f"(study: every layer at {granularity.name})")


def forced_plan(gpu: GpuSpec, model: ModelSpec, granularity: Granularity) -> Plan:
    return planner.make_plan(gpu, model, budget=forced_budget(granularity))


def default_granularities(gpu: GpuSpec, model: ModelSpec, gemms: tuple[str, ...] | None = None
                          ) -> tuple[Granularity, ...]:
    """The granularities that divide every studied GEMM's K and for which a kernel serves each of them at some M."""
    out = []
    for g in GRANULARITIES:
        plan = forced_plan(gpu, model, g)
        layers = [lp for lp in plan.layers if gemms is None or lp.name in gemms]
        if all(g.fits(lp.k) and any(b.kernel for b in plan.gemm_for(lp).buckets) for lp in layers):
            out.append(g)
    return tuple(out)


def parse_granularities(names: list[str]) -> tuple[Granularity, ...]:
    unknown = [n for n in names if n not in GRANULARITY_NAMES]
    if unknown:
        raise SpecError(f"--granularities: unknown {', '.join(unknown)}; choose from {','.join(GRANULARITY_NAMES)}")
    return tuple(sorted({Granularity.parse(n) for n in names}))


def _check_divides(granularities, layers) -> None:
    for g in granularities:
        for name, _, k in layers:
            if not g.fits(k):
                raise SpecError(f"granularity {g.name} does not divide K={k} of {name}; leave it out of "
                                f"--granularities (or study only other GEMMs with --gemms)")


def _select_gemms(plan: Plan, names: tuple[str, ...] | None) -> tuple[tuple[str, int, int], ...]:
    layers = tuple((lp.name, lp.n, lp.k) for lp in plan.layers)
    if names is None:
        return layers
    known = [name for name, _, _ in layers]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SpecError(f"--gemms: {plan.model} has no GEMM {', '.join(unknown)}; its GEMMs: {', '.join(known)}")
    return tuple(layer for layer in layers if layer[0] in names)


def predict(gpu: GpuSpec, constants: CostConstants, m: int, n: int, k: int, cfg: KernelConfig) -> Estimate:
    return w4a4_time(gpu, m, n, k, cfg.granularity, cfg.path, cfg, constants)


def candidates(gpu: GpuSpec, gemm: GemmPlan, m: int, constants: CostConstants, limit: int
               ) -> tuple[KernelConfig, ...]:
    """The configurations the planner weighed for the bucket serving ``m`` (see the module docstring), fastest
    predicted at ``m`` first: at most ``limit``, the planner's choice always among them."""
    bucket = gemm.bucket_for(m)
    legal = {cfg for path in gpu.compute_paths
             for cfg in legal_configs(gpu, path, gemm.granularity, gemm.n, gemm.k, gemm.out_dtype,
                                      m=bucket.m_max or build_stage.INT_MAX)}
    ranked = sorted(legal, key=lambda cfg: (predict(gpu, constants, m, gemm.n, gemm.k, cfg).us, cfg))
    kept = ranked[:limit]
    if bucket.kernel not in kept:
        kept = kept[:limit - 1] + [bucket.kernel]
    return tuple(kept)


def prepare(gpu: GpuSpec, model: ModelSpec, out: Path, granularities: tuple[Granularity, ...] | None = None,
            ms: tuple[int, ...] = DEFAULT_MS, gemms: tuple[str, ...] | None = None,
            max_candidates: int = DEFAULT_MAX_CANDIDATES) -> Setup:
    """Plans, candidates and build folders of a study; no GPU needed."""
    if max_candidates < 1:
        raise SpecError(f"--max-candidates must be >= 1, got {max_candidates}")
    layers = _select_gemms(forced_plan(gpu, model, GRANULARITIES[-1]), gemms)
    explicit = granularities is not None
    if not explicit:
        granularities = default_granularities(gpu, model, tuple(name for name, _, _ in layers))
    _check_divides(granularities, layers)
    builds, cases, unserved = [], [], []
    for g in granularities:
        plan = forced_plan(gpu, model, g)
        g_cases = []
        for name, n, k in layers:
            gemm = plan.gemm_for(name)
            for m in ms:
                chosen = gemm.bucket_for(m).kernel
                if chosen is None:
                    unserved.append((name, g.name, m))
                    continue
                found = candidates(gpu, gemm, m, plan.cost_constants, max_candidates)
                g_cases.append(Case(name, n, k, m, g, chosen, found))
        if not g_cases and not explicit:
            continue
        if not g_cases:
            raise SpecError(f"no kernel family serves {g.name} for {model.name} on {gpu.name} at the M studied; "
                            f"leave it out of --granularities (served: "
                            f"{', '.join(x.name for x in default_granularities(gpu, model)) or 'none'})")
        extra = {cfg for c in g_cases for cfg in c.candidates} - set(plan.kernels())
        builds.append(StudyBuild(g, plan, tuple(sorted(extra)), out / f"{gpu.name}-{model.name}-{g.name}"))
        cases += g_cases
    if not builds:
        raise SpecError(f"no kernel family serves {model.name} on {gpu.name} at the M studied; study other --ms")
    return Setup(gpu, model, builds[0].plan.cost_constants, tuple(ms), layers, tuple(builds), tuple(cases),
                 tuple(unserved), max_candidates)


def default_out_dir() -> Path:
    """A cache folder for the study's builds (beside the object cache)."""
    return user_cache_dir() / "study"


def check_device(gpu: GpuSpec) -> str:
    """The study times kernels on the GPU the spec describes: refuse early (before minutes of building)."""
    import torch

    if not torch.cuda.is_available():
        raise Apex4genError("no CUDA GPU here: the study times kernels on the GPU; run it on the GPU the spec "
                            f"describes ({gpu.name}), or re-plot a recorded study with --from-json")
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if 10 * major + minor != SM_NUMBER[gpu.kernel_arch]:
        raise Apex4genError(f"this GPU is {name} (sm_{major}{minor}), the spec {gpu.name} is {gpu.kernel_arch}: "
                            "give the spec of this GPU with --gpu")
    return name


# ---------------------------------------------------------------------------------------------- build


def build_all(setup: Setup, echo: Callable[[str], None], jobs: int | None = None, force: bool = False) -> None:
    """Every granularity's build, concurrently (each ninja runs its own compiles; their sum shares the cores)."""
    from . import toolchain

    toolchain.nvcc_version()  # cached once here rather than raced for by the threads
    toolchain.cutlass_version()
    echo(f"building {len(setup.builds)} libraries ({setup.distinct_kernels()} distinct kernels, "
         f"compiled once through the object cache) under {setup.builds[0].build_dir.parent}")

    def one(b: StudyBuild) -> None:
        started = time.monotonic()
        result = build_stage.build(b.plan, setup.gpu, b.build_dir, jobs=jobs, progress=False, force=force,
                                   allow_partial=True, extra_kernels=b.extra_kernels)
        work = f"{result.compiled} step(s) compiled" if result.compiled else "up to date"
        echo(f"  built {b.granularity.name}: {len(result.kernels)} kernels ({len(b.extra_kernels)} unrouted "
             f"candidates), {work}, {time.monotonic() - started:.0f} s")

    with ThreadPoolExecutor(max_workers=len(setup.builds)) as pool:
        for future in [pool.submit(one, b) for b in setup.builds]:
            future.result()


# ---------------------------------------------------------------------------------------------- timing


def timing_for(predicted_us: float) -> tuple[int, int]:
    """Replays a sample and samples: the bench's 20 x 15 while a sample is at most ~5 ms, fewer above."""
    reps = max(2, min(20, round(5000.0 / max(predicted_us, 1e-3))))
    samples = 15 if predicted_us <= 1000.0 else 7
    return reps, samples


def expected_seconds(setup: Setup) -> float:
    """GPU time the timing will take by the cost model's predictions (warm-up, one replay, the samples)."""
    def calls(us: float) -> float:
        reps, samples = timing_for(us)
        return (3 + reps + reps * samples) * us * 1e-6

    fp16 = {(c.gemm, c.m): fp16_time(setup.gpu, c.m, c.n, c.k, setup.constants).us for c in setup.cases}
    total = sum(calls(us) for us in fp16.values())
    for c in setup.cases:
        for cfg in c.candidates:
            total += calls(max(predict(setup.gpu, setup.constants, c.m, c.n, c.k, cfg).us, fp16[(c.gemm, c.m)]))
    return total


def measure(setup: Setup, builds: dict, echo: Callable[[str], None]) -> list[StudyPoint]:
    """Time every case on the loaded ``builds`` (granularity -> :class:`apex4gen.loader.Build`)."""
    import torch

    from . import bench

    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype = torch.float16 if setup.model.out_dtype == "f16" else torch.bfloat16
    points = []
    for name, n, k in setup.gemms:
        cases = [c for c in setup.cases if c.gemm == name]
        if not cases:
            continue
        copies = bench.copies_for(n * k // 2)
        ms = sorted({c.m for c in cases})
        x = {m: [torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) for _ in range(copies)] for m in ms}
        started = time.monotonic()
        fp16 = {}
        for m in ms:
            est = fp16_time(setup.gpu, m, n, k, setup.constants)
            fp16[m] = (bench.time_fp16(x[m], n, k, *timing_for(est.us)), est)
        echo(f"{name} ({n}x{k}) FP16: {len(ms)} M in {time.monotonic() - started:.1f} s")
        for g in setup.granularities:
            g_cases = [c for c in cases if c.granularity == g]
            if g_cases:
                started = time.monotonic()
                points += _measure_granularity(setup, builds[g], g_cases, x, fp16, copies, gen, dtype)
                runs = sum(len(c.candidates) for c in g_cases)
                echo(f"{name} {g.name}: {len(g_cases)} M, {runs} kernel timings in "
                     f"{time.monotonic() - started:.1f} s")
        del x
    return points


def _measure_granularity(setup: Setup, build, cases: list[Case], x: dict, fp16: dict, copies: int, gen,
                         dtype) -> list[StudyPoint]:
    import torch

    from . import bench, reference

    n, k, g = cases[0].n, cases[0].k, cases[0].granularity
    layouts = tuple(sorted({family_of(cfg).weight_layout for c in cases for cfg in c.candidates}))
    weights = [build.pack(reference.quantize_weight(torch.randn(n, k, device="cuda", dtype=dtype, generator=gen),
                                                    g.size(k)), layouts=layouts) for _ in range(copies)]
    entries = {e.name: e for e in build.kernels}
    points = []
    for c in cases:
        fp16_us, fp16_est = fp16[c.m]
        times = []
        for cfg in c.candidates:
            est = predict(setup.gpu, setup.constants, c.m, n, k, cfg)
            entry = entries[cfg.procedural_name()]
            xs = x[c.m]
            us = bench.time_graph(lambda i: build.linear(xs[i % copies], weights[i % copies], kernel=entry),
                                  copies, *timing_for(max(est.us, fp16_est.us)))
            times.append(KernelTime(cfg.procedural_name(), us, est.us, est.bound))
        chosen = next(t for t in times if t.kernel == c.chosen.procedural_name())
        points.append(StudyPoint(c.gemm, n, k, c.m, g.name, chosen.kernel, chosen.measured_us, chosen.predicted_us,
                                 fp16_us, fp16_est.us, fp16_est.bound, tuple(times)))
    return points


# ---------------------------------------------------------------------------------------------- summaries


def _ratio_off(ratio: float) -> float:
    """How far a ratio is from 1, symmetric in over- and under-prediction."""
    return max(ratio, 1.0 / ratio)


def _within(predicted: float, measured: float) -> bool:
    return abs(predicted - measured) <= PREDICTION_TOLERANCE * measured


def _share(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def _prediction_summary(points) -> dict:
    runs = [c for p in points for c in p.candidates]
    hits = sum(_within(p.predicted_us, p.measured_us) for p in points)
    worst = sorted(points, key=lambda p: -_ratio_off(p.predicted_us / p.measured_us))[:WORST]
    return {
        "points": len(points), "within": hits, "share": _share(hits, len(points)),
        "tolerance": PREDICTION_TOLERANCE, "target": PREDICTION_TARGET,
        "met": bool(points) and hits / len(points) >= PREDICTION_TARGET,
        "all_candidates": {"runs": len(runs), "within": sum(_within(c.predicted_us, c.measured_us) for c in runs),
                           "share": _share(sum(_within(c.predicted_us, c.measured_us) for c in runs), len(runs))},
        "fp16": {"points": len(points), "within": sum(_within(p.fp16_predicted_us, p.fp16_measured_us) for p in points),
                 "share": _share(sum(_within(p.fp16_predicted_us, p.fp16_measured_us) for p in points), len(points))},
        "worst": [{"gemm": p.gemm, "granularity": p.granularity, "m": p.m, "kernel": p.kernel,
                   "measured_us": p.measured_us, "predicted_us": p.predicted_us,
                   "ratio": round(p.predicted_us / p.measured_us, 4)} for p in worst],
    }


def _choice_summary(points) -> dict:
    """Over the points where the planner had a choice (one candidate is trivially the fastest)."""
    chosen = [p for p in points if len(p.candidates) > 1]
    hits = sum(p.choice_ratio <= 1.0 + CHOICE_TOLERANCE for p in chosen)
    worst = sorted(chosen, key=lambda p: -p.choice_ratio)[:WORST]
    return {
        "points": len(chosen), "within": hits, "share": _share(hits, len(chosen)),
        "single_candidate": len(points) - len(chosen), "tolerance": CHOICE_TOLERANCE, "target": CHOICE_TARGET,
        "met": bool(chosen) and hits / len(chosen) >= CHOICE_TARGET,
        "worst": [{"gemm": p.gemm, "granularity": p.granularity, "m": p.m, "kernel": p.kernel,
                   "fastest": p.fastest.kernel, "ratio": round(p.choice_ratio, 4)} for p in worst],
    }


def _regime(label: str, constants: tuple[str, ...], pairs: list[tuple[float, float]]) -> dict:
    """Bias (geometric mean of predicted / measured) and spread around it (geometric standard deviation - 1)."""
    logs = [math.log(p / m) for p, m in pairs]
    mean = sum(logs) / len(logs)
    spread = math.exp(math.sqrt(sum((v - mean) ** 2 for v in logs) / len(logs))) - 1.0
    hits = sum(_within(p, m) for p, m in pairs)
    return {"regime": label, "constants": list(constants), "runs": len(pairs), "geomean_ratio": round(math.exp(mean), 4),
            "spread": round(spread, 4), "within": hits, "share": _share(hits, len(pairs))}


def _regimes(points) -> list[dict]:
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for p in points:
        groups.setdefault(("fp16", p.fp16_bound), []).append((p.fp16_predicted_us, p.fp16_measured_us))
        for c in p.candidates:
            groups.setdefault(("w4a4", c.bound), []).append((c.predicted_us, c.measured_us))
    return [_regime(f"{'W4A4' if kind == 'w4a4' else 'FP16'} {bound}-bound",
                    REGIME_CONSTANTS.get((kind, bound), ()), pairs)
            for (kind, bound), pairs in sorted(groups.items(), key=lambda item: (item[0][0] != "w4a4", item[0][1]))]


def summarize(points) -> dict:
    points = list(points)
    return {"prediction": _prediction_summary(points), "planner": _choice_summary(points),
            "regimes": _regimes(points)}


def summary_lines(summary: dict) -> list[str]:
    pred, choice = summary["prediction"], summary["planner"]
    lines = [
        f"prediction within ±{pred['tolerance']:.0%} of measured: {pred['within']} of {pred['points']} points "
        f"({_pct(pred['share'])}; target >= {pred['target']:.0%}: {'met' if pred['met'] else 'NOT met'}); "
        f"every candidate: {_pct(pred['all_candidates']['share'])} of {pred['all_candidates']['runs']}, "
        f"FP16: {_pct(pred['fp16']['share'])}",
        f"planner's choice within {choice['tolerance']:.0%} of the fastest measured candidate: {choice['within']} of "
        f"{choice['points']} points with a choice ({_pct(choice['share'])}; target >= {choice['target']:.0%}: "
        f"{'met' if choice['met'] else 'NOT met'}); {choice['single_candidate']} points had one candidate",
    ]
    lines += [f"  worst prediction: {w['gemm']} {w['granularity']} M={w['m']}: predicted/measured {w['ratio']:.2f} "
              f"({w['predicted_us']:.1f} vs {w['measured_us']:.1f} µs, {_short(w['kernel'])})" for w in pred["worst"]]
    lines += [f"  worst choice: {w['gemm']} {w['granularity']} M={w['m']}: {w['ratio']:.2f}x the fastest "
              f"({_short(w['kernel'])} vs {_short(w['fastest'])})" for w in choice["worst"] if w["ratio"] > 1.0]
    for r in summary["regimes"]:
        lines.append(f"  regime {r['regime']}: {r['runs']} runs, predicted/measured geomean {r['geomean_ratio']:.2f}, "
                     f"spread ±{r['spread']:.0%}, {_pct(r['share'])} within ±25%"
                     + (f" (constants: {', '.join(r['constants'])})" if r["constants"] else ""))
    return lines


def unserved_line(unserved) -> str:
    """``g64 at M=256,1024; ...``: the granularities and M without a kernel (for any of the GEMMs studied)."""
    by_granularity: dict[str, set[int]] = {}
    for _, granularity, m in unserved:
        by_granularity.setdefault(granularity, set()).add(m)
    return "; ".join(f"{g} at M={','.join(map(str, sorted(ms)))}" for g, ms in by_granularity.items())


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def _short(kernel: str) -> str:
    return kernel.removeprefix("apex4gen_")


# ---------------------------------------------------------------------------------------------- files


def to_json(result: StudyResult) -> dict:
    return {"format": FORMAT, "meta": result.meta, "summary": summarize(result.points),
            "points": [asdict(p) for p in result.points],
            "unserved": [{"gemm": g, "granularity": gran, "m": m} for g, gran, m in result.unserved]}


def from_json(data: object, source: str) -> StudyResult:
    """A recorded study; the summary is recomputed from the points (the file's copy is for readers)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SpecError(f"{source} is not an apex4gen study JSON (no \"format\": \"{FORMAT}\"); make one with "
                        "`apex4gen study --json FILE`")
    try:
        points = tuple(StudyPoint(**{**p, "candidates": tuple(KernelTime(**c) for c in p["candidates"])})
                       for p in data["points"])
        unserved = tuple((u["gemm"], u["granularity"], u["m"]) for u in data.get("unserved", ()))
        for p in points:
            p.chosen  # the planner's kernel is among the candidates
    except (KeyError, TypeError, StopIteration) as err:
        raise SpecError(f"{source}: a point is malformed ({type(err).__name__}: {err}); re-record the study") from None
    return StudyResult(data.get("meta", {}), points, unserved)


def repredict(result: StudyResult, gpu: GpuSpec, constants: CostConstants = DEFAULT_CONSTANTS) -> StudyResult:
    """The recorded times beside this version's predictions (``constants`` on ``gpu``'s spec) of every kernel
    and of FP16: what a change of the cost model does to a recorded study, without timing anything again."""
    configs = configs_by_name(gpu.kernel_arch, {p.granularity for p in result.points})
    points = []
    for p in result.points:
        new = replace(p, candidates=tuple(_repredicted(t, configs, gpu, constants, p) for t in p.candidates))
        fp16 = fp16_time(gpu, p.m, p.n, p.k, constants)
        points.append(replace(new, predicted_us=new.chosen.predicted_us, fp16_predicted_us=fp16.us,
                              fp16_bound=fp16.bound))
    # the times stay the recording's; the predictions (and what made them) are this version's
    meta = {**result.meta, "cost_constants": constants.to_dict(), "gpu_spec_sha256": gpu.sha256(),
            "repredicted_by": f"apex4gen {__version__}"}
    return replace(result, meta=meta, points=tuple(points))


def _repredicted(timed: KernelTime, configs: dict[str, KernelConfig], gpu: GpuSpec, constants: CostConstants,
                 p: StudyPoint) -> KernelTime:
    cfg = configs.get(timed.kernel)
    if cfg is None:
        raise SpecError(f"{timed.kernel} (timed for {p.gemm} {p.granularity} at M={p.m}) is no configuration of this "
                        f"version's kernel families for {gpu.name}; the study can only be replotted as recorded")
    est = predict(gpu, constants, p.m, p.n, p.k, cfg)
    return replace(timed, predicted_us=est.us, bound=est.bound)


def write_atomic(path: Path, data: bytes) -> None:
    """A temporary file in the same folder, then a rename: a failed write leaves nothing half-written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------- tables

TABLE_COLUMNS = ("gemm", "N x K", "gran", "M", "kernel (planner's)", "W4A4 µs", "pred µs", "pred/meas",
                 "FP16 µs", "FP16 pred", "speedup", "pred speedup", "candidates", "choice/fastest")


def table_rows(points) -> list[tuple[str, ...]]:
    return [(p.gemm, f"{p.n}x{p.k}", p.granularity, str(p.m), _short(p.kernel), f"{p.measured_us:.1f}",
             f"{p.predicted_us:.1f}", f"{p.predicted_us / p.measured_us:.2f}", f"{p.fp16_measured_us:.1f}",
             f"{p.fp16_predicted_us:.1f}", f"{p.measured_speedup:.2f}", f"{p.predicted_speedup:.2f}",
             str(len(p.candidates)), f"{p.choice_ratio:.2f}") for p in points]


def markdown(result: StudyResult) -> str:
    meta = result.meta
    lines = [f"# W4A4 study: {meta.get('model', '?')} on {meta.get('device', '?')}", "",
             f"GPU spec {meta.get('gpu', '?')}, {meta.get('time', '?')}, apex4gen {meta.get('apex4gen', '?')}. "
             "Times in µs, end to end (activation quantization included); speedup = cuBLAS FP16 / W4A4; "
             "choice/fastest = the planner's kernel over the fastest measured candidate."
             + (f" Predictions re-made by {meta['repredicted_by']} (`--repredict`)." if "repredicted_by" in meta else ""),
             ""]
    lines += [f"- {line.strip()}" for line in summary_lines(summarize(result.points))]
    if result.unserved:
        lines.append(f"- not served by any kernel family (no point): {unserved_line(result.unserved)}")
    lines += ["", "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result.points)]
    return "\n".join(lines) + "\n"
