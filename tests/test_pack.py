"""Weight packing in C (runtime/pack.cuh, pack.cu) against apex4gen/kernels/layouts.py, bit for bit.

On the CPU: pack.cuh's per-byte rules, compiled for the host with nvcc, against layouts.py. On a GPU
(marked gpu): a build's apex4gen_pack_weight and prepared weights against layouts.py.
"""
from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch

from apex4gen import reference as ref
from apex4gen.kernels import layouts
from apex4gen import abi
from apex4gen.abi import WEIGHT_LAYOUT
from apex4gen.paths import runtime_dir

from _helpers import needs_nvcc
from test_kernels_gpu import build  # noqa: F401  (the fixture: every build in APEX4GEN_TEST_BUILDS, loaded)

HOST_SHIM = r"""
#include "pack.cuh"
using namespace apex4gen_pack;
extern "C" void pack_values(int layout, const uint8_t* qw, int64_t n, int64_t k, uint8_t* out) {
  for (int64_t i = 0; i < n * k / 2; ++i)
    out[i] = layout == 1 ? sm90_decode_byte(qw, k, i) : sm90_prefill_byte(qw, n, k, i);
}
extern "C" void pack_scales(int layout, const uint16_t* sw, int64_t n, int64_t groups, uint16_t* out) {
  for (int64_t i = 0; i < n * groups; ++i)
    out[i] = sw[layout == 1 ? sm90_decode_scale_source(groups, i) : sm90_prefill_scale_source(n, groups, i)];
}
"""

# (N, K, group): several row tiles and K chunks, per-channel and group-wise, scales of one and many groups
SHAPES = ((16, 64, 64), (48, 256, 128), (32, 192, 64), (64, 128, 128), (16, 512, 32))
PACKED_LAYOUTS = ("sm90_decode", "sm90_prefill")


def test_every_python_layout_has_a_c_number():
    assert set(WEIGHT_LAYOUT) == set(layouts.LAYOUTS)  # test_abi checks the numbers against the header


@pytest.mark.parametrize("layout", sorted(layouts.LAYOUTS))
def test_the_loader_sizes_each_layouts_scales_as_layouts_py_writes_them(layout):
    """Build.pack allocates [K/group, N] scales for abi.SCALES_TRANSPOSED layouts and [N, K/group] for the rest."""
    n, k, group = 48, 256, 64
    _, scales = layouts.pack(layout, random_weight(n, k, group))
    assert tuple(scales.shape) == ((k // group, n) if layout in abi.SCALES_TRANSPOSED else (n, k // group))


@pytest.fixture(scope="module")
def host_pack(tmp_path_factory):
    from apex4gen import toolchain
    folder = tmp_path_factory.mktemp("pack_shim")
    (folder / "shim.cu").write_text(HOST_SHIM)
    subprocess.run([toolchain.nvcc_path(), "-std=c++17", "-shared", "-Xcompiler=-fPIC", f"-I{runtime_dir()}",
                    str(folder / "shim.cu"), "-o", str(folder / "shim.so")], check=True)
    lib = ctypes.CDLL(str(folder / "shim.so"))
    for fn in (lib.pack_values, lib.pack_scales):
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def random_weight(n: int, k: int, group: int, dtype=torch.float16, device="cpu") -> ref.QuantizedTensor:
    """Every value -8..7 (-8 too, which quantization never makes) and scales of random bits."""
    gen = torch.Generator(device=device).manual_seed(n * 1000 + k + group)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen, device=device)
    scales = torch.randint(0, 1 << 15, (n, k // group), dtype=torch.int16, generator=gen, device=device)
    return ref.QuantizedTensor(q, scales.view(dtype), group)


@needs_nvcc
@pytest.mark.nvcc
@pytest.mark.parametrize("layout", PACKED_LAYOUTS)
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_host_rules_equal_layouts_py(host_pack, layout, n, k, group):
    w = random_weight(n, k, group)
    want_qw, want_sw = layouts.pack(layout, w)
    canonical = ref.pack_int4(w.q).contiguous()
    qw = torch.empty(n * k // 2, dtype=torch.uint8)
    sw = torch.empty(n * (k // group), dtype=torch.int16)
    number = WEIGHT_LAYOUT[layout]
    host_pack.pack_values(number, canonical.data_ptr(), n, k, qw.data_ptr())
    host_pack.pack_scales(number, w.scales.contiguous().view(torch.int16).data_ptr(), n, k // group, sw.data_ptr())
    assert torch.equal(qw, want_qw.reshape(-1))
    assert torch.equal(sw, want_sw.contiguous().view(torch.int16).reshape(-1))


def _pack_in_c(build, layout: str, w: ref.QuantizedTensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    canonical, scales = ref.pack_int4(w.q).contiguous(), w.scales.contiguous()
    qw, sw = torch.full_like(canonical, 0x5A), torch.full_like(scales, 7.0)
    status = build.lib.apex4gen_pack_weight(WEIGHT_LAYOUT[layout], canonical.data_ptr(), scales.data_ptr(),
                                            w.shape[0], w.shape[1], w.group, qw.data_ptr(), sw.data_ptr(),
                                            torch.cuda.current_stream().cuda_stream)
    return status, qw, sw


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_packing_equals_layouts_py(build, dtype):
    """Every layout (whatever the build's kernels read: packing is in every library) at shapes of a few tiles
    and of a real layer, per-channel and group-wise."""
    for n, k, group in (*SHAPES, (4096, 11008, 128), (8192, 8192, 8192)):
        w = random_weight(n, k, group, dtype, "cuda")
        for layout in layouts.LAYOUTS:
            status, qw, sw = _pack_in_c(build, layout, w)
            want_qw, want_sw = layouts.pack(layout, w)
            assert status == 0
            assert torch.equal(qw.reshape(-1), want_qw.reshape(-1)), (layout, n, k, group)
            assert torch.equal(sw.view(torch.int16).reshape(-1), want_sw.contiguous().view(torch.int16).reshape(-1))


@pytest.mark.gpu
def test_gpu_packing_refuses_bad_shapes_and_overlap(build):
    status, _, _ = _pack_in_c(build, "sm90_decode", random_weight(8, 64, 64, device="cuda"))
    assert status == abi.STATUS["bad_shape"]  # N % 16
    w = random_weight(16, 64, 64, device="cuda")
    canonical = ref.pack_int4(w.q).contiguous()
    status = build.lib.apex4gen_pack_weight(WEIGHT_LAYOUT["sm90_prefill"], canonical.data_ptr(),
                                                w.scales.data_ptr(), 16, 64, 64, canonical.data_ptr(),
                                                w.scales.clone().data_ptr(), torch.cuda.current_stream().cuda_stream)
    assert status == abi.STATUS["bad_argument"]  # packing in place


@pytest.mark.gpu
def test_gpu_prepared_weight_serves_every_routed_kernel(build):
    lib, stream = build.lib, torch.cuda.current_stream().cuda_stream
    for route in build.manifest.routes:
        n, k, group = route.n, route.k, route.group
        dtype_number = abi.DTYPE[route.dtype]
        w = random_weight(n, k, group, torch.float16 if route.dtype == "f16" else torch.bfloat16, "cuda")
        size = lib.apex4gen_prepared_weight_bytes(n, k, group, dtype_number)
        prepared = torch.empty(size, dtype=torch.uint8, device="cuda")
        canonical = ref.pack_int4(w.q).contiguous()
        assert lib.apex4gen_prepare_weight(canonical.data_ptr(), w.scales.data_ptr(), n, k, group, dtype_number,
                                           prepared.data_ptr(), size, stream) == abi.STATUS["ok"]
        assert lib.apex4gen_prepare_weight(canonical.data_ptr(), w.scales.data_ptr(), n, k, group, dtype_number,
                                           prepared.data_ptr(), size - 1, stream) == abi.STATUS["bad_argument"]
        qw, sw = ctypes.c_void_p(), ctypes.c_void_p()
        kernel = build.kernels[route.kernel]
        assert lib.apex4gen_prepared_operands(kernel.index, prepared.data_ptr(), n, k, group, dtype_number,
                                              ctypes.byref(qw), ctypes.byref(sw)) == abi.STATUS["ok"]
        want_qw, want_sw = layouts.pack(kernel.weight_layout, w)
        base = prepared.data_ptr()
        got_qw = prepared[qw.value - base:qw.value - base + want_qw.numel()]
        got_sw = prepared[sw.value - base:sw.value - base + 2 * want_sw.numel()]
        assert torch.equal(got_qw, want_qw.reshape(-1))
        assert torch.equal(got_sw, want_sw.contiguous().reshape(-1).view(torch.uint8))
