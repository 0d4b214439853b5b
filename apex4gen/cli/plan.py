"""``apex4gen plan``: choose granularities, paths and kernels for a model on a GPU, print them, write the plan."""
from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..errors import SpecError
from ..plan import UNSERVED_FIX, Plan, is_plan_file
from ..planner import DEFAULT_WORKLOAD, make_plan

_MIN_WIDTH = 120   # rich falls back to 80 columns off a terminal, which would wrap every row


def _console() -> Console:
    console = Console()
    return Console(width=max(console.width, _MIN_WIDTH))


def _layer_table(plan: Plan) -> Table:
    table = Table(title=f"{plan.model} on {plan.gpu}: W4A4 plan (workload {plan.workload.name})")
    for name, justify in (("layer", "left"), ("shape N x K", "right"), ("granularity", "left"), ("acts", "left"),
                          ("path", "left"), ("point", "left"), ("FP16 µs", "right"), ("W4A4 µs", "right"),
                          ("speedup", "right")):
        table.add_column(name, justify=justify)
    for lp in plan.layers:
        for i, p in enumerate(lp.predictions):
            head = (lp.name, f"{lp.n} x {lp.k}", lp.granularity.name, f"{lp.act_bits}-bit", lp.path) if i == 0 \
                else ("", "", "", "", "")
            table.add_row(*head, f"{p.phase} M={p.m}", f"{p.fp16_us:.1f}", f"{p.w4a4_us:.1f}", f"{p.speedup:.2f}x")
        table.add_section()
    for i, p in enumerate(plan.totals.predictions):
        head = ("all layers", f"x{plan.layers[0].count}", "", "", "") if i == 0 else ("", "", "", "", "")
        table.add_row(*head, f"{p.phase} M={p.m}", f"{p.fp16_us:.0f}", f"{p.w4a4_us:.0f}", f"{p.speedup:.2f}x")
    return table


def _check_output(path: Path, force: bool, text: str) -> None:
    """Nothing a user wrote is replaced without --force: another file, or a plan that differs from this one
    (hand-edited, or made from other inputs)."""
    if path.is_dir():
        raise SpecError(f"output {path} is a directory; give a file name with -o")
    if not path.parent.is_dir():
        raise SpecError(f"the folder of {path} does not exist; create it or give another path with -o")
    if not path.exists() or force:
        return
    if not is_plan_file(path):
        raise SpecError(f"{path} exists and is not an apex4gen plan; pass --force to overwrite it")
    if path.read_text() != text:
        raise SpecError(f"{path} holds another plan (edited, or made from other inputs); pass --force to replace "
                        "it, or give another path with -o")


def _print_summary(console: Console, plan: Plan, out: Path) -> None:
    console.print(_layer_table(plan))
    for lp in plan.layers:
        console.print(f"  {lp.name}: {lp.rationale}", soft_wrap=True)
    console.print(f"end to end (workload-weighted, linear layers): {plan.totals.speedup:.2f}x over FP16; "
                  f"{len(plan.kernels())} kernel configs; wrote {out}", soft_wrap=True)
    if plan.unserved():
        click.echo(f"apex4gen: warning: GEMMs without a kernel (counted at FP16 time in the speedup; `apex4gen "
                   f"build` needs --allow-partial): {plan.unserved_summary()}; {UNSERVED_FIX}", err=True)


@click.command("plan")
@click.option("--gpu", required=True, help="GPU spec: a shipped name (apex4gen specs list) or a YAML path.")
@click.option("--model", required=True, help="Model spec: a shipped name or a YAML path.")
@click.option("--workload", default=DEFAULT_WORKLOAD, show_default=True, help="Workload: a shipped name or a path.")
@click.option("--budget", "budget", default=None, help="Accuracy budget YAML (default: the documented defaults).")
@click.option("--unfused", is_flag=True, help="Plan separate q/k/v and gate/up projections instead of fused ones.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Plan file to write [default: GPU-MODEL.plan.yaml].")
@click.option("--force", is_flag=True, help="Overwrite an existing file: one that is not a plan, or another plan.")
def plan_cmd(gpu: str, model: str, workload: str, budget: str | None, unfused: bool, output: Path | None,
             force: bool) -> None:
    """Plan W4A4 granularity, compute path and kernels per layer; print the table and write the plan."""
    result = make_plan(gpu, model, workload, budget, fused=not unfused)
    if not result.kernels():
        raise SpecError(f"no kernel serves any GEMM of {result.model} on {result.gpu}: {result.unserved_summary()}; "
                        f"{UNSERVED_FIX}")
    out = output or Path(f"{result.gpu}-{result.model}.plan.yaml")
    _check_output(out, force, result.to_yaml())
    result.save(out)
    _print_summary(_console(), result, out)


COMMANDS = [plan_cmd]
