"""The user's side of a loaded build: :func:`load` and :class:`Build` (``pack`` a layer's weights once, then
``linear``; ``gemm`` and ``quantize_act`` for callers that quantize one activation for several GEMMs;
``rmsnorm_quantize_act`` and ``silu_mul_quantize_act`` for callers that quantize an activation in the op that
makes it, then ``gemm``)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import abi, manifest as manifest_file, reference
from ..errors import LoadError, ShapeError
from ..manifest import KernelEntry, Manifest
from . import ops
from .binding import Library, check_status, open_library


class Build:
    """A loaded build. ``pack`` prepares a layer's weights once; ``linear`` runs the W4A4 op."""

    def __init__(self, build_dir: Path, manifest: Manifest, lib: Library, handle: int):
        self.build_dir = build_dir
        self.manifest = manifest
        self.lib = lib
        self.handle = handle
        self.kernels = manifest.kernels

    def __repr__(self) -> str:
        return f"Build({self.build_dir}, gpu={self.manifest.gpu}, kernels={len(self.kernels)})"

    def select(self, m: int, n: int, k: int, group: int, dtype: torch.dtype, act_bits: int = 4) -> KernelEntry:
        idx = self.lib.apex4gen_select_kernel(m, n, k, group, act_bits, ops.dtype_enum(dtype))
        if idx < 0:
            raise ShapeError(f"this build has no kernel for M={m} N={n} K={k} group={group} {act_bits}-bit activations "
                             f"{ops.DTYPE_NAME[dtype]}; planned problems: {self.problems()}; re-plan with this shape "
                             "and activation precision")
        return self.kernels[idx]

    def problems(self) -> str:
        seen = sorted({(r.n, r.k, r.group, r.act_bits, r.dtype) for r in self.manifest.routes})
        return ", ".join(f"N={n} K={k} g={g}{'' if b == 4 else f' a{b}'} {d}" for n, k, g, b, d in seen)

    def act_bits_of(self, n: int, k: int, group: int, dtype: torch.dtype) -> tuple[int, ...]:
        """The activation precisions the build's plan routes for a problem (a weight packed once serves all)."""
        return tuple(sorted({r.act_bits for r in self.manifest.routes
                             if (r.n, r.k, r.group, r.dtype) == (n, k, group, ops.DTYPE_NAME[dtype])}))

    def layouts_for(self, n: int, k: int, group: int, dtype: torch.dtype) -> tuple[str, ...]:
        names = {self.kernels[r.kernel].weight_layout for r in self.manifest.routes
                 if (r.n, r.k, r.group, r.dtype) == (n, k, group, ops.DTYPE_NAME[dtype])}
        if not names:
            self.select(1, n, k, group, dtype)  # raises the one-line error
        return tuple(sorted(names))

    def pack(self, w: reference.QuantizedTensor, act_bits: int = 4,
             layouts: tuple[str, ...] | None = None) -> "PackedWeight":
        """Weights in every layout this build's kernels for the problem read (usually exactly one), packed on
        the weight's GPU by the library's apex4gen_pack_weight (what other engines call); ``act_bits``: the
        layer's activation precision (the plan's), which ``linear`` quantizes to. ``layouts`` names the layouts
        instead, for kernels called by index (``linear(..., kernel=)``) whose layout no route reads; the problem
        then need not be one the plan routes."""
        n, k = w.shape
        dtype = w.scales.dtype
        if not w.q.is_cuda:
            raise ShapeError(f"the weight to pack is on {w.q.device}: move it to the GPU first (.cuda())")
        if layouts is None and act_bits not in self.act_bits_of(n, k, w.group, dtype):
            self.select(1, n, k, w.group, dtype, act_bits)  # raises the one-line error
        canonical, scales = reference.pack_int4(w.q).contiguous(), w.scales.contiguous()
        packed = {}
        for name in layouts if layouts is not None else self.layouts_for(n, k, w.group, dtype):
            qw = torch.empty_like(canonical)
            groups = k // w.group
            sw = scales.new_empty((groups, n) if name in abi.SCALES_TRANSPOSED else (n, groups))
            status = self.lib.apex4gen_pack_weight(abi.WEIGHT_LAYOUT[name], canonical.data_ptr(), scales.data_ptr(),
                                                   n, k, w.group, qw.data_ptr(), sw.data_ptr(),
                                                   torch.cuda.current_stream().cuda_stream)
            check_status(self.lib, status, f"packing an N={n} K={k} weight into layout {name}")
            packed[name] = (qw, sw)
        return PackedWeight(n, k, w.group, dtype, packed, act_bits)

    def linear(self, x: torch.Tensor, w: "PackedWeight", bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None, kernel: KernelEntry | None = None) -> torch.Tensor:
        """y = W4A4(x, w) + bias for x [..., K] -> [..., N] (M = every leading dimension together, as
        ``torch.nn.functional.linear``); ``out`` (a contiguous [..., N] tensor of x's dtype) receives it when given.
        ``kernel`` (one of ``kernels``, legal for the problem and M) runs instead of the routed one."""
        info = kernel if kernel is not None else self.select(ops.rows(x), w.n, w.k, w.group, x.dtype, w.act_bits)
        qw, sw = w.layouts[info.weight_layout]
        if out is None:
            return torch.ops.apex4gen.linear(x, qw, sw, bias, w.n, w.group, self.handle, info.index)
        torch.ops.apex4gen.linear_out(x, qw, sw, bias, out, w.group, self.handle, info.index)
        return out

    def gemm(self, qx: torch.Tensor, sx: torch.Tensor, w: "PackedWeight", kernel: KernelEntry,
             bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The GEMM alone on activations quantized beforehand (in ``kernel.act_format``): GEMMs that read
        one activation (q, k and v; gate and up) quantize it once."""
        if kernel.act_format == "raw":
            raise ShapeError(f"kernel {kernel.name} quantizes its own input; call linear() instead")
        y = out if out is not None else torch.empty((*qx.shape[:-1], w.n), dtype=w.dtype, device=qx.device)
        qw, sw = w.layouts[kernel.weight_layout]
        torch.ops.apex4gen.gemm_out(qx, sx, qw, sw, bias, y, w.k, w.group, self.handle, kernel.index)
        return y

    def quantize_act(self, x: torch.Tensor, group: int, fmt: str = "s4",
                     act_bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.apex4gen.quantize_act(x, group, abi.ACT_FORMAT[fmt], self.handle, act_bits)

    def rmsnorm_quantize_act(self, x: torch.Tensor, weight: torch.Tensor, eps: float, group: int, fmt: str = "s4",
                             act_bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """``quantize_act(rms_norm(x, weight, eps), ...)`` in one kernel, the normalised x never written
        (numerics: :func:`apex4gen.reference.rms_norm`); x [..., K], weight [K] of x's dtype."""
        return torch.ops.apex4gen.rmsnorm_quantize_act(x, weight, eps, group, abi.ACT_FORMAT[fmt], self.handle,
                                                       act_bits)

    def silu_mul_quantize_act(self, gate_up: torch.Tensor, group: int, fmt: str = "s4",
                              act_bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """``quantize_act(silu(gate) * up, ...)`` in one kernel for gate_up [..., 2I] (``gate, up =
        gate_up.chunk(2, -1)``; numerics: :func:`apex4gen.reference.silu_mul`); outputs cover I values a row."""
        return torch.ops.apex4gen.silu_mul_quantize_act(gate_up, group, abi.ACT_FORMAT[fmt], self.handle, act_bits)


@dataclass(frozen=True)
class PackedWeight:
    n: int
    k: int
    group: int
    dtype: torch.dtype
    layouts: dict
    act_bits: int = 4  # the layer's activation precision: linear() routes and quantizes by it


def load(build_dir: str | Path) -> Build:
    """Load a build directory made by ``apex4gen build``; says so when it cannot run on this GPU."""
    build_dir = Path(build_dir)
    if not (build_dir / manifest_file.NAME).is_file():
        raise LoadError(f"{build_dir} is not a finished apex4gen build (no {manifest_file.NAME}); "
                        "run `apex4gen build`")
    manifest = manifest_file.read(build_dir)
    _check_device(manifest)
    lib = open_library(build_dir / manifest.library, manifest.prefix)
    return Build(build_dir, manifest, lib, ops.register(lib, manifest.kernels))


def _check_device(manifest: Manifest) -> None:
    if not torch.cuda.is_available():
        raise LoadError("no CUDA GPU here: a build can be made but not loaded; run on the GPU it targets")
    major, minor = torch.cuda.get_device_capability()
    here = 10 * major + minor
    built = manifest.sm
    name = torch.cuda.get_device_name()
    if here == built:
        return
    if manifest.ptx_embedded and here > built:
        warnings.warn(f"build for sm_{built} ({manifest.gpu}) runs on {name} (sm_{here}) through the driver's "
                      "PTX JIT: results are right, speed is not that GPU's", stacklevel=3)
        return
    raise LoadError(f"build {manifest.gpu} is for {manifest.arch}, this GPU is {name} (sm_{here}); "
                    f"build for this GPU with `apex4gen build --gpu <its spec>`")
