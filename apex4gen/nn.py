"""``W4A4Linear``: a drop-in ``nn.Linear`` holding packed int4 weights and their scales.

Two paths compute the same function (``apex4gen.reference`` is the contract for both):

* fake-quant (default, any device, plain PyTorch): activations are quantized per (token, group) with
  :func:`reference.quantize_activation`, dequantized, and multiplied with the dequantized weights in fp32.
  The quantized values and scales are bit-identical to the kernels'; only the fp32 summation order differs
  (one fp32 sum over K instead of exact int32 group partials), which is far below the int4 error.
* kernel: a build (``apex4gen.loader.load(build_dir)``) is attached with :meth:`W4A4Linear.attach`, which
  packs the weights once into the layouts its kernels read (``build.pack``);
  :meth:`W4A4Linear._kernel_linear` is the single call into it (``build.linear``).

Both paths first apply the optional ``input_transform`` (the online Hadamard before ``down_proj`` of the
rotation method) and the optional activation clipping (``act_clip`` < 1 clamps each (token, group) to that
fraction of its absmax, so the scale computed next -- by PyTorch or by the kernel -- is the clipped one).
"""
from __future__ import annotations

import torch
from torch import nn

from . import reference
from .errors import SpecError
from .granularity import Granularity


def effective_granularity(granularity: Granularity, k: int) -> Granularity:
    """The granularity actually used for a layer with ``k`` inputs.

    Kernels (and compressed-tensors) need K to be a multiple of the group. When it is not (SmolLM2's
    K=576 with g128), the largest power-of-two divisor of K below the request is used instead (g64 there),
    so every layer stays servable by a kernel instead of failing the whole model.
    """
    if granularity.fits(k):
        return granularity
    g = 1 << (granularity.group.bit_length() - 1)
    while g > 1 and k % g:
        g //= 2
    if g < 8:
        raise SpecError(f"K={k} has no usable group size at or below {granularity.group}; use 'channel'")
    return Granularity(g)


def clip_activation(x: torch.Tensor, group: int, ratio: float) -> torch.Tensor:
    """Clamp each (token, group) of ``x`` [M, K] to ``ratio`` times its absmax."""
    m, k = x.shape
    xg = x.reshape(m, k // group, group)
    bound = xg.abs().amax(dim=-1, keepdim=True) * ratio
    return torch.maximum(torch.minimum(xg, bound), -bound).reshape(m, k)


def fake_quant_activation(x: torch.Tensor, group: int, bits: int = reference.DEFAULT_ACT_BITS) -> torch.Tensor:
    """``x`` [M, K] quantized per (token, group) to ``bits`` by the contract and dequantized (fp32)."""
    return reference.dequantize(reference.quantize_activation(x, group, bits))


class W4A4Linear(nn.Module):
    """y = x W^T + b with W int4 (symmetric, per group or per channel) and x quantized on the fly to int4 (the
    default) or int8 (``act_bits``, a plan's per-layer choice: W4A8)."""

    def __init__(self, in_features: int, out_features: int, group: int, *, bias: bool = False,
                 scale_dtype: torch.dtype = torch.float16, act_clip: float = 1.0,
                 input_transform: torch.Tensor | None = None, act_bits: int = reference.DEFAULT_ACT_BITS) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group = reference.check_group(group, in_features)  # elements a scale covers (K: per-channel)
        reference.act_range(act_bits)  # 4 or 8, else ValueError
        self.act_bits = act_bits
        self.act_clip = float(act_clip)
        # diagnostic only (eval ppl --fp-acts): False leaves the input in full precision on the fake-quant
        # path (W4A16), to attribute the accuracy cost of 4-bit activations; the kernels always quantize
        self.quantize_input = True
        # diagnostic only (eval ppl --fp-weights): a full-precision weight [N, K] the fake-quant path multiplies
        # with instead of the dequantized int4 one (W16A4), to measure what 4-bit activations cost on their own
        self.weight_override: torch.Tensor | None = None
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.zeros(out_features, in_features // self.group,
                                                         dtype=scale_dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=scale_dtype) if bias else None)
        self.register_buffer("input_transform", input_transform)
        self.backend = None
        self._packed = None
        self._dequant_cache: torch.Tensor | None = None

    @classmethod
    def from_quantized(cls, w: reference.QuantizedTensor, bias: torch.Tensor | None = None, *,
                       act_clip: float = 1.0, input_transform: torch.Tensor | None = None,
                       act_bits: int = reference.DEFAULT_ACT_BITS) -> "W4A4Linear":
        n, k = w.shape
        layer = cls(k, n, w.group, bias=bias is not None, scale_dtype=w.scales.dtype, act_clip=act_clip,
                    input_transform=input_transform, act_bits=act_bits)
        layer.qweight.copy_(reference.pack_int4(w.q))
        layer.weight_scale.copy_(w.scales)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: Granularity, *,
                    scale_dtype: torch.dtype | None = None, act_clip: float = 1.0,
                    input_transform: torch.Tensor | None = None,
                    act_bits: int = reference.DEFAULT_ACT_BITS) -> "W4A4Linear":
        """Round-to-nearest quantization of ``linear`` (what a plan entry's granularity asks for)."""
        k = linear.in_features
        group = effective_granularity(granularity, k).size(k)
        w = reference.quantize_weight(linear.weight.detach(), group, scale_dtype or _scale_dtype(linear.weight))
        return cls.from_quantized(w, linear.bias, act_clip=act_clip, input_transform=input_transform,
                                  act_bits=act_bits)

    @property
    def granularity(self) -> Granularity:
        return Granularity.of_size(self.group, self.in_features)

    def quantized_weight(self) -> reference.QuantizedTensor:
        return reference.QuantizedTensor(q=reference.unpack_int4(self.qweight), scales=self.weight_scale,
                                         group=self.group)

    def attach(self, backend) -> None:
        """Route forward through the loaded kernels (``None`` returns to fake-quant). The weights are packed
        now, on the device of this layer's buffers: move the layer first."""
        if backend is not None and not self.quantize_input:
            raise ValueError("the kernels always quantize activations: quantize_input=False is fake-quant only")
        if backend is not None and self.weight_override is not None:
            raise ValueError("the kernels read int4 weights: weight_override is fake-quant only")
        self.backend = backend
        self._packed = None if backend is None else backend.pack(self.quantized_weight(), act_bits=self.act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = self.prepare_input(x.reshape(-1, self.in_features))
        y = self._kernel_linear(x2) if self.backend is not None else self._fake_quant_linear(x2)
        return y.reshape(*lead, self.out_features)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The float-side steps both paths share: online rotation, then activation clipping."""
        if self.input_transform is not None:
            x = (x.float() @ self.input_transform).to(x.dtype)
        if self.act_clip < 1.0:
            x = clip_activation(x, self.group, self.act_clip)
        return x

    def _kernel_linear(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self.backend.linear(x, self._packed, bias)

    def _fake_quant_linear(self, x: torch.Tensor) -> torch.Tensor:
        xq = fake_quant_activation(x, self.group, self.act_bits) if self.quantize_input else x.float()
        y = xq @ self._dequantized_weight(x.device).t()
        if self.bias is not None:
            y = y + self.bias.float()
        # the kernels round once to their 16-bit output dtype; an fp32 model keeps the fp32 result
        return y.to(x.dtype)

    def _dequantized_weight(self, device: torch.device) -> torch.Tensor:
        if self.weight_override is not None:
            return self.weight_override.float().to(device)
        cache = self._dequant_cache
        if cache is None or cache.device != device:
            cache = reference.dequantize(self.quantized_weight()).to(device)
            self._dequant_cache = cache
        return cache

    def _apply(self, fn, recurse=True):
        self._dequant_cache = None  # .to() / .half() move the buffers: rebuild the cache from them
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequant_cache = None  # new weights: the cache must follow them
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        extra = f", act_bits={self.act_bits}" if self.act_bits != reference.DEFAULT_ACT_BITS else ""
        extra += f", act_clip={self.act_clip}" if self.act_clip < 1.0 else ""
        online = ", online_rotation" if self.input_transform is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"granularity={self.granularity.name}{extra}{online}")


def _scale_dtype(weight: torch.Tensor) -> torch.dtype:
    """Scales are stored in the kernels' output dtype: the model's if 16-bit, else fp16."""
    return weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float16
