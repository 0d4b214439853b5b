"""QuaRot-style rotation of a LLaMA-family model: exact in full precision, friendlier to 4-bit.

An orthogonal ``Q`` applied to the residual stream moves outlier channels' energy across all channels, so
per-token / per-group absmax scales waste fewer levels. The model computes the same function because:

1. every RMSNorm's weight is folded into the linears that read it (RMSNorm without weight commutes with an
   orthogonal ``Q``: ``||x Q|| = ||x||``);
2. the embeddings become ``E Q``; linears reading the residual (q, k, v, gate, up, lm_head) become ``W Q``;
   linears writing it (o_proj, down_proj) become ``Q^T W``; the tied lm_head is untied for this;
3. each value head is rotated by a head-size Hadamard folded into v_proj's rows and o_proj's columns, so
   o_proj's input is rotated too at no run-time cost;
4. down_proj's input (the FFN activation, not in the residual stream) gets an *online* Hadamard ``T``:
   ``down_proj.input_transform = T`` and its weight becomes ``W T``; :class:`apex4gen.nn.W4A4Linear` applies
   ``T`` before quantizing. ``T`` is applied as a Kronecker product of small Hadamards
   (:func:`apply_transform`: 1536 = 48 x 32, ``n * (48 + 32)`` multiply-adds per token instead of ``n**2``),
   recognised from the dense matrix, which stays the stored form (checkpoints, kernels).

The residual's matrix ``Q`` is folded entirely into weights, so any orthogonal matrix costs nothing at run time.
By default it is one randomized Hadamard of order d. :func:`group_rotation` (``--group-rotation``) is instead
block-diagonal after a channel permutation: one Hadamard per activation group of q/k/v and gate/up (64 values for
SmolLM2), over channels ordered by how strongly the layers read them (:func:`channel_order`). A full Hadamard
gives every group a share of the few massive residual channels, so every group's absmax scale is set by them;
grouped, they inflate only the scales of the groups they fall in.

Matrices are randomized Hadamards ``diag(±1) H / sqrt(n)``. Sizes that are not powers of two (SmolLM2:
576 = 12·12·4, 1536 = 12·128) use Kronecker products of Sylvester (2^k) and Paley-I (q+1 for a prime
q ≡ 3 mod 4, e.g. 12, 20, 24, 44, 48) Hadamard matrices, which cover most model sizes. A size with no such
factorization falls back to a seeded random orthogonal matrix (QR of a Gaussian): the model stays exact,
outliers are still spread (with less uniform coefficients), but no fast Hadamard kernel can apply it.
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref

import torch
from torch import nn

from ..nn import W4A4Linear, clip_activation


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley(order: int) -> torch.Tensor:
    """Paley construction I: Hadamard matrix of order q+1 for a prime q ≡ 3 (mod 4)."""
    q = order - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in residues else -1.0 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]  # Jacobsthal matrix, skew-symmetric for q ≡ 3 mod 4
    s = torch.zeros(order, order, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jac
    return s + torch.eye(order, dtype=torch.float64)


def _paley_order(n: int) -> bool:
    return n % 4 == 0 and _is_prime(n - 1) and (n - 1) % 4 == 3


@functools.lru_cache(maxsize=None)
def _hadamard_parts(n: int) -> tuple[torch.Tensor, ...] | None:
    """Small ±1 Hadamard matrices whose Kronecker product is the Hadamard matrix of order ``n`` used here:
    H2's for a power of two (Sylvester), else the smallest Paley-I order p dividing n with a constructible
    n/p first (1536 = 12·128, 576 = 12·12·4), so that the online transform is cheap; or None."""
    if n & (n - 1) == 0:
        return (_sylvester(2),) * (n.bit_length() - 1) or (_sylvester(1),)
    for p in range(12, n // 2 + 1, 4):
        if n % p == 0 and _paley_order(p):
            rest = _hadamard_parts(n // p)
            if rest is not None:
                return (_paley(p),) + rest
    if _paley_order(n):
        return (_paley(n),)
    return None


@functools.lru_cache(maxsize=None)
def hadamard(n: int) -> torch.Tensor | None:
    """An unnormalized ±1 Hadamard matrix of order ``n`` (float64), or None if none is constructed."""
    parts = _hadamard_parts(n)
    return None if parts is None else functools.reduce(torch.kron, parts)


def hadamard_factors(n: int, max_factor: int = 64) -> list[torch.Tensor] | None:
    """±1 matrices whose Kronecker product is exactly :func:`hadamard` ``(n)``: its parts, adjacent ones
    merged while their product stays <= ``max_factor``; or None."""
    parts = _hadamard_parts(n)
    if parts is None:
        return None
    merged = [parts[0]]
    for f in parts[1:]:
        if merged[-1].shape[0] * f.shape[0] <= max_factor:
            merged[-1] = torch.kron(merged[-1], f)
        else:
            merged.append(f)
    return merged


class _FastTransform:
    """``x @ T`` for ``T = diag(s) kron(F_1, ..., F_m) / sqrt(n)``: x is scaled by the signs, viewed as
    [M, n_1, ..., n_m] and each small ±1 factor is applied along its axis -- ``n * sum(n_i)`` multiply-adds
    per row instead of ``n**2`` (1536 = 64 * 24: 17x fewer), the same linear map up to fp32 rounding."""

    def __init__(self, signs: torch.Tensor, factors: list[torch.Tensor], device: torch.device) -> None:
        n = signs.numel()
        self.signs = signs.to(device=device, dtype=torch.float32)
        self.factors = [f.to(device=device, dtype=torch.float32) for f in factors]
        self.sizes = [f.shape[0] for f in factors]
        self.norm = 1.0 / math.sqrt(n)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = (x.float() * self.signs).reshape(-1, *self.sizes)
        m = len(self.sizes)
        for axis, f in enumerate(self.factors):
            if axis == m - 1:
                y = y @ f
            else:
                y = (y.movedim(axis + 1, -1) @ f).movedim(-1, axis + 1)
        return (y * self.norm).reshape(*lead, -1)


_FAST: dict[int, tuple] = {}  # id(T) -> (weakref to T, T._version, _FastTransform or None)


def _fast_transform(t: torch.Tensor) -> "_FastTransform | None":
    """The structured form of an orthogonal ``t`` made by :func:`random_orthogonal` (found once per tensor,
    verified against the dense matrix), else None."""
    hit = _FAST.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    fast = None
    n = t.shape[0]
    factors = hadamard_factors(n) if t.dim() == 2 and t.shape[1] == n else None
    if factors is not None and len(factors) > 1:
        h = hadamard(n).to(t.device)
        signs = torch.sign((t.double() * h).sum(1))
        if torch.all(signs != 0) and torch.allclose(t.double(), signs.unsqueeze(1) * h / n ** 0.5, atol=1e-6):
            fast = _FastTransform(signs, factors, t.device)
    for key in [k for k, v in _FAST.items() if v[0]() is None]:
        del _FAST[key]
    _FAST[id(t)] = (weakref.ref(t), t._version, fast)
    return fast


def apply_transform(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(x.float() @ t).to(x.dtype)``; a randomized Hadamard of Kronecker form is applied fast."""
    fast = _fast_transform(t)
    y = fast(x) if fast is not None else x.float() @ t
    return y.to(x.dtype)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """``diag(±1) H / sqrt(n)`` with random signs, or a random orthogonal matrix when no Hadamard of order
    ``n`` is constructed (float64, [n, n])."""
    gen = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is None:
        warnings.warn(f"no Hadamard matrix of order {n} known here: using a random orthogonal matrix", stacklevel=2)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return signs.unsqueeze(1) * h / n ** 0.5


class RotatedInputLinear(nn.Linear):
    """``nn.Linear`` whose input is first multiplied by the orthogonal ``input_transform`` (online rotation)."""

    def __init__(self, linear: nn.Linear, transform: torch.Tensor) -> None:
        """``transform``: fp32 [in_features, in_features], orthogonal."""
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("input_transform", transform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(apply_transform(x, self.input_transform))


def linear_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the matrix of ``module`` actually multiplies: ``x`` after its online rotation, if any."""
    t = getattr(module, "input_transform", None)
    return x if t is None else apply_transform(x, t)


class OnlineRotatedW4A4Linear(W4A4Linear):
    """:class:`W4A4Linear` applying its ``input_transform`` with :func:`apply_transform` (fast Kronecker
    Hadamard) instead of a dense matmul: same function, same buffers and checkpoint as its base class."""

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = apply_transform(x, self.input_transform)
        if self.act_clip < 1.0:
            x = clip_activation(x, self.group, self.act_clip)
        return x



def set_fast_online_rotation(model: nn.Module, fast: bool = True) -> nn.Module:
    """Switch every :class:`W4A4Linear` with an online rotation to :class:`OnlineRotatedW4A4Linear` (``fast``)
    or back to the plain class (dense matmul, the exact arithmetic of a loaded checkpoint); in place."""
    for module in model.modules():
        if isinstance(module, W4A4Linear) and module.input_transform is not None:
            module.__class__ = OnlineRotatedW4A4Linear if fast else W4A4Linear
    return model


def _set(linear: nn.Linear, w: torch.Tensor) -> None:
    linear.weight.data = w.to(linear.weight.dtype).contiguous()


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    gamma = norm.weight.detach().double()
    for lin in readers:
        _set(lin, lin.weight.detach().double() * gamma.unsqueeze(0))
    norm.weight.data = torch.ones_like(norm.weight)


def _read_rotated(linears: list[nn.Linear], q: torch.Tensor) -> None:
    for lin in linears:
        _set(lin, lin.weight.detach().double() @ q)


def _write_rotated(linears: list[nn.Linear], q: torch.Tensor) -> None:
    for lin in linears:
        _set(lin, q.t() @ lin.weight.detach().double())
        if lin.bias is not None:
            lin.bias.data = (lin.bias.detach().double() @ q).to(lin.bias.dtype)


def _rotate_heads(v_proj: nn.Linear, o_proj: nn.Linear, head_dim: int, hq: torch.Tensor) -> None:
    """Rotate each value head by ``hq``: v rows ``Hq^T W_h`` and its bias ``Hq^T b_h`` (Qwen2 has one: the head's
    output ``Hq^T (W_h x + b_h)`` is what o_proj's rotated columns undo), o columns ``W_h Hq``."""
    wv = v_proj.weight.detach().double()
    wv = torch.cat([hq.t() @ blk for blk in wv.split(head_dim, dim=0)], 0)
    _set(v_proj, wv)
    if v_proj.bias is not None:
        bv = v_proj.bias.detach().double()
        v_proj.bias.data = torch.cat([hq.t() @ blk for blk in bv.split(head_dim)]).to(v_proj.bias.dtype)
    wo = o_proj.weight.detach().double()
    _set(o_proj, torch.cat([blk @ hq for blk in wo.split(head_dim, dim=1)], 1))


def group_rotation(order: torch.Tensor, block: int, seed: int) -> torch.Tensor:
    """``P diag(±1) blockdiag(H_block, ...)`` (float64, [n, n]): the channels taken in ``order`` (a permutation
    of ``range(n)``), consecutive runs of ``block`` of them rotated by one Hadamard each, random signs by
    ``seed``. Each run is one activation group of the readers, so a group's absmax scale adapts to its channels'
    size instead of every group carrying a share of the few massive channels (see :func:`channel_order`)."""
    n = order.numel()
    if n % block:
        raise ValueError(f"a block of {block} does not divide {n} channels")
    perm = torch.zeros(n, n, dtype=torch.float64)
    perm[order, torch.arange(n)] = 1.0
    h = hadamard(block)
    if h is None:
        warnings.warn(f"no Hadamard matrix of order {block} known here: its blocks get random orthogonal ones",
                      stacklevel=2)
        blocks = [random_orthogonal(block, seed + 1 + i) for i in range(n // block)]
    else:
        blocks = [h / block ** 0.5] * (n // block)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return perm @ (signs.unsqueeze(1) * torch.block_diag(*blocks))


def reading_weight(model: nn.Module) -> torch.Tensor:
    """How strongly the layers read each residual channel k (float64 [d]): ``sum ||W[:, k] * gamma_k||^2`` over
    every q/k/v and gate/up weight W and its norm's weight gamma."""
    weight = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        for norm, readers in ((layer.input_layernorm, (att.q_proj, att.k_proj, att.v_proj)),
                              (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
            gamma = norm.weight.detach().double()
            for lin in readers:
                weight += (lin.weight.detach().double() * gamma).pow(2).sum(0)
    return weight


def channel_order(model: nn.Module) -> torch.Tensor:
    """The residual channels by decreasing :func:`reading_weight`. :func:`group_rotation` then gives channels
    read alike one activation group: the rounding error a group's absmax scale sets costs output error in
    proportion to how strongly its channels are read, so the heavily read channels share groups of their own.
    Measured on SmolLM2-135M (bench/notes/accuracy.md): better than the channels in place or ordered by their
    energy on calibration tokens."""
    return torch.argsort(reading_weight(model), descending=True, stable=True)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, residual: torch.Tensor | None = None) -> None:
    """Apply the rotation in place to a transformers LLaMA-family ``*ForCausalLM`` (see the module doc);
    ``residual``: the residual stream's orthogonal matrix (float64 [d, d], e.g. :func:`group_rotation`),
    by default a randomized Hadamard of order d."""
    cfg = model.config
    d, ffn = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q = random_orthogonal(d, seed) if residual is None else residual
    t = random_orthogonal(ffn, seed + 1)
    t32 = t.float()  # one tensor shared by every down_proj (the checkpoint stores it once)
    hq = random_orthogonal(head_dim, seed + 2)

    inner = model.model
    _untie(model)
    emb = inner.embed_tokens
    emb.weight.data = (emb.weight.detach().double() @ q).to(emb.weight.dtype)
    for layer in inner.layers:
        att, mlp = layer.self_attn, layer.mlp
        _fold_norm(layer.input_layernorm, [att.q_proj, att.k_proj, att.v_proj])
        _fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        _read_rotated([att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj], q)
        _write_rotated([att.o_proj, mlp.down_proj], q)
        _rotate_heads(att.v_proj, att.o_proj, head_dim, hq)
        _set(mlp.down_proj, mlp.down_proj.weight.detach().double() @ t)
        mlp.down_proj = RotatedInputLinear(mlp.down_proj, t32)
    _fold_norm(inner.norm, [model.lm_head])
    _read_rotated([model.lm_head], q)


def _untie(model: nn.Module) -> None:
    """Give lm_head its own weight: it gets the final norm folded in, the embeddings do not."""
    head, emb = model.lm_head, model.model.embed_tokens
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {}
