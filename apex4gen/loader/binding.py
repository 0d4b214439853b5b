"""The C ABI (runtime/apex4gen.h) through ctypes: the argument struct, every function's signature, and status
codes turned into exceptions."""
from __future__ import annotations

import ctypes
from pathlib import Path

from .. import abi
from ..errors import LoadError, ShapeError


class GemmArgs(ctypes.Structure):
    """Mirror of apex4gen_gemm_args."""

    _fields_ = [
        ("qx", ctypes.c_void_p), ("sx", ctypes.c_void_p), ("qw", ctypes.c_void_p), ("sw", ctypes.c_void_p),
        ("bias", ctypes.c_void_p), ("y", ctypes.c_void_p),
        ("m", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int), ("group", ctypes.c_int),
        ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_size_t),
    ]


_c_int, _c_void_p, _c_size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
# name -> (return type, argument types); enums travel as int
SIGNATURES = {
    "apex4gen_quantize_act": (_c_int, [_c_void_p, _c_int, _c_int, _c_int, _c_int, _c_int, _c_int, _c_void_p,
                                       _c_void_p, _c_void_p]),
    "apex4gen_status_string": (ctypes.c_char_p, [_c_int]),
    "apex4gen_num_kernels": (_c_int, []),
    "apex4gen_kernel_name": (ctypes.c_char_p, [_c_int]),
    "apex4gen_kernel_act_format": (_c_int, [_c_int]),
    "apex4gen_select_kernel": (_c_int, [_c_int, _c_int, _c_int, _c_int, _c_int]),
    "apex4gen_kernel_workspace": (_c_size_t, [_c_int, _c_int, _c_int, _c_int]),
    "apex4gen_run_kernel": (_c_int, [_c_int, ctypes.POINTER(GemmArgs), _c_void_p]),
    "apex4gen_build_arch": (_c_int, []),
}


def open_library(path: Path) -> ctypes.CDLL:
    """The build's library with every ABI function typed."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise LoadError(f"cannot load {path}: {err}") from None
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def check_status(lib: ctypes.CDLL, status: int, what: str) -> None:
    """A shape the kernel cannot take is the caller's to fix (ShapeError); anything else is a runtime failure."""
    if status != abi.STATUS["ok"]:
        text = lib.apex4gen_status_string(status).decode()
        if status == abi.STATUS["bad_shape"]:
            raise ShapeError(f"{what} failed: {text}")
        raise RuntimeError(f"{what} failed: {text}")
