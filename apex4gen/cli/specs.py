"""``apex4gen specs list`` and ``apex4gen specs show NAME``: the shipped GPU, model and workload specs."""
from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from ..errors import SpecError
from ..graph import shared_problems
from ..schema import did_you_mean
from ..specs import (GpuSpec, ModelSpec, WorkloadSpec, list_gpus, list_models, list_workloads, load_any,
                     load_gpu, load_model, load_workload)


def _gpu_table() -> Table:
    table = Table(title="GPUs")
    for col in ("name", "arch", "SMs", "INT4 cores", "W4A4 paths", "rho", "DRAM GB/s", "smem/block KB"):
        table.add_column(col)
    for name in list_gpus():
        g = load_gpu(name)
        table.add_row(name, g.architecture, str(g.sm_count), g.int4_tensor_cores, "/".join(g.compute_paths),
                      f"{g.rho:.1f}", f"{g.dram_bandwidth_gbs:g}", str(g.smem_per_block_kb))
    return table


def _model_table() -> Table:
    table = Table(title="models")
    for col in ("name", "hidden", "intermediate", "heads/kv", "layers", "vocab", "dtype"):
        table.add_column(col)
    for name in list_models():
        m = load_model(name)
        table.add_row(name, str(m.hidden_size), str(m.intermediate_size),
                      f"{m.num_attention_heads}/{m.num_key_value_heads}", str(m.num_layers), str(m.vocab_size),
                      m.dtype)
    return table


def _workload_table() -> Table:
    table = Table(title="workloads")
    table.add_column("name")
    table.add_column("points (weight)")
    for name in list_workloads():
        w = load_workload(name)
        table.add_row(name, ", ".join(f"{p.label} ({p.weight:g})" for p in w.points))
    return table


@click.group("specs")
def specs_cmd() -> None:
    """List and show the shipped GPU, model and workload specs."""


@specs_cmd.command("list")
def list_cmd() -> None:
    """Every shipped GPU, model and workload."""
    console = Console(width=max(Console().width, 120))
    for table in (_gpu_table(), _model_table(), _workload_table()):
        console.print(table)


def _resolve(name: str) -> GpuSpec | ModelSpec | WorkloadSpec:
    """A shipped name of any kind, or a path to a YAML file whose keys say its kind."""
    loaders = ((list_gpus, load_gpu), (list_models, load_model), (list_workloads, load_workload))
    for lister, loader in loaders:
        if name in lister():
            return loader(name)
    if "/" in name or name.endswith((".yaml", ".yml")):
        return load_any(name)
    known = list_gpus() + list_models() + list_workloads()
    raise SpecError(f"unknown spec {name!r}{did_you_mean(name, known)} (known: {', '.join(known)})")


def _show_gpu(g: GpuSpec) -> list[str]:
    t = g.tensor_tops
    lines = [f"{g.full_name} ({g.name}): {g.architecture}, kernels built for {g.kernel_arch}, {g.sm_count} SMs, "
             f"{g.boost_clock_mhz:g} MHz",
             f"tensor TOPS (dense): int4 {t.int4} ({g.int4_tensor_cores}), int8 {t.int8}, fp8 {t.fp8}, fp16 {t.fp16}",
             f"FP32 {g.fp32_tflops:g} TFLOPS; DRAM {g.dram_bandwidth_gbs:g} GB/s; L2 {g.l2_mb:g} MB; "
             f"shared memory {g.smem_per_block_kb} KB ({g.smem_per_block_bytes} B) per block",
             f"W4A4 paths: {', '.join(f'{p} (rho {g.rho_of(p):.1f})' for p in g.compute_paths)}; rho {g.rho:.1f}",
             "sources:"]
    return lines + [f"  {field}: {source}" for field, source in g.sources]


def _show_model(m: ModelSpec) -> list[str]:
    lines = [f"{m.full_name} ({m.name}): {m.architecture}, {m.dtype}, {m.num_layers} layers, hidden {m.hidden_size},"
             f" intermediate {m.intermediate_size}, heads {m.num_attention_heads}/{m.num_key_value_heads} kv,"
             f" head_dim {m.head_dim}, vocab {m.vocab_size}", f"source: {m.source}"]
    for fused in (True, False):
        lines.append(f"{'fused' if fused else 'unfused'} GEMMs (N x K: layers, GEMMs per forward pass):")
        lines += [f"  {p.n} x {p.k}: {', '.join(p.layers)} (x{p.count})" for p in shared_problems(m, fused)]
    return lines + [f"  lm_head (not W4A4): {m.vocab_size} x {m.hidden_size}"]


def _show_workload(w: WorkloadSpec) -> list[str]:
    return [f"{w.name}: {w.description}"] + [f"  {p.label}: weight {p.weight:g}" for p in w.points]


@specs_cmd.command("show")
@click.argument("name")
def show_cmd(name: str) -> None:
    """One spec, by shipped name or YAML path, with what apex4gen derives from it."""
    spec = _resolve(name)
    show = {GpuSpec: _show_gpu, ModelSpec: _show_model, WorkloadSpec: _show_workload}[type(spec)]
    for line in show(spec):
        click.echo(line)


COMMANDS = [specs_cmd]
