"""Every kernel of a build against the reference, on the GPU.

Builds come from APEX4GEN_TEST_BUILDS (build directories separated by ':'), made beforehand with
`apex4gen build`; `scripts/device_check.sh` makes them and runs this file on the device. Fresh random data
each run (the seed is printed on failure), outputs poisoned with NaN before the kernel runs.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

from apex4gen import reference as ref
from apex4gen.errors import ShapeError
from apex4gen.loader.ops import dtype_enum

from _helpers import boundary_values

pytestmark = pytest.mark.gpu

MS = (1, 3, 16, 17, 100, 1024)
HOPPER_MS = MS + (33, 64, 4096)  # 33, 64: the sm90 decode kernels' 64-token instantiation (routed up to M = 64)
REF_ELEMENTS = 1 << 27  # the float64 reference holds [M, chunk, K/group] partials (1 GiB) at a time


def _build_dirs() -> list[Path]:
    raw = os.environ.get("APEX4GEN_TEST_BUILDS", "")
    return [Path(p) for p in raw.split(":") if p]


requires_builds = pytest.mark.skipif(
    not torch.cuda.is_available() or not _build_dirs(),
    reason="needs a CUDA GPU and APEX4GEN_TEST_BUILDS (run scripts/device_check.sh on the device)")


@pytest.fixture(scope="module", params=_build_dirs() or [None], ids=lambda p: p.name if p else "none")
def build(request):
    if request.param is None or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU and APEX4GEN_TEST_BUILDS")
    import warnings

    import apex4gen.loader as loader
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sm_8x builds on a newer GPU run through PTX JIT, on purpose
        return loader.load(request.param)


@pytest.fixture
def gen():
    seed = torch.seed() % 2**31
    print(f"seed={seed}")
    return torch.Generator(device="cuda").manual_seed(seed)


def problems(build, act_bits: int = 4) -> list[tuple[int, int, int, str]]:
    """The build's problems whose layers the plan gave ``act_bits``-bit activations."""
    return sorted({(r.n, r.k, r.group, r.dtype) for r in build.manifest.routes if r.act_bits == act_bits})


def _dtype(name: str) -> torch.dtype:
    return {"f16": torch.float16, "bf16": torch.bfloat16}[name]


def _ms(build) -> tuple[int, ...]:
    return HOPPER_MS if build.manifest.sm >= 90 else MS


def assert_matches_reference(y: torch.Tensor, xq: ref.QuantizedTensor, wq: ref.QuantizedTensor,
                             bias: torch.Tensor | None) -> None:
    assert not torch.isnan(y).any(), "NaN left in the output: some elements were never written"
    n, groups = wq.q.shape[0], wq.scales.shape[1]
    chunk = max(8, REF_ELEMENTS // (y.shape[0] * groups))
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        part = ref.QuantizedTensor(wq.q[lo:hi], wq.scales[lo:hi], wq.group)
        b = None if bias is None else bias[lo:hi]
        want = ref.gemm(xq, part, b, y.dtype).double()
        tol = ref.gemm_tolerance(xq, part, y.dtype, b)
        err = (y[:, lo:hi].double() - want).abs()
        bad = err > tol
        assert not bad.any(), (f"{int(bad.sum())} elements out of tolerance in columns {lo}:{hi}; "
                               f"worst error {float(err.max()):.4g}")


def _random_problem(n, k, group, dtype, m, gen):
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * 0.05
    bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen)
    return x, ref.quantize_weight(w, group), bias


@requires_builds
def test_every_routed_problem_and_m(build, gen):
    for n, k, group, dname in problems(build):
        dtype = _dtype(dname)
        for m in _ms(build):
            x, wq, bias = _random_problem(n, k, group, dtype, m, gen)
            y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            build.linear(x, build.pack(wq), bias, out=y)
            xq = ref.quantize_activation(x, group)
            assert_matches_reference(y, xq, wq, bias)


def _kernels_by_problem(build, act_bits: int = 4) -> list[tuple[tuple[int, int, int, str], int]]:
    """(problem, kernel index) for every kernel a route of ``act_bits``-bit activations names, once each."""
    return sorted({((r.n, r.k, r.group, r.dtype), r.kernel) for r in build.manifest.routes
                   if r.act_bits == act_bits})


@requires_builds
def test_every_kernel_at_any_m(build, gen):
    """Each kernel called directly (as through the C ABI) at M outside the bucket its route serves: the
    kernel, not the router, must take every M."""
    for (n, k, group, dname), index in _kernels_by_problem(build):
        info = build.kernels[index]
        if info.act_format == "raw":
            continue  # quantizes its own input: only reachable through linear(), covered above
        dtype = _dtype(dname)
        for m in (1, 3, 17, 100):
            x, wq, bias = _random_problem(n, k, group, dtype, m, gen)
            xq = ref.quantize_activation(x, group)
            y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            build.gemm(_store_activations(xq.q, info.act_format), xq.scales, build.pack(wq), info, bias, out=y)
            assert_matches_reference(y, xq, wq, bias)


# Three 128-channel tiles, the last one partial: with two CTAs a cluster along N (the per-channel prefill kernel),
# the last cluster has a CTA past N that still takes part in the multicast of the token tile. K of one and of three
# 128-deep K tiles: the group kernel runs its K tiles in pairs, with a single tile at the end of an odd count.
ODD_TILES_N, ODD_TILES_KS = 2 * 128 + 16, (128, 384)


@requires_builds
def test_hopper_prefill_kernels_at_an_odd_channel_tile_count(build, gen):
    indices = sorted({r.kernel for r in build.manifest.routes
                      if build.kernels[r.kernel].config["family"].startswith("sm90_prefill")})
    if not indices:
        pytest.skip(f"{build.build_dir.name} has no Hopper prefill kernel")
    for index in indices:
        info = build.kernels[index]
        dtype = _dtype(info.config["out_dtype"])
        for k, m in itertools.product(ODD_TILES_KS, (1, 100, 300)):
            group = k if info.config["granularity"] == "channel" else 128
            x, wq, bias = _random_problem(ODD_TILES_N, k, group, dtype, m, gen)
            xq = ref.quantize_activation(x, group, info.act_bits)
            y = torch.full((m, ODD_TILES_N), float("nan"), device="cuda", dtype=dtype)
            packed = build.pack(wq, info.act_bits, layouts=(info.weight_layout,))  # a shape no route plans
            build.gemm(_store_activations(xq.q, info.act_format), xq.scales, packed, info, bias, out=y)
            assert_matches_reference(y, xq, wq, bias)


@requires_builds
def test_worst_case_all_minus_eight(build):
    """Largest partial sums: every weight -8 and, where the kernel takes quantized input, every activation."""
    for n, k, group, dname in problems(build):
        dtype = _dtype(dname)
        for m in (1, 17, 128):
            info = build.select(m, n, k, group, dtype)
            wq = ref.QuantizedTensor(torch.full((n, k), -8, dtype=torch.int8, device="cuda"),
                                     torch.full((n, k // group), 2.0 ** -12, dtype=dtype, device="cuda"), group)
            y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            if info.act_format == "raw":
                x = torch.full((m, k), -1.0, device="cuda", dtype=dtype)  # quantizes to -7 everywhere
                build.linear(x, build.pack(wq), out=y)
                xq = ref.quantize_activation(x, group)
            else:
                xq = ref.QuantizedTensor(torch.full((m, k), -8, dtype=torch.int8, device="cuda"),
                                         torch.full((m, k // group), 2.0 ** -6, device="cuda"), group)
                qx = _store_activations(xq.q, info.act_format)
                build.gemm(qx, xq.scales, build.pack(wq), info, out=y)
            assert_matches_reference(y, xq, wq, None)


def _store_activations(q: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "s4":
        return ref.pack_int4(q)
    if fmt == "s8":
        return q.clone()
    return q.float().to(torch.float8_e4m3fn)


def _load_activations(qx: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "s4":
        return ref.unpack_int4(qx)
    return qx.float().to(torch.int8) if fmt == "e4m3" else qx


@requires_builds
@pytest.mark.parametrize("fmt", ["s4", "s8", "e4m3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_activation_quantization_is_exact(build, gen, fmt, dtype):
    # runtime/quantize.cu's kernels: warps per chunk (g64..g1024, and chunks over 32K values), a block per chunk
    # holding it in registers (2048..32K values: per-channel rows of K=8192 and 28672), 4-byte loads (1030)
    cases = []
    for m, k, group in ((1, 4096, 128), (3, 8192, 64), (100, 1024, 1024), (17, 2048, 2048), (64, 8192, 8192),
                        (5, 28672, 28672), (3, 1030, 1030), (2, 40960, 40960)):
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) * 3
        x[0, :group] = 0  # a zero group: scale 0, values 0
        cases.append((x, group))
    # values within a few ulps of the rounding boundaries (k + 1/2) s: the quantizer divides only for these
    for rows, width, group in ((512, 320, 320), (64, 2048, 2048), (16, 8192, 8192)):
        cases.append((boundary_values(gen, rows, width, dtype, "cuda").reshape(-1, 4 * width), group))
    for x, group in cases:
        qx, sx = build.quantize_act(x, group, fmt)
        want = ref.quantize_activation(x, group)
        assert torch.equal(sx, want.scales)
        assert torch.equal(_load_activations(qx, fmt), want.q)


@requires_builds
def test_unplanned_shape_and_bad_group_get_clear_errors(build):
    n, k, group, dname = problems(build)[0]
    dtype = _dtype(dname)
    with pytest.raises(ShapeError, match="no kernel for M=1 N=8 K=64"):
        build.select(1, 8, 64, group, dtype)
    x = torch.zeros(2, k + 1, device="cuda", dtype=dtype)
    packed = build.pack(ref.quantize_weight(torch.zeros(n, k, device="cuda", dtype=dtype), group))
    with pytest.raises(ShapeError):
        build.linear(x, packed)


@requires_builds
def test_cuda_graph_replay_matches_eager(build, gen):
    n, k, group, dname = problems(build)[0]
    dtype = _dtype(dname)
    for m in (1, 64, 1024):  # Hopper channel builds: decode, stream-K, and dependent-launch (PDL) kernels
        x, wq, bias = _random_problem(n, k, group, dtype, m, gen)
        packed = build.pack(wq)
        eager = build.linear(x, packed, bias)
        out = torch.full_like(eager, float("nan"))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            build.linear(x, packed, bias, out=out)  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        out.fill_(float("nan"))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            build.linear(x, packed, bias, out=out)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@requires_builds
def test_opcheck(build, gen):
    n, k, group, dname = problems(build)[0]
    dtype = _dtype(dname)
    x, wq, bias = _random_problem(n, k, group, dtype, 5, gen)
    info = build.select(5, n, k, group, dtype)
    qw, sw = build.pack(wq).layouts[info.weight_layout]
    torch.library.opcheck(torch.ops.apex4gen.linear.default, (x, qw, sw, bias, n, group, build.handle, info.index))
    torch.library.opcheck(torch.ops.apex4gen.quantize_act.default, (x, group, 0, build.handle))


# ---------------------------------------------------------------------------------------------- 8-bit activations
# Routes of a plan's W4A8 layers (act_bits 8): the sm90 decode kernels (raw input, quantized in-kernel to int8)
# and the per-channel prefill kernel (s8 from runtime/quantize.cu). A build without such routes skips these.


def _problems8(build) -> list[tuple[int, int, int, str]]:
    found = problems(build, 8)
    if not found:
        pytest.skip(f"{build.build_dir.name} has no 8-bit activation routes (plan it with an act8 budget)")
    return found


def _routed_ms(build, n, k, group, dtype, ms) -> list[int]:
    """The Ms of ``ms`` that an 8-bit route serves (a group-wise 8-bit layer has decode kernels only on Hopper)."""
    return [m for m in ms if build.lib.apex4gen_select_kernel(m, n, k, group, 8, dtype_enum(dtype)) >= 0]


@requires_builds
def test_every_routed_8bit_problem_and_m(build, gen):
    for n, k, group, dname in _problems8(build):
        dtype = _dtype(dname)
        for m in _routed_ms(build, n, k, group, dtype, _ms(build)):
            x, wq, bias = _random_problem(n, k, group, dtype, m, gen)
            y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            packed = build.pack(wq, act_bits=8)
            assert build.select(m, n, k, group, dtype, 8).config["act_bits"] == 8
            build.linear(x, packed, bias, out=y)
            xq = ref.quantize_activation(x, group, 8)
            assert int(xq.q.abs().max()) > 7, "8-bit values expected"
            assert_matches_reference(y, xq, wq, bias)


@requires_builds
def test_every_8bit_kernel_at_any_m(build, gen):
    for (n, k, group, dname), index in _kernels_by_problem(build, 8):
        info = build.kernels[index]
        if info.act_format == "raw":
            continue  # quantizes its own input: only reachable through linear(), covered above
        assert info.act_format == "s8" and info.act_bits == 8
        dtype = _dtype(dname)
        for m in (1, 3, 17, 100):
            x, wq, bias = _random_problem(n, k, group, dtype, m, gen)
            xq = ref.quantize_activation(x, group, 8)
            y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            build.gemm(xq.q.clone(), xq.scales, build.pack(wq, act_bits=8), info, bias, out=y)
            assert_matches_reference(y, xq, wq, bias)


@requires_builds
def test_8bit_worst_case_all_minus_128(build):
    """Largest partial sums: every weight -8 and every activation -128 (s8 kernels); the in-kernel quantizer of
    raw kernels maps absmax to 127, so there every activation is -127."""
    for n, k, group, dname in _problems8(build):
        dtype = _dtype(dname)
        for m in _routed_ms(build, n, k, group, dtype, (1, 17, 128, 1024)):
            info = build.select(m, n, k, group, dtype, 8)
            wq = ref.QuantizedTensor(torch.full((n, k), -8, dtype=torch.int8, device="cuda"),
                                     torch.full((n, k // group), 2.0 ** -14, dtype=dtype, device="cuda"), group)
            y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            if info.act_format == "raw":
                x = torch.full((m, k), -1.0, device="cuda", dtype=dtype)  # quantizes to -127 everywhere
                build.linear(x, build.pack(wq, act_bits=8), out=y)
                xq = ref.quantize_activation(x, group, 8)
            else:
                xq = ref.QuantizedTensor(torch.full((m, k), -128, dtype=torch.int8, device="cuda"),
                                         torch.full((m, k // group), 2.0 ** -10, device="cuda"), group)
                build.gemm(xq.q.clone(), xq.scales, build.pack(wq, act_bits=8), info, out=y)
            assert_matches_reference(y, xq, wq, None)


@requires_builds
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_8bit_activation_quantization_is_exact(build, gen, dtype):
    """runtime/quantize.cu at act_bits 8 (s8 storage), every kernel shape of the 4-bit test, boundary values of the
    8-bit grid and a zero group; s4 and e4m3 cannot hold 8-bit values and are refused."""
    cases = []
    for m, k, group in ((1, 4096, 128), (3, 8192, 64), (100, 1024, 1024), (17, 2048, 2048), (64, 8192, 8192),
                        (5, 28672, 28672), (3, 1030, 1030), (2, 40960, 40960)):
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) * 3
        x[0, :group] = 0
        cases.append((x, group))
    for rows, width, group in ((64, 4352, 4352), (16, 8192, 8192)):
        cases.append((boundary_values(gen, rows, width, dtype, "cuda", qmax=127).reshape(-1, 4 * width), group))
    for x, group in cases:
        qx, sx = build.quantize_act(x, group, "s8", act_bits=8)
        want = ref.quantize_activation(x, group, 8)
        assert torch.equal(sx, want.scales)
        assert torch.equal(qx, want.q)
    for fmt in ("s4", "e4m3"):
        with pytest.raises(RuntimeError, match="bad argument"):
            build.quantize_act(cases[0][0], cases[0][1], fmt, act_bits=8)
