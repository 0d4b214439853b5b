"""Running the probes on the current GPU (needs torch with CUDA): the rates, the copy bandwidth, the pure
weight stream, and the device's properties, into one frozen :class:`~.record.Measurements`.

Timing: a throughput loop is one launch timed with CUDA events, its iteration count first scaled so that a
launch takes about ``TARGET_MS``; the rate is the median over ``SAMPLES`` launches. The weight stream is timed
as ``apex4gen bench`` times an op (:func:`apex4gen.bench.time_graph`: CUDA-graph replays over buffers rotated past
L2, median), best of the grid shapes of :data:`~.catalog.STREAM_GRIDS`.
"""
from __future__ import annotations

import datetime
import functools
import statistics
from typing import Callable

from .. import __version__
from ..errors import Apex4genError
from . import source
from .catalog import STREAM_GRIDS, STREAM_SHAPE, Probe, StreamGrid, probes_for
from .library import ProbeLibrary
from .record import Device, Measurements, Rate, StreamTime

TARGET_MS = 10.0
SAMPLES = 5
_CALIBRATION_ITERS = 64
# compute capability -> (kernel arch the probes build for, the spec's architecture)
_ARCH = {(8, 0): ("sm_80", "sm_80"), (8, 6): ("sm_86", "sm_86"), (8, 9): ("sm_89", "sm_89"),
         (9, 0): ("sm_90a", "sm_90")}


class NoDevice(Apex4genError):
    """No CUDA device to measure."""


def _torch():
    import torch
    if not torch.cuda.is_available():
        raise NoDevice("no CUDA GPU is visible (torch.cuda.is_available() is False): run apex4gen probe on the GPU "
                       "to measure, with a CUDA build of PyTorch")
    return torch


def device_arch() -> tuple[str, str]:
    """(kernel arch, spec architecture) of the current GPU; one line if apex4gen has no kernels for it."""
    torch = _torch()
    capability = torch.cuda.get_device_capability()
    if capability not in _ARCH:
        known = ", ".join(f"sm_{a}{b}" for a, b in _ARCH)
        raise Apex4genError(f"{torch.cuda.get_device_name()} is sm_{capability[0]}{capability[1]}; apex4gen probes "
                            f"and builds for {known} only")
    return _ARCH[capability]


@functools.lru_cache(maxsize=None)
def _library(arch: str, progress: bool) -> ProbeLibrary:
    built = source.build(arch, progress=progress)
    return ProbeLibrary(built.library, probes_for(arch))


def library(progress: bool = False) -> ProbeLibrary:
    """The probe library of the current GPU, built (or found in the cache) and loaded once a process."""
    return _library(device_arch()[0], progress)


# ------------------------------------------------------------------------------------------------ loops


def _launch_ms(lib: ProbeLibrary, probe: Probe, iters: int, sink) -> tuple[float, int]:
    torch = _torch()
    stream = torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    blocks = lib.run(probe, iters, 0x5EED, sink.data_ptr(), stream.cuda_stream)
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end), blocks


def _calibrated_iters(lib: ProbeLibrary, probe: Probe, sink) -> int:
    """Iterations for a launch of about TARGET_MS (the first launch also warms the module up)."""
    iters = _CALIBRATION_ITERS
    _launch_ms(lib, probe, iters, sink)
    ms, _ = _launch_ms(lib, probe, iters, sink)
    while ms < TARGET_MS / 10:
        iters *= 8
        ms, _ = _launch_ms(lib, probe, iters, sink)
    return max(1, round(iters * TARGET_MS / ms))


def measure_loop(lib: ProbeLibrary, probe: Probe) -> Rate:
    """Tera-operations a second (what ``probe.ops_per_cta_iteration`` counts) over the whole GPU."""
    torch = _torch()
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    iters = _calibrated_iters(lib, probe, sink)
    runs = [_launch_ms(lib, probe, iters, sink) for _ in range(SAMPLES)]
    blocks = runs[0][1]
    ops = probe.ops_per_cta_iteration * blocks * iters
    samples = tuple(ops / (ms * 1e-3) / 1e12 for ms, _ in runs)
    return Rate(probe.name, probe.unit, probe.path, probe.instruction, statistics.median(samples), samples,
                blocks, probe.threads, iters)


# ------------------------------------------------------------------------------------------------ stream


def weight_bytes(n: int, k: int, group: int) -> int:
    """A GEMM's 4-bit weights and their 2-byte group scales, rounded up to 16-byte vectors."""
    return -(-(n * k // 2 + n * (k // group) * 2) // 16) * 16


def _time_grid(lib: ProbeLibrary, grid: StreamGrid, buffers: list, vecs: int, sink, sms: int) -> float:
    from ..bench import time_graph
    torch = _torch()
    blocks = grid.ctas_per_sm * sms

    def launch(i: int) -> None:
        lib.stream(buffers[i % len(buffers)].data_ptr(), vecs, blocks, grid.threads, grid.stride, sink.data_ptr(),
                   torch.cuda.current_stream().cuda_stream)
    return time_graph(launch, len(buffers))


def stream_times(n: int, k: int, group: int, lib: ProbeLibrary | None = None) -> tuple[StreamTime, ...]:
    """µs of reading one GEMM's weights and scales once, per grid shape of :data:`STREAM_GRIDS`."""
    from ..bench import copies_for
    torch = _torch()
    lib = lib or library()
    nbytes = weight_bytes(n, k, group)
    l2 = lib.attribute("l2_bytes")
    buffers = [torch.ones(nbytes, dtype=torch.uint8, device="cuda") for _ in range(copies_for(nbytes, l2))]
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    sms = lib.attribute("sm_count")
    out = tuple(StreamTime(g.label, g.ctas_per_sm * sms, g.threads, g.stride, nbytes,
                           _time_grid(lib, g, buffers, nbytes // 16, sink, sms)) for g in STREAM_GRIDS)
    del buffers
    return out


def stream_us(n: int, k: int, group: int) -> float:
    """The pure 4-bit weight stream of one GEMM (N x K, weights + g-``group`` scales) on the current GPU: µs of
    the fastest grid shape, timed as ``apex4gen bench`` times its ops (the bound beside the decode targets)."""
    return min(t.us for t in stream_times(n, k, group))


# ------------------------------------------------------------------------------------------------ the probe


def device(lib: ProbeLibrary) -> Device:
    torch = _torch()
    arch, architecture = device_arch()
    driver = lib.driver_version()
    return Device(name=torch.cuda.get_device_name(), architecture=architecture, kernel_arch=arch,
                  sm_count=lib.attribute("sm_count"), clock_mhz=lib.attribute("clock_khz") / 1000,
                  l2_bytes=lib.attribute("l2_bytes"), smem_per_block_optin=lib.attribute("smem_per_block_optin"),
                  driver=f"{driver // 1000}.{driver % 1000 // 10}", torch=torch.__version__)


def run(say: Callable[[str], None] = lambda line: None, progress: bool = True) -> Measurements:
    """Every measurement of `apex4gen probe`, with a line to ``say`` as each one finishes."""
    from ..bench import copy_bandwidth
    arch, _ = device_arch()
    say(f"probe: building the probe kernels for {arch} (cached after the first run)")
    lib = _library(arch, progress)
    dev = device(lib)
    say(f"probe: {dev.name} ({dev.architecture}, {dev.sm_count} SMs, {dev.clock_mhz:g} MHz, driver {dev.driver})")
    rates = []
    for probe in probes_for(arch):
        rate = measure_loop(lib, probe)
        rates.append(rate)
        say(f"  {rate.line()}")
    copy = copy_bandwidth() / 1e9
    say(f"  device-to-device copy (2 GiB read + written): {copy:,.0f} GB/s")
    n, k, group = STREAM_SHAPE
    stream = stream_times(n, k, group, lib)
    best = min(stream, key=lambda t: t.us)
    say(f"  4-bit weight stream ({n} x {k}, g{group}: {best.bytes / 1e6:.1f} MB): {best.gbs:,.0f} GB/s "
        f"({best.grid})")
    return Measurements(dev, datetime.date.today().isoformat(), __version__, tuple(rates), copy, STREAM_SHAPE,
                        stream)
