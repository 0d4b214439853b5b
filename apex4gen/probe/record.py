"""What a probe run measured: frozen records, their JSON (``apex4gen probe --json``, read back to write a spec
without the GPU) and the quantities derived from them (FP32 rate, tensor peak per path, ρ, promotion cost).
Compute rates are in tera-operations a second (TOPS for tensor loops), bandwidths in GB/s (10^9 bytes).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SpecError
from .catalog import PROBES, tensor_probe_for

FORMAT = 1
TENSOR_PATHS = ("int4", "int8", "fp8", "fp16")


@dataclass(frozen=True)
class Device:
    name: str
    architecture: str        # the GPU spec's (sm_90)
    kernel_arch: str         # what the probes were built for (sm_90a)
    sm_count: int
    clock_mhz: float         # cudaDevAttrClockRate: the peak clock
    l2_bytes: int
    smem_per_block_optin: int
    driver: str              # CUDA version the driver supports
    torch: str


@dataclass(frozen=True)
class Rate:
    name: str
    unit: str                # "tensor" or "cuda" (catalog.Probe.unit)
    path: str | None
    instruction: str
    value: float             # median of samples, tera-operations a second
    samples: tuple[float, ...]
    blocks: int
    threads: int
    iters: int

    def line(self) -> str:
        what = "TOPS" if self.unit == "tensor" else "T op/s"
        return (f"{self.name:<14} {self.value:>9.1f} {what:<6} {self.instruction} ({self.blocks} CTAs x "
                f"{self.threads} threads, median of {len(self.samples)})")


@dataclass(frozen=True)
class StreamTime:
    grid: str
    blocks: int
    threads: int
    stride: bool
    bytes: int
    us: float

    @property
    def gbs(self) -> float:
        return self.bytes / (self.us * 1e-6) / 1e9


@dataclass(frozen=True)
class Measurements:
    device: Device
    date: str
    apex4gen: str
    rates: tuple[Rate, ...]
    copy_gbs: float
    stream_shape: tuple[int, int, int]
    stream: tuple[StreamTime, ...]

    def rate(self, name: str) -> Rate | None:
        return next((r for r in self.rates if r.name == name), None)

    def _value(self, name: str) -> float:
        rate = self.rate(name)
        if rate is None:
            raise SpecError(f"the measurements of {self.device.name} have no {name} rate; re-run apex4gen probe")
        return rate.value

    @property
    def fp32_tflops(self) -> float:
        """Two flops an FFMA."""
        return 2.0 * self._value("ffma")

    @property
    def stream_gbs(self) -> float:
        return max(t.gbs for t in self.stream)

    def tensor_rate(self, path: str) -> Rate | None:
        """The rate that stands for a tensor path (wgmma on sm_90a, mma.sync elsewhere; None where absent)."""
        probe = tensor_probe_for(self.device.kernel_arch, path)
        return None if probe is None else self.rate(probe.name)

    def dequant_ops(self, name: str) -> float:
        """A promotion's cost in FP32 instructions: the FFMA rate over the promotion loop's rate."""
        return self._value("ffma") / self._value(name)

    def rho(self, rate: Rate) -> tuple[float, float]:
        """A tensor rate over the FP32 rate (APEX4's ρ) and over the I2F rate (the promotion ρ)."""
        return rate.value / self.fp32_tflops, rate.value / self._value("i2f")

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: object, file: str = "measurements") -> "Measurements":
        """A recorded ``apex4gen probe --json`` file; anything else is one line."""
        try:
            if data.get("format") != FORMAT:
                raise SpecError(f"{file}: probe measurements of format {data.get('format')!r}, not {FORMAT}; "
                                "re-run apex4gen probe --json")
            known = {p.name for p in PROBES}
            rates = tuple(Rate(**{**r, "samples": tuple(r["samples"])}) for r in data["rates"])
            unknown = [r.name for r in rates if r.name not in known]
            if unknown:
                raise SpecError(f"{file}: unknown probe {unknown[0]!r} (known: {', '.join(sorted(known))})")
            return cls(Device(**data["device"]), data["date"], data["apex4gen"], rates, float(data["copy_gbs"]),
                       tuple(data["stream_shape"]), tuple(StreamTime(**t) for t in data["stream"]))
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise SpecError(f"{file} is not an `apex4gen probe --json` file ({type(err).__name__}: {err}); "
                            "write one with apex4gen probe --json FILE") from None

    @classmethod
    def load(cls, path: str | Path) -> "Measurements":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SpecError(f"cannot read probe measurements {path}: {err}") from None
        return cls.from_dict(data, str(path))
