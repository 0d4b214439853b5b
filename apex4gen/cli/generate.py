"""``apex4gen generate`` (text from a checkpoint or a shipped model's shapes, on a build's kernels) and
``apex4gen e2e-bench`` (end to end against the same model in 16 bits)."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import click

from ..errors import SpecError
from ..files import check_output_folder


def _ints(text: str, option: str, allow_empty: bool = False) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SpecError(f"{option} takes comma-separated integers, got {text!r}") from None
    if (not values and not allow_empty) or any(v < 1 for v in values):
        raise SpecError(f"{option} takes integers >= 1, got {text!r}")
    return values


def _load_build(build_dir: Path | None):
    if build_dir is None:
        return None
    import warnings

    from ..loader import load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PTX JIT of an older arch's build: correct, slower; the user chose it
        return load(build_dir)


def _random_config(model: str, build, layers: int | None):
    """A shipped model (or a spec YAML) at the build's dtype; random weights take the build's plan granularities."""
    from ..engine.buildinfo import build_dtype, check_model
    from ..engine.config import from_spec
    from ..specs import load_model

    spec = load_model(model)
    if build is None:
        raise SpecError(f"{model}: a model with random weights takes its granularities from a build's plan; "
                        "give --build BUILD_DIR (or a checkpoint directory instead of a model name)")
    check_model(build, spec.name)
    return replace(from_spec(spec), dtype=build_dtype(build)).with_layers(layers)


def _random_model(model: str, build, layers: int | None, device):
    from ..engine.buildinfo import plan_act_bits, plan_groups
    from ..engine.weights import random_weights

    return random_weights(_random_config(model, build, layers), plan_groups(build), device,
                          act_bits=plan_act_bits(build)), None


def _checkpoint_model(path: Path, layers: int | None, device):
    from ..engine.weights import load_checkpoint

    weights = load_checkpoint(path, device)
    weights = replace(weights, config=weights.config.with_layers(layers))
    return weights, _tokenizer(path)


def _tokenizer(path: Path):
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def _encode(tokenizer, prompt: str, vocab: int):
    """Token ids of the prompt; without a tokenizer (random weights) its UTF-8 bytes, modulo the vocabulary."""
    if tokenizer is not None:
        return tokenizer(prompt)["input_ids"]
    return [b % vocab for b in prompt.encode()]


@click.command("generate")
@click.argument("model")
@click.option("--build", "build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Build directory: the projections run on its W4A4 kernels (CUDA). Without it: the fake-quant "
                   "path (reference numerics, any device), for a checkpoint only.")
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--layers", type=click.IntRange(1), default=None, help="Run only the first N decoder layers.")
@click.option("--device", default=None, help="torch device [default: cuda with --build or when present, else cpu].")
@click.option("--graphs/--no-graphs", default=True, show_default=True, help="Decode steps as CUDA-graph replays.")
def generate_cmd(model: str, build_dir: Path | None, prompt: str, max_new_tokens: int, layers: int | None,
                 device: str | None, graphs: bool) -> None:
    """Greedy text from MODEL: an `apex4gen quantize` checkpoint directory, or a shipped model name with --build
    (random weights at its real shapes, granularities from the build's plan; the prompt's bytes are its tokens)."""
    import torch

    from ..engine import Decoder, generate

    build = _load_build(build_dir)
    device = torch.device(device or ("cuda" if build is not None or torch.cuda.is_available() else "cpu"))
    if build is not None and device.type != "cuda":
        raise SpecError(f"--build runs on CUDA, not {device}; drop --device or --build")
    path = Path(model)
    if not path.exists() and len(path.parts) > 1:  # a path, not a model name
        raise SpecError(f"{model} does not exist; give an `apex4gen quantize` checkpoint folder or a shipped model "
                        "name (apex4gen specs list)")
    weights, tokenizer = (_checkpoint_model(path, layers, device) if path.is_dir()
                          else _random_model(model, build, layers, device))
    ids = _encode(tokenizer, prompt, weights.config.vocab_size)
    if not ids:
        raise SpecError("--prompt is empty; give at least one token")
    start = time.perf_counter()
    decoder = Decoder(weights, build, max_positions=len(ids) + max_new_tokens)
    loaded = time.perf_counter()
    out = generate(decoder, torch.tensor([ids], device=device), max_new_tokens, graph=graphs and device.type == "cuda")
    tokens = out.tokens[0].tolist()
    done = time.perf_counter()
    click.echo(tokenizer.decode(tokens) if tokenizer is not None else " ".join(map(str, tokens)))
    path_name = "W4A4 kernels" if build is not None else "fake-quant"
    click.echo(f"[{len(ids)} prompt + {len(tokens)} new tokens on {device} ({path_name}); load "
               f"{loaded - start:.1f} s, generate {done - loaded:.2f} s]", err=True)


@click.command("e2e-bench")
@click.argument("model")
@click.option("--build", "build_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Build directory of MODEL (fused plan) for this GPU.")
@click.option("--layers", type=click.IntRange(1), default=None,
              help="Decoder layers of both models [default: all]; fewer where the 16-bit model does not fit.")
@click.option("--prompt-lengths", default="512,2048", show_default=True, help="Prefill prompt lengths (batch 1).")
@click.option("--batches", default="1,16,64", show_default=True, help="Decode batch sizes ('' for none).")
@click.option("--context", default=256, show_default=True, type=click.IntRange(1),
              help="Decode starts at this position (tokens already in the cache).")
@click.option("--steps", default=32, show_default=True, type=click.IntRange(1), help="Decode steps timed per sample.")
@click.option("--samples", default=5, show_default=True, type=click.IntRange(1), help="Timings per figure (median).")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also measure the 16-bit model (--no-baseline: the W4A4 model alone, e.g. all 80 layers of a "
                   "model whose 16-bit weights do not fit).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the results here.")
def e2e_bench_cmd(model: str, build_dir: Path, layers: int | None, prompt_lengths: str, batches: str, context: int,
                  steps: int, samples: int, baseline: bool, json_path: Path | None) -> None:
    """Prefill and decode tokens/s and memory of MODEL (random weights, real shapes) on BUILD's W4A4 kernels
    against the same model in 16 bits, in one run: a table, the targets, JSON."""
    import torch

    from ..engine import benchmark as bench
    from ..engine.buildinfo import is_per_channel, plan_act_bits, plan_groups
    from ..engine.weights import random_weights

    settings = bench.Settings(_ints(prompt_lengths, "--prompt-lengths", True), _ints(batches, "--batches", True),
                              context, steps, samples)
    check_output_folder(json_path, "--json")
    build = _load_build(build_dir)
    config = _random_config(model, build, layers)
    groups = plan_groups(build)
    results = []
    if baseline:  # first, and freed before the W4A4 model is made: one model on the GPU at a time
        results.append(bench.measure(random_weights(config, None, "cuda"), None, bench.dtype_name(config), settings,
                                     click.echo))
    results.append(bench.measure(random_weights(config, groups, "cuda", act_bits=plan_act_bits(build)), build, "w4a4",
                                 settings, click.echo))
    targets = bench.targets(results[1], results[0], is_per_channel(build)) if baseline else ()
    report = bench.Report(config.name, str(build_dir), torch.cuda.get_device_name(), torch.__version__,
                          settings, tuple(results), targets)
    _print_report(report)
    if json_path:
        report.write_json(json_path)
        click.echo(f"wrote {json_path}")


def _print_report(report) -> None:
    from rich.console import Console
    from rich.table import Table

    base = report.results[0] if len(report.results) > 1 else None
    table = Table(title=f"{report.model} end to end on {report.device} ({report.results[-1].layers} layers; "
                        f"decode from position {report.settings.context}); tokens/s, ratio = W4A4 / "
                        f"{base.variant if base else '-'}")
    table.add_column("", justify="left")
    for r in report.results:
        table.add_column(r.variant, justify="right")
    if base:
        table.add_column("ratio", justify="right")
    rows = [(f"prefill {n}", lambda r, n=n: r.prefill_tokens_per_s[n]) for n in report.settings.prompt_lengths]
    rows += [(f"decode batch {b}", lambda r, b=b: r.decode_tokens_per_s[b]) for b in report.settings.batches]
    for label, get in rows:
        ratio = [f"{get(report.results[1]) / get(base):.2f}x"] if base else []
        table.add_row(label, *[f"{get(r):,.0f}" for r in report.results], *ratio)
    gib = 2 ** 30
    for label, get in (("decoder weights GiB", lambda r: r.decoder_weight_bytes / gib),
                       ("  with one layout a GEMM", lambda r: r.decoder_weight_bytes_one_layout / gib),
                       ("peak memory GiB", lambda r: r.peak_bytes / gib)):
        ratio = [f"{get(report.results[1]) / get(base):.2f}x"] if base else []
        table.add_row(label, *[f"{get(r):.2f}" for r in report.results], *ratio)
    Console(width=160).print(table)
    for t in report.targets:
        bound = f">= {t.minimum}x" if t.minimum is not None else f"<= {t.maximum}x"
        click.echo(f"target {t.label}: {t.value:.2f}x ({bound}: {'met' if t.met else 'NOT met'})")


COMMANDS = [generate_cmd, e2e_bench_cmd]
