"""A GPU spec from probe measurements: the file `apex4gen plan/build/bench --gpu FILE` reads. The device's
properties give name, architecture, SMs, clock, L2 and shared memory; the probe gives the rates, each with a
source naming the probe, the GPU, the date and what was measured; the ``measured:`` section carries the peaks
the cost model divides by (apex4gen/specs.py, apex4gen/costmodel.py).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from ..errors import Apex4genError
from ..files import write_if_different
from ..specs import GpuSpec, parse_gpu
from .record import TENSOR_PATHS, Measurements

HEADER = ("# Written by `apex4gen probe` from measurements on this GPU (dense rates). Top-level numbers are what the\n"
          "# probe measured; `measured:` holds the peaks the cost model uses in place of datasheet figures.\n")


def default_name(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "gpu"


def _number(value: float, source: str, digits: int = 1) -> dict:
    return {"value": round(value, digits), "source": source}


def _sources(m: Measurements):
    """Source text for a measured rate and for a device property."""
    where = f"apex4gen probe {m.apex4gen}, {m.device.name}, {m.date}"

    def rate(name: str, what: str | None = None) -> str:
        r = m.rate(name)
        detail = what or (f"{r.instruction}, median of {len(r.samples)} launches of {r.blocks} CTAs x {r.threads} "
                          "threads")
        return f"{where}: {detail}"

    def prop(attribute: str) -> str:
        return f"device properties ({attribute}) of {m.device.name}, read by apex4gen probe on {m.date}"
    return where, rate, prop


def _tensor_tops(m: Measurements, rate) -> dict:
    out = {}
    for path in TENSOR_PATHS:
        r = m.tensor_rate(path)
        if r is not None:
            out[path] = _number(r.value, rate(r.name))
    return out


def spec_document(m: Measurements, name: str | None = None) -> dict:
    """The spec as a mapping, in the order of the shipped files."""
    where, rate, prop = _sources(m)
    d = m.device
    n, k, group = m.stream_shape
    fp32 = _number(m.fp32_tflops, rate("ffma", f"FFMA throughput x 2 flops ({m.rate('ffma').instruction})"))
    stream = _number(m.stream_gbs, f"{where}: pure 4-bit weight stream, {n} x {k} int4 + g{group} scales read once, "
                                   "best grid shape (CUDA-graph median)", 0)
    tensor = _tensor_tops(m, rate)
    return {
        "name": name or default_name(d.name),
        "full_name": d.name,
        "architecture": d.architecture,
        "int4_tensor_cores": "emulated" if d.architecture == "sm_90" else "native",
        "sm_count": {"value": d.sm_count, "source": prop("cudaDevAttrMultiProcessorCount")},
        "boost_clock_mhz": _number(d.clock_mhz, prop("cudaDevAttrClockRate"), 0),
        "tensor_tops": tensor,
        "fp32_tflops": fp32,
        "dram_bandwidth_gbs": _number(m.copy_gbs, f"{where}: device-to-device copy of 1 GiB, bytes read + written "
                                                  "(median of 9)", 0),
        "l2_mb": _number(d.l2_bytes / 2**20, prop("cudaDevAttrL2CacheSize")),
        "smem_per_block_kb": {"value": d.smem_per_block_optin // 1024,
                              "source": prop("cudaDevAttrMaxSharedMemoryPerBlockOptin")},
        "measured": {
            "tensor_tops": copy.deepcopy(tensor),  # copies: YAML would write a shared object as an alias
            "fp32_tflops": dict(fp32),
            "stream_gbs": stream,
            "dequant_ops_int": _number(m.dequant_ops("promote_int"), rate(
                "promote_int", "FFMA rate / rate of promoting int32 partials (magic-number convert + FMUL + FFMA)"), 3),
            "dequant_ops_float": _number(m.dequant_ops("promote_float"), rate(
                "promote_float", "FFMA rate / rate of promoting float partials (FMUL + FFMA)"), 3),
        },
    }


def spec_text(m: Measurements, name: str | None = None) -> tuple[str, GpuSpec]:
    """The YAML text and the spec it parses to (checked as any user's spec file is)."""
    document = spec_document(m, name)
    text = HEADER + yaml.safe_dump(document, sort_keys=False, width=120)
    return text, parse_gpu(yaml.safe_load(text), f"the spec written from {m.device.name}'s probe")


def check_writable(path: Path | None, force: bool) -> None:
    """Before minutes of measuring: an existing file is kept unless --force, and the folder must exist."""
    if path is None:
        return
    if path.exists() and not force:
        raise Apex4genError(f"{path} exists; pass --force to replace it, or give another path")
    if not path.parent.is_dir():
        raise Apex4genError(f"{path}: the folder {path.parent} does not exist; create it or give another path")


def write(path: Path, text: str) -> Path:
    """Atomically (a temporary file renamed over the target): a failure leaves no partial file."""
    return write_if_different(path, text).path
