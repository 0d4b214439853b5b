"""Hopper W4A4 prefill kernels (apex4gen/kernels/sm90_prefill.py): families, layout, build, and on a GPU the
numerics contract (apex4gen.reference.gemm within gemm_tolerance).

GPU tests load prebuilt shared objects from $APEX4GEN_SM90_PREFILL_SO_DIR (named <procedural name>.so) when
set (the device machine has no CUTLASS headers), else build them with nvcc into a temporary folder.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import subprocess
from pathlib import Path

import pytest
import torch

from apex4gen import reference as ref
from apex4gen.kernels import FAMILIES, KernelConfig, family_of
from apex4gen.kernels import layouts
from apex4gen.kernels.sm90_prefill import GROUP, SM90_PREFILL_CHANNEL, SM90_PREFILL_GROUP
from apex4gen.loader import GemmArgs  # the ABI struct, defined once

H100_SMEM_PER_BLOCK = 227 * 1024
LLAMA2_70B = [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]  # (N, K): qkv, o, gate_up, down


def config(family: str, tile_m: int = 128, stages: int = 4, out_dtype: str = "f16") -> KernelConfig:
    fam = FAMILIES[family]
    group = GROUP if fam.granularity == "group" else 0
    return KernelConfig(family, "sm_90a", fam.path, group, tile_m, 128, 128, 1, 8, stages, 1, out_dtype)


# ---------------------------------------------------------------------------------------------- CPU only

def test_families_registered_with_their_formats():
    assert SM90_PREFILL_CHANNEL.act_format == "s8" and SM90_PREFILL_CHANNEL.path == "int8"
    assert SM90_PREFILL_GROUP.act_format == "e4m3" and SM90_PREFILL_GROUP.path == "fp8"
    assert SM90_PREFILL_GROUP.weight_layout in layouts.LAYOUTS
    assert SM90_PREFILL_CHANNEL.weight_layout in layouts.LAYOUTS


def test_group_family_serves_g128_only():
    assert SM90_PREFILL_GROUP.configs("sm_90a", 64, "f16") == []
    assert SM90_PREFILL_GROUP.configs("sm_90a", 256, "f16") == []
    assert all(c.group == GROUP for c in SM90_PREFILL_GROUP.configs("sm_90a", GROUP, "bf16"))


@pytest.mark.parametrize("family", ["sm90_prefill_channel", "sm90_prefill_group"])
def test_every_config_fits_hopper_shared_memory(family):
    fam = FAMILIES[family]
    group = GROUP if fam.granularity == "group" else 0
    for cfg in fam.configs("sm_90a", group, "f16"):
        assert 0 < fam.smem_bytes(cfg) <= H100_SMEM_PER_BLOCK, cfg.procedural_name()


def test_smem_bytes_match_values_read_off_the_compiler():
    """sizeof(GemmKernel::SharedStorage) as nvcc reported it for these two instances."""
    assert SM90_PREFILL_CHANNEL.smem_bytes(config("sm90_prefill_channel")) == 117760
    assert SM90_PREFILL_GROUP.smem_bytes(config("sm90_prefill_group")) == 120832


def test_streamk_only_where_the_template_implements_it():
    from apex4gen.kernels.legality import violations
    from apex4gen.specs import load_gpu
    h100 = load_gpu("h100-sxm")
    channel = {c.scheduler for c in SM90_PREFILL_CHANNEL.configs("sm_90a", 0, "f16")}
    assert channel == {"persistent", "streamk"}
    group = dataclasses.replace(config("sm90_prefill_group"), scheduler="streamk")
    assert any("no streamk scheduler" in v for v in violations(group, h100, 8192, 8192))
    streamk = dataclasses.replace(config("sm90_prefill_channel"), scheduler="streamk")
    assert violations(streamk, h100, 8192, 8192) == []
    assert streamk.procedural_name().endswith("_k1_streamk_f16")


def test_sm90_group_layout_transposes_scales_and_keeps_canonical_weights():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    w = ref.quantize_weight(torch.randn(48, 512, generator=gen).half(), GROUP)
    qw, sw = layouts.pack("sm90_group", w)
    assert torch.equal(ref.unpack_int4(qw), w.q)
    assert sw.shape == (512 // GROUP, 48) and sw.is_contiguous() and torch.equal(sw, w.scales.t())


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


# ---------------------------------------------------------------------------------------------- GPU

class LoadedKernel:
    """One kernel's launcher through ctypes; swap for apex4gen.loader once builds load through it."""

    def __init__(self, cfg: KernelConfig, so: Path):
        self.cfg = cfg
        self.family = family_of(cfg)
        lib = ctypes.CDLL(str(so))
        self._run = getattr(lib, cfg.procedural_name())
        self._run.argtypes = [ctypes.POINTER(GemmArgs), ctypes.c_void_p]
        self._run.restype = ctypes.c_int
        self._workspace = getattr(lib, cfg.procedural_name() + "_workspace")
        self._workspace.argtypes = [ctypes.c_int] * 3
        self._workspace.restype = ctypes.c_size_t

    def __call__(self, qx, sx, qw, sw, bias, y, group: int) -> int:
        m, k = qx.shape
        n = y.shape[1]
        ws_bytes = self._workspace(m, n, k)
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=y.device)
        args = GemmArgs(qx.data_ptr(), sx.data_ptr(), qw.data_ptr(), sw.data_ptr(),
                        bias.data_ptr() if bias is not None else None, y.data_ptr(), m, n, k, group,
                        ws.data_ptr(), ws_bytes)
        return self._run(ctypes.byref(args), torch.cuda.current_stream().cuda_stream)


def act_storage(q: torch.Tensor, act_format: str) -> torch.Tensor:
    """Quantized values -8..7 in the family's one-byte activation format."""
    if act_format == "e4m3":
        return q.float().to(torch.float8_e4m3fn)
    if act_format == "s8":
        return q.to(torch.int8)
    raise ValueError(f"no one-byte storage for act format {act_format}")


_KERNELS: dict[str, LoadedKernel] = {}


def load(cfg: KernelConfig, tmp_dir: Path) -> LoadedKernel:
    name = cfg.procedural_name()
    if name not in _KERNELS:
        prebuilt = os.environ.get("APEX4GEN_SM90_PREFILL_SO_DIR")
        if prebuilt and (Path(prebuilt) / f"{name}.so").is_file():
            so = Path(prebuilt) / f"{name}.so"
        else:
            _toolchain_or_skip()
            so = build_shared_object(cfg, tmp_dir)
        _KERNELS[name] = LoadedKernel(cfg, so)
    return _KERNELS[name]


def run_w4a4(kernel: LoadedKernel, xq: ref.QuantizedTensor, wq: ref.QuantizedTensor, bias, out_dtype):
    """Launch on GPU copies; the output is NaN-poisoned first so unwritten elements fail."""
    dev = "cuda"
    qw, sw = layouts.pack(kernel.family.weight_layout, wq)
    qx = act_storage(xq.q.to(dev), kernel.family.act_format)
    y = torch.full((xq.q.shape[0], wq.q.shape[0]), float("nan"), dtype=out_dtype, device=dev)
    status = kernel(qx, xq.scales.to(dev).float().contiguous(), qw.to(dev), sw.to(dev),
                    None if bias is None else bias.to(dev), y, xq.group)
    assert status == 0, f"launcher returned {status}"
    torch.cuda.synchronize()
    return y


def check_rows(y: torch.Tensor, xq, wq, bias, out_dtype, rows: torch.Tensor):
    """Compare the given rows with the reference (all rows for small M; a sample for large M)."""
    assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) or NaN outputs"
    rows = rows.to(xq.q.device)
    xs = ref.QuantizedTensor(xq.q[rows], xq.scales[rows], xq.group)
    want = ref.gemm(xs, wq, bias, out_dtype).double().cpu()
    tol = ref.gemm_tolerance(xs, wq, out_dtype, bias).cpu()
    err = (y[rows.to(y.device)].double().cpu() - want).abs()
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"max error / tolerance = {worst:.3g}"


def _random_problem(m, n, k, group, out_dtype, gen, with_bias=True, device="cpu"):
    """Activations with a per-token spread of magnitudes, small weights; quantized by the reference."""
    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[out_dtype]
    g = torch.Generator(device=device).manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    x = torch.randn(m, k, generator=g, device=device) * torch.rand(m, 1, generator=g, device=device) * 4
    w = torch.randn(n, k, generator=g, device=device) * 0.05
    xq = ref.quantize_activation(x.to(torch_dtype), group)
    wq = ref.quantize_weight(w.to(torch_dtype), group)
    bias = (torch.randn(n, generator=g, device=device) * 0.1).to(torch_dtype) if with_bias else None
    return xq, wq, bias, torch_dtype


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                  reason="needs an sm_90 GPU (H100/H200)")

GPU_CONFIGS = [config("sm90_prefill_channel"), config("sm90_prefill_group"),
               config("sm90_prefill_group", tile_m=64, stages=6, out_dtype="bf16")]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


@pytest.mark.gpu
@needs_gpu
@needs_hopper
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: f"{c.family}_{c.tile_m}_{c.out_dtype}")
@pytest.mark.parametrize("m", [1, 3, 16, 17, 100, 1024, 4096])
def test_matches_reference_small_shape(cfg, m, gen, tmp_path):
    n, k = 256, 1024
    group = k if cfg.group == 0 else cfg.group
    xq, wq, bias, dt = _random_problem(m, n, k, group, cfg.out_dtype, gen)
    y = run_w4a4(load(cfg, tmp_path), xq, wq, bias, dt)
    rows = torch.arange(m) if m <= 1024 else torch.randperm(m, generator=gen)[:256]
    check_rows(y, xq, wq, bias, dt, rows)


@pytest.mark.gpu
@needs_gpu
@needs_hopper
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: f"{c.family}_{c.tile_m}_{c.out_dtype}")
@pytest.mark.parametrize("nk", LLAMA2_70B, ids=lambda nk: f"{nk[0]}x{nk[1]}")
@pytest.mark.parametrize("m", [17, 4096])
def test_matches_reference_llama2_70b(cfg, nk, m, gen, tmp_path):
    n, k = nk
    group = k if cfg.group == 0 else cfg.group
    xq, wq, bias, dt = _random_problem(m, n, k, group, cfg.out_dtype, gen, with_bias=m == 17, device="cuda")
    y = run_w4a4(load(cfg, tmp_path), xq, wq, bias, dt)
    check_rows(y, xq, wq, bias, dt, torch.randperm(m, generator=gen)[:16])


@pytest.mark.gpu
@needs_gpu
@needs_hopper
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: f"{c.family}_{c.tile_m}_{c.out_dtype}")
def test_all_minus_eight_worst_case(cfg, gen, tmp_path):
    """Every value -8: the largest partial sums (64 K per channel, 8192 per group) must stay exact."""
    m, n, k = 200, 256, 8192
    group = k if cfg.group == 0 else cfg.group
    dt = {"f16": torch.float16, "bf16": torch.bfloat16}[cfg.out_dtype]
    xq = ref.QuantizedTensor(torch.full((m, k), -8, dtype=torch.int8),
                             torch.rand(m, k // group, generator=gen) * 1e-3, group)
    wq = ref.QuantizedTensor(torch.full((n, k), -8, dtype=torch.int8),
                             (torch.rand(n, k // group, generator=gen) * 1e-3).to(dt), group)
    y = run_w4a4(load(cfg, tmp_path), xq, wq, None, dt)
    check_rows(y, xq, wq, None, dt, torch.arange(m))


@pytest.mark.gpu
@needs_gpu
@needs_hopper
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: f"{c.family}_{c.tile_m}_{c.out_dtype}")
def test_rejects_bad_shapes(cfg, tmp_path):
    kernel = load(cfg, tmp_path)
    dev = "cuda"
    m, n, k = 16, 256, 1000  # K not a multiple of 128
    qx = torch.zeros(m, k, dtype=torch.int8, device=dev)
    y = torch.empty(m, n, dtype=torch.float16, device=dev)
    scales = torch.ones(m * k, device=dev)
    assert kernel(qx, scales, qx, scales, None, y, k if cfg.group == 0 else 128) == 1  # APEX4GEN_BAD_SHAPE


@pytest.mark.gpu
@needs_gpu
@needs_hopper
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: f"{c.family}_{c.tile_m}_{c.out_dtype}")
def test_cuda_graph_replay_matches_eager(cfg, gen, tmp_path):
    m, n, k = 300, 512, 2048
    group = k if cfg.group == 0 else cfg.group
    xq, wq, bias, dt = _random_problem(m, n, k, group, cfg.out_dtype, gen)
    kernel = load(cfg, tmp_path)
    eager = run_w4a4(kernel, xq, wq, bias, dt)
    qw, sw = (t.cuda() for t in layouts.pack(kernel.family.weight_layout, wq))
    qx = act_storage(xq.q.cuda(), kernel.family.act_format)
    sx, b = xq.scales.cuda().float().contiguous(), bias.cuda()
    y = torch.full_like(eager, float("nan"))
    kernel(qx, sx, qw, sw, b, y, group)  # warm-up outside capture (first-call host setup)
    y.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        assert kernel(qx, sx, qw, sw, b, y, group) == 0
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)



def test_legality_names_an_unserved_group_size():
    from apex4gen.kernels.legality import violations
    from apex4gen.specs import load_gpu

    gpu = load_gpu("h100-sxm")
    assert SM90_PREFILL_GROUP.configs("sm_90a", 256, "f16") == []
    cfg = dataclasses.replace(SM90_PREFILL_GROUP.configs("sm_90a", GROUP, "f16")[0], group=256)
    assert any("serves group sizes (128,), not 256" in r for r in violations(cfg, gpu, 8192, 8192))
