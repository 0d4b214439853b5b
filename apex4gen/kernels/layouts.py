"""Weight layouts: documented pack functions from the canonical form to what a kernel family reads.

A family names its layout in ``Family.weight_layout``; :func:`pack` turns a quantized weight
(``apex4gen.reference.QuantizedTensor``: int values [N, K] and scales [N, K/group]) into the tensors the
kernel receives as ``qw`` and ``sw``. Each pack function is registered with :func:`layout` and runs on any
device in plain PyTorch. Kernel engineers: add your function below its own section header.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import reference

PackFn = Callable[[reference.QuantizedTensor], tuple[torch.Tensor, torch.Tensor]]
LAYOUTS: dict[str, PackFn] = {}


def layout(name: str):
    def register(fn: PackFn) -> PackFn:
        if name in LAYOUTS:
            raise ValueError(f"weight layout {name!r} registered twice")
        LAYOUTS[name] = fn
        return fn
    return register


def pack(name: str, w: reference.QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        fn = LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown weight layout {name!r}; known: {', '.join(sorted(LAYOUTS))}") from None
    return fn(w)


# --- canonical: packed int4 [N, K/2] (reference.pack_int4), scales [N, K/group] as stored -----------------
@layout("canonical")
def pack_canonical(w: reference.QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.pack_int4(w.q), w.scales


# --- sm90_decode: int4 weights in m16n8k32 int8 mma A-fragment order, one 16-byte load a lane ----------------
# Byte tensor [N, K/2] (same size as canonical), ordered [N/16 row tiles][K/64 chunks][32 lanes][16 bytes].
# Lane (gid = lane // 4, t = lane % 4) of row tile r, chunk c holds 4 words; word (2*step + half), byte b:
#   high nibble = q[16r + gid,     64c + 32*step + 16*half + 4t + b]
#   low nibble  = q[16r + gid + 8, 64c + 32*step + 16*half + 4t + b]
# so masking the high nibbles (w & 0xF0F0F0F0) and the shifted low ones ((w << 4) & 0xF0F0F0F0) gives the
# mma's a0/a1 (half 0) and a2/a3 (half 1) registers holding value * 16. Scales stay canonical [N, K/group].
SM90_DECODE_ROWS, SM90_DECODE_CHUNK = 16, 64


@layout("sm90_decode")
def pack_sm90_decode(w: reference.QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    if n % SM90_DECODE_ROWS or k % SM90_DECODE_CHUNK:
        raise ValueError(f"sm90_decode layout needs N % {SM90_DECODE_ROWS} == 0 and K % {SM90_DECODE_CHUNK} == 0; "
                         f"got N={n} K={k}")
    nib = (w.q.to(torch.int16) & 0xF).to(torch.uint8)
    # [row tile, row half (gid / gid+8), gid, chunk, step, half, t, b]
    v = nib.reshape(n // 16, 2, 8, k // 64, 2, 2, 4, 4)
    v = v.permute(0, 3, 2, 6, 4, 5, 7, 1)  # [tile, chunk, gid, t, step, half, b, row half]
    packed = (v[..., 0] << 4) | v[..., 1]
    return packed.reshape(n, k // 2).contiguous(), w.scales


def unpack_sm90_decode(qw: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_sm90_decode`'s weight part: int8 values [N, K] (tests and debugging)."""
    p = qw.reshape(n // 16, k // 64, 8, 4, 2, 2, 4)
    both = torch.stack(((p >> 4) & 0xF, p & 0xF), dim=-1).to(torch.int16)  # [..., b, row half]
    vals = torch.where(both >= 8, both - 16, both).to(torch.int8)
    vals = vals.permute(0, 7, 2, 1, 4, 5, 3, 6)  # [tile, row half, gid, chunk, step, half, t, b]
    return vals.reshape(n, k).contiguous()


# --- sm90_group (sm90_prefill_group, g128 prefill): canonical packed int4 weights, scales transposed ------------
# qw: canonical [N, K/2] (CUTLASS's int4b_t K-major; TMA reads it as is). sw: [K/group, N] contiguous, in the
# stored dtype, so that one K tile's channel scales are contiguous and copy 16 bytes at a time.
@layout("sm90_group")
def pack_sm90_group(w: reference.QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.pack_int4(w.q), w.scales.t().contiguous()
