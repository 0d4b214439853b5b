"""The online Hadamard before down_proj, applied fast: ``x @ T`` for ``T = diag(s) (F_1 ⊗ ... ⊗ F_m) / c``
(``c`` normalises: the square root of the product of the ±1 factors' sizes).

x [..., n] is scaled by the signs, viewed as [rows, n_1, ..., n_m], and each small ±1 factor is applied along
its axis by one batched matmul on a reshape that needs no copy (axis i: [rows·n_1···n_(i-1), n_i, rest] times
``F_i^T`` from the left): ``n · Σ n_i`` multiply-adds a row instead of the dense ``n²``. A factor given as an
int is an identity of that size (a block-diagonal transform): nothing runs for it.

``T`` comes either from a checkpoint (the dense matrix the rotation stored, recognised here once at load as a
randomized Kronecker Hadamard of :mod:`apex4gen.accuracy.rotation`), or, for random-weight models, from
:func:`for_size`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..accuracy.rotation import hadamard, hadamard_factors
from ..errors import SpecError

# the largest factor applied as a small matmul: beyond it a factor is close to a dense transform
MAX_FACTOR = 256


class OnlineHadamard(nn.Module):
    """``x @ T`` for x [..., n]; the result keeps x's dtype (matmuls accumulate in fp32)."""

    def __init__(self, signs: torch.Tensor, factors: list[torch.Tensor | int]) -> None:
        super().__init__()
        self.sizes = tuple(int(f.shape[0]) if isinstance(f, torch.Tensor) else int(f) for f in factors)
        self.n = signs.numel()
        if math.prod(self.sizes) != self.n:
            raise ValueError(f"factor sizes {self.sizes} do not multiply to {self.n}")
        self.dense_axes = tuple(i for i, f in enumerate(factors) if isinstance(f, torch.Tensor))
        # the ±1 factors' product has rows of norm sqrt(product of their sizes): that normalises T
        norm = math.sqrt(math.prod(self.sizes[i] for i in self.dense_axes))
        self.register_buffer("scale", signs.float() / norm)
        for i in self.dense_axes:
            # F_i^T: a left multiplication applies F_i along its axis of the row-major view
            self.register_buffer(f"factor{i}", factors[i].float().t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = x * self.scale.to(x.dtype)
        rows = y.numel() // self.n
        for i in self.dense_axes:
            before = rows * math.prod(self.sizes[:i])
            after = math.prod(self.sizes[i + 1:])
            f = getattr(self, f"factor{i}").to(x.dtype)
            y = torch.matmul(f, y.reshape(before, self.sizes[i], after))
        return y.reshape(*lead, self.n)

    def dense(self) -> torch.Tensor:
        """The matrix ``T`` (float64, on the CPU), for tests and checks."""
        k = torch.ones(1, 1, dtype=torch.float64)
        for i, size in enumerate(self.sizes):
            f = getattr(self, f"factor{i}").t() if i in self.dense_axes else torch.eye(size)
            k = torch.kron(k, f.double().cpu().contiguous())
        return self.scale.double().cpu().unsqueeze(1) * k

    def extra_repr(self) -> str:
        return f"n={self.n}, factors={self.sizes}"


def from_dense(t: torch.Tensor, where: str) -> OnlineHadamard:
    """The fast form of a stored online rotation ``t`` [n, n]; a matrix of no such form is refused (applying it
    would be a dense n x n matmul per token)."""
    n = t.shape[0]
    factors = hadamard_factors(n, MAX_FACTOR) if t.dim() == 2 and t.shape[1] == n else None
    if factors is not None:
        h = hadamard(n)
        signs = torch.sign((t.double() * h).sum(1))
        if torch.all(signs != 0) and torch.allclose(t.double(), signs.unsqueeze(1) * h / math.sqrt(n), atol=1e-6):
            return OnlineHadamard(signs, factors)
    raise SpecError(f"{where}: the online rotation of order {n} is not a randomized Kronecker Hadamard, so it has "
                    "no fast form; quantize with --rotate on a model whose intermediate size has one")


def for_size(n: int, seed: int = 0) -> OnlineHadamard:
    """A randomized Hadamard transform of order ``n`` for a model with random weights: the rotation's Kronecker
    Hadamard where all its factors are small, else a block-diagonal one (a Sylvester Hadamard on the largest
    power-of-two block up to :data:`MAX_FACTOR` dividing n; 11008 = 43 blocks of 256), the same cost class."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    factors = hadamard_factors(n, MAX_FACTOR)
    if factors is not None and max(f.shape[0] for f in factors) <= MAX_FACTOR:
        return OnlineHadamard(signs, list(factors))
    block = math.gcd(n, MAX_FACTOR)
    if block < 2:
        raise SpecError(f"no fast Hadamard transform of order {n}")
    return OnlineHadamard(signs, [n // block, hadamard(block)])
