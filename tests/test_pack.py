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
from apex4gen.abi import WEIGHT_LAYOUT
from apex4gen.paths import runtime_dir

from test_build import needs_nvcc

HOST_SHIM = r"""
#include "pack.cuh"
using namespace apex4gen_pack;
extern "C" void pack_values(int layout, const uint8_t* qw, int64_t n, int64_t k, uint8_t* out) {
  for (int64_t i = 0; i < n * k / 2; ++i) out[i] = layout == 1 ? sm90_decode_byte(qw, k, i) : sm90_group_byte(qw, n, k, i);
}
extern "C" void pack_scales(int layout, const uint16_t* sw, int64_t n, int64_t groups, uint16_t* out) {
  for (int64_t i = 0; i < n * groups; ++i)
    out[i] = sw[layout == 1 ? sm90_decode_scale_source(groups, i) : sm90_group_scale_source(n, groups, i)];
}
"""

# (N, K, group): several row tiles and K chunks, per-channel and group-wise, scales of one and many groups
SHAPES = ((16, 64, 64), (48, 256, 128), (32, 192, 64), (64, 128, 128), (16, 512, 32))
PACKED_LAYOUTS = ("sm90_decode", "sm90_group")


def test_every_python_layout_has_a_c_number():
    assert set(WEIGHT_LAYOUT) == set(layouts.LAYOUTS)  # test_abi checks the numbers against the header


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
