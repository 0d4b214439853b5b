"""The C ABI (runtime/apex4gen.h) through ctypes: the argument struct, every function's signature, and status
codes turned into exceptions. A build exports each function as apex4gen_<prefix>_<name> (apex4gen/library.py);
:class:`Library` holds them under their source names (apex4gen_<name>)."""
from __future__ import annotations

import ctypes
from pathlib import Path

from .. import abi
from ..errors import LoadError, ShapeError
from ..library import LibraryFiles


class GemmArgs(ctypes.Structure):
    """Mirror of apex4gen_gemm_args."""

    _fields_ = [
        ("qx", ctypes.c_void_p), ("sx", ctypes.c_void_p), ("qw", ctypes.c_void_p), ("sw", ctypes.c_void_p),
        ("bias", ctypes.c_void_p), ("y", ctypes.c_void_p),
        ("m", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int), ("group", ctypes.c_int),
        ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_size_t),
    ]


_c_int, _c_void_p, _c_size_t, _c_char_p = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
_c_float = ctypes.c_float
_c_int_p, _c_void_pp = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_void_p)
# name -> (return type, argument types); enums travel as int; the order of APEX4GEN_FUNCTIONS
SIGNATURES = {
    "apex4gen_abi_version": (_c_int, []),
    "apex4gen_version": (_c_char_p, []),
    "apex4gen_build_arch": (_c_int, []),
    "apex4gen_status_string": (_c_char_p, [_c_int]),
    "apex4gen_num_problems": (_c_int, []),
    "apex4gen_problem": (_c_int, [_c_int, _c_int_p, _c_int_p, _c_int_p, _c_int_p, _c_int_p]),
    "apex4gen_num_kernels": (_c_int, []),
    "apex4gen_kernel_name": (_c_char_p, [_c_int]),
    "apex4gen_kernel_act_format": (_c_int, [_c_int]),
    "apex4gen_kernel_act_bits": (_c_int, [_c_int]),
    "apex4gen_kernel_weight_layout": (_c_int, [_c_int]),
    "apex4gen_weight_layouts": (ctypes.c_uint, [_c_int, _c_int, _c_int, _c_int]),
    "apex4gen_pack_weight": (_c_int, [_c_int, _c_void_p, _c_void_p, _c_int, _c_int, _c_int, _c_void_p, _c_void_p,
                                      _c_void_p]),
    "apex4gen_prepared_weight_bytes": (_c_size_t, [_c_int, _c_int, _c_int, _c_int]),
    "apex4gen_prepare_weight": (_c_int, [_c_void_p, _c_void_p, _c_int, _c_int, _c_int, _c_int, _c_void_p,
                                         _c_size_t, _c_void_p]),
    "apex4gen_prepared_operands": (_c_int, [_c_int, _c_void_p, _c_int, _c_int, _c_int, _c_int, _c_void_pp,
                                            _c_void_pp]),
    "apex4gen_quantize_act": (_c_int, [_c_void_p, _c_int, _c_int, _c_int, _c_int, _c_int, _c_int, _c_int,
                                       _c_void_p, _c_void_p, _c_void_p]),
    "apex4gen_rmsnorm_quantize_act": (_c_int, [_c_void_p, _c_int, _c_void_p, _c_float, _c_int, _c_int, _c_int, _c_int,
                                               _c_int, _c_int, _c_void_p, _c_void_p, _c_void_p]),
    "apex4gen_silu_mul_quantize_act": (_c_int, [_c_void_p, _c_int, _c_int, _c_int, _c_int, _c_int, _c_int, _c_int,
                                                _c_void_p, _c_void_p, _c_void_p]),
    "apex4gen_select_kernel": (_c_int, [_c_int, _c_int, _c_int, _c_int, _c_int, _c_int]),
    "apex4gen_kernel_workspace": (_c_size_t, [_c_int, _c_int, _c_int, _c_int]),
    "apex4gen_run_kernel": (_c_int, [_c_int, ctypes.POINTER(GemmArgs), _c_void_p]),
}


class Library:
    """A build's ABI functions, typed, under their source names, bound to the library's prefixed symbols."""

    def __init__(self, cdll: ctypes.CDLL, files: LibraryFiles):
        self.cdll = cdll
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(cdll, files.symbol(name[len("apex4gen_"):]))
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)


def open_library(path: Path, prefix: str) -> Library:
    """The build's library with every ABI function typed."""
    try:
        return Library(ctypes.CDLL(str(path)), LibraryFiles(prefix))
    except (OSError, AttributeError) as err:
        raise LoadError(f"cannot load {path}: {err}; rebuild it with `apex4gen build`") from None


def check_status(lib: Library, status: int, what: str) -> None:
    """A shape the kernel cannot take is the caller's to fix (ShapeError); anything else is a runtime failure."""
    if status != abi.STATUS["ok"]:
        text = lib.apex4gen_status_string(status).decode()
        if status == abi.STATUS["bad_shape"]:
            raise ShapeError(f"{what} failed: {text}")
        raise RuntimeError(f"{what} failed: {text}")
