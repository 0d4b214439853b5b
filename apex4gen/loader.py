"""Load: open a build's shared library and serve its kernels to PyTorch as ``torch.ops.apex4gen.*``.

The library's C ABI (runtime/apex4gen.h) is called through ctypes on the current CUDA stream; the ops are
``torch.library`` custom ops with fake implementations, so they work under torch.compile and CUDA graphs
(no host synchronisation, no allocation inside the library).
"""
from __future__ import annotations

import ctypes
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import reference
from .build import MANIFEST
from .emit import sha256_text
from .errors import LoadError, ShapeError
from .kernels import layouts

ACT_S4, ACT_S8, ACT_E4M3, ACT_RAW = 0, 1, 2, 3
_ACT_FORMAT = {"s4": ACT_S4, "s8": ACT_S8, "e4m3": ACT_E4M3, "raw": ACT_RAW}
_DTYPE = {torch.float16: 0, torch.bfloat16: 1}
_DTYPE_NAME = {torch.float16: "f16", torch.bfloat16: "bf16"}


class GemmArgs(ctypes.Structure):
    """Mirror of apex4gen_gemm_args."""

    _fields_ = [
        ("qx", ctypes.c_void_p), ("sx", ctypes.c_void_p), ("qw", ctypes.c_void_p), ("sw", ctypes.c_void_p),
        ("bias", ctypes.c_void_p), ("y", ctypes.c_void_p),
        ("m", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int), ("group", ctypes.c_int),
        ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_size_t),
    ]


def _bind(lib: ctypes.CDLL) -> None:
    c_int, c_void_p, c_size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
    sig = {
        "apex4gen_quantize_act": (c_int, [c_void_p, c_int, c_int, c_int, c_int, c_int, c_int, c_void_p, c_void_p,
                                          c_void_p]),
        "apex4gen_status_string": (ctypes.c_char_p, [c_int]),
        "apex4gen_num_kernels": (c_int, []),
        "apex4gen_kernel_name": (ctypes.c_char_p, [c_int]),
        "apex4gen_kernel_act_format": (c_int, [c_int]),
        "apex4gen_select_kernel": (c_int, [c_int, c_int, c_int, c_int, c_int]),
        "apex4gen_kernel_workspace": (c_size_t, [c_int, c_int, c_int, c_int]),
        "apex4gen_run_kernel": (c_int, [c_int, ctypes.POINTER(GemmArgs), c_void_p]),
        "apex4gen_build_arch": (c_int, []),
    }
    for name, (restype, argtypes) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


@dataclass(frozen=True)
class KernelInfo:
    index: int
    name: str
    act_format: str
    weight_layout: str
    config: dict


class Build:
    """A loaded build. ``pack`` prepares a layer's weights once; ``linear`` runs the W4A4 op."""

    def __init__(self, build_dir: Path, manifest: dict, lib: ctypes.CDLL, handle: int):
        self.build_dir = build_dir
        self.manifest = manifest
        self.lib = lib
        self.handle = handle
        self.kernels = tuple(KernelInfo(k["index"], k["name"], k["act_format"], k["weight_layout"], k["config"])
                             for k in manifest["kernels"])

    def __repr__(self) -> str:
        return f"Build({self.build_dir}, gpu={self.manifest['gpu']}, kernels={len(self.kernels)})"

    def select(self, m: int, n: int, k: int, group: int, dtype: torch.dtype) -> KernelInfo:
        idx = self.lib.apex4gen_select_kernel(m, n, k, group, _DTYPE[dtype])
        if idx < 0:
            raise ShapeError(f"this build has no kernel for M={m} N={n} K={k} group={group} {_DTYPE_NAME[dtype]}; "
                             f"planned problems: {self.problems()}; re-plan with this shape")
        return self.kernels[idx]

    def problems(self) -> str:
        seen = sorted({(r["n"], r["k"], r["group"], r["dtype"]) for r in self.manifest["routes"]})
        return ", ".join(f"N={n} K={k} g={g} {d}" for n, k, g, d in seen)

    def layouts_for(self, n: int, k: int, group: int, dtype: torch.dtype) -> tuple[str, ...]:
        names = {self.kernels[r["kernel"]].weight_layout for r in self.manifest["routes"]
                 if (r["n"], r["k"], r["group"], r["dtype"]) == (n, k, group, _DTYPE_NAME[dtype])}
        if not names:
            self.select(1, n, k, group, dtype)  # raises the one-line error
        return tuple(sorted(names))

    def pack(self, w: reference.QuantizedTensor) -> "PackedWeight":
        """Weights in every layout this build's kernels for the problem read (usually exactly one)."""
        n, k = w.shape
        dtype = w.scales.dtype
        packed = {}
        for name in self.layouts_for(n, k, w.group, dtype):
            qw, sw = layouts.pack(name, w)
            packed[name] = (qw.contiguous(), sw.contiguous())
        return PackedWeight(n, k, w.group, dtype, packed)

    def linear(self, x: torch.Tensor, w: "PackedWeight", bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """y = W4A4(x, w) + bias; ``out`` (a [M, N] tensor of x's dtype) receives it when given."""
        info = self.select(x.shape[0], w.n, w.k, w.group, x.dtype)
        qw, sw = w.layouts[info.weight_layout]
        if out is None:
            return torch.ops.apex4gen.linear(x, qw, sw, bias, w.n, w.group, self.handle, info.index)
        torch.ops.apex4gen.linear_out(x, qw, sw, bias, out, w.group, self.handle, info.index)
        return out

    def gemm(self, qx: torch.Tensor, sx: torch.Tensor, w: "PackedWeight", kernel: KernelInfo,
             bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The GEMM alone on activations quantized beforehand (in ``kernel.act_format``): GEMMs that read
        one activation (q, k and v; gate and up) quantize it once."""
        if kernel.act_format == "raw":
            raise ShapeError(f"kernel {kernel.name} quantizes its own input; call linear() instead")
        y = out if out is not None else torch.empty((qx.shape[0], w.n), dtype=w.dtype, device=qx.device)
        qw, sw = w.layouts[kernel.weight_layout]
        torch.ops.apex4gen.gemm_out(qx, sx, qw, sw, bias, y, w.k, w.group, self.handle, kernel.index)
        return y

    def quantize_act(self, x: torch.Tensor, group: int, fmt: str = "s4") -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.apex4gen.quantize_act(x, group, _ACT_FORMAT[fmt], self.handle)


@dataclass(frozen=True)
class PackedWeight:
    n: int
    k: int
    group: int
    dtype: torch.dtype
    layouts: dict


_BUILDS: list[Build] = []


def load(build_dir: str | Path) -> Build:
    """Load a build directory made by ``apex4gen build``; says so when it cannot run on this GPU."""
    build_dir = Path(build_dir)
    manifest_path = build_dir / MANIFEST
    if not manifest_path.is_file():
        raise LoadError(f"{build_dir} is not a finished apex4gen build (no {MANIFEST}); run `apex4gen build`")
    manifest = _read_manifest(build_dir)
    _check_device(manifest)
    try:
        lib = ctypes.CDLL(str(build_dir / manifest["library"]))
    except OSError as err:
        raise LoadError(f"cannot load {build_dir / manifest['library']}: {err}") from None
    _bind(lib)
    _register_ops()
    build = Build(build_dir, manifest, lib, len(_BUILDS))
    _BUILDS.append(build)
    return build


_MANIFEST_KEYS = ("arch", "gpu", "kernels", "library", "plan_sha256", "ptx_embedded", "routes", "sm")


def _read_manifest(build_dir: Path) -> dict:
    """The manifest, checked to be whole and to describe the plan.yaml beside it (a build that stopped between
    writing a new plan and linking leaves them apart)."""
    rebuild = f"rebuild it with `apex4gen build --plan {build_dir / 'plan.yaml'} --out {build_dir}`"
    try:
        manifest = json.loads((build_dir / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise LoadError(f"{build_dir / MANIFEST} is unreadable ({err}); {rebuild}") from None
    missing = [key for key in _MANIFEST_KEYS if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise LoadError(f"{build_dir / MANIFEST} lacks {', '.join(missing)}; {rebuild}")
    plan_path = build_dir / "plan.yaml"
    if not plan_path.is_file() or sha256_text(plan_path.read_text()) != manifest["plan_sha256"]:
        raise LoadError(f"{build_dir}'s library was not built from the plan.yaml beside it; {rebuild}")
    return manifest


def _check_device(manifest: dict) -> None:
    if not torch.cuda.is_available():
        raise LoadError("no CUDA GPU here: a build can be made but not loaded; run on the GPU it targets")
    major, minor = torch.cuda.get_device_capability()
    here = 10 * major + minor
    built = manifest["sm"]
    name = torch.cuda.get_device_name()
    if here == built:
        return
    if manifest["ptx_embedded"] and here > built:
        warnings.warn(f"build for sm_{built} ({manifest['gpu']}) runs on {name} (sm_{here}) through the driver's "
                      "PTX JIT: results are right, speed is not that GPU's", stacklevel=3)
        return
    raise LoadError(f"build {manifest['gpu']} is for {manifest['arch']}, this GPU is {name} (sm_{here}); "
                    f"build for this GPU with `apex4gen build --gpu <its spec>`")


def _check(build: Build, status: int, what: str) -> None:
    if status != 0:
        text = build.lib.apex4gen_status_string(status).decode()
        raise ShapeError(f"{what} failed: {text}") if status == 1 else RuntimeError(f"{what} failed: {text}")


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def quantized_act_shape(m: int, k: int, group: int, fmt: int) -> tuple[tuple[int, int], torch.dtype]:
    if fmt == ACT_S4:
        return (m, k // 2), torch.uint8
    if fmt == ACT_S8:
        return (m, k), torch.int8
    return (m, k), torch.float8_e4m3fn


def _quantize_act_impl(x: torch.Tensor, group: int, fmt: int, handle: int) -> tuple[torch.Tensor, torch.Tensor]:
    build = _BUILDS[handle]
    m, k = x.shape
    shape, dtype = quantized_act_shape(m, k, group, fmt)
    qx = torch.empty(shape, dtype=dtype, device=x.device)
    sx = torch.empty((m, k // group), dtype=torch.float32, device=x.device)
    status = build.lib.apex4gen_quantize_act(x.data_ptr(), x.stride(0), _DTYPE[x.dtype], m, k, group, fmt,
                                             qx.data_ptr(), sx.data_ptr(), _stream())
    _check(build, status, "activation quantization")
    return qx, sx


def _linear_impl(x, qw, sw, bias, y: torch.Tensor, group: int, handle: int, kernel: int) -> None:
    build = _BUILDS[handle]
    _check_out(y, x.shape[0], x.dtype)
    fmt = _ACT_FORMAT[build.kernels[kernel].act_format]
    if fmt == ACT_RAW:
        qx, sx = x, None
    else:
        qx, sx = _quantize_act_impl(x, group, fmt, handle)
    _gemm_impl(qx, sx, qw, sw, bias, y, x.shape[1], group, handle, kernel)


def _check_out(y: torch.Tensor, m: int, dtype: torch.dtype) -> None:
    if y.dim() != 2 or y.shape[0] != m or y.dtype != dtype or not y.is_contiguous():
        raise ShapeError(f"out must be a contiguous [{m}, N] {dtype} tensor, got {tuple(y.shape)} {y.dtype}")


def _gemm_impl(qx, sx, qw, sw, bias, y: torch.Tensor, k: int, group: int, handle: int, kernel: int) -> None:
    build = _BUILDS[handle]
    m, n = y.shape
    ws_bytes = build.lib.apex4gen_kernel_workspace(kernel, m, n, k)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=y.device) if ws_bytes else None
    args = GemmArgs(qx.data_ptr(), _ptr(sx), qw.data_ptr(), sw.data_ptr(), _ptr(bias), y.data_ptr(),
                    m, n, k, group, _ptr(ws), ws_bytes)
    _check(build, build.lib.apex4gen_run_kernel(kernel, ctypes.byref(args), _stream()),
           f"kernel {build.kernels[kernel].name} (M={m} N={n} K={k})")


_REGISTERED = False


def _register_ops() -> None:
    """Define torch.ops.apex4gen.{quantize_act, linear} once per process."""
    global _REGISTERED
    if _REGISTERED:
        return

    @torch.library.custom_op("apex4gen::quantize_act", mutates_args=())
    def quantize_act(x: torch.Tensor, group: int, fmt: int, handle: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_input(x, group)
        return _quantize_act_impl(x.contiguous(), group, fmt, handle)

    @quantize_act.register_fake
    def _(x, group, fmt, handle):
        m, k = x.shape
        shape, dtype = quantized_act_shape(m, k, group, fmt)
        return x.new_empty(shape, dtype=dtype), x.new_empty((m, k // group), dtype=torch.float32)

    @torch.library.custom_op("apex4gen::linear", mutates_args=())
    def linear(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None, n: int,
               group: int, handle: int, kernel: int) -> torch.Tensor:
        _check_input(x, group)
        y = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
        _linear_impl(x.contiguous(), qw, sw, bias, y, group, handle, kernel)
        return y

    @linear.register_fake
    def _(x, qw, sw, bias, n, group, handle, kernel):
        return x.new_empty((x.shape[0], n))

    @torch.library.custom_op("apex4gen::linear_out", mutates_args=("y",))
    def linear_out(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
                   y: torch.Tensor, group: int, handle: int, kernel: int) -> None:
        _check_input(x, group)
        _linear_impl(x.contiguous(), qw, sw, bias, y, group, handle, kernel)

    @linear_out.register_fake
    def _(x, qw, sw, bias, y, group, handle, kernel):
        return None

    @torch.library.custom_op("apex4gen::gemm_out", mutates_args=("y",))
    def gemm_out(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
                 y: torch.Tensor, k: int, group: int, handle: int, kernel: int) -> None:
        _check_out(y, qx.shape[0], sw.dtype)
        _gemm_impl(qx, sx, qw, sw, bias, y, k, group, handle, kernel)

    @gemm_out.register_fake
    def _(qx, sx, qw, sw, bias, y, k, group, handle, kernel):
        return None

    _REGISTERED = True


def _check_input(x: torch.Tensor, group: int) -> None:
    if x.dim() != 2 or x.dtype not in _DTYPE or not x.is_cuda:
        raise ShapeError(f"activations must be a 2-D float16/bfloat16 CUDA tensor, got {tuple(x.shape)} "
                         f"{x.dtype} on {x.device}")
    if x.shape[1] % group:
        raise ShapeError(f"K={x.shape[1]} is not a multiple of the group size {group}")
