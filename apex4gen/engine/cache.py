"""A static KV cache: [layers, batch, kv heads, positions, head dim] for K and for V, allocated once, so a decode
step reads and writes fixed addresses (CUDA-graph capturable). A cache of batch B serves any batch b <= B
through :meth:`KVCache.narrow` (views of the first b sequences)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DecoderConfig

ALIGN = 16  # positions


@dataclass(frozen=True)
class KVCache:
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor  # arange(S): the decode mask compares it with the current position

    @classmethod
    def allocate(cls, config: DecoderConfig, batch: int, length: int, device) -> "KVCache":
        """Room for at least ``length`` positions, rounded up to a multiple of ALIGN: SDPA's memory-efficient
        kernel takes a mask whose rows are 16-byte aligned as is (others are padded on every call)."""
        length = -(-length // ALIGN) * ALIGN
        shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
        return cls(torch.zeros(shape, dtype=config.dtype, device=device),
                   torch.zeros(shape, dtype=config.dtype, device=device),
                   torch.arange(length, device=device))

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def narrow(self, batch: int) -> "KVCache":
        return KVCache(self.k[:, :batch], self.v[:, :batch], self.positions)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[index], self.v[index]

    def mask(self, pos: torch.Tensor) -> torch.Tensor:
        """Additive attention mask [1, 1, 1, S] for a token at ``pos`` (a 1-element tensor): 0 up to ``pos``,
        -inf beyond."""
        allowed = self.positions <= pos
        zero = torch.zeros((), dtype=self.k.dtype, device=self.k.device)
        return torch.where(allowed, zero, float("-inf")).view(1, 1, 1, -1)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
