"""What the vLLM linear method computes, in plain PyTorch (no vLLM import): the GPU tests run it where vLLM
cannot be installed.

A quantized layer as vLLM loads it holds the checkpoint's compressed-tensors tensors for its partition:
``weight_packed`` (int32 [N, K/8]) and ``weight_scale`` ([N, K/group], or [N, 1] per channel).
:func:`prepare` turns them, once after loading, into what :func:`forward` reads:

* with a build (``apex4gen.load``): the weights in every layout the build's kernels for the problem read
  (``Build.pack``; a problem the build has no kernel for fails here, named); :func:`forward` calls the op
  ``torch.ops.apex4gen.routed_linear``, which picks the kernel by the token count and runs
  ``torch.ops.apex4gen.linear`` -- one opaque op, so vLLM's torch.compile traces through it and its CUDA
  graphs capture it (no host synchronisation);
* without one (vLLM's CPU backend, the CPU tests): the fake-quant path of ``apex4gen.nn`` (activations
  quantized per (token, group) by the contract, fp32 product, one rounding to the model's dtype).

Both first apply the layer's online rotation (down_proj of a rotated checkpoint, as a Kronecker product of
small Hadamards: :class:`OnlineRotation`) and activation clipping, as ``apex4gen.nn.W4A4Linear`` does.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import reference
from ..accuracy.rotation import _FastTransform, hadamard_factors
from ..checkpoint import WEIGHTS_FILE, unpack_int32
from ..errors import LoadError, ShapeError
from ..granularity import Granularity
from ..nn import clip_activation, fake_quant_activation

BUILD_ENV = "APEX4GEN_BUILD"


@dataclass(frozen=True)
class LayerScheme:
    """One (possibly fused) layer's quantization as the checkpoint states it."""

    granularity: Granularity
    act_clip: float = 1.0      # activation clipping ratio (1.0: none)
    rotation: str | None = None  # checkpoint key of the online input transform, if any
    act_bits: int = 4          # activation precision (input_activations.num_bits: a plan's W4A8 layers are 8)


class OnlineRotation:
    """``x @ T`` for the stored ``T = diag(s) kron(F_1, ..., F_m) / sqrt(n)`` (apex4gen's randomized Hadamard),
    applied factor by factor (``n * sum(n_i)`` multiply-adds a token instead of ``n**2``). Only the signs and
    the small ±1 factors are kept; ``T`` itself is read once and checked to be of that form."""

    def __init__(self, t: torch.Tensor, device: torch.device) -> None:
        n = t.shape[0]
        factors = hadamard_factors(n) if t.dim() == 2 and t.shape[1] == n else None
        if factors is None:
            raise LoadError(f"the online rotation [{tuple(t.shape)}] is not a Hadamard transform apex4gen knows: "
                            "re-quantize with `apex4gen quantize --rotate`")
        column0 = functools.reduce(torch.kron, [f[:, :1] for f in factors]).squeeze(1)  # ±1: H[:, 0]
        signs = torch.sign(t[:, 0].double()) * column0
        self.n = n
        self.transform = _FastTransform(signs, factors, device)
        _check_same_map(self.transform, t)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x).to(x.dtype)


def _check_same_map(fast: _FastTransform, t: torch.Tensor, probes: int = 4) -> None:
    """Random probes: the structured map equals the stored matrix (any other matrix fails them)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(probes, t.shape[0], generator=gen, dtype=torch.float64)
    dense = x @ t.double().cpu()
    structured = fast(x.to(fast.signs.device)).double().cpu()
    if not torch.allclose(structured, dense, rtol=1e-4, atol=1e-4 * float(dense.abs().max())):
        raise LoadError("the online rotation in the checkpoint is not the randomized Kronecker Hadamard apex4gen "
                        "writes: re-quantize with `apex4gen quantize --rotate`")


@functools.lru_cache(maxsize=None)
def _stored_transform(checkpoint_dir: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    path = Path(checkpoint_dir) / WEIGHTS_FILE
    try:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(key)
    except (OSError, KeyError, RuntimeError) as err:
        raise LoadError(f"cannot read the online rotation {key} from {path} ({err}); serve the checkpoint "
                        "directory that `apex4gen quantize` wrote") from None


@functools.lru_cache(maxsize=None)
def online_rotation(checkpoint_dir: str, key: str, device: str) -> OnlineRotation:
    """The rotation stored under ``key`` in the checkpoint, once per process and device (layers share it)."""
    return OnlineRotation(_stored_transform(checkpoint_dir, key), torch.device(device))


_LOADED: dict[int, object] = {}  # Build.handle -> Build, for the routed op


@functools.lru_cache(maxsize=None)
def load_build(build_dir: str):
    """``apex4gen.load`` once per process and directory."""
    from ..loader import load

    build = load(build_dir)
    _LOADED[build.handle] = build
    return build


@dataclass(frozen=True)
class Prepared:
    """What :func:`forward` needs besides the layer's tensors (attributes set by :func:`prepare`)."""

    n: int
    k: int
    group: int
    act_clip: float
    rotation: OnlineRotation | None
    handle: int | None           # the build's handle; None: fake-quant path
    layouts: tuple[str, ...]     # weight layouts of the kernels, in the order of the layer's tensors
    act_bits: int = 4


def checkpoint_weight(layer: torch.nn.Module, k: int, group: int) -> reference.QuantizedTensor:
    """The layer's loaded partition [N, k] as a QuantizedTensor (int8 values -8..7, scales as loaded)."""
    packed, scales = layer.weight_packed.data, layer.weight_scale.data
    q = unpack_int32(packed.cpu(), k).to(packed.device)
    return reference.QuantizedTensor(q=q, scales=scales, group=group)


def prepare(layer: torch.nn.Module, scheme: LayerScheme, k: int, build_dir: str | None,
            checkpoint_dir: str | None) -> Prepared:
    """Once after loading: unpack the checkpoint tensors, pack them for the build's kernels (or dequantize them
    for the fake-quant path), and register the result on ``layer``; the checkpoint tensors are dropped."""
    if not scheme.granularity.fits(k):
        raise ShapeError(f"K={k} is not a multiple of the checkpoint's {scheme.granularity} groups")
    group = scheme.granularity.size(k)
    w = checkpoint_weight(layer, k, group)
    n = w.shape[0]
    device = layer.weight_packed.device
    rotation = None
    if scheme.rotation is not None:
        if checkpoint_dir is None:
            raise LoadError("a rotated checkpoint is read from its directory (the online rotation is stored "
                            "there once): serve the local directory that `apex4gen quantize` wrote")
        rotation = online_rotation(str(checkpoint_dir), scheme.rotation, str(device))
        if rotation.n != k:
            raise ShapeError(f"online rotation of size {rotation.n} for a layer with K={k}")
    del layer.weight_packed, layer.weight_scale
    if build_dir is None:
        layer.register_parameter("w4a4_weight", _frozen(reference.dequantize(w).to(device)))
        return Prepared(n, k, group, scheme.act_clip, rotation, None, (), scheme.act_bits)
    build = load_build(str(build_dir))
    packed = build.pack(w, act_bits=scheme.act_bits)  # names the problem when the build has no kernel for it
    layouts = tuple(sorted(packed.layouts))
    for i, name in enumerate(layouts):
        qw, sw = packed.layouts[name]
        layer.register_parameter(f"w4a4_qw{i}", _frozen(qw))
        layer.register_parameter(f"w4a4_sw{i}", _frozen(sw))
    return Prepared(n, k, group, scheme.act_clip, rotation, build.handle, layouts, scheme.act_bits)


def _frozen(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)


def forward(layer: torch.nn.Module, p: Prepared, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = W4A4(x) + bias for x [..., K] -> [..., N]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.k)
    if p.rotation is not None:
        x2 = p.rotation(x2)
    if p.act_clip < 1.0:
        x2 = clip_activation(x2, p.group, p.act_clip)
    if p.handle is None:
        y = fake_quant_linear(x2, layer.w4a4_weight, p.group, bias, p.act_bits)
    else:
        qws = [getattr(layer, f"w4a4_qw{i}") for i in range(len(p.layouts))]
        sws = [getattr(layer, f"w4a4_sw{i}") for i in range(len(p.layouts))]
        y = torch.ops.apex4gen.routed_linear(x2, qws, sws, bias, p.n, p.group, p.handle, ",".join(p.layouts),
                                             p.act_bits)
    return y.reshape(*lead, p.n)


def fake_quant_linear(x: torch.Tensor, weight: torch.Tensor, group: int, bias: torch.Tensor | None,
                      act_bits: int = 4) -> torch.Tensor:
    """``apex4gen.nn.W4A4Linear``'s fake-quant arithmetic on a dequantized fp32 weight [N, K]."""
    y = fake_quant_activation(x, group, act_bits) @ weight.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.library.custom_op("apex4gen::routed_linear", mutates_args=())
def routed_linear(x: torch.Tensor, qws: list[torch.Tensor], sws: list[torch.Tensor], bias: torch.Tensor | None,
                  n: int, group: int, handle: int, layouts: str, act_bits: int = 4) -> torch.Tensor:
    """``Build.linear``: the kernel for this token count and activation precision (a host-side table look-up),
    then ``torch.ops.apex4gen.linear``."""
    from ..loader import PackedWeight

    build = _LOADED[handle]
    weights = dict(zip(layouts.split(","), zip(qws, sws)))
    packed = PackedWeight(n, x.shape[1], group, sws[0].dtype, weights, act_bits)
    return build.linear(x, packed, bias)


@routed_linear.register_fake
def _(x, qws, sws, bias, n, group, handle, layouts, act_bits=4):
    return x.new_empty((x.shape[0], n))
