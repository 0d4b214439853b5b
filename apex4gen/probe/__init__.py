"""`apex4gen probe`: microbenchmarks of the current GPU, generated and built like every kernel (:mod:`.source`:
templates/probe.cu.jinja over runtime/probe/probe.cuh), loaded through a small C ABI (:mod:`.library`), timed
from Python (:mod:`.measure`), recorded (:mod:`.record`) and written as a GPU spec (:mod:`.spec`)."""
from __future__ import annotations


def stream_us(n: int, k: int, group: int) -> float:
    """µs of the pure 4-bit weight stream of one GEMM on the current GPU (see :func:`.measure.stream_us`)."""
    from .measure import stream_us as measured
    return measured(n, k, group)
