"""The numeric values of the C ABI's enums (runtime/apex4gen.h), keyed by apex4gen's names for them.

One table for the build (which spells them in C++ through :mod:`apex4gen.kernels.cpp_names`) and the loader
(which passes them through ctypes); tests/test_abi.py checks both against the header. Standard library only:
the runtime side imports it without the compiler.
"""
from __future__ import annotations

from types import MappingProxyType

# apex4gen_dtype: output (and activation) dtypes, named as plans and manifests name them
DTYPE = MappingProxyType({"f16": 0, "bf16": 1})
# apex4gen_act_format: storage of quantized activations, named as kernel families name them
ACT_FORMAT = MappingProxyType({"s4": 0, "s8": 1, "e4m3": 2, "raw": 3})
# apex4gen_weight_layout: how a kernel reads the weights, named as apex4gen/kernels/layouts.py names them
WEIGHT_LAYOUT = MappingProxyType({"canonical": 0, "sm90_decode": 1, "sm90_prefill": 2})
# the layouts whose weight scales apex4gen_pack_weight writes transposed, [K/group, N] (the others: [N, K/group])
SCALES_TRANSPOSED = frozenset({"sm90_prefill"})
# apex4gen_status: what every ABI call returns
STATUS = MappingProxyType({"ok": 0, "bad_shape": 1, "bad_argument": 2, "cuda_error": 3, "no_kernel": 4,
                           "workspace": 5})
