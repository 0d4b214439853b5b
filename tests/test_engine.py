"""The inference engine on the CPU: the fake-quant path (reference numerics) of the same model code that runs
the kernels on the GPU (tests/test_engine_gpu.py)."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from _helpers import without_online_hadamard
from apex4gen.cli import cli
from apex4gen.engine import Decoder, DecodeStep, KVCache, generate, load_checkpoint, random_weights
from apex4gen.engine import hadamard
from apex4gen.engine.config import DecoderConfig
from apex4gen.engine.weights import LayerWeights, ModelWeights, Projection
from apex4gen.errors import SpecError
from apex4gen.granularity import Granularity

from tiny_llama import VOCAB, tiny_llama, token_batch

pytest.importorskip("transformers")


def _dense_weights(model) -> ModelWeights:
    """A transformers LLaMA's own weights, unquantized, q/k/v and gate/up fused as the engine holds them."""
    c = model.config
    config = DecoderConfig("tiny", c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                           c.head_dim, c.num_hidden_layers, c.vocab_size, torch.float32, c.rms_norm_eps)

    def fused(*linears) -> Projection:
        return Projection(torch.cat([lin.weight.detach() for lin in linears]))

    def layer(i: int) -> LayerWeights:
        block = model.model.layers[i]
        att, mlp = block.self_attn, block.mlp
        return LayerWeights(block.input_layernorm.weight.detach(), block.post_attention_layernorm.weight.detach(),
                            {"qkv_proj": fused(att.q_proj, att.k_proj, att.v_proj), "o_proj": fused(att.o_proj),
                             "gate_up_proj": fused(mlp.gate_proj, mlp.up_proj), "down_proj": fused(mlp.down_proj)},
                            None)

    return ModelWeights(config, model.model.embed_tokens.weight.detach(), model.model.norm.weight.detach(),
                        model.lm_head.weight.detach(), layer)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A rotated (online Hadamard before down_proj), g16 W4A4 checkpoint of a tiny LLaMA (gate/up with 8-bit
    activations, as a plan's W4A8 layer), and its model."""
    from apex4gen.accuracy import QuantConfig, quantize_model
    from apex4gen.checkpoint import load_quantized, save_quantized

    out = tmp_path_factory.mktemp("ckpt")
    fp = tiny_llama(layers=2, tie=False)
    cfg = QuantConfig.uniform(Granularity(16), rotate=True, act_bits={"gate_up_proj": 8})
    save_quantized(quantize_model(copy.deepcopy(fp), cfg), out)
    return out, load_quantized(out), fp


@torch.no_grad()
def test_fp_path_is_transformers_llama():
    model = tiny_llama(layers=2, tie=False)
    ids = token_batch(2, 11)
    want = model(input_ids=ids).logits
    got = Decoder(_dense_weights(model))(ids, all_logits=True)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


@torch.no_grad()
def test_checkpoint_fake_quant_matches_transformers_model(checkpoint):
    """Fused q/k/v and gate/up, the fast online Hadamard and the engine's attention compute what the quantized
    transformers model computes (float32: the same quantized values, so agreement to float rounding)."""
    path, quantized, fp = checkpoint
    decoder = Decoder(load_checkpoint(path, dtype=torch.float32))
    assert isinstance(decoder.layers[0].mlp.online, hadamard.OnlineHadamard)
    ids = token_batch(2, 11)
    want = quantized(input_ids=ids).logits
    got = decoder(ids, all_logits=True)
    quant_error = (want - fp(input_ids=ids).logits).norm()
    assert (got - want).norm() < 1e-4 * quant_error, (float((got - want).norm()), float(quant_error))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_kv_cache_decode_equals_full_recompute(checkpoint, dtype):
    path, _, _ = checkpoint
    decoder = Decoder(load_checkpoint(path, dtype=dtype))
    ids = token_batch(3, 12)
    cache = KVCache.allocate(decoder.config, 3, 16, "cpu")
    decoder(ids[:, :8], cache)
    for pos in range(8, 12):
        step = decoder(ids[:, pos:pos + 1], cache, torch.tensor([pos]))
        full = decoder(ids[:, :pos + 1])
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(step.float(), full.float(), atol=tol, rtol=tol), (pos, float((step - full).abs().max()))


@torch.no_grad()
def test_greedy_generation_is_argmax_of_full_recompute(checkpoint):
    path, _, _ = checkpoint
    decoder = Decoder(load_checkpoint(path, dtype=torch.float32))
    prompt = token_batch(2, 5)
    out = generate(decoder, prompt, 8)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, decoder(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.tokens, seq[:, 5:])


@torch.no_grad()
def test_decode_step_object_runs_eagerly_on_cpu(checkpoint):
    path, _, _ = checkpoint
    decoder = Decoder(load_checkpoint(path, dtype=torch.float32))
    ids = token_batch(2, 6)
    cache = KVCache.allocate(decoder.config, 4, 10, "cpu")
    decoder(ids, cache.narrow(2))
    step = DecodeStep(decoder, cache, 2, graph=False)
    step.start(ids[:, -1:], 6)
    tokens = step().clone()
    assert int(step.pos) == 7
    assert torch.equal(tokens, step.logits[:, -1].argmax(-1, keepdim=True))


def test_random_w4a4_model_is_the_quantized_fp_model():
    """Same seed: the W4A4 random model is the FP one quantized, with down_proj rotated by the online Hadamard
    (so both compute nearly the same function), layer by layer in any order."""
    config = DecoderConfig("tiny", 64, 128, 4, 2, 16, 2, VOCAB, torch.float32)
    fp = random_weights(config, None, "cpu", seed=3)
    q = random_weights(config, {"qkv_proj": 16, "o_proj": 64, "gate_up_proj": 32, "down_proj": 32}, "cpu", seed=3)
    assert torch.equal(fp.layer(1).projections["o_proj"].weight, fp.layer(1).projections["o_proj"].weight)
    assert q.layer(0).projections["qkv_proj"].weight.group == 16
    with torch.no_grad():
        ids = token_batch(2, 7)
        a, b = Decoder(fp)(ids, all_logits=True), Decoder(q)(ids, all_logits=True)
    assert (a - b).norm() < 0.5 * a.norm()
    groups = {"qkv_proj": 16, "o_proj": 64, "gate_up_proj": 32, "down_proj": 32}
    shapes = {"qkv_proj": (128, 64), "o_proj": (64, 64), "gate_up_proj": (256, 64), "down_proj": (64, 128)}
    int4 = sum(n * k // 2 + n * k // groups[kind] * 2 for kind, (n, k) in shapes.items())  # values + fp16 scales
    online = 128 * 4 + (16 * 16 + 8 * 8) * 4  # scale and the 16 x 8 factors, fp32, shared by the layers
    norms = 2 * 64 * 4
    assert Decoder(q).decoder_weight_bytes() == 2 * (int4 + norms) + online
    assert Decoder(fp).decoder_weight_bytes() == 2 * (sum(n * k for n, k in shapes.values()) + 2 * 64) * 4


@pytest.mark.parametrize("n, factors", [(96, (12, 8)), (1536, (48, 32)), (2752, (43, 64)), (4096, (64, 64))])
def test_fast_hadamard_is_orthogonal_and_applies_its_matrix(n, factors):
    t = hadamard.for_size(n, seed=1)
    assert (t.a, t.b) == factors  # 2752 = 43 x 64: no small Hadamard of order 2752 here, so 43 blocks of 64
    dense = t.dense()
    assert torch.allclose(dense @ dense.T, torch.eye(n, dtype=torch.float64), atol=1e-9)
    x = torch.randn(2, 3, n)
    assert torch.allclose(t(x).double(), x.double() @ dense, atol=1e-5)
    assert torch.allclose(t.to(torch.bfloat16)(x.bfloat16()).double(), x.double() @ dense, atol=0.05)


def test_stored_rotation_is_recognised_and_others_refused():
    from apex4gen.accuracy.rotation import random_orthogonal

    t = random_orthogonal(1536, seed=4).float()
    fast = hadamard.from_dense(t, "ckpt")
    assert (fast.a, fast.b) == (48, 32) and torch.allclose(fast.dense(), t.double(), atol=1e-6)
    q, _ = torch.linalg.qr(torch.randn(96, 96, dtype=torch.float64))
    with pytest.raises(SpecError, match="no fast form"):
        hadamard.from_dense(q.float(), "ckpt")


def test_engine_does_not_import_the_compiler():
    code = ("import sys, apex4gen.engine, apex4gen.engine.benchmark, apex4gen.engine.buildinfo; "
            "bad = [m for m in ('jinja2', 'apex4gen.emit', 'apex4gen.build', 'apex4gen.planner', "
            "'apex4gen.costmodel') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generate_command_on_a_checkpoint(checkpoint):
    path, _, _ = checkpoint
    result = CliRunner().invoke(cli, ["generate", str(path), "--prompt", "hi there", "--max-new-tokens", "4",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    tokens = result.stdout.split("\n")[0].split()
    assert len(tokens) == 4 and all(0 <= int(t) < VOCAB for t in tokens)


@pytest.mark.parametrize("args, message", [
    (["generate", "llama2-7b", "--prompt", "x"], "give --build"),
    (["generate", "no-such-model", "--prompt", "x"], "no-such-model"),
    (["e2e-bench", "llama2-7b", "--build", ".", "--batches", "1,x"], "--batches takes comma-separated integers"),
])
def test_bad_input_is_one_line(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output


class _ReferenceBuild:
    """The Build API (pack, linear on [..., K]; select, gemm and the fused producers for the engine's fused path)
    computed by the reference: the kernel path's plumbing on the CPU. ``calls`` counts the ops run. The GEMM's
    output dtype is that of the activations its producer quantized (a checkpoint's scales may be another)."""

    def __init__(self):
        from collections import Counter
        self.calls = Counter()
        self.act_dtype = None

    def pack(self, w, act_bits=4):
        from apex4gen.loader import PackedWeight
        return PackedWeight(w.shape[0], w.shape[1], w.group, w.scales.dtype, {"canonical": (w.q, w.scales)},
                            act_bits)

    def linear(self, x, packed, bias=None):
        from apex4gen import reference
        self.calls["linear"] += 1
        q, scales = packed.layouts["canonical"]
        w = reference.QuantizedTensor(q, scales, packed.group)
        y = reference.reference_linear(x.reshape(-1, packed.k), w, bias, packed.act_bits)
        return y.reshape(*x.shape[:-1], packed.n)

    def select(self, m, n, k, group, dtype, act_bits=4):
        """A kernel reading int8 activations, as the Hopper prefill kernels do."""
        from apex4gen.manifest import KernelEntry
        return KernelEntry(0, "reference", {}, "s8", act_bits, "canonical", "")

    def gemm(self, qx, sx, packed, kernel, bias=None):
        from apex4gen import reference
        self.calls["gemm"] += 1
        q, scales = packed.layouts["canonical"]
        x = reference.QuantizedTensor(qx.reshape(-1, packed.k), sx.reshape(-1, packed.k // packed.group), packed.group)
        y = reference.gemm(x, reference.QuantizedTensor(q, scales, packed.group), bias, self.act_dtype)
        return y.reshape(*qx.shape[:-1], packed.n)

    def rmsnorm_quantize_act(self, x, weight, eps, group, fmt="s4", act_bits=4):
        from apex4gen import reference
        self.calls["rmsnorm_quantize_act"] += 1
        return self._quantized(reference.rms_norm(x, weight, eps), group, act_bits)

    def silu_mul_quantize_act(self, gate_up, group, fmt="s4", act_bits=4):
        from apex4gen import reference
        self.calls["silu_mul_quantize_act"] += 1
        return self._quantized(reference.silu_mul(gate_up), group, act_bits)

    def _quantized(self, y, group, act_bits):
        from apex4gen import reference
        self.act_dtype = y.dtype
        q = reference.quantize_activation(y.reshape(-1, y.shape[-1]), group, act_bits)
        return q.q.view(y.shape), q.scales.view(*y.shape[:-1], -1)


@torch.no_grad()
def test_kernel_path_plumbing_on_reference_ops(checkpoint):
    """KernelLinear (packing once, [..., K] in, bias, clipping) through a build whose ops are the reference: the
    logits are the fake-quant path's up to its summation order."""
    from apex4gen.engine.model import KernelLinear

    path, _, _ = checkpoint
    weights = load_checkpoint(path, dtype=torch.bfloat16)
    kernel = Decoder(weights, _ReferenceBuild())
    assert sum(isinstance(m, KernelLinear) for m in kernel.modules()) == 8
    # the checkpoint's 8-bit gate/up reach the packed weight the op routes by; the rest stay 4-bit
    bits = {m.packed.act_bits for m in kernel.modules() if isinstance(m, KernelLinear)}
    assert bits == {4, 8} and weights.layer(0).projections["gate_up_proj"].act_bits == 8
    ids = token_batch(2, 9)
    got, want = kernel(ids, all_logits=True).float(), Decoder(weights)(ids, all_logits=True).float()
    assert (got - want).norm() < 0.05 * want.norm(), float((got - want).norm() / want.norm())


@pytest.mark.parametrize("online", [True, False])
@torch.no_grad()
def test_kernel_path_fuses_the_producers_on_reference_ops(checkpoint, online):
    """On the kernels, qkv_proj and gate_up_proj read their inputs from the fused RMSNorm op, and down_proj from the
    fused SiLU(gate) * up op unless an online Hadamard stands between (the checkpoint's rotation; without it, the
    same weights with the Hadamard left out, which both paths then compute alike)."""
    from collections import Counter

    path, _, _ = checkpoint
    weights = load_checkpoint(path, dtype=torch.bfloat16)
    if not online:
        weights = without_online_hadamard(weights)
    build = _ReferenceBuild()
    kernel = Decoder(weights, build)
    ids = token_batch(2, 9)
    got, want = kernel(ids, all_logits=True).float(), Decoder(weights)(ids, all_logits=True).float()
    assert (got - want).norm() < 0.05 * want.norm(), float((got - want).norm() / want.norm())
    layers = kernel.config.num_layers
    fused_down = 0 if online else layers
    assert build.calls == Counter(rmsnorm_quantize_act=2 * layers, silu_mul_quantize_act=fused_down,
                                  gemm=2 * layers + fused_down, linear=2 * layers - fused_down)


def test_e2e_report_targets_json_and_summary(tmp_path, capsys):
    """The benchmark's verdicts, table, JSON and the device script's summary line, on made-up measurements."""
    from apex4gen.cli.generate import _print_report
    from apex4gen.engine import benchmark as bench

    fp = bench.ModelResult("fp16", 32, {512: 1000.0, 2048: 900.0}, {1: 100.0, 16: 1500.0, 64: 5000.0}, 100, 200, 100)
    w4 = bench.ModelResult("w4a4", 32, {512: 1200.0, 2048: 1000.0}, {1: 260.0, 16: 2900.0, 64: 6600.0}, 28, 90, 15)
    targets = bench.targets(w4, fp, per_channel=True)
    verdicts = {t.label: t.met for t in targets}
    assert verdicts == {"decode batch 1 vs fp16": True, "decode batch 16 vs fp16": False,
                        "decode batch 64 vs fp16": True, "prefill 2048 vs fp16 (per-channel plan)": False,
                        "decoder weight memory vs fp16": True}
    assert [t.minimum for t in bench.targets(w4, fp, per_channel=False) if "prefill" in t.label] == [1.0]
    report = bench.Report("llama2-7b", "b", "GPU", "2", bench.Settings(), (fp, w4), targets)
    _print_report(report)
    printed = capsys.readouterr().out
    assert "2.60x" in printed and "target decode batch 16 vs fp16: 1.93x (>= 2.0x: NOT met)" in printed
    report.write_json(tmp_path / "e2e-x.json")
    script = Path(__file__).resolve().parents[1] / "scripts" / "e2e_summary.py"
    line = subprocess.run([sys.executable, str(script), str(tmp_path / "e2e-x.json")],
                          capture_output=True, text=True, check=True).stdout
    assert "decode b1 2.60x" in line and "prefill2048 1.11x" in line and "(0.28x; one layout a GEMM 0.15x)" in line
    assert "not met: decode batch 16 vs fp16, prefill 2048 vs fp16 (per-channel plan)" in line


def test_weight_bytes_count_every_layout_held():
    """A Hopper GEMM holds its decode and its prefill layout; the one-layout count keeps the smaller."""
    from apex4gen.engine.model import KernelLinear
    from apex4gen.loader import PackedWeight

    class TwoLayouts(_ReferenceBuild):
        def pack(self, w, act_bits=4):
            q = torch.zeros(w.shape[0], w.shape[1] // 2, dtype=torch.uint8)
            return PackedWeight(w.shape[0], w.shape[1], w.group, w.scales.dtype,
                                {"a": (q, w.scales), "b": (q.clone(), w.scales.t().contiguous())})

    from apex4gen import reference
    w = reference.quantize_weight(torch.randn(32, 64), 16)
    lin = KernelLinear(Projection(w), TwoLayouts())
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
    assert size(lin.weight_tensors()) == 2 * (32 * 32 + 32 * 4 * 2)
    assert size(lin.weight_tensors(one_layout=True)) == 32 * 32 + 32 * 4 * 2


@torch.no_grad()
def test_cache_rounding_stays_inside_the_position_tables(checkpoint):
    """A cache is rounded up to whole ALIGN blocks; so are the RoPE tables: a decode step at the cache's last
    position (where a captured step warms up) finds its position."""
    path, _, _ = checkpoint
    decoder = Decoder(load_checkpoint(path, dtype=torch.float32), max_positions=21)
    cache = KVCache.allocate(decoder.config, 1, 21, "cpu")
    assert cache.length == 32 and decoder.rope.cos.shape[0] == 32
    decoder(torch.tensor([[5]]), cache, torch.tensor([cache.length - 1]))


def test_checkpoint_config_rope_and_refusals():
    from apex4gen.engine.config import from_hf

    base = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100, "rms_norm_eps": 1e-5}
    assert from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, torch.float16,
                   "c").rope_theta == 5e5  # transformers >= 5
    assert from_hf({**base, "rope_theta": 1e6}, torch.float16, "c").rope_theta == 1e6
    assert from_hf(base, torch.float16, "c").head_dim == 16
    with pytest.raises(SpecError, match="RoPE scaling"):
        from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, torch.float16, "c")
    with pytest.raises(SpecError, match="not a LLaMA-architecture"):
        from_hf({**base, "model_type": "gpt2"}, torch.float16, "c")
    with pytest.raises(SpecError, match="lacks or mistypes"):
        from_hf({k: v for k, v in base.items() if k != "vocab_size"}, torch.float16, "c")


@pytest.mark.parametrize("fused", [True, False])
def test_plan_granularities_of_a_build(tmp_path, fused):
    """The engine reads a build's plan.yaml without the planner: group sizes per fused kind (K per-channel)."""
    from types import SimpleNamespace

    from apex4gen.engine.buildinfo import is_per_channel, plan_groups
    from apex4gen.planner import make_plan

    plan = make_plan("h100-sxm", "llama2-7b", fused=fused)
    plan.save(tmp_path / "plan.yaml")
    build = SimpleNamespace(build_dir=tmp_path)
    if not fused:
        with pytest.raises(SpecError, match="planned unfused"):
            plan_groups(build)
        return
    want = {lp.name: lp.granularity.size(lp.k) for lp in plan.layers}
    assert plan_groups(build) == want and set(want) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert is_per_channel(build) == all(lp.granularity.is_channel for lp in plan.layers)
