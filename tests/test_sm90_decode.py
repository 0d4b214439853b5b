"""sm90_decode: the weight layout (CPU), render + nvcc for sm_90a, and the kernel against the reference (GPU)."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from apex4gen import reference as ref
from apex4gen.kernels import FAMILIES, legality, sm90_decode
from apex4gen.kernels.layouts import LAYOUTS, pack_sm90_decode, unpack_sm90_decode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sm90_decode_native as native  # noqa: E402


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def _random_weight(gen, n, k, group):
    return ref.quantize_weight(torch.randn(n, k, generator=gen).half(), group)


# ------------------------------------------------------------------------------------------------- layout
def test_layout_registered_under_the_family_name():
    for name in ("sm90_decode", "sm90_decode_channel"):
        assert FAMILIES[name].weight_layout in LAYOUTS


@pytest.mark.parametrize("n,k", [(16, 64), (48, 512), (32, 1024)])
def test_layout_round_trip(gen, n, k):
    w = _random_weight(gen, n, k, 64)
    qw, sw = pack_sm90_decode(w)
    assert qw.dtype == torch.uint8 and qw.shape == (n, k // 2)
    assert torch.equal(unpack_sm90_decode(qw, n, k), w.q)
    assert sw is w.scales


def test_layout_matches_fragment_formula(gen):
    """Spot-check bytes against the documented formula (independent of the inverse)."""
    n, k = 32, 256
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    w = ref.QuantizedTensor(q=q, scales=torch.ones(n, k // 64, dtype=torch.float16), group=64)
    flat = pack_sm90_decode(w)[0].reshape(-1)
    for _ in range(200):
        r, c, lane, word, b = (int(torch.randint(hi, (1,), generator=gen)) for hi in (n // 16, k // 64, 32, 4, 4))
        gid, t, step, half = lane // 4, lane % 4, word // 2, word % 2
        kk = 64 * c + 32 * step + 16 * half + 4 * t + b
        byte = int(flat[((r * (k // 64) + c) * 32 + lane) * 16 + word * 4 + b])
        assert byte >> 4 == int(q[16 * r + gid, kk]) & 0xF
        assert byte & 0xF == int(q[16 * r + gid + 8, kk]) & 0xF


def test_layout_rejects_misaligned_shapes(gen):
    with pytest.raises(ValueError, match="N % 16"):
        pack_sm90_decode(_random_weight(gen, 24, 128, 64))


# ------------------------------------------------------------------------------------------------- family
def _h100():
    return SimpleNamespace(name="h100-sxm", kernel_arch="sm_90a", smem_per_block_bytes=227 * 1024)


@pytest.mark.parametrize("group,family", [(128, "sm90_decode"), (0, "sm90_decode_channel")])
def test_legal_for_llama2_70b_shapes(group, family):
    for n, k in ((10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)):
        ours = [c for c in legality.legal_configs(_h100(), "int8", group, n, k, "f16", m=16) if c.family == family]
        assert len(ours) == 1
        too_many_tokens = legality.legal_configs(_h100(), "int8", group, n, k, "f16",
                                                 m=sm90_decode.PLANNER_MAX_M + 1)
        assert family not in {c.family for c in too_many_tokens}


def test_smem_mirror_fits_every_llama_slice():
    """The launcher only uses splits whose slice fits; the 8-way split of each llama K must fit (the
    occupancy query then says whether two blocks a SM do)."""
    for k in (8192, 28672):
        for group in (128, 0):
            for v in sm90_decode.variants(group, k >= sm90_decode.LARGE_K):
                assert sm90_decode.variant_smem_bytes(v, group, k // 8) <= 227 * 1024


def test_workspace_mirror_follows_the_token_tiles():
    """int4 x of the variant's padded tokens + fp32 scales [K/group][tokens]."""
    assert sm90_decode.workspace_bytes(1, 8192, 128) == 8 * 4096 + 64 * 8 * 4
    assert sm90_decode.workspace_bytes(17, 8192, 0) == 32 * 4096 + 32 * 4
    assert sm90_decode.workspace_bytes(64, 28672, 128) == 64 * 14336 + 224 * 64 * 4


def test_render_rejects_other_groups():
    with pytest.raises(ValueError, match="power-of-two"):
        sm90_decode.render_group(native.decode_config(96, "f16"))


# ------------------------------------------------------------------------------------------------- nvcc
def _have_toolchain() -> bool:
    try:
        from apex4gen.toolchain import cutlass_include_dirs, nvcc_path
        nvcc_path(), cutlass_include_dirs()
        return True
    except Exception:
        return False


@pytest.mark.nvcc
@pytest.mark.skipif(not _have_toolchain(), reason="needs nvcc and the CUTLASS headers")
@pytest.mark.parametrize("group,dtype", [(128, "f16"), (0, "bf16")])
def test_compiles_for_sm90a_without_spills(tmp_path, group, dtype):
    cfg = native.decode_config(group, dtype)
    lib, report = native.build_library(cfg, tmp_path)
    assert lib.is_file()
    kernels = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    distinct = {v for large_k in (False, True) for v in sm90_decode.variants(group, large_k)}
    assert len(kernels) == len(distinct) + 1  # + the activation quantization kernel
    assert all(v == ("0", "0", "0") for v in kernels), report
    # the launcher's workspace (loadable without a GPU: cudart is linked statically) matches the mirror
    launcher = native.DecodeKernel(lib, cfg)
    for m in (1, 8, 9, 17, 33, 64):
        for k in (256, 8192, 28672):
            assert launcher.workspace_fn(m, 4096, k) == sm90_decode.workspace_bytes(m, k, group), (m, k)
    assert launcher.workspace_fn(65, 4096, 8192) == 0


# ------------------------------------------------------------------------------------------------- GPU
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                               reason="needs an sm_90 GPU (H100/H200)")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    if not torch.cuda.is_available() or not _have_toolchain():
        pytest.skip("needs CUDA and the toolchain")
    out = tmp_path_factory.mktemp("sm90_decode")
    built = {}
    for group in (128, 0):
        for dtype in ("f16", "bf16"):
            cfg = native.decode_config(group, dtype)
            built[(group, dtype)] = native.DecodeKernel(native.build_library(cfg, out)[0], cfg)
    return built


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("group", [128, 0])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_matches_reference(kernels, gen, m, group, dtype):
    kernel = kernels[(group, dtype)]
    n, k = 1040, 2048  # a partial last block of rows
    torch_dtype = native._DTYPES[dtype]
    w = ref.quantize_weight(torch.randn(n, k, generator=gen).to(torch_dtype), group or None)
    w = ref.QuantizedTensor(w.q.cuda(), w.scales.cuda(), w.group)
    qw, sw = native.pack_weight(w)
    x = torch.randn(m, k, generator=gen).to(torch_dtype).cuda()
    bias = torch.randn(n, generator=gen).to(torch_dtype).cuda()
    result = native.check_against_reference(kernel, x, w, qw, sw, bias)
    assert result["ok"], result


@pytest.mark.gpu
@needs_gpu
def test_worst_case_weights_all_minus_8(kernels, gen):
    kernel = kernels[(0, "f16")]
    n, k = 64, 8192
    w = ref.QuantizedTensor(torch.full((n, k), -8, dtype=torch.int8).cuda(),
                            torch.full((n, 1), 2.0 ** -10, dtype=torch.float16).cuda(), k)
    qw, sw = native.pack_weight(w)
    x = -torch.ones(16, k).half().cuda()  # every activation quantizes to -7
    result = native.check_against_reference(kernel, x, w, qw, sw, None)
    assert result["ok"], result


@pytest.mark.gpu
@needs_gpu
def test_bad_shape_is_refused(kernels, gen):
    kernel = kernels[(128, "f16")]
    x = torch.randn(65, 1024).half().cuda()
    y = torch.empty(65, 64).half().cuda()
    qw = torch.zeros(64, 512, dtype=torch.uint8).cuda()
    sw = torch.ones(64, 8).half().cuda()
    assert kernel(x, qw, sw, None, y) == 1  # APEX4GEN_BAD_SHAPE: M > 64
    k = 512 * 8 * sm90_decode.QUANT_ITERS + 256  # past what the quantizing block holds
    x = torch.randn(1, k).half().cuda()
    qw = torch.zeros(64, k // 2, dtype=torch.uint8).cuda()
    sw = torch.ones(64, k // 128).half().cuda()
    assert kernel(x, qw, sw, None, torch.empty(1, 64).half().cuda()) == 1


@pytest.mark.gpu
@needs_gpu
def test_graph_replay_equals_eager(kernels, gen):
    kernel = kernels[(128, "f16")]
    n, k, m = 512, 4096, 16
    w = ref.quantize_weight(torch.randn(n, k, generator=gen).half(), 128)
    w = ref.QuantizedTensor(w.q.cuda(), w.scales.cuda(), w.group)
    qw, sw = native.pack_weight(w)
    x = torch.randn(m, k, generator=gen).half().cuda()
    eager = torch.empty(m, n).half().cuda()
    assert kernel(x, qw, sw, None, eager) == 0
    replay = torch.full((m, n), float("nan")).half().cuda()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert kernel(x, qw, sw, None, replay) == 0
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replay, eager)
