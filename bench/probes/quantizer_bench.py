"""Activation quantizer variants (shared objects exporting apex4gen_quantize_act, each runtime/quantize.cu or a
variant of it): bit-exact against the first and the reference, then CUDA-graph timed with inputs rotated past L2.

From the repository root (REV: the commit to compare against):

    F="-std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -Xcompiler=-fPIC -shared -gencode=arch=compute_90a,code=sm_90a -Iruntime"
    git show REV:runtime/quantize.cu > old.cu
    nvcc $F old.cu -o a_old.so; nvcc $F runtime/quantize.cu -o new.so      # no GPU needed
    PYTHONPATH=. python3 bench/probes/quantizer_bench.py a_old.so new.so   # on the GPU

Prints one row of µs a shape and library; JSON to $OUT/qbench.json ($OUT defaults to the current folder).
"""
import ctypes, sys, json, os
import torch
from apex4gen import reference as ref
from apex4gen.bench import time_graph, copies_for
libs = {os.path.basename(p)[:-3]: ctypes.CDLL(p) for p in sys.argv[1:]}
FMT = {"s4": 0, "s8": 1, "e4m3": 2}
def run(lib, x, group, fmt, qx, sx, bits=4):
    st = lib.apex4gen_quantize_act(ctypes.c_void_p(x.data_ptr()), x.shape[1], 1 if x.dtype == torch.bfloat16 else 0,
                                   x.shape[0], x.shape[1], group, bits, FMT[fmt], ctypes.c_void_p(qx.data_ptr()),
                                   ctypes.c_void_p(sx.data_ptr()), ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
    assert st == 0, st
def outputs(m, k, group, fmt):
    qx = torch.empty((m, k // 2) if fmt == "s4" else (m, k), dtype=torch.uint8, device="cuda")
    return qx, torch.empty(m, k // group, device="cuda")
res = []
for m, k, group, fmt, bits in [(4096, 8192, 128, "e4m3", 4), (4096, 28672, 128, "e4m3", 4),
                               (1024, 8192, 128, "e4m3", 4), (256, 8192, 128, "e4m3", 4), (64, 8192, 128, "e4m3", 4),
                               (16, 8192, 128, "s4", 4), (4096, 8192, 8192, "s8", 4), (4096, 8192, 8192, "s8", 8),
                               (4096, 28672, 28672, "s8", 4), (3, 8192, 64, "s4", 4), (100, 1024, 1024, "s8", 8),
                               (7, 4096, 256, "e4m3", 4), (5, 1030, 1030, "s4", 4)]:
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(m, k, device="cuda", dtype=dtype) * 3
        x[0, :group] = 0
        want = ref.quantize_activation(x, group, bits)
        base = None
        for name, lib in libs.items():
            qx, sx = outputs(m, k, group, fmt); qx.fill_(0xAB); sx.fill_(float("nan"))
            run(lib, x, group, fmt, qx, sx, bits); torch.cuda.synchronize()
            assert torch.equal(sx, want.scales), (name, m, k, group, fmt)
            if base is None: base = qx.clone()
            assert torch.equal(qx, base), (name, m, k, group, fmt, "differs from the first")
        if dtype != torch.bfloat16 or (m < 64 and m != 16):
            continue
        copies = copies_for(m * k * 2)
        xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(copies)]
        outs = [outputs(m, k, group, fmt) for _ in range(copies)]
        row = {"m": m, "k": k, "group": group, "fmt": fmt, "bits": bits}
        for name, lib in libs.items():
            row[name] = round(time_graph(lambda i: run(lib, xs[i % copies], group, fmt, *outs[i % copies], bits),
                                         copies), 2)
        moved = m * k * 2 + (m * k // 2 if fmt == "s4" else m * k) + m * (k // group) * 4
        row["GBps_best"] = round(moved / min(v for kk, v in row.items() if kk in libs) / 1e3)
        print(row, flush=True); res.append(row)
json.dump(res, open(os.environ.get("OUT", ".") + "/qbench.json", "w"), indent=1)
print("all variants bit-exact with the first and the reference")
