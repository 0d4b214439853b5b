"""Probe (bench/notes/accuracy.md): perplexity of SmolLM2-135M with full-precision weights and 4-bit
activations (W16A4) at the reduced setting (2048 tokens of Pride and Prejudice, 1024-token windows), the residual
rotated by apex4gen's Hadamard (or a saved learned one). Environment: G / GO = group of the qkv+gate_up / o_proj
inputs (64), SKIP = leading tokens of each window left unquantized (0), BOS = a token id prepended to each window
(-1: none).

    PYTHONPATH=. python3 bench/probes/w16a4.py had [learned_rotation_....pt ...]
"""
import sys, os, torch
from torch import nn
from apex4gen.accuracy.models import load_model
from apex4gen.accuracy import rotation
from apex4gen.nn import fake_quant_activation
from apex4gen.accuracy.evaluation import tokenize, windows
import math
BOS=int(os.environ.get("BOS","-1"))
@torch.no_grad()
def perplexity(model, ids, window, desc):
    tot=0.0; cnt=0
    for row in windows(ids, window):
        inp = row if BOS<0 else torch.cat([torch.tensor([BOS]), row])
        off = 0 if BOS<0 else 1
        logits = model(input_ids=inp.unsqueeze(0), use_cache=False).logits[0, off:-1].float()
        tot += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum")); cnt += row.numel()-1
    return math.exp(tot/cnt)
from apex4gen.accuracy.data import load_text
model, tok = load_model()
d=576; hd=64
import os
SKIP=int(os.environ.get("SKIP","0"))
def fq(x, g):
    if SKIP and x.dim()==3:
        return torch.cat([x[:, :SKIP], fq0(x[:, SKIP:].contiguous(), g)], 1)
    return fq0(x, g)
def fq0(x, g):
    return fake_quant_activation(x.reshape(-1, x.shape[-1]), g).reshape(x.shape)
T = rotation.random_orthogonal(1536, 1).float(); Hq = rotation.random_orthogonal(hd, 2).float()
class QNorm(nn.Module):
    def __init__(s, norm, Q): super().__init__(); s.norm=norm; s.Q=Q
    def forward(s, h):
        xh = h*torch.rsqrt(h.pow(2).mean(-1,keepdim=True)+s.norm.variance_epsilon)
        return s.norm.weight*(fq(xh@s.Q,int(os.environ.get("G","64")))@s.Q.t())
def o_hook(m,a):
    x=a[0]; sh=x.shape; xh=(x.reshape(*sh[:-1],-1,hd)@Hq).reshape(sh)
    return ((fq(xh,int(os.environ.get("GO","64"))).reshape(*sh[:-1],-1,hd)@Hq.t()).reshape(sh),)
def d_hook(m,a): return (fq(a[0]@T,128)@T.t(),)
ids = tokenize(tok, load_text("prideprejudice"), 2048)
with torch.no_grad(): print("FP ppl", perplexity(model, ids, 1024, "fp"), flush=True)
for path in sys.argv[1:]:
    Q = rotation.random_orthogonal(d,0).float() if path=="had" else torch.load(path).float()
    import copy; m = copy.deepcopy(model)
    for L in m.model.layers:
        L.input_layernorm=QNorm(L.input_layernorm,Q); L.post_attention_layernorm=QNorm(L.post_attention_layernorm,Q)
        L.self_attn.o_proj.register_forward_pre_hook(o_hook); L.mlp.down_proj.register_forward_pre_hook(d_hook)
    with torch.no_grad(): print(path, "W16A4 ppl", perplexity(m, ids, 1024, "x"), flush=True)
