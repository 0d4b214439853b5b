"""Probe (bench/notes/accuracy.md): W16A4 perplexity of SmolLM2-135M at the reduced setting (2048 tokens of Pride
and Prejudice, 1024-token windows) under residual rotations that differ in how they meet the 64-value activation
groups of q/k/v and gate/up: one randomized Hadamard across all 576 channels (`had`, the default of --rotate), or
one 64-value Hadamard per group over the channels in some order (`block:<order>:<sign seed>`), the matrix of
apex4gen.accuracy.rotation.group_rotation. Orders: `place` (channels in place), `energy` (mean square of the
RMS-normalised residual on the first 2048 tokens of Emma, over every norm), `weight` (sum of the reading
columns' squared norms, gamma folded: rotation.reading_weight, the order --group-rotation uses), `product` (energy x
weight), `sqrt` (energy x sqrt(weight)), `ratio` (energy / weight), each decreasing; `hyb:<k>:<sign seed>`: by
weight, the k highest-energy channels moved into the last group. o_proj (head Hadamard) and down_proj (online
Hadamard) inputs are quantized as in the pipeline; DOWN=weight or DOWN=place replaces down_proj's Hadamard by one
per 128-value group over the FFN channels ordered by down_proj's column norms or in place.

    PYTHONPATH=. python3 bench/probes/group_rotation.py had block:weight:0 block:ratio:1 ...
"""
import copy
import math
import os
import sys

import torch
from torch import nn

from apex4gen.accuracy import rotation
from apex4gen.accuracy.data import load_text
from apex4gen.accuracy.evaluation import tokenize, windows
from apex4gen.accuracy.models import load_model
from apex4gen.nn import fake_quant_activation

D, HEAD, GROUP = 576, 64, 64


@torch.no_grad()
def perplexity(model, ids, window=1024):
    total, count = 0.0, 0
    for row in windows(ids, window):
        logits = model(input_ids=row.unsqueeze(0), use_cache=False).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
        count += row.numel() - 1
    return math.exp(total / count)


def fq(x, group):
    return fake_quant_activation(x.reshape(-1, x.shape[-1]), group).reshape(x.shape)


class QuantizedNorm(nn.Module):
    """RMSNorm whose output is quantized in the rotated basis Q (weights stay FP: W16A4)."""

    def __init__(self, norm, q):
        super().__init__()
        self.norm, self.q = norm, q

    def forward(self, h):
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.norm.variance_epsilon)
        return self.norm.weight * (fq(x @ self.q, GROUP) @ self.q.t())


@torch.no_grad()
def residual_energy(model, tok):
    ids = tokenize(tok, load_text("emma"), 2048)
    sums = []

    def hook(_m, args):
        h = args[0][0]
        sums.append((h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).pow(2).mean(0))

    norms = [n for L in model.model.layers for n in (L.input_layernorm, L.post_attention_layernorm)]
    handles = [n.register_forward_pre_hook(hook) for n in norms]
    for i in range(2):
        model(input_ids=ids[i * 1024:(i + 1) * 1024].unsqueeze(0), use_cache=False)
    for h in handles:
        h.remove()
    return torch.stack(sums).mean(0).double()


def main():
    model, tok = load_model()
    energy, weight = residual_energy(model, tok), rotation.reading_weight(model)
    keys = {"place": -torch.arange(D, dtype=torch.float64), "energy": energy, "weight": weight,
            "product": energy * weight, "sqrt": energy * weight.sqrt(), "ratio": energy / weight}
    t = rotation.random_orthogonal(1536, 1).float()
    hq = rotation.random_orthogonal(HEAD, 2).float()

    def o_hook(_m, args):
        x = args[0]
        xh = (x.reshape(*x.shape[:-1], -1, HEAD) @ hq).reshape(x.shape)
        return ((fq(xh, GROUP).reshape(*x.shape[:-1], -1, HEAD) @ hq.t()).reshape(x.shape),)

    mode = os.environ.get("DOWN", "full")

    def make_d_hook(lin):
        if mode == "full":
            tt = t
        else:
            w = lin.weight.detach().double().pow(2).sum(0)
            key = w if mode == "weight" else -torch.arange(1536, dtype=torch.float64)
            tt = rotation.group_rotation(torch.argsort(key, descending=True, stable=True), 128, 1).float()
        return lambda _m, args: (fq(args[0] @ tt, 128) @ tt.t(),)

    ids = tokenize(tok, load_text("prideprejudice"), 2048)
    print(f"FP {perplexity(model, ids):.3f}", flush=True)
    for name in sys.argv[1:]:
        if name == "had":
            q = rotation.random_orthogonal(D, 0)
        elif name.startswith("hyb"):
            _, k, seed = name.split(":")
            top = set(energy.topk(int(k)).indices.tolist())
            rest = [c for c in torch.argsort(weight, descending=True, stable=True).tolist() if c not in top]
            q = rotation.group_rotation(torch.tensor(rest + sorted(top)), GROUP, int(seed))
        else:
            _, order, seed = name.split(":")
            q = rotation.group_rotation(torch.argsort(keys[order], descending=True, stable=True), GROUP, int(seed))
        m = copy.deepcopy(model)
        for L in m.model.layers:
            L.input_layernorm = QuantizedNorm(L.input_layernorm, q.float())
            L.post_attention_layernorm = QuantizedNorm(L.post_attention_layernorm, q.float())
            L.self_attn.o_proj.register_forward_pre_hook(o_hook)
            L.mlp.down_proj.register_forward_pre_hook(make_d_hook(L.mlp.down_proj))
        print(f"{name} W16A4 {perplexity(m, ids):.3f}", flush=True)


if __name__ == "__main__":
    main()
