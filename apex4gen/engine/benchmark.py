"""End to end on the GPU: a model on a build's W4A4 kernels against the same model in 16 bits, in one run.

Both models are the same :class:`Decoder` code (attention, norms, RoPE, lm_head, KV cache, CUDA graphs) with
random weights at a model's real shapes; they differ in their projections only (and the W4A4 model runs the
online Hadamard before down_proj that a rotated checkpoint needs). One model is on the GPU at a time: built,
measured, freed.

* prefill: one prompt of T tokens from position 0 (logits of the last position), captured in a CUDA graph and
  replayed; tokens/s = T / time.
* decode: ``batch`` sequences, one greedy token each per step, at positions ``context`` onwards over a static
  cache of ``context + steps`` positions; ``steps`` CUDA-graph replays back to back (each step feeds the next
  its tokens and position on the device); tokens/s = batch * steps / time.
* Each figure is the median of ``samples`` timings (CUDA events), after a warm-up replay.
* memory: the decoder layers' weights as held (the kernels' layouts and scales; 16-bit weights), and the
  peak allocated by PyTorch while the model runs (weights, caches, activations, graph pools; not the
  transients of making random weights).
  On Hopper a GEMM's decode and prefill kernels read different weight layouts, so both are held; the
  one-layout figure is what a kernel set sharing one layout would hold.
"""
from __future__ import annotations

import gc
import json
import statistics
from dataclasses import asdict, dataclass, field

import torch

from .cache import KVCache
from .config import DecoderConfig
from .model import Decoder
from .runner import DecodeStep
from .weights import ModelWeights


@dataclass(frozen=True)
class Settings:
    prompt_lengths: tuple[int, ...] = (512, 2048)
    batches: tuple[int, ...] = (1, 16, 64)
    context: int = 256
    steps: int = 32
    samples: int = 5


@dataclass(frozen=True)
class ModelResult:
    variant: str            # "w4a4" or the baseline's dtype name
    layers: int
    prefill_tokens_per_s: dict  # prompt length -> tokens/s
    decode_tokens_per_s: dict   # batch -> tokens/s
    decoder_weight_bytes: int
    peak_bytes: int
    decoder_weight_bytes_one_layout: int  # as if every GEMM's kernels read a single weight layout


@dataclass(frozen=True)
class Target:
    label: str
    value: float
    minimum: float | None = None  # >= this ratio; None: a maximum instead
    maximum: float | None = None

    @property
    def met(self) -> bool:
        return self.value >= self.minimum if self.minimum is not None else self.value <= self.maximum


@dataclass(frozen=True)
class Report:
    model: str
    build: str
    device: str
    torch: str
    settings: Settings
    results: tuple[ModelResult, ...]
    targets: tuple[Target, ...] = field(default_factory=tuple)

    def write_json(self, path) -> None:
        data = asdict(self)
        data["targets"] = [{**asdict(t), "met": t.met} for t in self.targets]
        with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")


def _median_ms(run, samples: int, before=None) -> float:
    """Median over ``samples`` of one ``run()``'s GPU time in ms (``before()`` runs untimed ahead of each)."""
    times = []
    for _ in range(samples):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _capture(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def prefill_tokens_per_s(model: Decoder, length: int, samples: int) -> float:
    config = model.config
    cache = KVCache.allocate(config, 1, length, "cuda")
    ids = torch.randint(0, config.vocab_size, (1, length), device="cuda")
    graph = _capture(lambda: model(ids, cache))
    graph.replay()
    ms = _median_ms(graph.replay, samples)
    del graph, cache
    return length / (ms * 1e-3)


def decode_tokens_per_s(model: Decoder, cache: KVCache, batch: int, settings: Settings) -> float:
    step = DecodeStep(model, cache, batch, graph=True)
    first = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")

    def replay_steps() -> None:
        for _ in range(settings.steps):
            step.graph.replay()

    step.start(first, settings.context)
    step.graph.replay()  # warm-up
    ms = _median_ms(replay_steps, settings.samples, before=lambda: step.start(first, settings.context))
    del step
    return batch * settings.steps / (ms * 1e-3)


@torch.no_grad()
def measure(weights: ModelWeights, build, variant: str, settings: Settings, log=print) -> ModelResult:
    """Build the model on the GPU (through ``build``'s kernels when its projections are quantized), time it,
    free it."""
    _release()
    config = weights.config
    positions = max(max(settings.prompt_lengths, default=0), settings.context + settings.steps + 1)
    model = Decoder(weights, build, max_positions=positions)
    _release()
    torch.cuda.reset_peak_memory_stats()  # from here: the model held, not the transients of making it
    weight_bytes, one_layout = model.decoder_weight_bytes(), model.decoder_weight_bytes(one_layout=True)
    log(f"{variant}: {config.num_layers} layers, decoder weights {weight_bytes / 2**30:.2f} GiB")
    prefill = {}
    for length in settings.prompt_lengths:
        prefill[length] = prefill_tokens_per_s(model, length, settings.samples)
        log(f"  prefill {length}: {prefill[length]:.0f} tokens/s")
    decode = {}
    if settings.batches:
        cache = KVCache.allocate(config, max(settings.batches), settings.context + settings.steps + 1, "cuda")
        for batch in settings.batches:
            decode[batch] = decode_tokens_per_s(model, cache, batch, settings)
            log(f"  decode batch {batch}: {decode[batch]:.0f} tokens/s")
        del cache
    peak = torch.cuda.max_memory_allocated()
    del model
    _release()
    return ModelResult(variant, config.num_layers, prefill, decode, weight_bytes, peak, one_layout)


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def targets(w4a4: ModelResult, baseline: ModelResult, per_channel: bool) -> tuple[Target, ...]:
    """The end-to-end targets (ratios of W4A4 over the 16-bit model measured in the same run)."""
    out = []
    for batch, minimum in ((1, 2.5), (16, 2.0), (64, 1.3)):
        if batch in w4a4.decode_tokens_per_s and batch in baseline.decode_tokens_per_s:
            ratio = w4a4.decode_tokens_per_s[batch] / baseline.decode_tokens_per_s[batch]
            out.append(Target(f"decode batch {batch} vs {baseline.variant}", ratio, minimum=minimum))
    if 2048 in w4a4.prefill_tokens_per_s and 2048 in baseline.prefill_tokens_per_s:
        ratio = w4a4.prefill_tokens_per_s[2048] / baseline.prefill_tokens_per_s[2048]
        plan = "per-channel plan" if per_channel else "default plan, never slower"
        out.append(Target(f"prefill 2048 vs {baseline.variant} ({plan})", ratio, minimum=1.3 if per_channel else 1.0))
    out.append(Target(f"decoder weight memory vs {baseline.variant}",
                      w4a4.decoder_weight_bytes / baseline.decoder_weight_bytes, maximum=0.3))
    return tuple(out)


def dtype_name(config: DecoderConfig) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(config.dtype, str(config.dtype))
