"""`apex4gen bench BUILD_DIR`: time a loaded build's GEMMs against cuBLAS and PyTorch's int4 kernel."""
from __future__ import annotations

import time
from pathlib import Path

import click

from .. import bench as bench_stage
from ..errors import Apex4genError
from ..files import check_output_folder
from ..plan import Plan

# The Hopper path's targets: (label, which points, baseline, minimum ratio, reduce) where reduce is the
# geometric mean over the GEMMs, or the minimum for "never slower".
TARGETS = (
    ("M<=16 vs cuBLAS FP16", lambda p: p.m <= 16, "fp16", 4.0, "geomean"),
    ("M=4096 g128 vs cuBLAS FP8", lambda p: p.m == 4096 and p.granularity == "g128", "fp8", 1.0, "geomean"),
    ("M=4096 channel vs cuBLAS FP8", lambda p: p.m == 4096 and p.granularity == "channel", "fp8", 1.1, "geomean"),
    ("M=4096 vs cuBLAS INT8", lambda p: p.m == 4096, "int8", 1.3, "geomean"),
    ("every M vs cuBLAS FP16 (worst point)", lambda p: True, "fp16", 1.0, "min"),
)


@click.command("bench")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--ms", default=",".join(map(str, bench_stage.DEFAULT_MS)), show_default=True,
              help="Comma-separated M values (tokens).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every point here.")
@click.option("--baselines", default=",".join(bench_stage.BASELINES), show_default=True)
@click.option("--breakdown", is_flag=True,
              help="Also time the activation quantizer and the GEMM alone (ops with a separate quantizer).")
def bench_command(build_dir: Path, ms: str, json_path: Path | None, baselines: str, breakdown: bool):
    """Time each GEMM of BUILD_DIR's plan at each M, end to end, against cuBLAS FP16/INT8/FP8."""
    import torch

    from .. import specs
    from ..loader import load

    m_values = _parse_ms(ms)
    want = _parse_baselines(baselines)
    check_output_folder(json_path, "--json")
    build = load(build_dir)
    plan = Plan.load(build_dir / "plan.yaml")
    gpu = specs.load_gpu(build.manifest.gpu)
    bandwidth = bench_stage.copy_bandwidth()
    points = []
    for layer in plan.layers:
        group = layer.granularity.size(layer.k)
        dtype = torch.float16 if plan.out_dtype == "f16" else torch.bfloat16
        points += bench_stage.bench_gemm(build, layer.name, layer.n, layer.k, group, m_values, dtype, want,
                                         tc_peak_tops=gpu.tops(layer.path), bandwidth=bandwidth,
                                         breakdown=breakdown, act_bits=layer.act_bits)
    _print_table(points, want, torch.cuda.get_device_name(), bandwidth, breakdown)
    _print_targets(points)
    if json_path:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "build": str(build_dir),
                "copy_bandwidth_gbs": bandwidth / 1e9, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "ms": m_values, "baselines": list(want), "breakdown": breakdown}
        bench_stage.write_json(json_path, points, meta)
        click.echo(f"wrote {json_path}")


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


def _print_table(points, want, device: str, bandwidth: float, breakdown: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"W4A4 on {device} (copy bandwidth {bandwidth / 1e12:.2f} TB/s); ratios = baseline µs / ours")
    halves = ("quant µs", "GEMM µs") if breakdown else ()
    for col in ("gemm", "N x K", "M", "gran", "W4A4 µs", *halves, *[f"x{b}" for b in want], "%BW", "%TC"):
        table.add_column(col, justify="right")
    for p in points:
        ratios = [_fmt(p.speedup(b)) for b in want]
        times = (_fmt(p.quantize_us, ".1f"), _fmt(p.gemm_us, ".1f")) if breakdown else ()
        table.add_row(p.gemm, f"{p.n}x{p.k}", str(p.m), p.granularity, f"{p.w4a4_us:.1f}", *times, *ratios,
                      f"{100 * p.bw_fraction:.0f}", f"{100 * p.tc_fraction:.0f}")
    Console(width=200).print(table)


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _print_targets(points) -> None:
    for label, pred, baseline, minimum, reduce in TARGETS:
        ratios = [p.speedup(baseline) for p in points if pred(p) and p.speedup(baseline)]
        if not ratios:
            continue
        value = min(ratios) if reduce == "min" else bench_stage.geomean(ratios)
        verdict = "met" if value >= minimum else "NOT met"
        click.echo(f"target {label}: {value:.2f}x (>= {minimum}x: {verdict})")
    small = [p.bw_fraction for p in points if p.m <= 16]
    if small:
        value = bench_stage.geomean(small)
        click.echo(f"target M<=16 DRAM bandwidth: {100 * value:.0f}% of copy bandwidth "
                   f"(>= 80%: {'met' if value >= 0.8 else 'NOT met'})")


COMMANDS = [bench_command]
