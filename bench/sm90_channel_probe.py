"""Probe the per-channel Hopper prefill path piece by piece (H100): the activation quantizer alone, the GEMM
alone for several kernel variants, and quantizer + GEMM end to end; in one run, CUDA graphs, weights and
activations rotated over enough copies to overflow L2 (apex4gen.bench.time_graph / copies_for).

Inputs (all prebuilt, the device has no CUTLASS):
  --so-dir DIR: q_old.so / q_new.so / q_<other>.so (runtime/quantize.cu before / after / other versions, each
                exporting apex4gen_quantize_act; every one is checked bit for bit against q_old) and
                variant GEMMs <name>.so exporting probe_<name> / probe_<name>_workspace (the channel template
                rendered with the variant's values under the kernel name probe_<name>);
  --build DIR:  an apex4gen build whose sm90_prefill_channel kernels are timed as they are (the "before");
                without it only the quantizers are compared.
Every variant's output is compared bit for bit with the build's kernel of the same M (same int32 partials,
same epilogue: equal outputs expected). Writes JSON; prints one line per measurement.

    python bench/sm90_channel_probe.py --so-dir .devcarry_h3/so --build .devcarry_h3/build-before \
        --ms 64,256,1024,4096 --json $OUT/probe.json
"""
from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import apex4gen  # noqa: E402
from apex4gen import reference as ref  # noqa: E402
from apex4gen.bench import copies_for, time_graph  # noqa: E402
from apex4gen.kernels import layouts  # noqa: E402
from apex4gen.loader import GemmArgs  # noqa: E402

SHAPES = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}
FMT = {"s4": 0, "s8": 1, "e4m3": 2}


class Quantizer:
    def __init__(self, so: Path):
        self.lib = ctypes.CDLL(str(so))
        fn = self.lib.apex4gen_quantize_act
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self.fn = fn

    def __call__(self, x, group, fmt, qx, sx):
        m, k = x.shape
        st = self.fn(x.data_ptr(), x.stride(0), 0, m, k, group, FMT[fmt], qx.data_ptr(), sx.data_ptr(),
                     torch.cuda.current_stream().cuda_stream)
        assert st == 0, st


class Variant:
    def __init__(self, so: Path):
        self.name = so.stem
        lib = ctypes.CDLL(str(so))
        self.run = getattr(lib, f"probe_{self.name}")
        self.run.argtypes = [ctypes.POINTER(GemmArgs), ctypes.c_void_p]
        self.run.restype = ctypes.c_int
        self.ws = getattr(lib, f"probe_{self.name}_workspace")
        self.ws.argtypes = [ctypes.c_int] * 3
        self.ws.restype = ctypes.c_size_t

    def __call__(self, qx, sx, qw, sw, y):
        m, k = qx.shape
        n = y.shape[1]
        nbytes = self.ws(m, n, k)
        ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
        args = GemmArgs(qx.data_ptr(), sx.data_ptr(), qw.data_ptr(), sw.data_ptr(), None, y.data_ptr(),
                        m, n, k, k, ws.data_ptr(), nbytes)
        st = self.run(ctypes.byref(args), torch.cuda.current_stream().cuda_stream)
        assert st == 0, (self.name, st)


def probe_quantizer(qs: dict, ms, out: list) -> None:
    for k, group, fmt in ((8192, 8192, "s8"), (28672, 28672, "s8"), (8192, 128, "e4m3")):
        for m in ms:
            copies = copies_for(m * k * 2)
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) * 3 for _ in range(copies)]
            qx = torch.empty(m, k, dtype=torch.int8, device="cuda")
            sx = torch.empty(m, k // group, dtype=torch.float32, device="cuda")
            results = {}
            for name, q in qs.items():
                q(xs[0], group, fmt, qx, sx)
                results[name] = (qx.clone(), sx.clone())
                torch.cuda.synchronize()  # time_graph's warm-up runs on its own stream and rewrites qx
                t = time_graph(lambda i, q=q: q(xs[i % copies], group, fmt, qx, sx), copies)
                gbs = (3 * m * k + 4 * m * (k // group)) / (t * 1e-6) / 1e9
                out.append({"what": "quantize", "impl": name, "m": m, "k": k, "group": group, "fmt": fmt,
                            "us": t, "gbs": gbs})
                print(f"quantize {name} {fmt} g{group} M={m} K={k}: {t:.2f} us {gbs:.0f} GB/s", flush=True)
            qa, sa = results["old"]
            for name, (qb, sb) in results.items():
                same = torch.equal(qa, qb) and torch.equal(sa, sb)
                out.append({"what": "quantize_equal", "impl": name, "m": m, "k": k, "group": group, "fmt": fmt,
                            "equal": same})
                print(f"quantize old == {name}: {same}", flush=True)


def useful(variant: str, m: int) -> bool:
    """Skip token tiles far from M (a 256-token tile at M=64, a 64-token tile at M=4096)."""
    tile_m = int(re.match(r"t(\d+)", variant).group(1))
    return tile_m <= 2 * max(64, m) and 16 * tile_m >= m


def probe_gemms(build, variants, quant_new: Quantizer, ms, shapes, out: list, save) -> None:
    kernels = [k for k in build.kernels if "prefill_channel" in k.name]
    for shape in shapes:
        n, k = SHAPES[shape]
        copies = copies_for(n * k // 2)
        w = [ref.quantize_weight(torch.randn(n, k, device="cuda", dtype=torch.float16), k)
             for _ in range(copies)]
        packed = [build.pack(wq) for wq in w]
        canon = [layouts.pack("canonical", wq) for wq in w]
        for m in ms:
            acopies = max(2, copies_for(m * k * 2))
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) * 3 for _ in range(acopies)]
            qsx = [build.quantize_act(x, k, "s8") for x in xs]
            y = torch.empty(m, n, dtype=torch.float16, device="cuda")
            routed = build.select(m, n, k, k, torch.float16)
            # before: the build's route, end to end and GEMM alone; and every channel kernel of the build alone
            t = time_graph(lambda i: build.linear(xs[i % acopies], packed[i % copies], out=y), copies)
            out.append({"what": "e2e", "impl": "build:" + routed.name, "shape": shape, "m": m, "us": t})
            print(f"e2e {shape} M={m} build route {routed.name}: {t:.1f} us", flush=True)
            ref_y = None
            for kern in kernels:
                build.gemm(qsx[0][0], qsx[0][1], packed[0], kern, out=y)
                if kern.name == routed.name or ref_y is None:
                    ref_y = y.clone()
                t = time_graph(lambda i, kern=kern: build.gemm(qsx[i % acopies][0], qsx[i % acopies][1],
                                                               packed[i % copies], kern, out=y), copies)
                out.append({"what": "gemm", "impl": "build:" + kern.name, "shape": shape, "m": m, "us": t})
                print(f"gemm {shape} M={m} {kern.name}: {t:.1f} us", flush=True)
            for v in (v for v in variants if useful(v.name, m)):
                y.fill_(float("nan"))
                v(qsx[0][0], qsx[0][1], *canon[0], y)
                torch.cuda.synchronize()
                equal = bool(torch.equal(y, ref_y))
                t = time_graph(lambda i, v=v: v(qsx[i % acopies][0], qsx[i % acopies][1], *canon[i % copies], y),
                               copies)

                def e2e(i, v=v):
                    x = xs[i % acopies]
                    qx = torch.empty(m, k, dtype=torch.int8, device="cuda")
                    sx = torch.empty(m, 1, dtype=torch.float32, device="cuda")
                    quant_new(x, k, "s8", qx, sx)
                    v(qx, sx, *canon[i % copies], y)
                te = time_graph(e2e, copies)
                out.append({"what": "gemm", "impl": v.name, "shape": shape, "m": m, "us": t, "equal": equal})
                out.append({"what": "e2e", "impl": "q_new+" + v.name, "shape": shape, "m": m, "us": te})
                print(f"gemm {shape} M={m} {v.name}: {t:.1f} us, e2e with new quantizer {te:.1f} us, "
                      f"output equal to the build's: {equal}", flush=True)
            save()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--so-dir", required=True)
    ap.add_argument("--build", help="the build whose channel kernels are timed (omit: the quantizer alone)")
    ap.add_argument("--ms", default="64,256,1024,4096")
    ap.add_argument("--shapes", default="o,down,qkv,gate_up")
    ap.add_argument("--variants", default="", help="comma list of variant names (default: every *.so but q_*)")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    ms = [int(v) for v in a.ms.split(",")]
    so_dir = Path(a.so_dir)
    qs = {p.stem[2:]: Quantizer(p) for p in sorted(so_dir.glob("q_*.so"))}  # q_old.so, q_new.so, ...
    names = a.variants.split(",") if a.variants else sorted(p.stem for p in so_dir.glob("*.so")
                                                              if not p.stem.startswith("q_"))
    names = names if a.build else []
    variants = [Variant(so_dir / f"{n}.so") for n in names]
    out: list = []
    print(torch.cuda.get_device_name(), flush=True)

    def save():
        Path(a.json).write_text(json.dumps(out, indent=1))
    probe_quantizer(qs, ms, out)
    save()
    if a.build:
        probe_gemms(apex4gen.load(a.build), variants, qs["new"], ms, a.shapes.split(","), out, save)


if __name__ == "__main__":
    main()
