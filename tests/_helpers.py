"""Shared test helpers: spec files to break, and kernel families registered only for a test."""
from __future__ import annotations

import contextlib
from unittest import mock
from pathlib import Path

import pytest
import torch
import yaml

from apex4gen import reference as ref
from apex4gen.kernels.families import FAMILIES, Family, TileShape
from apex4gen.paths import specs_dir


def shipped(kind: str, name: str) -> dict:
    return yaml.safe_load((specs_dir() / kind / f"{name}.yaml").read_text())


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextlib.contextmanager
def families(*registered: Family):
    """Replace the registry for the duration of a test (``families()`` = nothing registered)."""
    saved = dict(FAMILIES)
    FAMILIES.clear()
    FAMILIES.update({f.name: f for f in registered})
    try:
        yield
    finally:
        FAMILIES.clear()
        FAMILIES.update(saved)


def _smem(cfg) -> int:
    # int4 A and B tiles per stage plus fp32 scales: enough to make some tiles illegal on 99 KB GPUs.
    return cfg.stages * ((cfg.tile_m + cfg.tile_n) * cfg.tile_k // 2 + (cfg.tile_m + cfg.tile_n) * 4)


def make_family(name: str, archs: tuple[str, ...], path: str, granularity: str, max_m: int | None = None,
                split_k: tuple[int, ...] = (1,), act_format: str = "s4") -> Family:
    return Family(name=name, archs=archs, path=path, granularity=granularity, template="none.jinja",
                  act_format=act_format, weight_layout="canonical", align_k=128, align_n=8,
                  tiles=(TileShape(16, 64, 128, 1, 2), TileShape(128, 128, 128, 2, 2), TileShape(256, 256, 128, 4, 2)),
                  stages=(2, 4, 6), split_k=split_k, smem_bytes=_smem, render=lambda cfg: {}, max_m=max_m)


AMPERE = ("sm_80", "sm_86", "sm_89")
TEST_FAMILIES = (
    make_family("t_group", AMPERE, "int4", "group"),
    make_family("t_channel", AMPERE, "int4", "channel", split_k=(1, 2)),
    make_family("t_fp8", ("sm_90a",), "fp8", "group", act_format="e4m3"),
    make_family("t_fp8_decode", ("sm_90a",), "fp8", "group", max_m=64, split_k=(1, 4), act_format="e4m3"),
    make_family("t_fp8_channel", ("sm_90a",), "fp8", "channel", act_format="e4m3"),
)


def boundary_values(gen: torch.Generator, rows: int, width: int = 320, dtype: torch.dtype = torch.float32,
                    device: str = "cpu", qmax: int = 7) -> torch.Tensor:
    """Activations aimed at the quantizer's rounding boundaries, [rows, width] of ``dtype``: each row (meant as
    one group) holds its absmax, every half-integer multiple (k + 1/2) s of s = absmax / qmax inside it (qmax 7:
    4-bit, 127: 8-bit; width >= 1 + 34 qmax), each nudged by -8..8 ulps of ``dtype``, then random values up to
    the absmax. Even rows have absmax = qmax * 2^e, so s = 2^e and the half-integer multiples are exact ties
    (representable in 16-bit floats too, for qmax 7); odd rows have a random absmax (near misses in float32; in
    16-bit floats the rounding to the format lands them anywhere)."""
    exponent = torch.randint(-10, 10, (rows, 1), generator=gen, device=device).float()  # finite in float16
    absmax = torch.exp(torch.empty(rows, 1, device=device).uniform_(-8, 8, generator=gen))
    absmax = torch.where(torch.arange(rows, device=device).unsqueeze(1) % 2 == 0, qmax * torch.exp2(exponent),
                         absmax)
    absmax = absmax.to(dtype)
    s = ref._scale_of(absmax.float(), qmax)
    halves = ((torch.arange(-qmax, qmax, dtype=torch.float32, device=device) + 0.5) * s).to(dtype)  # [rows, 2 qmax]
    nudged = [halves]
    up, down = halves.clone(), halves.clone()
    for _ in range(8):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.full_like(down, float("-inf")))
        nudged += [up, down]
    fill = width - 1 - 17 * halves.shape[1]
    assert fill >= 0, f"width must be at least {1 + 17 * halves.shape[1]}"
    noise = ((torch.rand(rows, fill, generator=gen, device=device) * 2 - 1) * absmax.float()).to(dtype)
    return torch.cat([absmax, *nudged, noise], dim=1)


def _have_toolchain() -> bool:
    from apex4gen import toolchain
    from apex4gen.errors import ToolchainError
    try:
        toolchain.nvcc_path()
        toolchain.cutlass_root()
        return True
    except ToolchainError:
        return False


needs_nvcc = pytest.mark.skipif(not _have_toolchain(), reason="needs nvcc and the nvidia-cutlass headers")


def fake_quant_linear_f64(self, x: torch.Tensor) -> torch.Tensor:
    """W4A4Linear's fake-quant GEMM summed in float64: the same contract, another summation order (patched in to
    tell a kernel's rounding from the fake-quant path's own)."""
    from apex4gen.nn import fake_quant_activation
    xq = fake_quant_activation(x, self.group, self.act_bits).double()
    y = xq @ self._dequantized_weight(x.device).double().t()
    if self.bias is not None:
        y = y + self.bias.double()
    return y.to(x.dtype)


REORDER_CHUNK = 128  # K elements a partial sum covers in fake_quant_linear_by_chunks: one g128 group


def fake_quant_linear_by_chunks(self, x: torch.Tensor) -> torch.Tensor:
    """W4A4Linear's fake-quant GEMM as the kernels order it: fp32 partial sums over 128-wide K chunks, added one
    chunk after the other (the group-wise kernels' promotion order; any order is as valid for per-channel)."""
    from apex4gen.nn import fake_quant_activation
    xq = fake_quant_activation(x, self.group, self.act_bits)
    w = self._dequantized_weight(x.device)
    y = torch.zeros(x.shape[0], w.shape[0], device=x.device, dtype=torch.float32)
    for k0 in range(0, w.shape[1], REORDER_CHUNK):
        y += xq[:, k0:k0 + REORDER_CHUNK] @ w[:, k0:k0 + REORDER_CHUNK].t()
    if self.bias is not None:
        y = y + self.bias.float()
    return y.to(x.dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float32."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def rounding_floor(run, want: torch.Tensor) -> float:
    """How far the fake-quant path's own output moves under other valid summation orders of its GEMMs (float64, and
    the kernels' chunked fp32): the largest relative difference of ``run()`` from ``want``. A 16-bit output rounds
    the other way now and then, and the next layer's quantizer can turn that into a whole activation step, so
    one order alone can land on no flip by chance (a floor of 0) where the kernels' order lands on some."""
    from apex4gen.nn import W4A4Linear
    floors = []
    for order in (fake_quant_linear_f64, fake_quant_linear_by_chunks):
        with mock.patch.object(W4A4Linear, "_fake_quant_linear", order):
            floors.append(relative_error(run(), want))
    return max(floors)


def without_online_hadamard(weights):
    """Model weights whose layers leave out the online Hadamard before down_proj: W4A4 models then compute the same
    function without it, and down_proj's input is SiLU(gate) * up itself."""
    from dataclasses import replace
    return replace(weights, make_layer=lambda i, layer=weights.make_layer: replace(layer(i), online=None))
