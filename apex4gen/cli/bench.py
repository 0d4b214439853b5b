"""`apex4gen bench BUILD_DIR`: time a loaded build's GEMMs against cuBLAS and PyTorch's int4 kernel."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import click

from .. import bench as bench_stage
from ..errors import Apex4genError
from ..files import check_output_folder
from ..bench import Point
from ..plan import Plan


@dataclass(frozen=True)
class Target:
    """One performance target: the points it reads, the ratio it takes of each, how they reduce, the minimum."""

    label: str
    selects: Callable[[Point], bool]
    ratio: Callable[[Point], float | None]
    minimum: float
    reduce: str = "geomean"   # or "min": the worst point ("never slower")
    bound: str = "tensor"     # what is printed beside it: "stream", "tensor" (share of the peak) or "worst"


def _vs(baseline: str) -> Callable[[Point], float | None]:
    return lambda p: p.speedup(baseline)


# The Hopper path's targets: the decode bound is the weight stream measured in the same run; g128 prefill
# against cuBLAS FP8 per-tensor (the scaling DeepGEMM-class kernels beat), per-channel against the faster FP8.
TARGETS = (
    Target("M<=16: W4A4 op vs the pure 4-bit weight stream", lambda p: p.m <= 16, lambda p: p.stream_fraction, 0.95,
           bound="stream"),
    Target("M=4096 g128 vs cuBLAS FP8 per-tensor", lambda p: p.m == 4096 and p.granularity == "g128",
           _vs("fp8_tensor"), 0.8),
    Target("M=4096 channel vs cuBLAS FP8", lambda p: p.m == 4096 and p.granularity == "channel", _vs("fp8"), 1.1),
    Target("every M, g128: never slower than cuBLAS FP16 (worst point)", lambda p: p.granularity == "g128",
           _vs("fp16"), 1.0, "min", "worst"),
    Target("every M, channel: never slower than cuBLAS FP16 (worst point)", lambda p: p.granularity == "channel",
           _vs("fp16"), 1.0, "min", "worst"),
)
# Issue 16 item 3 on the op with its quantizer fused into its producer (--fused-producer): o_proj, whose input no
# fusable op makes, counts as its plain op.
FUSED_TARGET = Target("M=4096 channel vs cuBLAS FP8, quantizer fused into its producer (o_proj unfused)",
                      lambda p: p.m == 4096 and p.granularity == "channel",
                      lambda p: p.fused_speedup("fp8") or p.speedup("fp8"), 1.1)

PREDICTION_TOLERANCE = 0.25   # the cost model's predictions against each measured point


@click.command("bench")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--ms", default=",".join(map(str, bench_stage.DEFAULT_MS)), show_default=True,
              help="Comma-separated M values (tokens).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every point here.")
@click.option("--baselines", default=",".join(bench_stage.BASELINES), show_default=True)
@click.option("--breakdown", is_flag=True,
              help="Also time the activation quantizer and the GEMM alone (ops with a separate quantizer).")
@click.option("--fused-producer", is_flag=True,
              help="Also time each op with its quantizer fused into the op making its input (RMSNorm, SiLU*mul): "
                   "fused op + GEMM minus the plain PyTorch op.")
def bench_command(build_dir: Path, ms: str, json_path: Path | None, baselines: str, breakdown: bool,
                  fused_producer: bool):
    """Time each GEMM of BUILD_DIR's plan at each M, end to end, against cuBLAS FP16/INT8/FP8."""
    import torch

    from .. import specs
    from ..loader import load
    from ..probe import stream_us

    m_values = _parse_ms(ms)
    want = _parse_baselines(baselines)
    check_output_folder(json_path, "--json")
    build = load(build_dir)
    plan = Plan.load(build_dir / "plan.yaml")
    gpu = specs.load_gpu(build.manifest.gpu)
    bandwidth = bench_stage.copy_bandwidth()
    producers = _producers(plan) if fused_producer else {}
    points = []
    for layer in plan.layers:
        group = layer.granularity.size(layer.k)
        dtype = torch.float16 if plan.out_dtype == "f16" else torch.bfloat16
        bound = stream_us(layer.n, layer.k, group) if min(m_values) <= 16 else None
        points += bench_stage.bench_gemm(build, layer.name, layer.n, layer.k, group, m_values, dtype, want,
                                         tc_peak_tops=gpu.tops(layer.path), bandwidth=bandwidth,
                                         breakdown=breakdown, act_bits=layer.act_bits, stream_us=bound,
                                         producer=producers.get(layer.name))
    points = _with_predictions(points, plan, gpu)
    _print_table(points, want, torch.cuda.get_device_name(), bandwidth, breakdown, fused_producer)
    _print_targets(points, (*TARGETS, FUSED_TARGET) if fused_producer else TARGETS)
    _print_predictions(points)
    if json_path:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "build": str(build_dir),
                "copy_bandwidth_gbs": bandwidth / 1e9, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "ms": m_values, "baselines": list(want), "breakdown": breakdown, "fused_producer": fused_producer}
        bench_stage.write_json(json_path, points, meta)
        click.echo(f"wrote {json_path}")


def _with_predictions(points: list[Point], plan: Plan, gpu) -> list[Point]:
    """Each point with the cost model's time of the kernel that ran it (a kernel of the plan, by name)."""
    from ..costmodel import w4a4_time

    configs = {cfg.procedural_name(): cfg for cfg in plan.kernels()}
    out = []
    for p in points:
        cfg = configs[p.kernel]
        estimate = w4a4_time(gpu, p.m, p.n, p.k, cfg.granularity, cfg.path, cfg, plan.cost_constants)
        out.append(replace(p, predicted_us=estimate.us))
    return out


def _producers(plan: Plan) -> dict[str, str]:
    """Layer name -> the producer (bench.PRODUCERS) of its input, from the model graph; layers whose input no
    fusable op makes (o_proj: attention's output) are left out."""
    from ..graph import layer_graph
    from ..specs import load_model

    graph = layer_graph(load_model(plan.model), plan.fused)
    out = {}
    for layer in plan.layers:
        (op,) = graph.predecessors(layer.activation)
        if graph.nodes[op]["op"] in bench_stage.PRODUCERS:
            out[layer.name] = graph.nodes[op]["op"]
    return out


def _parse_ms(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise Apex4genError(f"--ms takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise Apex4genError(f"--ms values must be >= 1, got {text!r}")
    return values


def _parse_baselines(text: str) -> tuple[str, ...]:
    """Known baseline names only: a misspelt one would otherwise be left out of the table without a word."""
    want = tuple(b.strip() for b in text.split(",") if b.strip())
    unknown = [b for b in want if b not in bench_stage.BASELINES]
    if unknown:
        raise Apex4genError(f"--baselines: unknown {', '.join(unknown)}; choose from {','.join(bench_stage.BASELINES)}")
    return want


def _print_table(points, want, device: str, bandwidth: float, breakdown: bool = False,
                 fused_producer: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"W4A4 on {device} (copy bandwidth {bandwidth / 1e12:.2f} TB/s); ratios = baseline µs / ours")
    halves = ("quant µs", "GEMM µs") if breakdown else ()
    fused = ("fused µs", "fused xfp8") if fused_producer else ()
    for col in ("gemm", "N x K", "M", "gran", "W4A4 µs", *halves, *[f"x{b}" for b in want], "%BW", "%stream",
                "%TC", *fused, "pred/meas"):
        table.add_column(col, justify="right")
    for p in points:
        ratios = [_fmt(p.speedup(b)) for b in want]
        times = (_fmt(p.quantize_us, ".1f"), _fmt(p.gemm_us, ".1f")) if breakdown else ()
        fused_cells = (_fmt(p.fused_cost_us, ".1f"), _fmt(p.fused_speedup("fp8"))) if fused_producer else ()
        table.add_row(p.gemm, f"{p.n}x{p.k}", str(p.m), p.granularity, f"{p.w4a4_us:.1f}", *times, *ratios,
                      f"{100 * p.bw_fraction:.0f}", _fmt(p.stream_fraction and 100 * p.stream_fraction, ".0f"),
                      f"{100 * p.tc_fraction:.0f}", *fused_cells, _fmt(p.prediction_ratio))
    Console(width=220).print(table)


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _print_targets(points, targets: tuple[Target, ...] = TARGETS) -> None:
    """One line a target with points: the value, met or not, and beside it the bound that caps it."""
    for target in targets:
        chosen = [p for p in points if target.selects(p) and target.ratio(p)]
        if not chosen:
            continue
        ratios = [target.ratio(p) for p in chosen]
        value = min(ratios) if target.reduce == "min" else bench_stage.geomean(ratios)
        verdict = "met" if value >= target.minimum else "NOT met"
        click.echo(f"target {target.label}: {value:.2f}x (>= {target.minimum}x: {verdict}); {_beside(target, chosen)}")


def _print_predictions(points, tolerance: float = PREDICTION_TOLERANCE) -> None:
    """The cost model against the measurement: the points predicted within ``tolerance``, and the worst one."""
    rated = [p for p in points if p.prediction_ratio is not None]
    if not rated:
        return
    within = sum(abs(p.prediction_ratio - 1.0) <= tolerance for p in rated)
    worst = max(rated, key=lambda p: max(p.prediction_ratio, 1.0 / p.prediction_ratio))
    verdict = "met" if within == len(rated) else "NOT met"
    click.echo(f"target cost model within ±{tolerance:.0%} of the measured time (the GEMM alone where timed): "
               f"{within} of {len(rated)} points (every point: {verdict}); worst: {worst.gemm} {worst.granularity} "
               f"at M={worst.m}, predicted {worst.predicted_us:.1f} µs for {worst.modelled_us:.1f}")


def _beside(target: Target, chosen: list[Point]) -> str:
    """The bound of a target: the weight stream against FP16 for the decode target, the worst point for a
    "never slower" one, else the share of the tensor-core peak the points reach."""
    if target.bound == "worst":
        worst = min(chosen, key=target.ratio)
        return f"worst: {worst.gemm} at M={worst.m}"
    if target.bound == "stream":
        streams = [p.baselines_us["fp16"] / p.stream_us for p in chosen if "fp16" in p.baselines_us]
        ours = [p.speedup("fp16") for p in chosen if "fp16" in p.baselines_us]
        if streams:
            return (f"bound: the weight stream runs {bench_stage.geomean(streams):.2f}x cuBLAS FP16, "
                    f"the op {bench_stage.geomean(ours):.2f}x")
    return f"the op at {100 * bench_stage.geomean([p.tc_fraction for p in chosen]):.0f}% of the tensor-core peak"


COMMANDS = [bench_command]
