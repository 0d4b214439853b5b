"""`apex4gen build`: plan (or read a plan), render, compile, and say what could and could not be done here."""
from __future__ import annotations

import time
from pathlib import Path

import click

from .. import build as build_stage
from .. import planner, specs
from ..errors import SpecError
from ..plan import Plan


@click.command("build")
@click.option("--gpu", required=True, help="GPU spec: a shipped name (apex4gen specs list) or a YAML path.")
@click.option("--model", help="Model spec: a shipped name or a YAML path (not needed with --plan).")
@click.option("--workload", default=None, help="Workload spec name or path (default: the documented mix).")
@click.option("--budget", default=None, help="Accuracy budget / sensitivity YAML.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Build this plan file instead of planning.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Build directory (default: generated/<gpu>-<model>).")
@click.option("--emit-only", is_flag=True, help="Render the sources and stop (no nvcc needed).")
@click.option("-j", "--jobs", type=int, default=None, help="Parallel compile jobs (default: ninja's).")
@click.option("--force", is_flag=True, help="Write into a --out directory that holds other files or another build.")
@click.option("--allow-partial", is_flag=True,
              help="Build a plan whose GEMMs are not all served by a kernel (the library refuses the others).")
def build_command(gpu, model, workload, budget, plan_path, out, emit_only, jobs, force, allow_partial):
    """Plan, render and compile the W4A4 kernels of MODEL for GPU into one runtime module."""
    gpu_spec = specs.load_gpu(gpu)
    if plan_path is not None:
        plan = Plan.load(plan_path)
        _check_plan_options(plan, plan_path, model, workload, budget)
    else:
        if not model:
            raise click.UsageError("--model is required unless --plan is given")
        plan = planner.make_plan(gpu_spec, model, workload=workload, budget=budget)
    out = out or build_stage.default_build_dir(gpu_spec.name, plan.model)
    started = time.monotonic()
    result = build_stage.build(plan, gpu_spec, out, emit_only=emit_only, jobs=jobs, force=force,
                                allow_partial=allow_partial)
    _report(result, gpu_spec, emit_only, time.monotonic() - started)


def _check_plan_options(plan: Plan, plan_path: Path, model, workload, budget) -> None:
    """With --plan the plan decides everything: an option that would plan differently is refused, not ignored."""
    if model is not None and specs.load_model(model).name != plan.model:
        raise SpecError(f"--model {model} conflicts with --plan {plan_path}, a plan for {plan.model}; drop --model, "
                        f"or re-plan with `apex4gen plan --model {model}`")
    ignored = [name for name, value in (("--workload", workload), ("--budget", budget)) if value is not None]
    if ignored:
        raise SpecError(f"{' and '.join(ignored)} cannot change the plan given with --plan {plan_path}; drop "
                        f"{'them' if len(ignored) > 1 else 'it'}, or make a new plan with `apex4gen plan`")


def _report(result, gpu_spec, emit_only: bool, seconds: float) -> None:
    click.echo(f"{len(result.kernels)} kernels for {gpu_spec.name} ({gpu_spec.kernel_arch}) in {result.build_dir}")
    for name in result.kernels:
        click.echo(f"  {name}")
    if emit_only:
        click.echo(f"rendered {result.emitted_changed} changed file(s); --emit-only: nothing compiled")
        return
    work = f"compiled {result.compiled} step(s)" if result.compiled else "up to date: nothing compiled"
    click.echo(f"{work} in {seconds:.1f}s -> {result.library}")
    click.echo(_load_hint(result.build_dir, gpu_spec))


def _load_hint(build_dir: Path, gpu_spec) -> str:
    import torch

    if not torch.cuda.is_available():
        return (f"no CUDA GPU here: built, not loaded or tested; on the GPU ({gpu_spec.name}), "
                f"apex4gen.load('{build_dir}') loads it")
    return f"load it with apex4gen.load('{build_dir}')"


COMMANDS = [build_command]
