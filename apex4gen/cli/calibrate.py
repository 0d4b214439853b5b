"""``apex4gen calibrate``: per-layer output error per granularity -> the planner's sensitivity YAML."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import SpecError

_DEFAULT_SPEC = "smollm2-135m"  # the model spec of the default (SmolLM2) model


@click.command("calibrate")
@click.option("--model-path", default=None,
              help="transformers model directory or .gguf file [default: SmolLM2-135M-Instruct]")
@click.option("--model-name", default=None,
              help=f"model spec name the plan uses (apex4gen specs list) [default: {_DEFAULT_SPEC} for the "
                   f"default model; required otherwise]")
@click.option("--rotate/--no-rotate", default=False, show_default=True,
              help="measure the rotated model (use the setting you will quantize with)")
@click.option("--group-rotation", is_flag=True,
              help="with --rotate: the residual rotated as `quantize --group-rotation` does, one Hadamard per g128 "
                   "group (or the largest power of two dividing the hidden size) of the channels ordered by how "
                   "strongly the layers read them")
@click.option("--calib-text", default="emma", show_default=True, help="an Austen novel, 'britannica' or a .txt")
@click.option("--calib-samples", default=8, show_default=True, type=click.IntRange(1))
@click.option("--calib-seq-len", default=512, show_default=True, type=click.IntRange(16))
@click.option("--seed", default=0, show_default=True, type=int,
              help="seed of every random choice: the calibration windows and the Hadamard signs")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="sensitivity YAML to write (point a budget file's `sensitivity:` at it)")
def calibrate_cmd(model_path, model_name, rotate, group_rotation, calib_text, calib_samples, calib_seq_len, seed,
                  output: Path) -> None:
    """Measure each layer kind's output error per granularity and activation precision (4 / 8 bits) on real
    activations."""
    from ..accuracy.models import load_model
    from ..accuracy.rotation import rotate_model
    from ..accuracy.calibrate import kind_errors, kind_in_features, layer_errors, sensitivity, write_sensitivity
    from ..accuracy.options import calibration_ids, check_methods
    from ..accuracy.pipeline import QuantConfig, residual_rotation
    from ..granularity import Granularity

    check_methods({"rotate": rotate, "group_rotation": group_rotation})
    if model_name is None:
        if model_path is not None:
            raise SpecError("--model-name is required with --model-path (the spec name the planner uses)")
        model_name = _DEFAULT_SPEC
    model, tokenizer = load_model(model_path)
    if rotate:
        # the blocks of the default granularity: the sensitivities cover every granularity, the rotation is one
        cfg = QuantConfig.uniform(Granularity.parse("g128"), rotate=True, group_rotation=group_rotation, seed=seed)
        rotate_model(model, seed=seed, residual=residual_rotation(model, cfg))
    calib = calibration_ids(tokenizer, calib_text, calib_samples, calib_seq_len, seed)
    errors = kind_errors(layer_errors(model, calib))
    write_sensitivity(sensitivity(errors, kind_in_features(model), model_name), output, errors)
    for kind, choices in sorted(errors.items()):
        click.echo(f"{kind:13s} " + "  ".join(f"{g.name}/a{bits}={e:.4f}" for (g, bits), e in choices.items()))
    click.echo(f"wrote {output}")


COMMANDS = [calibrate_cmd]
