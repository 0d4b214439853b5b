"""Benchmark the Hopper W4A4 prefill kernels against cuBLAS on the same device, in the same run.

For llama2-70b's four GEMMs (N x K) and M from 64 to 4096: torch.matmul fp16, torch._int_mm (int8),
torch._scaled_mm (fp8 e4m3, per-tensor and rowwise scales) and every prebuilt apex4gen sm90 prefill kernel
found in --so-dir (files <procedural name>.so). Times are CUDA-event medians after warm-up, with the weights
rotated over several copies so that L2 does not hold them. The W4A4 time is the GEMM kernel alone (activations
already quantized, as runtime/quantize.cu leaves them). Prints a table (TFLOPS, 2*M*N*K / time) and writes JSON.

    python bench/sm90_prefill_bench.py --so-dir .devcarry_sm90p --json $OUT/bench.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from apex4gen import reference as ref  # noqa: E402
from apex4gen.kernels import KernelConfig, family_of, layouts  # noqa: E402
from test_sm90_prefill import GemmArgs, LoadedKernel, act_storage  # noqa: E402

import ctypes  # noqa: E402

SHAPES = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}
MS = (64, 128, 256, 512, 1024, 2048, 4096)
COPIES = 3


def time_ms(fn, warmup: int = 5, reps: int = 30) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rotating(fns):
    """One callable that runs the next of several equivalent launches (distinct weight copies) each call."""
    state = {"i": 0}

    def call():
        fns[state["i"] % len(fns)]()
        state["i"] += 1
    return call


def config_from_name(name: str) -> KernelConfig:
    # apex4gen_<family>_sm90a_<path>_<gran>_<tm>x<tn>x<tk>_w<wm>x<wn>_s<st>_k<sk>_<dtype>
    parts = name.split("_")
    dtype, sk, st, warps, tiles, gran, path = parts[-1], parts[-2], parts[-3], parts[-4], parts[-5], parts[-6], parts[-7]
    family = "_".join(parts[1:-8])
    tm, tn, tk = (int(v) for v in tiles.split("x"))
    wm, wn = (int(v) for v in warps[1:].split("x"))
    group = 0 if gran == "channel" else int(gran[1:])
    return KernelConfig(family, "sm_90a", path, group, tm, tn, tk, wm, wn, int(st[1:]), int(sk[1:]), dtype)


def cublas_baselines(m: int, n: int, k: int, dev: str) -> dict[str, float]:
    a16 = torch.randn(m, k, device=dev, dtype=torch.float16)
    w16 = [torch.randn(n, k, device=dev, dtype=torch.float16) for _ in range(COPIES)]
    out = {"fp16": time_ms(rotating([lambda w=w: a16 @ w.t() for w in w16]))}
    del w16
    a8 = torch.randint(-8, 8, (m, k), device=dev, dtype=torch.int8)
    w8 = [torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8) for _ in range(COPIES)]
    out["int8"] = time_ms(rotating([lambda w=w: torch._int_mm(a8, w.t()) for w in w8]))
    del w8
    af = a8.float().to(torch.float8_e4m3fn)
    wf = [torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8).float().to(torch.float8_e4m3fn)
          for _ in range(COPIES)]
    one = torch.ones((), device=dev)
    out["fp8_tensor"] = time_ms(rotating([lambda w=w: torch._scaled_mm(af, w.t(), one, one, out_dtype=torch.bfloat16)
                                          for w in wf]))
    sa, sb = torch.rand(m, 1, device=dev), torch.rand(1, n, device=dev)
    out["fp8_rowwise"] = time_ms(rotating([lambda w=w: torch._scaled_mm(af, w.t(), sa, sb, out_dtype=torch.bfloat16)
                                           for w in wf]))
    return out


def w4a4_time(kernel: LoadedKernel, m: int, n: int, k: int, dev: str) -> float | None:
    cfg = kernel.cfg
    group = k if cfg.group == 0 else cfg.group
    gen = torch.Generator().manual_seed(m * 7 + n)
    xq = ref.quantize_activation(torch.randn(m, k, generator=gen).half(), group)
    qx = act_storage(xq.q.to(dev), kernel.family.act_format)
    sx = xq.scales.to(dev).float().contiguous()
    dt = {"f16": torch.float16, "bf16": torch.bfloat16}[cfg.out_dtype]
    y = torch.empty(m, n, device=dev, dtype=dt)
    launches = []
    for _ in range(COPIES):
        # random int4 weights straight on the device (packing a 57344 x 8192 matrix on the CPU is slow)
        q = torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8)
        s = (torch.rand(n, k // group, device=dev) * 0.01).to(dt)
        qw, sw = layouts.pack(kernel.family.weight_layout, ref.QuantizedTensor(q, s, group))
        ws_bytes = kernel._workspace(m, n, k)
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)
        args = GemmArgs(qx.data_ptr(), sx.data_ptr(), qw.data_ptr(), sw.data_ptr(), None, y.data_ptr(),
                        m, n, k, group, ws.data_ptr(), ws_bytes)
        keep = (qw, sw, ws, args)
        stream = torch.cuda.current_stream().cuda_stream
        launches.append(lambda keep=keep: kernel._run(ctypes.byref(keep[3]), stream))
    if launches[0]() != 0:
        return None
    return time_ms(rotating(launches))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--so-dir", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--only", default="", help="time only the kernels whose name contains this (e.g. _g128_)")
    args = ap.parse_args()
    dev = "cuda"
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    kernels = [LoadedKernel(config_from_name(p.stem), p) for p in sorted(args.so_dir.glob("apex4gen_sm90_prefill_*.so"))
               if args.only in p.stem]
    results = []
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        for m in map(int, args.ms.split(",")):
            flop = 2.0 * m * n * k
            row = {"shape": shape, "m": m, "n": n, "k": k, "ms": cublas_baselines(m, n, k, dev)}
            for kern in kernels:
                t = w4a4_time(kern, m, n, k, dev)
                if t is not None:
                    row["ms"][kern.cfg.procedural_name()] = t
            row["tflops"] = {name: flop / (t * 1e-3) / 1e12 for name, t in row["ms"].items()}
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results) -> None:
    def best(row, gran):
        vals = [(v, name) for name, v in row["tflops"].items() if f"_{gran}_" in name]
        return max(vals) if vals else (float("nan"), "-")
    print(f"\n{'shape':8} {'M':>5} | {'fp16':>6} {'int8':>6} {'fp8T':>6} {'fp8R':>6} | {'chan':>6} {'g128':>6} "
          f"| chan/fp8T g128/fp8T chan/int8 g128/int8 g128/fp16")
    for r in results:
        t = r["tflops"]
        c, _ = best(r, "channel")
        g, _ = best(r, "g128")
        print(f"{r['shape']:8} {r['m']:5d} | {t['fp16']:6.0f} {t['int8']:6.0f} {t['fp8_tensor']:6.0f} "
              f"{t['fp8_rowwise']:6.0f} | {c:6.0f} {g:6.0f} | {c / t['fp8_tensor']:9.2f} {g / t['fp8_tensor']:9.2f} "
              f"{c / t['int8']:9.2f} {g / t['int8']:9.2f} {g / t['fp16']:9.2f}")


if __name__ == "__main__":
    main()
