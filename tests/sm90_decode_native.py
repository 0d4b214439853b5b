"""Build and call sm90_decode kernels without apex4gen.loader: render -> nvcc -> .so -> ctypes.

Used by tests/test_sm90_decode.py and bench/sm90_decode_bench.py until the loader serves these families;
then ``DecodeKernel`` is the only piece to swap for ``apex4gen.loader``. Rendering and compiling need the
CUTLASS headers and nvcc; loading and calling need only torch with CUDA (the device machine has no CUTLASS,
so libraries are built here and carried there together with ``manifest.json``).
"""
from __future__ import annotations

import ctypes
import json
import subprocess
from pathlib import Path

import torch

from apex4gen.kernels import KernelConfig
from apex4gen.kernels import sm90_decode
from apex4gen.kernels.layouts import pack
from apex4gen import reference
from apex4gen.loader import GemmArgs  # the ABI struct, defined once

_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
STATUS_OK = 0


def decode_config(group: int, out_dtype: str) -> KernelConfig:
    """The one configuration of each family (group 0 = per-channel)."""
    t = sm90_decode.TILES[0]
    family = "sm90_decode_channel" if group == 0 else "sm90_decode"
    return KernelConfig(family, "sm_90a", "int8", group, t.tile_m, t.tile_n, t.tile_k, t.warps_m, t.warps_n,
                        sm90_decode.VARIANTS_GROUP[1].p, 1, out_dtype)


def build_library(cfg: KernelConfig, out_dir: Path) -> tuple[Path, str]:
    """Render and compile one kernel into ``out_dir/<name>.so``; returns the path and ptxas' report."""
    from apex4gen.emit import render_kernel
    from apex4gen.paths import runtime_dir
    from apex4gen.toolchain import cutlass_include_dirs, nvcc_flags, nvcc_path

    out_dir.mkdir(parents=True, exist_ok=True)
    name = cfg.procedural_name()
    src = out_dir / f"{name}.cu"
    src.write_text(render_kernel(cfg))
    lib = out_dir / f"{name}.so"
    cmd = [nvcc_path(), *nvcc_flags(cfg.arch, [*cutlass_include_dirs(), runtime_dir()]), "-shared",
           "-Xptxas", "-v", "-o", str(lib), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"nvcc failed for {name}:\n{done.stderr[-4000:]}")
    return lib, done.stderr


def write_manifest(out_dir: Path, libs: dict[str, KernelConfig]) -> None:
    """``{file: config}`` so a machine without CUTLASS can load the carried libraries."""
    (out_dir / "manifest.json").write_text(json.dumps({f: c.to_dict() for f, c in libs.items()}, indent=1))


def read_manifest(lib_dir: Path) -> dict[str, KernelConfig]:
    raw = json.loads((lib_dir / "manifest.json").read_text())
    return {f: KernelConfig.from_dict(d) for f, d in raw.items()}


class DecodeKernel:
    """One loaded launcher: ``kernel(x, qw, sw, bias, y)`` runs on the current stream and returns the status."""

    def __init__(self, lib_path: Path, cfg: KernelConfig):
        self.cfg = cfg
        self.lib = ctypes.CDLL(str(lib_path))
        name = cfg.procedural_name()
        self.fn = getattr(self.lib, name)
        self.fn.argtypes = [ctypes.POINTER(GemmArgs), ctypes.c_void_p]
        self.fn.restype = ctypes.c_int
        self.workspace_fn = getattr(self.lib, f"{name}_workspace")
        self.workspace_fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.workspace_fn.restype = ctypes.c_size_t
        self.split_fn = getattr(self.lib, f"{name}_split")
        self.split_fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.split_fn.restype = ctypes.c_int
        self.dtype = _DTYPES[cfg.out_dtype]
        self._workspace: torch.Tensor | None = None

    def workspace(self, m: int, n: int, k: int, device: torch.device) -> torch.Tensor:
        """The launcher's workspace, grown on demand and kept, as the loader's caching allocator would: the
        first call of a shape must come before any graph capture."""
        need = self.workspace_fn(m, n, k)
        if self._workspace is None or self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=torch.uint8, device=device)
        return self._workspace

    def args(self, x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
             y: torch.Tensor) -> GemmArgs:
        m, k = x.shape
        n = y.shape[1]
        group = self.cfg.group or k
        ws = self.workspace(m, n, k, x.device)
        return GemmArgs(x.data_ptr(), None, qw.data_ptr(), sw.data_ptr(),
                        bias.data_ptr() if bias is not None else None, y.data_ptr(), m, n, k, group,
                        ws.data_ptr(), ws.numel())

    def split(self, m: int, n: int, k: int) -> int:
        """The cluster split of K the launcher picks on the current device (0: the shape is refused)."""
        return self.split_fn(m, n, k)

    def __call__(self, x, qw, sw, bias, y) -> int:
        a = self.args(x, qw, sw, bias, y)
        return self.fn(ctypes.byref(a), ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))


def pack_weight(w: reference.QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    qw, sw = pack(sm90_decode.SM90_DECODE.weight_layout, w)
    return qw.contiguous(), sw.contiguous()


def check_against_reference(kernel: DecodeKernel, x: torch.Tensor, w: reference.QuantizedTensor,
                            qw: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """Run on NaN-poisoned output; compare with reference_linear within gemm_tolerance."""
    m, n = x.shape[0], w.shape[0]
    y = torch.full((m, n), float("nan"), dtype=kernel.dtype, device=x.device)
    status = kernel(x, qw, sw, bias, y)
    torch.cuda.synchronize()
    if status != STATUS_OK:
        return {"ok": False, "status": status}
    xq = reference.quantize_activation(x, w.group)
    ref = reference.gemm(xq, w, bias, kernel.dtype).double()
    tol = reference.gemm_tolerance(xq, w, kernel.dtype, bias)
    err = (y.double() - ref).abs()
    finite = bool(torch.isfinite(y).all())
    worst = float((err / tol).nan_to_num(float("inf")).max())
    rel = float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))
    return {"ok": finite and worst <= 1.0, "status": status, "worst_err_over_tol": worst, "rel_l2": rel}
