"""The PyTorch ops ``torch.ops.apex4gen.{quantize_act, rmsnorm_quantize_act, silu_mul_quantize_act, linear,
linear_out, gemm_out}``: ``torch.library`` custom ops with fake implementations (torch.compile), on the current
CUDA stream, allocating only through PyTorch and never synchronising the host, so they can be captured in CUDA
graphs. Activations may have any leading shape ``[..., K]`` (outputs ``[..., N]``), as
``torch.nn.functional.linear``; the C ABI sees them as [M, K]. The two producer ops return what ``quantize_act``
returns for the activation they make (RMSNorm's output; SiLU(gate) * up of a [..., 2K] gate_up), without
writing that activation.

An op names its build by ``handle`` (what :func:`register` returned) and its kernel by the manifest's index.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from .. import abi
from ..errors import ShapeError
from ..manifest import KernelEntry
from .binding import GemmArgs, Library, check_status

# torch dtypes of activations and outputs, by the names plans and manifests use
DTYPE_NAME = {torch.float16: "f16", torch.bfloat16: "bf16"}
_DTYPE = {dtype: abi.DTYPE[name] for dtype, name in DTYPE_NAME.items()}


@dataclass(frozen=True)
class _Library:
    """What the ops need of a loaded build: its library and its kernels (act formats, names for errors)."""

    lib: Library
    kernels: tuple[KernelEntry, ...]


_LIBRARIES: list[_Library] = []


def register(lib: Library, kernels: tuple[KernelEntry, ...]) -> int:
    """Make a loaded library callable from the ops; returns its handle."""
    _register_ops()
    _LIBRARIES.append(_Library(lib, kernels))
    return len(_LIBRARIES) - 1


def dtype_enum(dtype: torch.dtype) -> int:
    return _DTYPE[dtype]


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def quantized_act_shape(m: int, k: int, group: int, fmt: int) -> tuple[tuple[int, int], torch.dtype]:
    if fmt == abi.ACT_FORMAT["s4"]:
        return (m, k // 2), torch.uint8
    if fmt == abi.ACT_FORMAT["s8"]:
        return (m, k), torch.int8
    return (m, k), torch.float8_e4m3fn


def _quantized_outputs(x: torch.Tensor, m: int, k: int, group: int, fmt: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape, dtype = quantized_act_shape(m, k, group, fmt)
    return (torch.empty(shape, dtype=dtype, device=x.device),
            torch.empty((m, k // group), dtype=torch.float32, device=x.device))


def _quantize_act_impl(x: torch.Tensor, group: int, fmt: int, handle: int,
                       act_bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _LIBRARIES[handle].lib
    m, k = x.shape
    qx, sx = _quantized_outputs(x, m, k, group, fmt)
    status = lib.apex4gen_quantize_act(x.data_ptr(), x.stride(0), _DTYPE[x.dtype], m, k, group, act_bits, fmt,
                                       qx.data_ptr(), sx.data_ptr(), _stream())
    check_status(lib, status, "activation quantization")
    return qx, sx


def _rmsnorm_quantize_act_impl(x: torch.Tensor, weight: torch.Tensor, eps: float, group: int, fmt: int, handle: int,
                               act_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _LIBRARIES[handle].lib
    m, k = x.shape
    qx, sx = _quantized_outputs(x, m, k, group, fmt)
    status = lib.apex4gen_rmsnorm_quantize_act(x.data_ptr(), x.stride(0), weight.data_ptr(), eps, _DTYPE[x.dtype],
                                               m, k, group, act_bits, fmt, qx.data_ptr(), sx.data_ptr(), _stream())
    check_status(lib, status, "RMSNorm with activation quantization")
    return qx, sx


def _silu_mul_quantize_act_impl(gate_up: torch.Tensor, group: int, fmt: int, handle: int,
                                act_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _LIBRARIES[handle].lib
    m, k = gate_up.shape[0], gate_up.shape[1] // 2
    qx, sx = _quantized_outputs(gate_up, m, k, group, fmt)
    status = lib.apex4gen_silu_mul_quantize_act(gate_up.data_ptr(), gate_up.stride(0), _DTYPE[gate_up.dtype], m, k,
                                                group, act_bits, fmt, qx.data_ptr(), sx.data_ptr(), _stream())
    check_status(lib, status, "SiLU(gate) * up with activation quantization")
    return qx, sx


def rows(x: torch.Tensor) -> int:
    """M of an activation [..., K]: every leading dimension together."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> contiguous [M, K]: the C ABI's view of activations."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _flat_out(y: torch.Tensor, lead: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An output [..., N] whose leading dimensions are the activations' ``lead``, as the [M, N] the C ABI writes."""
    if y.dim() != len(lead) + 1 or y.shape[:-1] != lead or y.dtype != dtype or not y.is_contiguous():
        raise ShapeError(f"out must be a contiguous [{', '.join(map(str, lead))}, N] {dtype} tensor, "
                         f"got {tuple(y.shape)} {y.dtype}")
    return y.view(-1, y.shape[-1])


def _linear_impl(x, qw, sw, bias, y: torch.Tensor, group: int, handle: int, kernel: int) -> None:
    _check_out(y, x.shape[0], x.dtype)
    info = _LIBRARIES[handle].kernels[kernel]
    fmt = abi.ACT_FORMAT[info.act_format]
    if fmt == abi.ACT_FORMAT["raw"]:
        qx, sx = x, None
    else:  # the kernel's precision: a kernel built for 8-bit activations reads 8-bit values
        qx, sx = _quantize_act_impl(x, group, fmt, handle, info.act_bits)
    _gemm_impl(qx, sx, qw, sw, bias, y, x.shape[1], group, handle, kernel)


def _check_out(y: torch.Tensor, m: int, dtype: torch.dtype) -> None:
    if y.dim() != 2 or y.shape[0] != m or y.dtype != dtype or not y.is_contiguous():
        raise ShapeError(f"out must be a contiguous [{m}, N] {dtype} tensor, got {tuple(y.shape)} {y.dtype}")


def _gemm_impl(qx, sx, qw, sw, bias, y: torch.Tensor, k: int, group: int, handle: int, kernel: int) -> None:
    library = _LIBRARIES[handle]
    m, n = y.shape
    ws_bytes = library.lib.apex4gen_kernel_workspace(kernel, m, n, k)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=y.device) if ws_bytes else None
    args = GemmArgs(qx.data_ptr(), _ptr(sx), qw.data_ptr(), sw.data_ptr(), _ptr(bias), y.data_ptr(),
                    m, n, k, group, _ptr(ws), ws_bytes)
    check_status(library.lib, library.lib.apex4gen_run_kernel(kernel, ctypes.byref(args), _stream()),
                 f"kernel {library.kernels[kernel].name} (M={m} N={n} K={k})")


def _rows_like(x: torch.Tensor, qx: torch.Tensor, sx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized rows of a flattened x given x's leading dimensions back."""
    return qx.view(*x.shape[:-1], qx.shape[-1]), sx.view(*x.shape[:-1], sx.shape[-1])


_REGISTERED = False


def _register_ops() -> None:
    """Define torch.ops.apex4gen.{quantize_act, rmsnorm_quantize_act, silu_mul_quantize_act, linear, linear_out,
    gemm_out} once per process."""
    global _REGISTERED
    if _REGISTERED:
        return

    @torch.library.custom_op("apex4gen::quantize_act", mutates_args=())
    def quantize_act(x: torch.Tensor, group: int, fmt: int, handle: int,
                     act_bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        _check_input(x, group)
        qx, sx = _quantize_act_impl(_flat(x), group, fmt, handle, act_bits)
        return _rows_like(x, qx, sx)

    @quantize_act.register_fake
    def _(x, group, fmt, handle, act_bits=4):
        return _fake_quantized(x, x.shape[-1], group, fmt)

    @torch.library.custom_op("apex4gen::rmsnorm_quantize_act", mutates_args=())
    def rmsnorm_quantize_act(x: torch.Tensor, weight: torch.Tensor, eps: float, group: int, fmt: int, handle: int,
                             act_bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        _check_input(x, group)
        _check_norm_weight(weight, x)
        qx, sx = _rmsnorm_quantize_act_impl(_flat(x), weight, eps, group, fmt, handle, act_bits)
        return _rows_like(x, qx, sx)

    @rmsnorm_quantize_act.register_fake
    def _(x, weight, eps, group, fmt, handle, act_bits=4):
        return _fake_quantized(x, x.shape[-1], group, fmt)

    @torch.library.custom_op("apex4gen::silu_mul_quantize_act", mutates_args=())
    def silu_mul_quantize_act(gate_up: torch.Tensor, group: int, fmt: int, handle: int,
                              act_bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        _check_gate_up(gate_up, group)
        qx, sx = _silu_mul_quantize_act_impl(_flat(gate_up), group, fmt, handle, act_bits)
        return _rows_like(gate_up, qx, sx)

    @silu_mul_quantize_act.register_fake
    def _(gate_up, group, fmt, handle, act_bits=4):
        return _fake_quantized(gate_up, gate_up.shape[-1] // 2, group, fmt)

    @torch.library.custom_op("apex4gen::linear", mutates_args=())
    def linear(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None, n: int,
               group: int, handle: int, kernel: int) -> torch.Tensor:
        _check_input(x, group)
        y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
        _linear_impl(_flat(x), qw, sw, bias, y.view(-1, n), group, handle, kernel)
        return y

    @linear.register_fake
    def _(x, qw, sw, bias, n, group, handle, kernel):
        return x.new_empty((*x.shape[:-1], n))

    @torch.library.custom_op("apex4gen::linear_out", mutates_args=("y",))
    def linear_out(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
                   y: torch.Tensor, group: int, handle: int, kernel: int) -> None:
        _check_input(x, group)
        _linear_impl(_flat(x), qw, sw, bias, _flat_out(y, x.shape[:-1], x.dtype), group, handle, kernel)

    @linear_out.register_fake
    def _(x, qw, sw, bias, y, group, handle, kernel):
        return None

    @torch.library.custom_op("apex4gen::gemm_out", mutates_args=("y",))
    def gemm_out(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
                 y: torch.Tensor, k: int, group: int, handle: int, kernel: int) -> None:
        y2 = _flat_out(y, qx.shape[:-1], sw.dtype)
        _gemm_impl(_flat(qx), _flat(sx), qw, sw, bias, y2, k, group, handle, kernel)

    @gemm_out.register_fake
    def _(qx, sx, qw, sw, bias, y, k, group, handle, kernel):
        return None

    _REGISTERED = True


def _check_16bit_cuda(t: torch.Tensor, name: str, shape: str) -> None:
    """``t`` (called ``name``, of the ``shape`` the message names) is a float16/bfloat16 CUDA tensor of at least one
    dimension."""
    if t.dim() < 1 or t.dtype not in _DTYPE or not t.is_cuda:
        raise ShapeError(f"{name} must be a {shape} float16/bfloat16 CUDA tensor, got {tuple(t.shape)} {t.dtype} "
                         f"on {t.device}")


def _check_input(x: torch.Tensor, group: int) -> None:
    _check_16bit_cuda(x, "activations", "[..., K]")
    if x.shape[-1] % group:
        raise ShapeError(f"K={x.shape[-1]} is not a multiple of the group size {group}")


def _fake_quantized(x: torch.Tensor, k: int, group: int, fmt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shapes and dtypes of quantized activations [..., K] made from ``x``'s leading dimensions."""
    shape, dtype = quantized_act_shape(1, k, group, fmt)
    return (x.new_empty((*x.shape[:-1], shape[1]), dtype=dtype),
            x.new_empty((*x.shape[:-1], k // group), dtype=torch.float32))


def _check_norm_weight(weight: torch.Tensor, x: torch.Tensor) -> None:
    if weight.shape != x.shape[-1:] or weight.dtype != x.dtype or weight.device != x.device \
            or not weight.is_contiguous():
        raise ShapeError(f"the RMSNorm weight must be a contiguous [{x.shape[-1]}] {x.dtype} tensor on {x.device}, "
                         f"got {tuple(weight.shape)} {weight.dtype} on {weight.device}")


def _check_gate_up(gate_up: torch.Tensor, group: int) -> None:
    _check_16bit_cuda(gate_up, "gate_up", "[..., 2I]")
    if gate_up.shape[-1] % 2 or (gate_up.shape[-1] // 2) % group:
        raise ShapeError(f"gate_up's last dimension {gate_up.shape[-1]} must be 2I with I a multiple of the group "
                         f"size {group}")
