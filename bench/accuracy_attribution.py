"""Where SmolLM2's W4A4 perplexity loss comes from: quantize once (g128, rotation + GPTQ, with `best` also
act-order and both clipping searches), then evaluate with the activations of one layer kind left unquantized
(weights stay 4-bit), and of all kinds (W4A16). One line per variant. Results: bench/NOTES-accuracy.md.

    python3 bench/accuracy_attribution.py TOKENS CALIB_SAMPLES [best]     # e.g. 2048 16 best
"""
import copy, sys, time
import torch
from apex4gen.accuracy.data import load_text
from apex4gen.accuracy.models import load_model
from apex4gen.accuracy.pipeline import KIND_OF, QuantConfig
from apex4gen.accuracy.rotation import set_fast_online_rotation
from apex4gen.cli.quantize import quantize_loaded
from apex4gen.evaluation import perplexity, tokenize
from apex4gen.nn import W4A4Linear

torch.set_num_threads(2)
tokens, samples = int(sys.argv[1]), int(sys.argv[2])
best = len(sys.argv) > 3 and sys.argv[3] == "best"
t0 = time.time()
model, tok = load_model(None)
ids = tokenize(tok, load_text("prideprejudice"), tokens)
fp = perplexity(model, ids, 1024, "fp")
print(f"fp {fp:.3f}", flush=True)
cfg = QuantConfig.uniform("g128", rotate=True, gptq=True, act_order=best, clip_weights=best, clip_acts=best)
q = quantize_loaded(copy.deepcopy(model), tok, cfg, "emma", samples, 512)
set_fast_online_rotation(q)
kinds = {}
for name, m in q.named_modules():
    if isinstance(m, W4A4Linear):
        kinds.setdefault(KIND_OF[name.rsplit(".", 1)[1]], []).append(m)
def run(label, skip):
    for kind, mods in kinds.items():
        for m in mods:
            m._skip = kind in skip
    ppl = perplexity(q, ids, 1024, label)
    print(f"{label:28s} ppl {ppl:8.3f} ratio {ppl / fp:.4f}  ({time.time() - t0:.0f} s)", flush=True)
# a per-module switch: the fake-quant product without the activation rounding
src_forward = W4A4Linear._fake_quant_linear
def fq(self, x):
    if getattr(self, "_skip", False):
        return x @ self._dequantized_weight(x.device).t() + (0 if self.bias is None else self.bias)
    return src_forward(self, x)
W4A4Linear._fake_quant_linear = fq
run("W4A4 (all quantized)", set())
for kind in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
    run(f"A16 at {kind}", {kind})
run("A16 everywhere (W4A16)", set(kinds))
