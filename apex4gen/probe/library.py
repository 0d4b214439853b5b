"""The probe library's C ABI (templates/probe.cu.jinja) through ctypes."""
from __future__ import annotations

import ctypes
from pathlib import Path

from ..errors import LoadError
from .catalog import Probe
from .source import ABI_VERSION

# cudaDeviceAttr values (CUDA runtime, driver_types.h): stable across CUDA 11-13
ATTRIBUTES = {"clock_khz": 13, "sm_count": 16, "l2_bytes": 38, "max_threads_per_sm": 39, "smem_per_block_optin": 97}

_SIGNATURES = {
    "apex4gen_probe_abi_version": (ctypes.c_int, []),
    "apex4gen_probe_count": (ctypes.c_int, []),
    "apex4gen_probe_name": (ctypes.c_char_p, [ctypes.c_int]),
    "apex4gen_probe_run": (ctypes.c_int, [ctypes.c_int, ctypes.c_longlong, ctypes.c_uint, ctypes.c_float,
                                          ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.POINTER(ctypes.c_int)]),
    "apex4gen_probe_stream": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                             ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
    "apex4gen_probe_attribute": (ctypes.c_int, [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]),
    "apex4gen_probe_driver_version": (ctypes.c_int, []),
}


class ProbeLibrary:
    """The loops of one arch, checked against the catalog they were rendered from."""

    def __init__(self, path: Path, probes: tuple[Probe, ...]):
        try:
            self._lib = ctypes.CDLL(str(path))
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(self._lib, name)
                fn.restype, fn.argtypes = restype, argtypes
        except (OSError, AttributeError) as err:
            raise LoadError(f"cannot load the probe library {path}: {err}; delete its folder to rebuild it") from None
        names = tuple(self._lib.apex4gen_probe_name(i).decode() for i in range(self._lib.apex4gen_probe_count()))
        if self._lib.apex4gen_probe_abi_version() != ABI_VERSION or names != tuple(p.name for p in probes):
            raise LoadError(f"the probe library {path} does not match this apex4gen; delete its folder to rebuild it")
        self.index = {p.name: i for i, p in enumerate(probes)}

    def run(self, probe: Probe, iters: int, seed: int, sink: int, stream: int) -> int:
        """Launch one loop on a full grid; returns the grid's CTA count."""
        blocks = ctypes.c_int(0)
        status = self._lib.apex4gen_probe_run(self.index[probe.name], iters, seed, 1.0001, 0.5, sink, stream,
                                              ctypes.byref(blocks))
        _check(status, f"probe {probe.name}")
        return blocks.value

    def stream(self, src: int, vecs: int, blocks: int, threads: int, stride: bool, sink: int, stream: int) -> None:
        _check(self._lib.apex4gen_probe_stream(src, vecs, blocks, threads, int(stride), sink, stream), "weight stream")

    def attribute(self, name: str) -> int:
        value = ctypes.c_int(0)
        _check(self._lib.apex4gen_probe_attribute(ATTRIBUTES[name], ctypes.byref(value)), f"device attribute {name}")
        return value.value

    def driver_version(self) -> int:
        return self._lib.apex4gen_probe_driver_version()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed (status {status}): the CUDA launch was refused")
