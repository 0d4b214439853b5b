"""The engine on a build's kernels, on the GPU: the ops on [..., K] activations, logits against the fake-quant
path, greedy generation, CUDA-graph decode against eager.

Builds come from APEX4GEN_TEST_BUILDS (as tests/test_kernels_gpu.py); the model tests take those of fused plans
of LLaMA models. Each model is the build's model at its real shapes with random weights and two decoder layers:
the W4A4 one through the kernels, the same weights through the fake-quant path, and the 16-bit model they were
quantized from.

Tolerance of the logits (the argument of tests/test_model_gpu.py): every kernel is within the GEMM tolerance of
the reference on its real inputs (checked here per projection), but the fake-quant path sums in fp32 in another
order, which moves some 16-bit outputs by one ulp, and the next layer's activation quantization turns such a
value into a whole quantization step now and then. So the kernel path must be as close to fake-quant as another
legal summation order (float64) is, and well inside the W4A4 error itself.
"""
from __future__ import annotations


import pytest
import torch

from apex4gen import reference as ref
from apex4gen.errors import ShapeError
from apex4gen.nn import W4A4Linear
from _helpers import relative_error, rounding_floor, without_online_hadamard
from test_kernels_gpu import _build_dirs, _load_activations, assert_matches_reference, problems

pytestmark = pytest.mark.gpu

LAYERS = 2
STEPS = 32


def _load(path):
    import warnings

    import apex4gen.loader as loader
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sm_8x builds on a newer GPU run through PTX JIT, on purpose
        return loader.load(path)


def _fused_llama_builds():
    import yaml

    from apex4gen.specs import load_model

    out = []
    for b in _build_dirs():
        plan = yaml.safe_load((b / "plan.yaml").read_text()) if (b / "plan.yaml").exists() else None
        if plan and plan["fused"] and load_model(plan["model"]).architecture in ("llama", "mistral"):
            out.append(b)
    return out


@pytest.fixture(scope="module", params=_build_dirs() or [None], ids=lambda p: p.name if p else "none")
def build(request):
    if request.param is None or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU and APEX4GEN_TEST_BUILDS (scripts/e2e_device.sh)")
    return _load(request.param)


@torch.no_grad()
def test_ops_take_any_leading_shape(build):
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k, group, dname in problems(build):
        dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dname]
        w = build.pack(ref.quantize_weight(torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * 0.05,
                                           group))
        bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen)
        x = torch.randn(2, 3, k, device="cuda", dtype=dtype, generator=gen)
        flat = build.linear(x.reshape(6, k), w, bias)
        y = build.linear(x, w, bias)
        assert y.shape == (2, 3, n) and torch.equal(y.reshape(6, n), flat)
        out = torch.full((2, 3, n), float("nan"), device="cuda", dtype=dtype)
        build.linear(x, w, bias, out=out)
        assert torch.equal(out, y)
        assert torch.equal(build.linear(x[0, 0], w, bias), flat[0])  # 1-D: one token
        info = build.select(6, n, k, group, dtype)
        if info.act_format != "raw":
            qx, sx = build.quantize_act(x, group, info.act_format)
            q2, s2 = build.quantize_act(x.reshape(6, k), group, info.act_format)
            assert qx.shape[:2] == (2, 3) and torch.equal(qx.reshape(q2.shape), q2)
            assert torch.equal(sx.reshape(s2.shape), s2)
            assert torch.equal(build.gemm(qx, sx, w, info, bias), y)
        with pytest.raises(ShapeError, match="out must be a contiguous"):
            build.linear(x, w, bias, out=torch.empty(6, n, device="cuda", dtype=dtype))


@pytest.fixture(scope="module", params=_fused_llama_builds() or [None], ids=lambda p: p.name if p else "none")
def models(request):
    """(build, kernel model, fake-quant model, 16-bit model), same weights, two layers."""
    if request.param is None or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU and a fused LLaMA build in APEX4GEN_TEST_BUILDS (scripts/e2e_device.sh)")
    build = _load(request.param)
    seed = torch.seed() % 2**31
    print(f"seed={seed}")
    return (build, *_decoders(build, seed))


def _decoders(build, seed: int, online: bool = True):
    """The kernel, fake-quant and 16-bit models of the build's model (random weights, LAYERS layers); without
    ``online`` the W4A4 ones leave out the online Hadamard before down_proj (both compute the same function)."""
    from dataclasses import replace

    from apex4gen.engine import Decoder, random_weights
    from apex4gen.engine.buildinfo import build_dtype, plan_act_bits, plan_groups
    from apex4gen.engine.config import from_spec
    from apex4gen.specs import load_model

    config = replace(from_spec(load_model(build.manifest.model)), dtype=build_dtype(build)).with_layers(LAYERS)
    groups, bits = plan_groups(build), plan_act_bits(build)

    def quantized():
        weights = random_weights(config, groups, "cuda", seed, bits)
        return weights if online else without_online_hadamard(weights)

    return (Decoder(quantized(), build, max_positions=512), Decoder(quantized(), None, max_positions=512),
            Decoder(random_weights(config, None, "cuda", seed), None, max_positions=512))


def _skip_unless_served(build, m: int) -> None:
    """A build made with --allow-partial runs only the M its plan serves for every GEMM (the prompt's tokens)."""
    from apex4gen.plan import Plan

    plan = Plan.load(build.build_dir / "plan.yaml")
    holes = ["/".join(g.layers) for g, _ in plan.unserved() if g.bucket_for(m).kernel is None]
    if holes:
        pytest.skip(f"{build.build_dir.name} is a partial build: no kernel for {', '.join(holes)} at M={m}")


def _record_projections(build, monkeypatch) -> list:
    """Every projection's call from now on, as (its activations quantized, packed weight, output): the op's
    input quantized by the reference where ``linear`` quantizes it, the fused producer's output where ``gemm``
    reads activations a producer quantized."""
    seen = []
    linear, gemm = build.linear, build.gemm

    def record_linear(x, w, bias=None, out=None, kernel=None):
        y = linear(x, w, bias, out, kernel)
        seen.append((ref.quantize_activation(x.reshape(-1, w.k), w.group, w.act_bits), w, y))
        return y

    def record_gemm(qx, sx, w, info, bias=None, out=None):
        y = gemm(qx, sx, w, info, bias, out)
        q = _load_activations(qx.reshape(-1, qx.shape[-1]), info.act_format)
        seen.append((ref.QuantizedTensor(q, sx.reshape(-1, sx.shape[-1]), w.group), w, y))
        return y

    monkeypatch.setattr(build, "linear", record_linear)
    monkeypatch.setattr(build, "gemm", record_gemm)
    return seen


def _check_projections(kernel, fake, seen) -> None:
    """Each recorded GEMM within the GEMM tolerance of the reference on the activations it read."""
    from apex4gen.engine.model import KernelLinear

    linears = [m for m in kernel.modules() if isinstance(m, KernelLinear)]
    fakes = [m for m in fake.modules() if isinstance(m, W4A4Linear)]
    weights = {id(m.packed): f.quantized_weight() for m, f in zip(linears, fakes)}
    assert len(seen) == 4 * LAYERS
    for xq, w, y in seen:
        assert_matches_reference(y.reshape(xq.q.shape[0], -1), xq, weights[id(w)], None)


def _assert_logits_near_fake_quant(got, fake, fp, ids) -> None:
    """The kernel path's logits ``got`` within twice fake-quant's own rounding floor (+0.01) of fake-quant's, and
    under half of fake-quant's distance from the 16-bit model."""
    want, want_fp = fake(ids, all_logits=True), fp(ids, all_logits=True)
    floor = rounding_floor(lambda: fake(ids, all_logits=True), want)
    quant_error, path_error = relative_error(want, want_fp), relative_error(got, want)
    assert path_error < 2 * floor + 0.01 and path_error < 0.5 * quant_error, (path_error, floor, quant_error)


@torch.no_grad()
def test_every_projection_on_its_real_inputs(models, monkeypatch):
    build, kernel, fake, _ = models
    seen = _record_projections(build, monkeypatch)
    kernel(torch.randint(0, kernel.config.vocab_size, (1, 17), device="cuda"))
    _check_projections(kernel, fake, seen)


@pytest.mark.parametrize("online", [True, False])
@torch.no_grad()
def test_fused_producers_are_taken_and_match_fake_quant(models, monkeypatch, online):
    """A 600-token prefill: where the routed kernels read quantized activations, qkv_proj and gate_up_proj get
    them from the fused RMSNorm op and down_proj from the fused SiLU(gate) * up op (not with the online Hadamard
    between), every GEMM on them within its tolerance, and the logits as close to fake-quant as the unfused
    path's must be (test_logits_kernel_path_matches_fake_quant)."""
    build, *_ = models
    _skip_unless_served(build, 600)
    kernel, fake, fp = _decoders(build, torch.seed() % 2**31, online)
    calls = []
    for name in ("rmsnorm_quantize_act", "silu_mul_quantize_act"):
        op = getattr(build, name)
        monkeypatch.setattr(build, name, lambda *a, _op=op, _name=name, **kw: calls.append(_name) or _op(*a, **kw))
    seen = _record_projections(build, monkeypatch)
    ids = torch.randint(0, kernel.config.vocab_size, (2, 300), device="cuda")
    got = kernel(ids, all_logits=True)
    expected = []
    for proj in (kernel.layers[0].attn.qkv.linear, kernel.layers[0].mlp.gate_up.linear):
        if proj.prequantized_kernel(600) is not None:
            expected.append("rmsnorm_quantize_act")
    if not online and kernel.layers[0].mlp.down.linear.prequantized_kernel(600) is not None:
        expected.append("silu_mul_quantize_act")
    if not expected:
        pytest.skip(f"{build.build_dir.name}'s kernels at M=600 quantize their own input: nothing to fuse")
    assert sorted(calls) == sorted(expected * LAYERS)
    _check_projections(kernel, fake, seen)
    _assert_logits_near_fake_quant(got, fake, fp, ids)


@pytest.mark.parametrize("tokens", [1, 17, 300])
@torch.no_grad()
def test_logits_kernel_path_matches_fake_quant(models, tokens):
    build, kernel, fake, fp = models
    _skip_unless_served(build, 2 * tokens)
    ids = torch.randint(0, kernel.config.vocab_size, (2, tokens), device="cuda")
    got = kernel(ids, all_logits=True)
    assert torch.isfinite(got).all()
    _assert_logits_near_fake_quant(got, fake, fp, ids)


@torch.no_grad()
def test_greedy_generation_same_tokens(models):
    """STEPS greedy tokens through the kernels (CUDA-graph decode) and through the fake-quant path (eager) are
    the same; the one legal exception is a near tie: where they part, the fake-quant path's own logits of the
    two tokens must lie closer than the two paths' logits differ on the prompt."""
    from apex4gen.engine import DecodeStep, KVCache, generate

    build, kernel, fake, _ = models
    _skip_unless_served(build, 24)
    prompt = torch.randint(0, kernel.config.vocab_size, (1, 24), device="cuda")
    got = generate(kernel, prompt, STEPS, graph=True)
    cache = KVCache.allocate(fake.config, 1, 24 + STEPS, "cuda")
    first = fake(prompt, cache)[:, -1]
    margin = 4 * float((got.prompt_logits.float() - first.float()).abs().max())
    step = DecodeStep(fake, cache, 1, graph=False)
    step.start(first.argmax(-1, keepdim=True), 24)
    tokens, logits = [first.argmax(-1, keepdim=True)], [first]
    for _ in range(STEPS - 1):
        tokens.append(step().clone())
        logits.append(step.logits[:, -1])
    want = torch.cat(tokens, 1)[0].tolist()
    have = got.tokens[0].tolist()
    if have != want:
        i = next(i for i, (a, b) in enumerate(zip(have, want)) if a != b)
        gap = float(logits[i][0, want[i]] - logits[i][0, have[i]])
        assert gap <= margin, f"step {i}: kernel token {have[i]}, fake-quant {want[i]} ahead by {gap} > {margin}"


@pytest.mark.parametrize("batch", [1, 5])
@torch.no_grad()
def test_cuda_graph_decode_equals_eager(models, batch):
    from apex4gen.engine import DecodeStep, KVCache

    build, kernel, _, _ = models
    _skip_unless_served(build, batch * 39)
    ids = torch.randint(0, kernel.config.vocab_size, (batch, 40), device="cuda")
    cache = KVCache.allocate(kernel.config, batch, 48, "cuda")
    kernel(ids[:, :-1], cache)
    eager = DecodeStep(kernel, cache, batch, graph=False)
    eager.start(ids[:, -1:], 39)
    eager_tokens = eager().clone()
    graph = DecodeStep(kernel, cache, batch, graph=True)
    graph.start(ids[:, -1:], 39)
    graph_tokens = graph()
    # the same kernels on the same inputs; cuBLAS (lm_head, the online Hadamard) could pick another algorithm
    # under capture, so the logits must be as close as one ulp flipping a quantized activation now and then allows
    assert relative_error(graph.logits, eager.logits) < 1e-3, relative_error(graph.logits, eager.logits)
    assert torch.equal(graph_tokens, eager_tokens) and int(graph.pos) == 40
