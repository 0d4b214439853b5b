"""The level-2 experiment on a Hopper GPU: `python3 harness.py BUILD LIB [LIB ...]` (MS: comma-separated M values).

Each LIB (build.sh) is checked against float64 on fresh random operands (outputs poisoned with NaN first; M = 1,
3, 17, 100, 4096), then timed, GEMM alone on int8 activations, against BUILD's routed per-channel kernel on the
same operands and cuBLAS FP8 per-tensor (torch._scaled_mm) at llama2-70b's four shapes: CUDA-graph replays of 20
calls, median of 7, in µs. OUTJ names the JSON of the timings."""
import ctypes, sys, json, torch
import apex4gen
from apex4gen import reference
from apex4gen.kernels import layouts

class Args(ctypes.Structure):
    _fields_ = [("qx", ctypes.c_void_p), ("sx", ctypes.c_void_p), ("qw", ctypes.c_void_p), ("sw", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("y", ctypes.c_void_p), ("m", ctypes.c_int), ("n", ctypes.c_int),
                ("k", ctypes.c_int), ("group", ctypes.c_int), ("workspace", ctypes.c_void_p),
                ("workspace_bytes", ctypes.c_size_t)]

libs = {p: ctypes.CDLL(p) for p in sys.argv[2:]}
for l in libs.values():
    l.l2_run.argtypes = [ctypes.POINTER(Args), ctypes.c_void_p, ctypes.c_void_p]
    l.l2_workspace.argtypes = [ctypes.POINTER(Args)]; l.l2_workspace.restype = ctypes.c_size_t
b = apex4gen.load(sys.argv[1])
dev = torch.device("cuda")
torch.manual_seed(0)

def operands(m, n, k):
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)
    r = torch.randint(1, 17, (n, k // 128), dtype=torch.int8, device=dev)
    sw = (torch.rand(n, device=dev) * 0.01 + 0.001).half()
    x8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
    sx = torch.rand(m, device=dev) * 0.01 + 0.001
    return q, r, sw, x8, sx

def l2_call(lib, m, n, k, qw, rt, sw, x8, sx, y, ws):
    a = Args(x8.data_ptr(), sx.data_ptr(), qw.data_ptr(), sw.data_ptr(), None, y.data_ptr(), m, n, k, 128,
             ws.data_ptr() if ws is not None else None, ws.numel() if ws is not None else 0)
    return lambda: lib.l2_run(ctypes.byref(a), rt.data_ptr(), torch.cuda.current_stream().cuda_stream)

def workspace(lib, m, n, k):
    a = Args(None, None, None, None, None, None, m, n, k, 128, None, 0)
    nb = lib.l2_workspace(ctypes.byref(a))
    return torch.empty(max(nb, 1), dtype=torch.uint8, device=dev)

def timeit(fn, reps=20):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize(); ts.append(e0.elapsed_time(e1) * 1000 / reps)
    return sorted(ts)[3]

def check(lib, m, n, k):
    q, r, sw, x8, sx = operands(m, n, k)
    qt = reference.QuantizedTensor(q=q, scales=sw.unsqueeze(1), group=k)
    qw, _ = layouts.pack_sm90_prefill(qt)
    rt = r.t().contiguous()
    y = torch.full((m, n), float("nan"), dtype=torch.half, device=dev)
    st = l2_call(lib, m, n, k, qw, rt, sw, x8, sx, y, workspace(lib, m, n, k))()
    torch.cuda.synchronize()
    wr = (q.to(torch.int32) * r.repeat_interleave(128, dim=1).to(torch.int32))
    ref = (x8.double() @ wr.double().t()) * sw.double()[None, :] * sx.double()[:, None]
    err = ((y.double() - ref).abs() / (ref.abs() + 1e-3 * ref.abs().max())).max().item()
    return st, err

res = {}
for p, lib in libs.items():
    for (m, n, k) in [(1, 256, 512), (3, 256, 1024), (100, 512, 8192), (17, 8192, 8192), (4096, 10240, 8192)]:
        st, err = check(lib, m, n, k)
        print(f"check {p} m={m} n={n} k={k}: status {st} max rel err {err:.2e} {'OK' if st == 0 and err < 2e-3 else 'FAIL'}", flush=True)

SHAPES = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}
for m in [int(v) for v in __import__("os").environ.get("MS", "256,1024,4096").split(",")]:
    for name, (n, k) in SHAPES.items():
        q, r, sw, x8, sx = operands(m, n, k)
        row = {}
        # shipped per-channel kernel (same int8 activations), through the build
        w = b.pack(reference.QuantizedTensor(q=q, scales=sw.unsqueeze(1), group=k))
        ent = b.select(m, n, k, k, torch.half)
        y = torch.empty((m, n), dtype=torch.half, device=dev)
        row["channel"] = timeit(lambda: b.gemm(x8, sx, w, ent, out=y))
        qw, _ = layouts.pack_sm90_prefill(reference.QuantizedTensor(q=q, scales=sw.unsqueeze(1), group=k))
        rt = r.t().contiguous()
        for p, lib in libs.items():
            row[p] = timeit(l2_call(lib, m, n, k, qw, rt, sw, x8, sx, y, workspace(lib, m, n, k)))
        a8 = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn); b8 = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        row["fp8_tensor"] = timeit(lambda: torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.half))
        print(f"M={m} {name}: " + " ".join(f"{kk} {v:.1f}us" for kk, v in row.items()) + " | fp8/l2 " +
              " ".join(f"{row['fp8_tensor'] / row[p]:.3f}" for p in libs), flush=True)
        res[f"{name}-{m}"] = row
json.dump(res, open(__import__("os").environ.get("OUTJ", "/tmp/l2.json"), "w"), indent=1)
