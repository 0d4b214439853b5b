"""The online Hadamard before down_proj, applied fast: ``x @ T`` for ``T = diag(s) (L ⊗ R) / c``, with ±1
Hadamard matrices ``L`` [a, a] and ``R`` [b, b] (n = a·b) and ``c = sqrt(a·b)`` normalising.

x [..., n] is scaled by ``s / c`` and viewed as [rows, a, b]; ``L`` applies along the middle axis as one batched
matmul (``L^T`` times each [a, b] block) and ``R`` along the last as one plain GEMM ([rows·a, b] times ``R``):
``n·(a + b)`` multiply-adds a row instead of the dense ``n²``, on tensor cores in the model's dtype. ``L`` may
be an identity (a block-diagonal transform): then only the GEMM runs.

``T`` comes from a checkpoint (the dense matrix stored by the rotation, recognised once at load as a randomized
Kronecker Hadamard of :mod:`apex4gen.accuracy.rotation`, whose parts are split in two where ``a + b`` is
smallest) or, for random-weight models, from :func:`for_size`.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..accuracy.rotation import hadamard, hadamard_factors
from ..errors import SpecError

BLOCK = 256          # the block of a block-diagonal transform (random-weight models whose Hadamard is not small)
MAX_COST = 1024      # a + b beyond which a random-weight model takes the block-diagonal transform


class OnlineHadamard(nn.Module):
    """``x @ T`` for x [..., n]. Buffers follow the module's dtype (``.to(dtype)`` once, at model build);
    matmuls accumulate in fp32."""

    def __init__(self, signs: torch.Tensor, left: torch.Tensor | int, right: torch.Tensor) -> None:
        super().__init__()
        self.a = left if isinstance(left, int) else int(left.shape[0])
        self.b = int(right.shape[0])
        self.n = signs.numel()
        if self.a * self.b != self.n:
            raise ValueError(f"factors {self.a} x {self.b} do not make {self.n}")
        norm = math.sqrt(self.b if isinstance(left, int) else self.n)
        self.register_buffer("scale", signs.float() / norm)
        # L^T: a left multiplication of each [a, b] block applies L along the rows of the row-major view
        self.register_buffer("left", None if isinstance(left, int) else left.float().t().contiguous())
        self.register_buffer("right", right.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = x * _as(self.scale, x)
        if self.left is not None:
            y = torch.matmul(_as(self.left, x), y.reshape(-1, self.a, self.b))
        return (y.reshape(-1, self.b) @ _as(self.right, x)).reshape(*lead, self.n)

    def dense(self) -> torch.Tensor:
        """The matrix ``T`` (float64, on the CPU), for tests and checks."""
        eye = self.left is None
        left = torch.eye(self.a, dtype=torch.float64) if eye else self.left.t().double().cpu().contiguous()
        return self.scale.double().cpu().unsqueeze(1) * torch.kron(left, self.right.double().cpu())

    def extra_repr(self) -> str:
        return f"n={self.n}, factors={self.a}x{self.b}" + (" (block-diagonal)" if self.left is None else "")


def _as(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in x's dtype: a no-op once the model moved the module to its dtype."""
    return t if t.dtype == x.dtype else t.to(x.dtype)


def _kron(parts) -> torch.Tensor:
    return functools.reduce(torch.kron, parts)


def _split(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two Kronecker groups of consecutive ``parts`` with the fewest multiply-adds (smallest a + b)."""
    sizes = [p.shape[0] for p in parts]
    best = min(range(1, len(parts)), key=lambda s: math.prod(sizes[:s]) + math.prod(sizes[s:]))
    return _kron(parts[:best]), _kron(parts[best:])


def _parts(n: int) -> list[torch.Tensor] | None:
    return hadamard_factors(n, max_factor=1)  # nothing merged: the construction's own parts


def from_dense(t: torch.Tensor, where: str) -> OnlineHadamard:
    """The fast form of a stored online rotation ``t`` [n, n]; a matrix of no such form is refused (applying it
    would be a dense n x n matmul per token)."""
    n = t.shape[0]
    parts = _parts(n) if t.dim() == 2 and t.shape[1] == n else None
    if parts is not None and len(parts) > 1:
        h = hadamard(n)
        signs = torch.sign((t.double() * h).sum(1))
        if torch.all(signs != 0) and torch.allclose(t.double(), signs.unsqueeze(1) * h / math.sqrt(n), atol=1e-6):
            return OnlineHadamard(signs, *_split(parts))
    raise SpecError(f"{where}: the online rotation of order {n} is not a randomized Kronecker Hadamard, so it has "
                    "no fast form; quantize with --rotate on a model whose intermediate size has one")


def for_size(n: int, seed: int = 0) -> OnlineHadamard:
    """A randomized Hadamard transform of order ``n`` for a model with random weights: the rotation's Kronecker
    Hadamard where it splits into two small factors (a + b <= MAX_COST), else a block-diagonal one: Sylvester
    Hadamards on blocks of the largest power of two up to BLOCK dividing n (11008 = 43 blocks of 256)."""
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    parts = _parts(n)
    if parts is not None and len(parts) > 1:
        left, right = _split(parts)
        if left.shape[0] + right.shape[0] <= MAX_COST:
            return OnlineHadamard(signs, left, right)
    block = math.gcd(n, BLOCK)
    if block < 2:
        raise SpecError(f"no fast Hadamard transform of order {n}")
    return OnlineHadamard(signs, n // block, hadamard(block))
