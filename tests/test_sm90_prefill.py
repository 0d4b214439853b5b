"""Hopper W4A4 prefill kernels (apex4gen/kernels/sm90_prefill.py): families, layout, legality, compilation.
On a GPU, every kernel of a build is checked against the reference by tests/test_kernels_gpu.py.
"""
from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import torch

from apex4gen.granularity import CHANNEL, G128, Granularity
from apex4gen import reference as ref
from apex4gen.kernels import FAMILIES, KernelConfig
from apex4gen.kernels import layouts
from apex4gen.kernels.sm90_prefill import GROUP, SM90_PREFILL_CHANNEL, SM90_PREFILL_GROUP

H100_SMEM_PER_BLOCK = 227 * 1024
LLAMA2_70B = [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]  # (N, K): qkv, o, gate_up, down


def config(family: str, tile_m: int = 128, stages: int = 4, out_dtype: str = "f16") -> KernelConfig:
    fam = FAMILIES[family]
    granularity = G128 if fam.granularity == "group" else CHANNEL
    return KernelConfig(family, "sm_90a", fam.path, granularity, tile_m, 128, 128, 1, 8, stages, 1, out_dtype)


# ---------------------------------------------------------------------------------------------- CPU only

def test_families_registered_with_their_formats():
    assert SM90_PREFILL_CHANNEL.act_format == "s8" and SM90_PREFILL_CHANNEL.path == "int8"
    assert SM90_PREFILL_GROUP.act_format == "e4m3" and SM90_PREFILL_GROUP.path == "fp8"
    assert SM90_PREFILL_GROUP.weight_layout in layouts.LAYOUTS
    assert SM90_PREFILL_CHANNEL.weight_layout in layouts.LAYOUTS


def test_group_family_serves_g128_only():
    assert SM90_PREFILL_GROUP.configs("sm_90a", Granularity(64), "f16") == []
    assert SM90_PREFILL_GROUP.configs("sm_90a", Granularity(256), "f16") == []
    assert SM90_PREFILL_GROUP.configs("sm_90a", CHANNEL, "f16") == []
    assert all(c.granularity == G128 for c in SM90_PREFILL_GROUP.configs("sm_90a", G128, "bf16"))


@pytest.mark.parametrize("family", ["sm90_prefill_channel", "sm90_prefill_group"])
def test_every_config_fits_hopper_shared_memory(family):
    fam = FAMILIES[family]
    granularity = G128 if fam.granularity == "group" else CHANNEL
    for cfg in fam.configs("sm_90a", granularity, "f16"):
        assert 0 < fam.smem_bytes(cfg) <= H100_SMEM_PER_BLOCK, cfg.procedural_name()


def test_smem_bytes_match_values_read_off_the_compiler():
    """sizeof(GemmKernel::SharedStorage) as nvcc reported it for these two instances."""
    assert SM90_PREFILL_CHANNEL.smem_bytes(config("sm90_prefill_channel")) == 117760
    assert SM90_PREFILL_GROUP.smem_bytes(config("sm90_prefill_group")) == 120832
    assert SM90_PREFILL_GROUP.smem_bytes(config("sm90_prefill_group", tile_m=256)) == 188416


def test_streamk_only_where_the_template_implements_it():
    from apex4gen.kernels.legality import violations
    from apex4gen.specs import load_gpu
    h100 = load_gpu("h100-sxm")
    channel = {c.scheduler for c in SM90_PREFILL_CHANNEL.configs("sm_90a", CHANNEL, "f16")}
    assert channel == {"persistent", "streamk"}
    group = dataclasses.replace(config("sm90_prefill_group"), scheduler="streamk")
    assert any("no streamk scheduler" in v for v in violations(group, h100, 8192, 8192))
    streamk = dataclasses.replace(config("sm90_prefill_channel"), scheduler="streamk")
    assert violations(streamk, h100, 8192, 8192) == []
    assert streamk.procedural_name().endswith("_k1_streamk_f16")


def test_sm90_prefill_layout_round_trips_and_transposes_scales():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    w = ref.quantize_weight(torch.randn(48, 512, generator=gen).half(), GROUP)
    qw, sw = layouts.pack("sm90_prefill", w)
    assert qw.shape == (48, 256) and qw.dtype == torch.uint8
    assert torch.equal(layouts.unpack_sm90_prefill(qw, 48, 512), w.q)
    assert sw.shape == (512 // GROUP, 48) and sw.is_contiguous() and torch.equal(sw, w.scales.t())


def test_sm90_prefill_layout_gives_each_lane_its_wgmma_fragment_contiguously():
    """The e4m3 wgmma A fragment (PTX ISA, wgmma .m64nNk32 A for 8-bit types): in a warp's 16 x 32 slice,
    lane l holds rows l/4 and l/4 + 8, k = 4*(l%4) + {0..3} and the same + 16. In the sm90_prefill layout those
    16 values are elements 16*l .. 16*l + 15 of the atom, row-major over (k half, row half, 4 k); atoms are
    ordered [K/32][N/16]."""
    n, k = 32, GROUP
    q = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(7))
    w = ref.QuantizedTensor(q.to(torch.int8), torch.ones(n, k // GROUP), GROUP)
    flat = ref.unpack_int4(layouts.pack_sm90_prefill(w)[0]).reshape(-1)
    index = torch.arange(n * k).reshape(n, k)
    ordered = torch.full((n * k,), -1, dtype=torch.long)
    for c in range(k // 32):
        for r in range(n // 16):
            base = 512 * (c * (n // 16) + r)
            for lane in range(32):
                for v in range(16):
                    row = 16 * r + lane // 4 + 8 * ((v // 4) % 2)
                    col = 32 * c + 4 * (lane % 4) + v % 4 + 16 * (v // 8)
                    ordered[base + 16 * lane + v] = index[row, col]
    assert torch.equal(flat.long(), (q.reshape(-1)[ordered]).long())


@pytest.mark.parametrize("family", ["sm90_prefill_channel", "sm90_prefill_group"])
def test_render_defines_the_abi_entry_points(family):
    from apex4gen.emit import render_kernel
    cfg = config(family)
    src = render_kernel(cfg)
    name = cfg.procedural_name()
    body = src[src.index('#include "apex4gen.h"'):]
    assert body.startswith('#include "apex4gen.h"')
    assert f'extern "C" APEX4GEN_EXPORT int {name}(const apex4gen_gemm_args* args, cudaStream_t stream)' in src
    assert f'extern "C" APEX4GEN_EXPORT size_t {name}_workspace(int m, int n, int k)' in src


# ---------------------------------------------------------------------------------------------- build

def _toolchain_or_skip():
    from apex4gen.errors import ToolchainError
    from apex4gen.toolchain import cutlass_include_dirs, nvcc_path
    try:
        return nvcc_path(), cutlass_include_dirs()
    except ToolchainError as err:
        pytest.skip(str(err))


def build_shared_object(cfg: KernelConfig, out_dir: Path) -> Path:
    """Render and compile one kernel into ``out_dir/<name>.so`` (what apex4gen.build/loader will do)."""
    from apex4gen.emit import render_kernel
    from apex4gen.paths import runtime_dir
    from apex4gen.toolchain import cutlass_include_dirs, nvcc_flags, nvcc_path
    name = cfg.procedural_name()
    src = out_dir / f"{name}.cu"
    src.write_text(render_kernel(cfg))
    so = out_dir / f"{name}.so"
    cmd = [nvcc_path(), *nvcc_flags(cfg.arch, [*cutlass_include_dirs(), runtime_dir()]), "-shared",
           "-Xptxas=-warn-spills", str(src), "-o", str(so)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    # a serialized wgmma pipeline is a silent 2x: treat the warning as a failure
    assert "serialized" not in done.stderr, done.stderr[-4000:]
    return so


@pytest.mark.nvcc
def test_group_kernel_compiles(tmp_path):
    _toolchain_or_skip()
    assert build_shared_object(config("sm90_prefill_group"), tmp_path).is_file()


@pytest.mark.nvcc
@pytest.mark.slow
def test_channel_kernel_compiles(tmp_path):
    _toolchain_or_skip()
    assert build_shared_object(config("sm90_prefill_channel"), tmp_path).is_file()


def test_legality_names_an_unserved_group_size():
    from apex4gen.kernels.legality import violations
    from apex4gen.specs import load_gpu

    gpu = load_gpu("h100-sxm")
    cfg = dataclasses.replace(SM90_PREFILL_GROUP.configs("sm_90a", G128, "f16")[0], granularity=Granularity(256))
    assert any("serves group sizes (128,), not g256" in r for r in violations(cfg, gpu, 8192, 8192))
