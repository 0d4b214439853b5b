"""A LLaMA-architecture decoder for inference: embeddings, RMSNorm, RoPE, GQA attention through torch SDPA,
SwiGLU MLP, lm_head; one forward for prefill (whole prompts from position 0) and one for decode (one token a
sequence at a position held in a device tensor, so that a decode step can be captured in a CUDA graph).

The projections are what :func:`make_linear` makes of the weights: the build's W4A4 ops (kernel path),
:class:`apex4gen.nn.W4A4Linear` (fake-quant path: the reference numerics, any device), or ``F.linear`` on
16-bit weights (the FP baseline). Everything else is the same code for all three, so the speed ratio of two
models comes from their linear layers (and the W4A4 model's online Hadamard, which it needs).

On the kernel path a projection whose input is straight the output of RMSNorm (qkv_proj, gate_up_proj) or of
SiLU(gate) * up (down_proj without an online Hadamard) has that op and its activation quantization run as one
fused op (``rmsnorm_quantize_act``, ``silu_mul_quantize_act``), then the GEMM on its output, wherever the
kernel routed for the token count reads quantized activations and the layer clips none (:class:`NormLinear`,
:class:`SiluMulLinear`): the activation is never written, and the quantizer's read of it and its launch are
gone. The result is what the unfused ops give up to their float32 order (reference.rms_norm, silu_mul).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..loader.ops import rows
from ..nn import W4A4Linear, clip_activation
from .cache import ALIGN, KVCache
from .config import DecoderConfig
from .hadamard import OnlineHadamard
from .weights import KINDS, LayerWeights, ModelWeights, Projection


class DenseLinear(nn.Module):
    """``F.linear`` on a 16-bit weight (the baseline)."""

    def __init__(self, proj: Projection) -> None:
        super().__init__()
        self.register_buffer("weight", proj.weight)
        self.register_buffer("bias", proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def weight_tensors(self, one_layout: bool = False) -> list:
        return [self.weight, self.bias]


class KernelLinear(nn.Module):
    """The build's W4A4 op (activation quantization + GEMM) on x [..., K]; the weight is kept only in the
    layouts the build's kernels read, packed once here on the weight's device."""

    def __init__(self, proj: Projection, build) -> None:
        super().__init__()
        self.build = build
        self.packed = build.pack(proj.weight, act_bits=proj.act_bits)
        self.bias = proj.bias
        self.act_clip = proj.act_clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_clip < 1.0:
            x = clip_activation(x.reshape(-1, self.packed.k), self.packed.group, self.act_clip).reshape(x.shape)
        return self.build.linear(x, self.packed, self.bias)

    def prequantized_kernel(self, m: int):
        """The kernel routed for ``m`` tokens if it reads activations quantized beforehand, which a producer then
        quantizes as it makes them; None where the layer clips its input or the kernel quantizes its own."""
        if self.act_clip < 1.0:
            return None
        packed = self.packed
        kernel = self.build.select(m, packed.n, packed.k, packed.group, packed.dtype, packed.act_bits)
        return None if kernel.act_format == "raw" else kernel

    def gemm(self, qx: torch.Tensor, sx: torch.Tensor, kernel) -> torch.Tensor:
        """The GEMM on activations a producer quantized for ``kernel`` (:meth:`prequantized_kernel`)."""
        return self.build.gemm(qx, sx, self.packed, kernel, self.bias)

    def weight_tensors(self, one_layout: bool = False) -> list:
        """Every layout held (a Hopper GEMM's decode and prefill kernels read different ones), or the smallest."""
        pairs = list(self.packed.layouts.values())
        if one_layout:
            pairs = [min(pairs, key=lambda pair: sum(t.numel() * t.element_size() for t in pair))]
        return [t for pair in pairs for t in pair] + [self.bias]


class FakeQuantLinear(W4A4Linear):
    """:class:`apex4gen.nn.W4A4Linear` (the fake-quant path) with the engine's weight count."""

    def weight_tensors(self, one_layout: bool = False) -> list:
        return [self.qweight, self.weight_scale, self.bias]


def make_linear(proj: Projection, build=None) -> nn.Module:
    """W4A4 through ``build``'s kernels, W4A4 fake-quant without a build, or 16-bit ``F.linear``."""
    if not proj.quantized:
        return DenseLinear(proj)
    if build is not None:
        return KernelLinear(proj, build)
    return FakeQuantLinear.from_quantized(proj.weight, proj.bias, act_clip=proj.act_clip,
                                          act_bits=proj.act_bits).to(proj.weight.q.device)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _prequantized_kernel(linear: nn.Module, x: torch.Tensor):
    """The kernel that ``linear`` runs on activations quantized by x's fused producer (one row of x a token), or
    None: the projection is not on the kernels, or its kernel takes no quantized input (:class:`KernelLinear`)."""
    if not isinstance(linear, KernelLinear):
        return None
    return linear.prequantized_kernel(rows(x))


class NormLinear(nn.Module):
    """RMSNorm, then a projection of its output (qkv_proj, gate_up_proj). On the kernel path, where the routed
    kernel reads quantized activations, the norm quantizes its output itself (``rmsnorm_quantize_act``) and the
    GEMM reads that."""

    def __init__(self, norm: RMSNorm, linear: nn.Module) -> None:
        super().__init__()
        self.norm, self.linear = norm, linear

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        kernel = _prequantized_kernel(self.linear, h)
        if kernel is None:
            return self.linear(self.norm(h))
        lin = self.linear
        qx, sx = lin.build.rmsnorm_quantize_act(h, self.norm.weight, self.norm.eps, lin.packed.group,
                                                kernel.act_format, kernel.act_bits)
        return lin.gemm(qx, sx, kernel)


class SiluMulLinear(nn.Module):
    """SwiGLU's ``silu(gate) * up`` of gate_up [..., 2I] (``chunk(2, -1)``: gate first; F.silu rounded to the
    dtype, then the product), the online Hadamard if the checkpoint has one, then down_proj. On the kernel path
    without an online Hadamard, where the routed kernel reads quantized activations, one fused op
    (``silu_mul_quantize_act``) makes and quantizes the activation and the GEMM reads that."""

    def __init__(self, linear: nn.Module, online: OnlineHadamard | None) -> None:
        super().__init__()
        self.linear, self.online = linear, online

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        kernel = None if self.online is not None else _prequantized_kernel(self.linear, gate_up)
        if kernel is None:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
            if self.online is not None:
                act = self.online(act)
            return self.linear(act)
        lin = self.linear
        qx, sx = lin.build.silu_mul_quantize_act(gate_up, lin.packed.group, kernel.act_format, kernel.act_bits)
        return lin.gemm(qx, sx, kernel)


class Rope(nn.Module):
    """Rotary embeddings in the rotate-half convention of transformers' LLaMA, as cos and signed-sin tables:
    ``x·cos + roll(x, D/2)·sin±`` with ``sin± = [-sin, sin]`` is ``x·cos + rotate_half(x)·sin``."""

    def __init__(self, config: DecoderConfig, max_positions: int, device) -> None:
        """Tables for ``max_positions`` rounded up as caches are (:data:`cache.ALIGN`): a cache made for at most
        that many positions never holds one beyond the tables."""
        super().__init__()
        max_positions = -(-max_positions // ALIGN) * ALIGN
        d = config.head_dim
        inv = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv)
        self.register_buffer("cos", angles.cos().repeat(1, 2).to(config.dtype))
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], 1).to(config.dtype))

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin± at ``positions`` [T], shaped to broadcast over [B, T, heads, D]."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class Attention(nn.Module):
    """Self-attention of the residual stream h: ``qkv`` (a :class:`NormLinear`) normalises and projects it."""

    def __init__(self, config: DecoderConfig, qkv: NormLinear, o: nn.Module) -> None:
        super().__init__()
        self.config, self.qkv, self.o = config, qkv, o

    def forward(self, h: torch.Tensor, rope: tuple, cache: tuple | None, pos: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        b, t, _ = h.shape
        heads, kv_heads, d = c.num_heads, c.num_kv_heads, c.head_dim
        qkv = self.qkv(h)
        qk = Rope.apply(qkv[..., :c.q_dim + c.kv_dim].view(b, t, heads + kv_heads, d), *rope)
        q, k = qk[:, :, :heads], qk[:, :, heads:]
        v = qkv[..., c.q_dim + c.kv_dim:].view(b, t, kv_heads, d)
        if pos is None:
            out = self._prefill(q, k, v, cache)
        else:
            out = self._decode(q, k, v, cache, pos, mask)
        return self.o(out)

    def _prefill(self, q, k, v, cache) -> torch.Tensor:
        """Causal self-attention over the prompt (positions 0..T-1), whose K/V then fill the cache's start."""
        b, t, heads, d = q.shape
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            cache[0][:, :, :t].copy_(k)
            cache[1][:, :, :t].copy_(v)
        group = heads // k.shape[1]
        if group > 1:  # shared K/V heads repeated: every SDPA backend (flash included) takes the plain form
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True)
        return out.transpose(1, 2).reshape(b, t, heads * d)

    def _decode(self, q, k, v, cache, pos, mask) -> torch.Tensor:
        """One new token a sequence at ``pos``: its K/V written into the cache, attention over the cache (every
        position, masked beyond ``pos``: a static shape). The query heads sharing a K/V head are that head's
        queries, so SDPA reads each K/V head once without repeating it."""
        b, _, heads, d = q.shape
        kv_heads = k.shape[2]
        cache[0].index_copy_(2, pos, k.transpose(1, 2))
        cache[1].index_copy_(2, pos, v.transpose(1, 2))
        out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, heads // kv_heads, d), cache[0], cache[1],
                                             attn_mask=mask)
        return out.reshape(b, 1, heads * d)


class MLP(nn.Module):
    """SwiGLU of the residual stream h: ``gate_up`` (a :class:`NormLinear`) normalises and projects it, ``down``
    (a :class:`SiluMulLinear`) makes the activation and projects it."""

    def __init__(self, gate_up: NormLinear, down: SiluMulLinear) -> None:
        super().__init__()
        self.gate_up, self.down = gate_up, down

    @property
    def online(self) -> OnlineHadamard | None:
        return self.down.online

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up(h))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, weights: LayerWeights, build=None) -> None:
        super().__init__()
        p = weights.projections
        lin = {kind: make_linear(p[kind], build) for kind in KINDS}
        input_norm = RMSNorm(weights.input_norm, config.rms_norm_eps)
        post_norm = RMSNorm(weights.post_norm, config.rms_norm_eps)
        self.attn = Attention(config, NormLinear(input_norm, lin["qkv_proj"]), lin["o_proj"])
        online = None if weights.online is None else weights.online.to(config.dtype)  # in place: shared by layers
        self.mlp = MLP(NormLinear(post_norm, lin["gate_up_proj"]), SiluMulLinear(lin["down_proj"], online))

    def forward(self, h, rope, cache, pos, mask):
        h = h + self.attn(h, rope, cache, pos, mask)
        return h + self.mlp(h)

    def weight_tensors(self, one_layout: bool = False) -> list:
        linears = (self.attn.qkv.linear, self.attn.o, self.mlp.gate_up.linear, self.mlp.down.linear)
        online = [] if self.mlp.online is None else list(self.mlp.online.buffers())
        norms = [self.attn.qkv.norm.weight, self.mlp.gate_up.norm.weight]
        return [t for m in linears for t in m.weight_tensors(one_layout)] + norms + online


class Decoder(nn.Module):
    """The model. ``forward(ids)`` is prefill from position 0 (``cache`` optional: filled when given);
    ``forward(ids [B, 1], cache, pos)`` is one decode step. Logits of the last position only unless
    ``all_logits``."""

    def __init__(self, weights: ModelWeights, build=None, max_positions: int = 4096) -> None:
        super().__init__()
        config = weights.config
        self.config = config
        self.register_buffer("embed", weights.embed)
        self.layers = nn.ModuleList(DecoderLayer(config, weights.layer(i), build) for i in range(config.num_layers))
        self.norm = RMSNorm(weights.norm, config.rms_norm_eps)
        self.register_buffer("lm_head", weights.lm_head)
        self.rope = Rope(config, max_positions, weights.embed.device)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, pos: torch.Tensor | None = None,
                all_logits: bool = False) -> torch.Tensor:
        h = F.embedding(ids, self.embed)
        if pos is None:
            rope = self.rope.tables(torch.arange(ids.shape[1], device=ids.device))
            mask = None
        else:
            rope = self.rope.tables(pos)
            mask = cache.mask(pos)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, None if cache is None else cache.layer(i), pos, mask)
        if not all_logits:
            h = h[:, -1:]
        return F.linear(self.norm(h), self.lm_head)

    def decoder_weight_bytes(self, one_layout: bool = False) -> int:
        """Bytes of the decoder layers' weights as held (kernel layouts, scales, norms, the online transform;
        a tensor shared by layers counted once); ``one_layout``: as if each GEMM's kernels read one layout."""
        tensors = {t.data_ptr(): t for layer in self.layers for t in layer.weight_tensors(one_layout)
                   if t is not None}
        return sum(t.numel() * t.element_size() for t in tensors.values())
