"""`apex4gen study`: per granularity and M, a model's W4A4 GEMMs measured against cuBLAS FP16 next to the cost
model's prediction, on the current GPU; or (``--from-json``) the table and plot of a recorded study, no GPU."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .. import __version__
from .. import study as study_stage
from .. import studyplot
from ..cli.bench import _parse_ms
from ..errors import Apex4genError
from ..files import check_output_folder


@click.command("study")
@click.option("--gpu", help="GPU spec of this GPU: a shipped name (apex4gen specs list) or a YAML path.")
@click.option("--model", help="Model spec: a shipped name or a YAML path.")
@click.option("--granularities", default=None,
              help="Comma-separated, e.g. g64,g128,channel (default: every one a kernel family serves for the "
                   "model's GEMMs on this GPU).")
@click.option("--ms", default=None, help=f"Comma-separated M values (default {','.join(map(str, study_stage.DEFAULT_MS))}).")
@click.option("--gemms", default=None, help="Comma-separated GEMMs (layers of the fused plan, e.g. o_proj; default all).")
@click.option("--max-candidates", type=int, default=study_stage.DEFAULT_MAX_CANDIDATES, show_default=True,
              help="Kernel configurations timed per point: the planner's and the best others by prediction.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of the study's builds (default: a cache folder, reused by later runs).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every point and the summary here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the speedup-vs-M figure here (PNG; needs matplotlib).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the table and the summary as Markdown here.")
@click.option("--from-json", "from_json", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Re-plot (and re-summarise) a recorded study instead of measuring: no GPU needed.")
@click.option("--repredict", is_flag=True,
              help="With --from-json: this version's cost-model predictions beside the recorded times (the GPU "
                   "spec the study names), instead of the recorded predictions.")
@click.option("-j", "--jobs", type=int, default=None, help="Parallel compile jobs of each build (default: ninja's).")
@click.option("--force", is_flag=True, help="Replace existing output files (and build folders of other inputs).")
def study_command(gpu, model, granularities, ms, gemms, max_candidates, out, json_path, plot_path, markdown_path,
                  from_json, repredict, jobs, force):
    """Measure MODEL's W4A4 GEMMs per granularity and M on this GPU against FP16 and the cost model."""
    outputs = [(json_path, "--json"), (plot_path, "--plot"), (markdown_path, "--markdown")]
    if from_json is not None:
        given = [option for option, value in (("--gpu", gpu), ("--model", model), ("--granularities", granularities),
                                              ("--ms", ms), ("--gemms", gemms), ("--out", out), ("--json", json_path))
                 if value is not None]
        if given:
            raise click.UsageError(f"--from-json re-plots a recorded study: drop {', '.join(given)}")
        _check_outputs(outputs, force)
        result = study_stage.from_json(_read_json(from_json), str(from_json))
        if repredict:
            result = _repredicted(result, from_json)
        _report(result, plot_path, markdown_path, None)
        return
    if repredict:
        raise click.UsageError("--repredict re-predicts a recorded study: give --from-json FILE")
    if not gpu or not model:
        raise click.UsageError("--gpu and --model are required (or --from-json FILE to re-plot a recorded study)")
    _check_outputs(outputs, force)
    result = _measure(gpu, model, granularities, ms, gemms, max_candidates, out, jobs, force)
    _report(result, plot_path, markdown_path, json_path)


def _repredicted(result: study_stage.StudyResult, source: Path) -> study_stage.StudyResult:
    from .. import specs

    gpu = result.meta.get("gpu")
    if not gpu:
        raise Apex4genError(f"--repredict: {source} names no GPU spec (meta.gpu); re-record the study")
    return study_stage.repredict(result, specs.load_gpu(gpu))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Apex4genError(f"--from-json {path}: not readable JSON ({err}); give a file `apex4gen study --json` "
                            "wrote") from None


def _check_outputs(outputs, force: bool) -> None:
    """Before minutes of measuring: every output's folder exists, no output exists unless --force, a plot has
    matplotlib."""
    for path, option in outputs:
        check_output_folder(path, option)
        if path is not None and path.exists() and not force:
            raise Apex4genError(f"{option} {path} exists; pass --force to replace it, or give another path")
        if path is not None and option == "--plot":
            studyplot.require_matplotlib()


def _measure(gpu, model, granularities, ms, gemms, max_candidates, out, jobs, force) -> study_stage.StudyResult:
    import torch

    from .. import specs
    from ..loader import load

    gpu_spec, model_spec = specs.load_gpu(gpu), specs.load_model(model)
    chosen = study_stage.parse_granularities(_names(granularities)) if granularities else None
    m_values = tuple(_parse_ms(ms)) if ms else study_stage.DEFAULT_MS
    default_out = out is None
    setup = study_stage.prepare(gpu_spec, model_spec, out or study_stage.default_out_dir(), chosen, m_values,
                                tuple(_names(gemms)) if gemms else None, max_candidates)
    device = study_stage.check_device(gpu_spec)
    echo = _echo
    started = time.monotonic()
    study_stage.build_all(setup, echo, jobs, force or default_out)
    build_s = time.monotonic() - started
    builds = {b.granularity: load(b.build_dir) for b in setup.builds}
    echo(f"timing {len(setup.cases)} points ({sum(len(c.candidates) for c in setup.cases)} kernel timings) on "
         f"{device}: about {study_stage.expected_seconds(setup):.0f} s of GPU time by the cost model")
    started = time.monotonic()
    points = study_stage.measure(setup, builds, echo)
    meta = {"device": device, "gpu": gpu_spec.name, "gpu_spec_sha256": gpu_spec.sha256(), "model": model_spec.name,
            "apex4gen": __version__, "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ms": list(setup.ms),
            "granularities": [g.name for g in setup.granularities], "max_candidates": setup.max_candidates,
            "build_seconds": round(build_s, 1), "timing_seconds": round(time.monotonic() - started, 1),
            "cost_constants": setup.constants.to_dict()}
    return study_stage.StudyResult(meta, tuple(points), setup.unserved)


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _echo(line: str) -> None:
    click.echo(line, err=True)


def _report(result: study_stage.StudyResult, plot_path, markdown_path, json_path) -> None:
    """Print the table and the summary; render every output first, then write them (nothing half-written)."""
    _print_table(result)
    if result.unserved:
        click.echo(f"not served by any kernel family (no point): {study_stage.unserved_line(result.unserved)}")
    for line in study_stage.summary_lines(study_stage.summarize(result.points)):
        click.echo(line)
    files = {}
    if plot_path is not None:
        files[plot_path] = studyplot.render_png(result.points, result.meta)
    if markdown_path is not None:
        files[markdown_path] = study_stage.markdown(result).encode()
    if json_path is not None:
        files[json_path] = (json.dumps(study_stage.to_json(result), indent=1) + "\n").encode()
    for path, data in files.items():
        study_stage.write_atomic(path, data)
        click.echo(f"wrote {path}")


def _print_table(result: study_stage.StudyResult) -> None:
    from rich.console import Console
    from rich.table import Table

    meta = result.meta
    table = Table(title=f"W4A4 study: {meta.get('model', '?')} on {meta.get('device', '?')} "
                        f"(µs end to end; speedup = FP16 / W4A4)")
    for col in study_stage.TABLE_COLUMNS:
        table.add_column(col, justify="left" if col in ("gemm", "gran", "kernel (planner's)") else "right")
    for row in study_stage.table_rows(result.points):
        table.add_row(*row)
    Console(width=230).print(table)


COMMANDS = [study_command]
