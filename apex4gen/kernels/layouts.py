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
