"""The ops' shapes for activations of any leading shape [..., K], through their fake implementations (what
torch.compile traces with), on meta tensors: no GPU needed. The real implementations: tests/test_engine_gpu.py."""
from __future__ import annotations

import pytest
import torch

from apex4gen import abi
from apex4gen.loader import ops as loader_ops


@pytest.fixture(scope="module", autouse=True)
def ops():
    loader_ops._register_ops()


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 3, 4)])
def test_linear_keeps_leading_dimensions(lead):
    y = torch.ops.apex4gen.linear(_meta(*lead, 64), _meta(32, 32, dtype=torch.uint8), _meta(32, 4), None, 32, 16,
                                  0, 0)
    assert y.shape == (*lead, 32) and y.dtype == torch.float16


@pytest.mark.parametrize("fmt, width, dtype", [("s4", 32, torch.uint8), ("s8", 64, torch.int8),
                                                ("e4m3", 64, torch.float8_e4m3fn)])
def test_quantize_act_keeps_leading_dimensions(fmt, width, dtype):
    qx, sx = torch.ops.apex4gen.quantize_act(_meta(2, 3, 64), 16, abi.ACT_FORMAT[fmt], 0)
    assert qx.shape == (2, 3, width) and qx.dtype == dtype
    assert sx.shape == (2, 3, 4) and sx.dtype == torch.float32


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_rmsnorm_quantize_act_keeps_leading_dimensions(lead):
    qx, sx = torch.ops.apex4gen.rmsnorm_quantize_act(_meta(*lead, 64), _meta(64), 1e-5, 16, abi.ACT_FORMAT["s4"], 0)
    assert qx.shape == (*lead, 32) and qx.dtype == torch.uint8
    assert sx.shape == (*lead, 4) and sx.dtype == torch.float32


@pytest.mark.parametrize("fmt, width, dtype", [("s4", 32, torch.uint8), ("s8", 64, torch.int8),
                                                ("e4m3", 64, torch.float8_e4m3fn)])
def test_silu_mul_quantize_act_covers_half_of_gate_up(fmt, width, dtype):
    """gate_up [..., 2I] gives activations of I values a row."""
    qx, sx = torch.ops.apex4gen.silu_mul_quantize_act(_meta(2, 3, 128), 16, abi.ACT_FORMAT[fmt], 0)
    assert qx.shape == (2, 3, width) and qx.dtype == dtype
    assert sx.shape == (2, 3, 4) and sx.dtype == torch.float32
