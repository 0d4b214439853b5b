"""The study's figure: W4A4 speedup over cuBLAS FP16 against M, one line per granularity, measured (solid) and
predicted by the cost model (dashed) in the same colour; a geometric-mean panel over the GEMMs, then one panel per
GEMM (APEX4's figure, for the GPU the study ran on). matplotlib's Agg backend: no display needed."""
from __future__ import annotations

import io
import math

from .errors import Apex4genError
from .granularity import Granularity

_COLUMNS = 3


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise Apex4genError("the plot needs matplotlib: pip install 'apex4gen[plot]' (or leave out --plot)") from None


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _series(points, granularity: str) -> tuple[list[int], list[float], list[float]]:
    chosen = sorted((p for p in points if p.granularity == granularity), key=lambda p: p.m)
    return [p.m for p in chosen], [p.measured_speedup for p in chosen], [p.predicted_speedup for p in chosen]


def _geomean_series(points, gemms: list[str], granularity: str) -> tuple[list[int], list[float], list[float]]:
    """Per M where every GEMM has a point at this granularity: geometric means of the speedups."""
    by_m: dict[int, list] = {}
    for p in points:
        if p.granularity == granularity:
            by_m.setdefault(p.m, []).append(p)
    ms = sorted(m for m, group in by_m.items() if len(group) == len(gemms))
    return (ms, [_geomean([p.measured_speedup for p in by_m[m]]) for m in ms],
            [_geomean([p.predicted_speedup for p in by_m[m]]) for m in ms])


def render_png(points, meta: dict) -> bytes:
    """The figure as PNG bytes (the caller writes them atomically)."""
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    points = list(points)
    gemms = list(dict.fromkeys(p.gemm for p in points))
    granularities = sorted({p.granularity for p in points}, key=Granularity.parse)
    colors = {g: plt.get_cmap("viridis")(i / max(1, len(granularities) - 1) * 0.9)
              for i, g in enumerate(granularities)}
    panels = (["geomean over GEMMs"] if len(gemms) > 1 else []) + gemms
    rows = math.ceil((len(panels) + 1) / _COLUMNS)  # one cell more for the legend
    fig, axes = plt.subplots(rows, _COLUMNS, figsize=(5.2 * _COLUMNS, 3.9 * rows), squeeze=False)
    cells = [ax for row in axes for ax in row]
    for ax, panel in zip(cells, panels):
        for g in granularities:
            if panel in gemms:
                sub = [p for p in points if p.gemm == panel]
                ms, measured, predicted = _series(sub, g)
            else:
                ms, measured, predicted = _geomean_series(points, gemms, g)
            ax.plot(ms, measured, "-o", color=colors[g], markersize=4, linewidth=1.8)
            ax.plot(ms, predicted, "--", color=colors[g], linewidth=1.3, alpha=0.85)
        _decorate(ax, panel, points)
    legend = cells[len(panels)]
    legend.axis("off")
    handles = [Line2D([], [], color=colors[g], marker="o", linewidth=1.8, label=g) for g in granularities]
    handles += [Line2D([], [], color="black", linestyle="-", label="measured"),
                Line2D([], [], color="black", linestyle="--", label="cost model")]
    legend.legend(handles=handles, loc="center", frameon=False, fontsize=11, title="granularity")
    for ax in cells[len(panels) + 1:]:
        ax.axis("off")
    fig.suptitle(f"W4A4 speedup over cuBLAS FP16: {meta.get('model', '?')} on {meta.get('device', '?')} "
                 f"(activation quantization included)", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _decorate(ax, panel: str, points) -> None:
    ax.set_xscale("log", base=2)
    ms = sorted({p.m for p in points})
    ax.set_xticks(ms)
    ax.set_xticklabels([str(m) for m in ms], fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_title(panel if panel.startswith("geomean") else _gemm_title(panel, points), fontsize=11)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup over FP16")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="major", alpha=0.3)


def _gemm_title(gemm: str, points) -> str:
    p = next(p for p in points if p.gemm == gemm)
    return f"{gemm} (N={p.n}, K={p.k})"
