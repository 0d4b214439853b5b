"""Which fp32 CPU kernels of the accuracy pipeline give other bits at another thread count: a short hash of each
output at 1 and 2 intra-op threads. Run it under another kernel choice to see which ones move across CPUs, e.g.
`ATEN_CPU_CAPABILITY=avx2` (ATen's AVX2 kernels, as on a CPU without AVX-512) or `MKL_CBWR=COMPATIBLE`
(another MKL code path, as on a CPU of another vendor): `PYTHONPATH=. python3 bench/probes/kernel_bits.py`."""
import hashlib

import torch
from torch.nn.functional import scaled_dot_product_attention


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()[:10]


def outputs() -> dict[str, str]:
    torch.manual_seed(0)
    x, w = torch.randn(512, 1536), torch.randn(576, 1536)  # 512 calibration tokens, down_proj's shape
    q, k, v = (torch.randn(1, 9, 256, 64) for _ in range(3))  # SmolLM2's 9 heads of 64
    return {"Hessian X^T X (addmm)": digest(torch.zeros(1536, 1536).addmm_(x.t(), x)),
            "linear x W^T": digest(x @ w.t()),
            "sum of squares": digest(((x @ w.t()) ** 2).sum().reshape(1)),
            "causal sdpa": digest(scaled_dot_product_attention(q, k, v, is_causal=True)),
            "silu": digest(torch.nn.functional.silu(x)),
            "rms (mean of squares)": digest(x.pow(2).mean(-1))}


by_threads = {}
for threads in (1, 2):
    torch.set_num_threads(threads)
    by_threads[threads] = outputs()
for name, one in by_threads[1].items():
    two = by_threads[2][name]
    print(f"{name:22s} 1 thread {one}  2 threads {two}  {'same' if one == two else 'DIFFERENT'}")
