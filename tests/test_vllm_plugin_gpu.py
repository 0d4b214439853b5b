"""The vLLM plugin's linear method on the GPU, through a build's kernels.

vLLM is not installed on the GPU machine, so its layer object is stood in for by a module holding what
vLLM's weight loaders leave on a layer: ``weight_packed`` (compressed-tensors int32) and ``weight_scale``
(tests/test_vllm_plugin.py checks that against the real vLLM on the CPU). What runs is the code the plugin's
``Apex4genLinearMethod.process_weights_after_loading`` and ``apply`` call: ``apex4gen.vllm_plugin.core``.

For every build in APEX4GEN_TEST_BUILDS and every problem it routes (a fused plan's problems are vLLM's layers):
the output matches the reference GEMM within ``reference.gemm_tolerance`` at decode and prefill token counts;
CUDA-graph replay equals eager; torch.compile(fullgraph=True, dynamic shapes) traces ``apply`` as vLLM
compiles a model (one opaque op, no graph break); and the online rotation runs on the GPU.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

from apex4gen import reference as ref
from apex4gen.accuracy.rotation import hadamard_factors, random_orthogonal
from apex4gen.checkpoint import WEIGHTS_FILE, pack_int32
from apex4gen.granularity import Granularity
from apex4gen.vllm_plugin import core
from test_kernels_gpu import _build_dirs, _dtype, assert_matches_reference, problems

pytestmark = pytest.mark.gpu

TOKENS = (1, 16, 17, 64, 300)  # decode, the decode/prefill bucket edges, prefill


@pytest.fixture(scope="module", params=_build_dirs() or [None], ids=lambda p: p.name if p else "none")
def build_dir(request):
    if request.param is None or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU and APEX4GEN_TEST_BUILDS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sm_8x builds on a newer GPU run through PTX JIT, on purpose
        core.load_build(str(request.param))
    return request.param


class LoadedLayer(torch.nn.Module):
    """What vLLM's loaders leave on a layer the plugin created: the checkpoint's tensors of its partition."""

    def __init__(self, w: ref.QuantizedTensor) -> None:
        super().__init__()
        self.weight_packed = torch.nn.Parameter(pack_int32(w.q.cpu()).cuda(), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(w.scales, requires_grad=False)


def _scheme(group: int, k: int, **kw) -> core.LayerScheme:
    return core.LayerScheme(Granularity.of_size(group, k), **kw)


def _prepared(build_dir, n, k, group, dtype, gen, scheme=None, checkpoint_dir=None):
    w = ref.quantize_weight(torch.randn(n, k, generator=gen, device="cuda", dtype=dtype) * 0.05, group, dtype)
    layer = LoadedLayer(w)
    p = core.prepare(layer, scheme or _scheme(group, k), k, str(build_dir), checkpoint_dir)
    return layer, p, w


@pytest.fixture
def gen():
    seed = torch.seed() % 2**31
    print(f"seed={seed}")
    return torch.Generator(device="cuda").manual_seed(seed)


def _build(build_dir):
    return core.load_build(str(build_dir))


@torch.no_grad()
def test_apply_matches_the_reference(build_dir, gen):
    for n, k, group, dname in problems(_build(build_dir)):
        dtype = _dtype(dname)
        layer, p, w = _prepared(build_dir, n, k, group, dtype, gen)
        assert p.handle is not None and not hasattr(layer, "weight_packed")
        for m in TOKENS:
            x = torch.randn(m, k, generator=gen, device="cuda", dtype=dtype)
            bias = torch.randn(n, generator=gen, device="cuda", dtype=dtype)
            y = core.forward(layer, p, x, bias)
            assert y.shape == (m, n) and y.dtype == dtype
            assert_matches_reference(y, ref.quantize_activation(x, group), w, bias)


@torch.no_grad()
def test_cuda_graph_replay_equals_eager(build_dir, gen):
    n, k, group, dname = problems(_build(build_dir))[0]
    dtype = _dtype(dname)
    layer, p, _ = _prepared(build_dir, n, k, group, dtype, gen)
    for m in (1, 64, 1024):
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=dtype)
        eager = core.forward(layer, p, x, None)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            core.forward(layer, p, x, None)  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = core.forward(layer, p, x, None)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@torch.no_grad()
def test_torch_compile_traces_apply_in_one_graph(build_dir, gen):
    n, k, group, dname = problems(_build(build_dir))[0]
    dtype = _dtype(dname)
    layer, p, _ = _prepared(build_dir, n, k, group, dtype, gen)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: core.forward(layer, p, x, None), fullgraph=True, dynamic=True,
                             backend="eager")
    for m in (3, 17, 300):  # one trace, symbolic token count: the kernel is chosen inside the op
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=dtype)
        assert torch.equal(compiled(x), core.forward(layer, p, x, None))


@torch.no_grad()
def test_online_rotation_on_the_gpu(build_dir, gen, tmp_path):
    """A rotated down_proj: the stored dense transform is read from the checkpoint file and applied as the
    Kronecker product of small Hadamards, then the kernels run on the rotated input."""
    rotatable = [pr for pr in problems(_build(build_dir)) if hadamard_factors(pr[1]) is not None]
    if not rotatable:
        pytest.skip("no routed K of this build has a Hadamard matrix here")
    n, k, group, dname = min(rotatable, key=lambda pr: pr[1])
    dtype = _dtype(dname)
    t = random_orthogonal(k, seed=1).float()
    save_file({"apex4gen.input_transform.0": t.contiguous()}, str(tmp_path / WEIGHTS_FILE))
    scheme = _scheme(group, k, rotation="apex4gen.input_transform.0")
    layer, p, w = _prepared(build_dir, n, k, group, dtype, gen, scheme, str(tmp_path))
    x = torch.randn(64, k, generator=gen, device="cuda", dtype=dtype)
    rotated = p.rotation(x)
    torch.testing.assert_close(rotated.float(), x.float() @ t.cuda(), rtol=2 ** -7, atol=2 ** -7)
    y = core.forward(layer, p, x, None)
    assert_matches_reference(y, ref.quantize_activation(rotated, group), w, None)
