"""Summarise `apex4gen bench --json` files as the markdown tables of bench/results/<gpu>/results.md.

    python3 scripts/bench_table.py bench/results/h100/llama2-70b-g128.json [more.json ...]

One table a file: per M, geomeans over the file's GEMMs of cuBLAS time / W4A4 time (end to end, quantizer
included) against FP16, the faster of the two FP8 baselines and INT8, the worst GEMM against FP16, and the geomean
fraction of the measured copy bandwidth, and where the run timed it (M <= 16), the geomean of the pure 4-bit
weight stream's time over the op's: the reductions `apex4gen bench` uses for its target lines.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

COLUMNS = ("M", "vs FP16", "vs best FP8", "vs INT8", "worst point vs FP16", "% of copy BW", "% of stream bound")


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def ratio(point: dict, baseline: str) -> float | None:
    """Baseline time over W4A4 time; "fp8" is the faster of cuBLAS FP8 per-tensor and row-wise."""
    times = point["baselines_us"]
    names = ("fp8_tensor", "fp8_row") if baseline == "fp8" else (baseline,)
    present = [times[n] for n in names if times.get(n) is not None]
    return min(present) / point["w4a4_us"] if present else None


def row(m: int, points: list[dict]) -> list[str]:
    def mean_of(baseline: str) -> str:
        values = [r for r in (ratio(p, baseline) for p in points) if r is not None]
        return "–" if not values else f"{geomean(values):.2f}"

    worst = min(points, key=lambda p: ratio(p, "fp16"))
    streams = [p["stream_us"] / p["w4a4_us"] for p in points if m <= 16 and p.get("stream_us")]
    return [str(m), mean_of("fp16"), mean_of("fp8"), mean_of("int8"),
            f"{ratio(worst, 'fp16'):.2f} ({worst['gemm']})",
            f"{100 * geomean([p['bw_fraction'] for p in points]):.0f}",
            "–" if not streams else f"{100 * geomean(streams):.0f}"]


def table(data: dict) -> str:
    meta = data["meta"]
    by_m: dict[int, list[dict]] = {}
    for p in data["points"]:
        by_m.setdefault(p["m"], []).append(p)
    grans = sorted({p["granularity"] for p in data["points"]})
    lines = [f"{meta['device']}, {meta['time']}, {', '.join(grans)}, copy bandwidth "
             f"{meta['copy_bandwidth_gbs'] / 1e3:.2f} TB/s", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(m, by_m[m])) + " |" for m in sorted(by_m)]
    return "\n".join(lines)


def load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
        data["meta"]["device"], data["points"][0]["w4a4_us"]
        return data
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise SystemExit(f"bench_table: {path} is not a JSON file written by `apex4gen bench --json` ({e}); "
                         "pass the files that command wrote")


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit("usage: python3 scripts/bench_table.py BENCH_JSON [BENCH_JSON ...]")
    print("\n\n".join(table(load(path)) for path in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
