"""Weight layouts: documented pack functions from the canonical form to what a kernel family reads.

A family names its layout in ``Family.weight_layout``; :func:`pack` turns a quantized weight
(``apex4gen.reference.QuantizedTensor``: int values [N, K] and scales [N, K/group]) into the tensors the
kernel receives as ``qw`` and ``sw``. Each pack function is registered with :func:`layout` and runs on any
device in plain PyTorch: it is the documentation of its layout and the tests' oracle. What runs is the
library's C packing (runtime/pack.cuh, pack.cu: ``apex4gen_<prefix>_pack_weight``, called by ``Build.pack`` and
by other engines), which tests/test_pack.py holds equal to these functions bit for bit. Kernel engineers: add
your function below its own section header, its rule to pack.cuh and its number to the C ABI's
``apex4gen_weight_layout``.
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
# mma's a0/a1 (half 0) and a2/a3 (half 1) registers holding value * 16.
# Scales [N/16 row tiles][K/group][16 rows]: a row tile's scales of one group are 32 contiguous bytes, so a block
# copies its slice's scales in 16-byte pieces (per-channel, one group: the canonical [N] order).
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
    groups = w.scales.shape[1]
    scales = w.scales.reshape(n // 16, 16, groups).permute(0, 2, 1)
    return packed.reshape(n, k // 2).contiguous(), scales.reshape(n, groups).contiguous()


def unpack_sm90_decode(qw: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_sm90_decode`'s weight part: int8 values [N, K] (tests and debugging)."""
    p = qw.reshape(n // 16, k // 64, 8, 4, 2, 2, 4)
    both = torch.stack(((p >> 4) & 0xF, p & 0xF), dim=-1).to(torch.int16)  # [..., b, row half]
    vals = torch.where(both >= 8, both - 16, both).to(torch.int8)
    vals = vals.permute(0, 7, 2, 1, 4, 5, 3, 6)  # [tile, row half, gid, chunk, step, half, t, b]
    return vals.reshape(n, k).contiguous()


# --- sm90_prefill (sm90_prefill_group and sm90_prefill_channel): reordered int4 weights, scales transposed -----
# qw: byte tensor [N, K/2] (same size as canonical) in CUTLASS's offline reordering for mixed-input wgmma:
# cutlass::compute_memory_reordering_atom<e4m3>() (default arguments; int8 gives the same) tiled over (N, K) by
# tile_to_shape. An atom is one warp's 16 x 32 wgmma A fragment, laid out so that each lane's 16 values (8 bytes) are
# contiguous; SM90_PREFILL_ATOM is that cute layout, (row, k) -> element offset, as (shape, stride) of (row modes,
# k modes) (the template static_asserts that CUTLASS computes exactly this). Atoms tile N first, then K: atom (N/16
# index r, K/32 index c) starts at element 512 * (c * N/16 + r). Two int4 values a byte, low nibble first
# (int4b_t). sw: [K/group, N] contiguous, in the stored dtype, so that one K tile's channel scales are
# contiguous and copy 16 bytes at a time (per-channel: [1, N], the canonical [N] order).
SM90_PREFILL_ATOM = (((8, 2), (4, 4, 2)), ((64, 4), (1, 16, 8)))
SM90_PREFILL_ATOM_ROWS, SM90_PREFILL_ATOM_K = 16, 32


def _cute_offset(index: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """cute's colexicographic (first mode fastest) map of a 1-D index through one (shape, stride) mode."""
    offset = 0
    for extent, step in zip(shape, stride):
        offset += (index % extent) * step
        index //= extent
    return offset


def _sm90_prefill_atom_order() -> torch.Tensor:
    """order[e] = row * 32 + k of the value at element offset e of an atom."""
    (row_shape, k_shape), (row_stride, k_stride) = SM90_PREFILL_ATOM
    order = torch.empty(SM90_PREFILL_ATOM_ROWS * SM90_PREFILL_ATOM_K, dtype=torch.long)
    for row in range(SM90_PREFILL_ATOM_ROWS):
        for k in range(SM90_PREFILL_ATOM_K):
            e = _cute_offset(row, row_shape, row_stride) + _cute_offset(k, k_shape, k_stride)
            order[e] = row * SM90_PREFILL_ATOM_K + k
    return order


@layout("sm90_prefill")
def pack_sm90_prefill(w: reference.QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    rows, kk = SM90_PREFILL_ATOM_ROWS, SM90_PREFILL_ATOM_K
    if n % rows or k % kk:
        raise ValueError(f"sm90_prefill layout needs N % {rows} == 0 and K % {kk} == 0; got N={n} K={k}")
    atoms = w.q.reshape(n // rows, rows, k // kk, kk).permute(2, 0, 1, 3).reshape(k // kk, n // rows, rows * kk)
    ordered = atoms[..., _sm90_prefill_atom_order().to(w.q.device)]
    return reference.pack_int4(ordered.reshape(n, k)).contiguous(), w.scales.t().contiguous()


def unpack_sm90_prefill(qw: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_sm90_prefill`'s weight part: int8 values [N, K] (tests and debugging)."""
    rows, kk = SM90_PREFILL_ATOM_ROWS, SM90_PREFILL_ATOM_K
    ordered = reference.unpack_int4(qw.reshape(n, k // 2)).reshape(k // kk, n // rows, rows * kk)
    atoms = torch.empty_like(ordered)
    atoms[..., _sm90_prefill_atom_order().to(qw.device)] = ordered
    return atoms.reshape(k // kk, n // rows, rows, kk).permute(1, 2, 0, 3).reshape(n, k).contiguous()
