"""`apex4gen bench`: W4A4 ops of a build against cuBLAS and PyTorch's own 4-bit kernel, in one run.

Method (the same for every candidate): inputs are rotated over enough copies that the weights cannot stay in
L2; each timed sample is one CUDA-graph replay of ``reps`` calls (launch overhead out, as serving engines run
decode), bracketed by CUDA events after warm-up; the figure is the median over samples divided by ``reps``.
The W4A4 op is timed end to end: activation quantization included. Bytes and peaks for the roofline columns
come from the same run (a measured device-to-device copy) and the GPU spec (tensor-core peak).
With ``breakdown`` the two halves of a two-kernel op are timed alone as well, the same way: the activation
quantizer, and the GEMM on activations quantized beforehand (ops whose kernel quantizes its own input have no
halves to time).
With ``fused_producer`` each point also gets the op's cost with its quantizer fused into the op that makes its
activation (RMSNorm before qkv/gate_up, SiLU(gate) * up before down_proj; o_proj's input has no such op): the
time of the fused producer op plus the GEMM on its output, minus the time of the plain producer in PyTorch
(F.rms_norm with a random weight, F.silu(g) * u), i.e. what the projection adds to a decoder whose producer runs
anyway, comparable with the cuBLAS baselines (which read the producer's output). Ratios count it at no less than
the GEMM alone (Point.fused_cost_us), which is timed with it.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from . import reference
from .granularity import Granularity

DEFAULT_MS = (1, 4, 16, 64, 256, 1024, 4096)
BASELINES = ("fp16", "int8", "fp8_tensor", "fp8_row", "int4_weight_only")
PRODUCERS = ("rmsnorm", "silu_mul")  # graph.py's ops that make a decoder projection's input
RMS_EPS = 1e-5


@dataclass(frozen=True)
class Point:
    gemm: str
    n: int
    k: int
    m: int
    granularity: str
    kernel: str
    w4a4_us: float
    baselines_us: dict
    bytes_moved: int
    bw_fraction: float
    tc_fraction: float
    quantize_us: float | None = None  # the halves of the op, timed alone (``breakdown``)
    gemm_us: float | None = None
    stream_us: float | None = None    # the bound: a kernel that only reads this GEMM's 4-bit weights and scales
    fused_us: float | None = None     # (fused producer + GEMM) - plain producer (``fused_producer``); None: no
                                      # producer to fuse (o_proj), or the kernel quantizes its own input
    predicted_us: float | None = None  # the cost model's time of the point's kernel (the plan's constants)

    @property
    def modelled_us(self) -> float:
        """The measured time the cost model predicts: the GEMM alone where it was timed (the model does not count
        a separate quantizer launch), else the op (the decode kernels quantize inside their call)."""
        return self.gemm_us if self.gemm_us is not None else self.w4a4_us

    @property
    def prediction_ratio(self) -> float | None:
        """Predicted over measured (``modelled_us``)."""
        return None if self.predicted_us is None else self.predicted_us / self.modelled_us

    @property
    def stream_fraction(self) -> float | None:
        """Bound time over ours: 1.0 is an op as fast as reading its weights."""
        return None if self.stream_us is None else self.stream_us / self.w4a4_us

    def speedup(self, baseline: str) -> float | None:
        """Baseline time over ours; ``fp8`` is the faster of cuBLAS FP8 per-tensor and row-wise."""
        t = self._baseline_us(baseline)
        return None if t is None else t / self.w4a4_us

    @property
    def fused_cost_us(self) -> float | None:
        """The op's cost with its quantizer fused into the producer: ``fused_us``, but never below the GEMM alone.
        A difference under the GEMM's time is the producer's own fusion (PyTorch's silu(g) * u is two kernels and
        two passes over [M, I]; a serving engine fuses it for its 16-bit and FP8 paths too), not the op's."""
        if not self.fused_us or self.fused_us <= 0:
            return None
        return max(self.fused_us, self.gemm_us) if self.gemm_us else self.fused_us

    def fused_speedup(self, baseline: str) -> float | None:
        """Baseline time over the op's with its quantizer fused into the producer (``fused_cost_us``)."""
        t, ours = self._baseline_us(baseline), self.fused_cost_us
        return None if t is None or ours is None else t / ours

    def _baseline_us(self, baseline: str) -> float | None:
        if baseline == "fp8":
            times = [self.baselines_us[b] for b in ("fp8_tensor", "fp8_row") if b in self.baselines_us]
            return min(times) if times else None
        return self.baselines_us.get(baseline)


def time_graph(fn: Callable[[int], None], copies: int, reps: int = 20, samples: int = 15) -> float:
    """Median µs of one call; ``fn(i)`` runs the op on input set ``i % copies``."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(3):  # warm-up outside the graph (lazy init, autotuning, module load)
            fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(reps):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    del graph
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (the bandwidth roofline). Timed eagerly: a copy
    captured in a CUDA graph becomes a memcpy node that ran ~20% slower (2.4 vs 3.0 TB/s on the H100)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(9):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return nbytes / statistics.median(times)


def copies_for(weight_bytes: int, l2_bytes: int = 50 << 20) -> int:
    """Enough weight copies that one round trip through them overflows L2 twice."""
    return max(4, math.ceil(4 * l2_bytes / max(weight_bytes, 1)))


def w4a4_bytes(m: int, n: int, k: int, group: int) -> int:
    groups = k // group
    return n * k // 2 + n * groups * 2 + m * k * 2 + m * n * 2


def time_fp16(x: list, n: int, k: int, reps: int = 20, samples: int = 15) -> float:
    """cuBLAS ``x @ w.t()`` in the activations' 16-bit dtype, one [N, K] weight per input copy, µs."""
    copies = len(x)
    w = [torch.randn(n, k, device="cuda", dtype=x[0].dtype) for _ in range(copies)]
    return time_graph(lambda i: torch.matmul(x[i % copies], w[i % copies].t()), copies, reps, samples)


def _baselines(m: int, n: int, k: int, x: list, want: set) -> dict:
    """cuBLAS FP16 / INT8 / FP8 (per-tensor, row-wise) and aten's int4 weight-only g128, µs."""
    copies = len(x)
    out = {}
    if "fp16" in want:
        out["fp16"] = time_fp16(x, n, k)
    if "int8" in want and m >= 17:  # cuBLAS int8 through torch needs M > 16
        xi = [torch.randint(-8, 8, (m, k), device="cuda", dtype=torch.int8) for _ in range(copies)]
        wi = [torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8) for _ in range(copies)]
        out["int8"] = time_graph(lambda i: torch._int_mm(xi[i % copies], wi[i % copies].t()), copies)
        del xi, wi
    if want & {"fp8_tensor", "fp8_row"}:
        out.update(_fp8_baselines(m, n, k, copies, want))
    if "int4_weight_only" in want:
        t = _int4_weight_only(m, n, k, x)
        if t is not None:
            out["int4_weight_only"] = t
    return out


def _fp8_baselines(m: int, n: int, k: int, copies: int, want: set) -> dict:
    """cuBLAS FP8 needs M to be a multiple of 16: smaller or odd M is padded, as a caller would."""
    f8 = torch.float8_e4m3fn
    m = -(-m // 16) * 16
    xf = [torch.randint(-8, 8, (m, k), device="cuda").to(f8) for _ in range(copies)]
    wf = [torch.randint(-8, 8, (n, k), device="cuda").to(f8) for _ in range(copies)]
    out = {}
    one = torch.ones((), device="cuda")
    if "fp8_tensor" in want:
        out["fp8_tensor"] = time_graph(lambda i: torch._scaled_mm(
            xf[i % copies], wf[i % copies].t(), one, one, out_dtype=torch.bfloat16), copies)
    if "fp8_row" in want:
        sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
        out["fp8_row"] = time_graph(lambda i: torch._scaled_mm(
            xf[i % copies], wf[i % copies].t(), sa, sb, out_dtype=torch.bfloat16), copies)
    return out


def _int4_weight_only(m: int, n: int, k: int, x: list) -> float | None:
    """aten._weight_int4pack_mm at g128 with bf16 activations (what torchao's int4 weight-only runs)."""
    copies = len(x)
    try:
        xb = [t.to(torch.bfloat16) for t in x]
        packed, sz = [], []
        for _ in range(copies):
            w = torch.randint(0, 16, (n, k // 2), device="cuda", dtype=torch.uint8)
            packed.append(torch.ops.aten._convert_weight_to_int4pack(w, 8))
            sz.append(torch.rand(k // 128, n, 2, device="cuda", dtype=torch.bfloat16))
        return time_graph(lambda i: torch.ops.aten._weight_int4pack_mm(
            xb[i % copies], packed[i % copies], 128, sz[i % copies]), copies)
    except (RuntimeError, AttributeError):
        return None


def _halves(build, info, x: list, weights: list, group: int) -> tuple[float | None, float | None]:
    """µs of the activation quantizer alone and of the GEMM alone on pre-quantized activations."""
    if info.act_format == "raw":
        return None, None
    copies = len(x)
    quantized = [build.quantize_act(t, group, info.act_format, info.act_bits) for t in x]
    out = torch.empty(x[0].shape[0], weights[0].n, dtype=x[0].dtype, device="cuda")
    quantize = time_graph(lambda i: build.quantize_act(x[i % copies], group, info.act_format, info.act_bits), copies)
    gemm = time_graph(lambda i: build.gemm(*quantized[i % copies], weights[i % copies], info, out=out), copies)
    return quantize, gemm


def _producer_ops(build, info, producer: str, k: int, group: int, dtype) -> tuple[Callable, Callable]:
    """(fused op, plain PyTorch op) of a producer, each on one input of it: x [M, K] for RMSNorm (a random
    weight), gate_up [M, 2K] for SiLU(gate) * up."""
    if producer == "rmsnorm":
        norm = torch.rand(k, device="cuda", dtype=dtype) + 0.5

        def fused(x):
            return build.rmsnorm_quantize_act(x, norm, RMS_EPS, group, info.act_format, info.act_bits)

        def plain(x):
            return torch.nn.functional.rms_norm(x, (k,), norm, RMS_EPS)
    else:
        def fused(gate_up):
            return build.silu_mul_quantize_act(gate_up, group, info.act_format, info.act_bits)

        def plain(gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up
    return fused, plain


def _fused_producer(build, info, producer: str, x: list, weights: list, group: int) -> float | None:
    """µs of (fused producer op + GEMM on its output) minus µs of the plain producer in PyTorch; None where the
    kernel quantizes its own input (nothing to fuse)."""
    if info.act_format == "raw":
        return None
    copies, (m, k), dtype = len(x), x[0].shape, x[0].dtype
    inputs = x if producer == "rmsnorm" else [torch.randn(m, 2 * k, device="cuda", dtype=dtype) for _ in x]
    fused, plain = _producer_ops(build, info, producer, k, group, dtype)
    out = torch.empty(m, weights[0].n, dtype=dtype, device="cuda")
    both = time_graph(lambda i: build.gemm(*fused(inputs[i % copies]), weights[i % copies], info, out=out), copies)
    return both - time_graph(lambda i: plain(inputs[i % copies]), copies)


def bench_gemm(build, name: str, n: int, k: int, group: int, ms, dtype=torch.float16, want=BASELINES,
               tc_peak_tops: float = 0.0, bandwidth: float = 0.0, breakdown: bool = False,
               act_bits: int = 4, stream_us: float | None = None, producer: str | None = None) -> list[Point]:
    """Time one GEMM of a build at each M (skipping buckets the build does not serve), with the plan's
    activation precision; ``stream_us``, the weight-stream bound of this GEMM measured in the same run, is
    recorded with every point. ``producer`` (one of PRODUCERS, or None for no fusable producer) times the op
    with its quantizer fused into that producer (Point.fused_us), and the GEMM alone that bounds it below."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    wbytes = n * k // 2
    copies = copies_for(wbytes)
    weights = [build.pack(reference.quantize_weight(
        torch.randn(n, k, device="cuda", dtype=dtype, generator=gen), group), act_bits) for _ in range(copies)]
    points = []
    for m in ms:
        info = build.select(m, n, k, group, dtype, act_bits)
        x = [torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) for _ in range(copies)]
        ours = time_graph(lambda i: build.linear(x[i % copies], weights[i % copies]), copies)
        halves = _halves(build, info, x, weights, group) if breakdown or producer else (None, None)
        fused = _fused_producer(build, info, producer, x, weights, group) if producer else None
        base = _baselines(m, n, k, x, set(want))
        moved = w4a4_bytes(m, n, k, group)
        flops = 2.0 * m * n * k
        points.append(Point(
            name, n, k, m, Granularity.of_size(group, k).name, info.name, ours, base, moved,
            moved / (ours * 1e-6) / bandwidth if bandwidth else 0.0,
            flops / (ours * 1e-6) / (tc_peak_tops * 1e12) if tc_peak_tops else 0.0, *halves, stream_us, fused))
    return points


def geomean(values) -> float:
    vals = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def write_json(path, points: list[Point], meta: dict) -> None:
    """Every point's fields; where the fused-producer time was measured, also the cost counted from it
    (``fused_cost_us``) and its ratios (``fused_speedups``: baseline µs over that cost, ``fp8`` the faster FP8)."""
    with open(path, "w") as f:
        json.dump({"meta": meta, "points": [_point_record(p) for p in points]}, f, indent=2, sort_keys=True)
        f.write("\n")


def _point_record(p: Point) -> dict:
    record = asdict(p)
    if p.fused_us is not None:
        record["fused_cost_us"] = p.fused_cost_us
        record["fused_speedups"] = {b: p.fused_speedup(b) for b in (*p.baselines_us, "fp8")}
    return record
