"""Check and time the sm90_decode kernels on llama2-70b's GEMMs against cuBLAS FP16 (torch.matmul).

End to end: our time includes the activation quantization (the launcher runs it and the GEMM). CUDA events
around each call, calls queued behind a sleep so launch latency stays out, median of many; weights rotated
over enough copies (>= 4, >= 200 MB) that L2 (50 MB) never holds them. Bandwidth fraction = bytes moved
(weights, scales, x, y) / the device-to-device copy bandwidth measured in the same run; "bound" = cuBLAS
FP16's bytes / ours, the speed-up if both streamed at the same efficiency.

    python bench/sm90_decode_bench.py --build-dir .devcarry_sm90d            # here: render + nvcc only
    python bench/sm90_decode_bench.py --lib-dir .devcarry_sm90d --check --profile --bench --out results.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from apex4gen import reference as ref  # noqa: E402
import sm90_decode_native as native  # noqa: E402

LLAMA2_70B = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}
CHECK_MS = (1, 3, 16, 17, 33, 64)
BENCH_MS = (1, 4, 16, 32, 48, 64)
GROUPS = (128, 0)  # 0: per-channel
L2_CLEAR_BYTES = 200 << 20


def build(out_dir: Path, variants: str | None = None, dtypes: tuple[str, ...] = ("f16", "bf16")) -> None:
    """Render + compile every (group, dtype) library; `variants` ("mt,warps,rt,p;...") replaces every
    variant table of the family (both K classes) for a tuning sweep."""
    from apex4gen.kernels import sm90_decode
    if variants:
        table = tuple(sm90_decode.Variant(*map(int, v.split(","))) for v in variants.split(";"))
        sm90_decode.VARIANTS_GROUP = sm90_decode.VARIANTS_CHANNEL = sm90_decode.VARIANTS_LARGE_K = table
    libs = {}
    for group in GROUPS:
        for dtype in dtypes:
            cfg = native.decode_config(group, dtype)
            lib, report = native.build_library(cfg, out_dir)
            (out_dir / f"{lib.stem}.ptxas.txt").write_text(report)
            libs[lib.name] = cfg
            print(f"built {lib.name}")
    native.write_manifest(out_dir, libs)


def load(lib_dir: Path) -> dict[tuple[int, str], native.DecodeKernel]:
    return {(cfg.group, cfg.out_dtype): native.DecodeKernel(lib_dir / f, cfg)
            for f, cfg in native.read_manifest(lib_dir).items()}


# ------------------------------------------------------------------------------------------------- check
def random_weight(n: int, k: int, group: int, dtype: torch.dtype) -> ref.QuantizedTensor:
    return ref.quantize_weight(torch.randn(n, k, device="cuda", dtype=dtype), group or None)


def check(kernels, out: dict) -> bool:
    cases = []
    for name, (n, k) in LLAMA2_70B.items():
        for group in GROUPS:
            w = random_weight(n, k, group, torch.float16)
            qw, sw = native.pack_weight(w)
            bias = torch.randn(n, device="cuda", dtype=torch.float16)
            for m in CHECK_MS:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16) * 3
                r = native.check_against_reference(kernels[(group, "f16")], x, w, qw, sw, bias if m % 2 else None)
                cases.append({"gemm": name, "group": group, "m": m, "dtype": "f16", **r})
            del w, qw, sw
    for group in GROUPS:  # bf16 and the all -8 worst case on o_proj
        n, k = LLAMA2_70B["o"]
        w = random_weight(n, k, group, torch.bfloat16)
        qw, sw = native.pack_weight(w)
        for m in (5, 16, 64) if (group, "bf16") in kernels else ():  # sweep builds are f16 only
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            r = native.check_against_reference(kernels[(group, "bf16")], x, w, qw, sw, None)
            cases.append({"gemm": "o", "group": group, "m": m, "dtype": "bf16", **r})
        g = group or k
        worst = ref.QuantizedTensor(torch.full((n, k), -8, dtype=torch.int8, device="cuda"),
                                    torch.full((n, k // g), 2.0 ** -8, dtype=torch.float16, device="cuda"), g)
        qw, sw = native.pack_weight(worst)
        x = -torch.ones(16, k, device="cuda", dtype=torch.float16)
        r = native.check_against_reference(kernels[(group, "f16")], x, worst, qw, sw, None)
        cases.append({"gemm": "o_all_-8", "group": group, "m": 16, "dtype": "f16", **r})
    cases.append(graph_replay_case(kernels[(128, "f16")]))
    torch.cuda.empty_cache()
    out["check"] = cases
    bad = [c for c in cases if not c["ok"]]
    print(f"check: {len(cases) - len(bad)}/{len(cases)} passed; worst err/tol "
          f"{max(c.get('worst_err_over_tol', float('inf')) for c in cases):.3g}")
    for c in bad:
        print("  FAIL", c)
    return not bad


def graph_replay_case(kern) -> dict:
    """Both launches (quantization, then the GEMM under programmatic dependent launch) captured in a CUDA
    graph: replays onto NaN-poisoned outputs equal the eager result bit for bit, also with new x."""
    n, k = LLAMA2_70B["o"]
    w = random_weight(n, k, 128, torch.float16)
    qw, sw = native.pack_weight(w)
    ok = True
    for m in (1, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        eager = torch.empty(m, n, device="cuda", dtype=torch.float16)
        assert kern(x, qw, sw, None, eager) == 0
        replay = torch.empty_like(eager)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            assert kern(x, qw, sw, None, replay) == 0
        for _ in range(3):
            replay.fill_(float("nan"))
            x.copy_(torch.randn_like(x))
            graph.replay()
            assert kern(x, qw, sw, None, eager) == 0
            torch.cuda.synchronize()
            ok = ok and torch.equal(replay, eager)
    return {"gemm": "o_graph_replay", "group": 128, "m": 16, "dtype": "f16", "ok": ok, "worst_err_over_tol": 0.0}


# ------------------------------------------------------------------------------------------------- bench
def time_calls(fn, calls: int = 200) -> float:
    """Median µs of `calls` calls, each between two events, all queued behind a GPU sleep."""
    for i in range(10):
        fn(i)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    torch.cuda._sleep(20_000_000)  # ~10 ms: the CPU queues every call before the GPU reaches the first
    for i in range(calls):
        starts[i].record()
        fn(i)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_calls(lambda i: dst.copy_(src), calls=20)
    return 2 * src.numel() / (t * 1e-6)


def copies_for(nbytes: int) -> int:
    return max(4, math.ceil(L2_CLEAR_BYTES / nbytes))


def bench(kernels, out: dict, ms=BENCH_MS) -> None:
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    out["copy_bandwidth"] = bw
    rows = []
    for name, (n, k) in LLAMA2_70B.items():
        wf = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies_for(2 * n * k))]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t_fp16 = time_calls(lambda i: torch.matmul(x, wf[i % len(wf)].t()))
            moved_fp16 = 2 * n * k + 2 * m * k + 2 * m * n
            row = {"gemm": name, "n": n, "k": k, "m": m, "cublas_fp16_us": t_fp16,
                   "cublas_bw_frac": moved_fp16 / (t_fp16 * 1e-6) / bw}
            for group in GROUPS:
                nbytes_w = n * k // 2 + n * (k // (group or k)) * 2
                qws = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
                       for _ in range(copies_for(nbytes_w))]
                sws = [torch.rand(n, k // (group or k), device="cuda", dtype=torch.float16) * 0.01 for _ in qws]
                y = torch.empty(m, n, device="cuda", dtype=torch.float16)
                kern = kernels[(group, "f16")]
                status = kern(x, qws[0], sws[0], None, y)
                assert status == 0, f"status {status} for {name} m={m} group={group}"
                t = time_calls(lambda i: kern(x, qws[i % len(qws)], sws[i % len(qws)], None, y))
                moved = nbytes_w + 2 * m * k + 2 * m * n
                tag = f"g{group}" if group else "channel"
                row[f"{tag}_us"] = t
                row[f"{tag}_speedup"] = t_fp16 / t
                row[f"{tag}_bw_frac"] = moved / (t * 1e-6) / bw
                row[f"{tag}_bound"] = moved_fp16 / moved
                del qws, sws
            rows.append(row)
            print(f"{name:8s} M={m:3d} fp16 {t_fp16:7.1f} us {100 * row['cublas_bw_frac']:4.0f}% | g128 "
                  f"{row['g128_us']:6.1f} us {row['g128_speedup']:4.2f}x (bound {row['g128_bound']:4.2f}) "
                  f"{100 * row['g128_bw_frac']:4.0f}% | channel {row['channel_us']:6.1f} us "
                  f"{row['channel_speedup']:4.2f}x (bound {row['channel_bound']:4.2f}) "
                  f"{100 * row['channel_bw_frac']:4.0f}%", flush=True)
        del wf
        torch.cuda.empty_cache()
    out["bench"] = rows
    print("\ngeomean speedup over cuBLAS FP16 (4 GEMMs) / mean bandwidth fraction:")
    for m in ms:
        sel = [r for r in rows if r["m"] == m]
        parts = []
        for tag in ("g128", "channel"):
            gm = math.exp(sum(math.log(r[f"{tag}_speedup"]) for r in sel) / len(sel))
            frac = sum(r[f"{tag}_bw_frac"] for r in sel) / len(sel)
            bound = math.exp(sum(math.log(r[f"{tag}_bound"]) for r in sel) / len(sel))
            parts.append(f"{tag} {gm:4.2f}x (bound {bound:4.2f}) {100 * frac:3.0f}%")
        print(f"  M={m:3d}: " + " | ".join(parts))


def _nvml_clocks():
    """(SM MHz, memory MHz, throttle-reason bits) from NVML, or None where it cannot be read."""
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return (pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                pynvml.nvmlDeviceGetCurrentClocksEventReasons(h))
    except Exception:  # diagnosis only
        return None


def variance(kernels, out: dict, calls: int = 60) -> None:
    """M >= 32 outliers. Each call is preceded by an elementwise kernel of a varying block count (moves where the
    block scheduler places the next blocks); the calls queue behind either a GPU sleep (``sleep``, as
    time_calls does) or ~8 ms of FP16 GEMMs (``warm``). A clock probe (a timed 200k-cycle sleep kernel) runs just
    before and after the calls: SM MHz = cycles / time. Median per perturbation; max/min ~2-3 = outliers."""
    scratch = torch.zeros(132 * 512 * 64, device="cuda")
    big = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    probe_cycles = 200_000
    rows = []

    def probe():
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(probe_cycles)
        b.record()
        return a, b

    for mode in ("sleep", "warm"):
        for name in ("qkv", "o", "down"):
            n, k = LLAMA2_70B[name]
            for group in GROUPS:
                nbytes_w = n * k // 2 + n * (k // (group or k)) * 2
                qws = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
                       for _ in range(copies_for(nbytes_w))]
                sws = [torch.rand(n, k // (group or k), device="cuda", dtype=torch.float16) * 0.01 for _ in qws]
                kern = kernels[(group, "f16")]
                for m in (32, 64):
                    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                    y = torch.empty(m, n, device="cuda", dtype=torch.float16)
                    meds, clocks = [], []
                    for pert in (1, 5, 17, 33, 50, 64):
                        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                              for _ in range(calls)]
                        kern(x, qws[0], sws[0], None, y)
                        torch.cuda.synchronize()
                        if mode == "sleep":
                            torch.cuda._sleep(20_000_000)
                        else:
                            for _ in range(40):
                                torch.matmul(big, big)
                        p0 = probe()
                        for i, (a, b) in enumerate(ev):
                            scratch[: pert * 512 * (1 + i % 3)].add_(1.0)
                            a.record()
                            kern(x, qws[i % len(qws)], sws[i % len(qws)], None, y)
                            b.record()
                        p1 = probe()
                        torch.cuda.synchronize()
                        nv = _nvml_clocks()
                        times = sorted(a.elapsed_time(b) * 1e3 for a, b in ev)
                        mhz = [probe_cycles / (a.elapsed_time(b) * 1e3) for a, b in (p0, p1)]
                        meds.append(statistics.median(times))
                        clocks.append(mhz)
                        rows.append({"mode": mode, "gemm": name, "group": group, "m": m, "perturb": pert,
                                     "median_us": meds[-1], "p10_us": times[len(times) // 10],
                                     "p90_us": times[9 * len(times) // 10], "max_us": times[-1],
                                     "probe_mhz_before_after": mhz, "nvml_sm_mem_reasons": nv})
                    tag = f"g{group}" if group else "channel"
                    print(f"variance {mode:5s} {name:5s} {tag:7s} M={m:3d}: medians "
                          + " ".join(f"{t:6.1f}" for t in meds) + f" | max/min {max(meds) / min(meds):4.2f} | MHz "
                          + " ".join(f"{c[0]:.0f}/{c[1]:.0f}" for c in clocks), flush=True)
                del qws, sws
    out["variance"] = rows


def profile(kernels, out: dict) -> None:
    """Per-kernel device time (quantization vs GEMM) and the launch-to-launch span, o_proj g128, from the
    profiler's trace; each call's kernels overlap under programmatic dependent launch."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    n, k = LLAMA2_70B["o"]
    kern = kernels[(128, "f16")]
    qws = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8) for _ in range(8)]
    sws = [torch.rand(n, k // 128, device="cuda", dtype=torch.float16) * 0.01 for _ in qws]
    res = {}
    for m in (1, 16, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        y = torch.empty(m, n, device="cuda", dtype=torch.float16)
        for i in range(5):
            kern(x, qws[i % 8], sws[i % 8], None, y)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.cuda._sleep(5_000_000)
            for i in range(40):
                kern(x, qws[i % 8], sws[i % 8], None, y)
            torch.cuda.synchronize()
        quant, gemm = [], []
        for e in prof.events():
            if e.device_type.name != "CUDA":
                continue
            if "quantize_x_kernel" in e.name:
                quant.append(e)
            elif "decode_kernel" in e.name:
                gemm.append(e)
        span = [g.time_range.end - q.time_range.start for q, g in zip(quant, gemm)]
        res[m] = {"quant_us": statistics.median(e.time_range.elapsed_us() for e in quant),
                  "gemm_us": statistics.median(e.time_range.elapsed_us() for e in gemm),
                  "quant_start_to_gemm_end_us": statistics.median(span)}
        print(f"profile o_proj g128 M={m}: " + ", ".join(f"{a} {b:.1f}" for a, b in res[m].items()), flush=True)
    out["profile"] = res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build-dir", type=Path, help="render and compile the libraries here (needs nvcc, CUTLASS)")
    ap.add_argument("--variants", help="tuning sweep: 'mt,warps,rt,p;...' instead of the family's variant tables (f16 only)")
    ap.add_argument("--lib-dir", type=Path, help="load prebuilt libraries (manifest.json) from here")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--profile", action="store_true", help="quantization vs GEMM time from the profiler")
    ap.add_argument("--variance", action="store_true", help="M >= 32 outliers under perturbed block placement")
    ap.add_argument("--ms", default=",".join(map(str, BENCH_MS)), help="M values of --bench")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.build_dir:
        build(a.build_dir, a.variants, ("f16",) if a.variants else ("f16", "bf16"))
    if not (a.check or a.bench or a.profile or a.variance):
        return 0
    kernels = load(a.lib_dir or a.build_dir)
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    ok = True
    try:
        if a.check:
            ok = check(kernels, out)
        if a.profile:
            try:
                profile(kernels, out)
            except Exception as e:  # diagnosis only: never lose the check and the bench to it
                print(f"profile failed: {e!r}")
        if a.variance:
            variance(kernels, out)
        if a.bench:
            bench(kernels, out, tuple(int(m) for m in a.ms.split(",")))
    finally:
        if a.out:
            a.out.write_text(json.dumps(out, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
