"""Probe (bench/notes/accuracy.md, "Learned residual rotation"): learn the residual rotation R1 SpinQuant-style
(orthogonal parametrization started at apex4gen's randomized Hadamard, Adam, next-token loss of the W16A4 model with
straight-through rounding on every linear input: qkv/gate_up through R1, o_proj through the head Hadamard,
down_proj through the online Hadamard), then run rotation + GPTQ + act-order + clip-w + clip-a at the reduced
setting (2048 tokens of Pride and Prejudice, calibration 16 x 512 of Emma) with the learned R1.

    PYTHONPATH=. python3 bench/probes/learned_rotation.py STEPS LR BATCH [adam|cayley]
(STEPS = 0: the Hadamard baseline through the same code). Not part of the package: measured, not kept.""",
import sys, time, math, copy, torch
from torch import nn
from torch.nn.utils import parametrizations
from apex4gen.accuracy.models import load_model
from apex4gen.accuracy import rotation
from apex4gen.accuracy.pipeline import QuantConfig, quantize_model
from apex4gen.accuracy.evaluation import perplexity, tokenize
from apex4gen.accuracy.options import calibration_ids
from apex4gen.granularity import G128
from apex4gen.accuracy.data import load_text

steps = int(sys.argv[1]); lr = float(sys.argv[2]); bs = int(sys.argv[3]); mode = sys.argv[4] if len(sys.argv)>4 else "adam"
torch.manual_seed(0)
model, tok = load_model()
for p in model.parameters(): p.requires_grad_(False)
d = model.config.hidden_size; ffn = model.config.intermediate_size; hd = 64; seed = 0

def fq_ste(x, g):
    shp = x.shape
    xg = x.reshape(-1, shp[-1] // g, g)
    s = xg.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 7
    q = xg / s
    qr = q + (torch.clamp(torch.round(q), -8, 7) - q).detach()
    return (qr * s).reshape(shp)

class Rot(nn.Module):
    def __init__(self, q0):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)
        parametrizations.orthogonal(self.lin, orthogonal_map="cayley" if mode=="cayley" else None)
        self.lin.weight = q0
    def q(self): return self.lin.weight

q0 = rotation.random_orthogonal(d, seed).float()
R = Rot(q0)
T = rotation.random_orthogonal(ffn, seed + 1).float()
Hq = rotation.random_orthogonal(hd, seed + 2).float()

class QNorm(nn.Module):
    def __init__(self, norm):
        super().__init__(); self.norm = norm
    def forward(self, h):
        var = h.float().pow(2).mean(-1, keepdim=True)
        xh = h * torch.rsqrt(var + self.norm.variance_epsilon)
        Q = R.q()
        z = fq_ste(xh @ Q, 64) @ Q.t()
        return self.norm.weight * z

def o_hook(m, args):
    x = args[0]; sh = x.shape
    xh = x.reshape(*sh[:-1], -1, hd) @ Hq
    xh = fq_ste(xh.reshape(sh), 64).reshape(*sh[:-1], -1, hd) @ Hq.t()
    return (xh.reshape(sh),)
def d_hook(m, args):
    x = args[0]
    return (fq_ste(x @ T, 128) @ T.t(),)

orig_norms = []
for L in model.model.layers:
    orig_norms.append((L.input_layernorm, L.post_attention_layernorm))
    L.input_layernorm = QNorm(L.input_layernorm); L.post_attention_layernorm = QNorm(L.post_attention_layernorm)
hooks = [L.self_attn.o_proj.register_forward_pre_hook(o_hook) for L in model.model.layers]
hooks += [L.mlp.down_proj.register_forward_pre_hook(d_hook) for L in model.model.layers]

train = calibration_ids(tok, "emma", 64, 512, seed=0)[16:]  # not the GPTQ rows: seed 0 draws those first
print("train rows", train.shape)
opt = torch.optim.Adam(R.parameters(), lr=lr) if mode != "sgd" else torch.optim.SGD(R.parameters(), lr=lr)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(steps, 1))
t0 = time.time()
for step in range(steps):
    rows = train[(step * bs) % len(train):][:bs]
    with torch.nn.utils.parametrize.cached():
        out = model(input_ids=rows, labels=rows, use_cache=False)
        opt.zero_grad(); out.loss.backward()
    opt.step(); sched.step()
    print(f"step {step} loss {out.loss.item():.4f} {time.time()-t0:.0f}s", flush=True)
Q = R.q().detach().double()
print("orth err", (Q @ Q.t() - torch.eye(d, dtype=torch.float64)).abs().max().item())
for h in hooks: h.remove()
for L, (a, b) in zip(model.model.layers, orig_norms):
    L.input_layernorm = a; L.post_attention_layernorm = b
torch.save(Q, f"learned_rotation_{steps}_{lr}_{bs}_{mode}.pt")

# rot + GPTQ + act-order + clips at the reduced setting
orig = rotation.random_orthogonal
def patched(n, s):
    if n == d and s == seed: return Q
    return orig(n, s)
rotation.random_orthogonal = patched
ids = tokenize(tok, load_text("prideprejudice"), 2048)
with torch.no_grad():
    fp = perplexity(model, ids, 1024, "fp")
    cfg = QuantConfig.uniform(G128, rotate=True, gptq=True, act_order=True, clip_weights=True, clip_acts=True)
    qm = quantize_model(copy.deepcopy(model), cfg, calibration_ids(tok, "emma", 16, 512, seed=0))
    rotation.set_fast_online_rotation(qm)
    qp = perplexity(qm, ids, 1024, "quant")
print(f"RESULT steps={steps} lr={lr} bs={bs} mode={mode} fp={fp:.3f} quant={qp:.3f} ratio={qp/fp:.4f} total {time.time()-t0:.0f}s")
