"""Inspect a build: what its plan decided, what it contains, and what the compiler made of one kernel.

Everything is read from the build folder alone (``manifest.json``, ``plan.yaml``, ``src/``, ``obj/``; the
manifest's paths are relative to the folder), so a folder copied from another machine inspects the same, and
no GPU is needed. The records here are frozen and turn into JSON with :func:`to_json`; the ``apex4gen
inspect`` command prints them.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from . import manifest as manifests
from .build import INT_MAX
from .errors import Apex4genError, LoadError
from .granularity import Granularity
from .kernels import KernelConfig, family_of
from .plan import Plan
from .sass import ObjectReport, PathEvidence, SassUnavailable, demangle, read_object

_NAME_PREFIX = "apex4gen_"
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


class KernelNotFound(Apex4genError):
    """The kernel asked for is not in the build (or several match)."""


@dataclass(frozen=True)
class PointSpeedup:
    phase: str
    m: int
    weight: float
    speedup: float


@dataclass(frozen=True)
class LayerRow:
    name: str
    n: int
    k: int
    granularity: str
    path: str
    speedup: float                      # predicted, weighted over the plan's workload points
    points: tuple[PointSpeedup, ...]
    act_bits: int = 4                   # the layer's activation precision


@dataclass(frozen=True)
class RouteRow:
    """Problem x M bucket -> kernel: the kernel serves m_min <= M <= m_max (m_max None: every larger M)."""

    n: int
    k: int
    group: int                          # the group size the ABI receives: K for per-channel
    dtype: str
    m_min: int
    m_max: int | None
    kernel: int
    kernel_name: str
    layers: tuple[str, ...]
    act_bits: int = 4                   # the problem's activation precision


@dataclass(frozen=True)
class KernelRow:
    index: int
    name: str
    config: dict
    act_format: str
    weight_layout: str
    source: str                         # relative to the build folder
    object: str | None                  # relative to the build folder; None if the manifest names none
    routes: int


@dataclass(frozen=True)
class BuildSummary:
    build_dir: str
    gpu: str
    arch: str
    model: str
    apex4gen: str
    nvcc: str
    cutlass: str
    speedup: float                      # the plan's end to end prediction over FP16
    points: tuple[PointSpeedup, ...]
    layers: tuple[LayerRow, ...]
    routes: tuple[RouteRow, ...]
    kernels: tuple[KernelRow, ...]
    unserved: str | None                # GEMMs and M ranges no kernel serves (a partial build), else None


@dataclass(frozen=True)
class Spills:
    """Local memory traffic in the SASS: spill stores/loads (and stack arrays) cost a trip to memory."""

    local_bytes: int                    # the most local memory per thread of any function
    stores: int                         # STL instructions
    loads: int                          # LDL instructions

    @property
    def none(self) -> bool:
        return self.local_bytes == 0 and self.stores == 0 and self.loads == 0


@dataclass(frozen=True)
class KernelReport:
    kernel: KernelRow
    routes: tuple[RouteRow, ...]
    source_text: str
    headers: tuple[str, ...]            # the build's headers the source includes (relative to the build folder)
    compile_command: tuple[str, ...]
    dynamic_shared_bytes: int | None    # what the launch asks for (the family's own count)
    sass: ObjectReport | None
    demangled: dict                     # device function name -> its C++ name
    mix: dict                           # opcode -> count over every function of the object (MIX_OPCODES)
    evidence: PathEvidence | None
    spills: Spills | None
    unavailable: str | None             # why there is no SASS (missing object or tool), else None


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Build:
    path: Path
    manifest: manifests.Manifest
    plan: Plan


def _open(build_dir: Path) -> _Build:
    """The manifest (checked whole and made from the plan.yaml beside it, as the loader checks it) and the plan."""
    build_dir = Path(build_dir)
    if not build_dir.is_dir():
        raise LoadError(f"{build_dir} is not a folder; give a build folder made by `apex4gen build` "
                        "(e.g. generated/<gpu>-<model>)")
    if not (build_dir / manifests.NAME).is_file():
        raise LoadError(f"{build_dir} is not a finished apex4gen build (no {manifests.NAME}); build it with "
                        "`apex4gen build --gpu GPU --model MODEL --out DIR` or give another folder")
    manifest = manifests.read(build_dir)
    return _Build(build_dir, manifest, Plan.load(build_dir / "plan.yaml"))


# ---------------------------------------------------------------------------------------------- the summary


def _weighted(points: tuple[PointSpeedup, ...]) -> float:
    """The workload-weighted speedup, as the planner weighs its end to end figure (time ratios, not speedups)."""
    return round(sum(p.weight for p in points) / sum(p.weight / p.speedup for p in points), 4)


def _layer_rows(plan: Plan) -> tuple[LayerRow, ...]:
    rows = []
    for lp in plan.layers:
        points = tuple(PointSpeedup(p.phase, p.m, p.weight, p.speedup) for p in lp.predictions)
        rows.append(LayerRow(lp.name, lp.n, lp.k, lp.granularity.name, lp.path, _weighted(points), points,
                             lp.act_bits))
    return tuple(rows)


def _route_rows(build: _Build) -> tuple[RouteRow, ...]:
    names = {k.index: k.name for k in build.manifest.kernels}
    gemms = {(g.n, g.k, g.granularity.size(g.k), g.out_dtype, g.act_bits): g for g in build.plan.gemms}
    rows = []
    for r in build.manifest.routes:
        # the manifest was built from this plan (checked on reading)
        gemm = gemms[(r.n, r.k, r.group, r.dtype, r.act_bits)]
        m_max = None if r.m_max >= INT_MAX else r.m_max
        rows.append(RouteRow(r.n, r.k, r.group, r.dtype, gemm.m_min(m_max), m_max, r.kernel, names[r.kernel],
                             gemm.layers, r.act_bits))
    return tuple(rows)


def _kernel_rows(build: _Build, routes: tuple[RouteRow, ...]) -> tuple[KernelRow, ...]:
    objects = {c.source: c.object for c in build.manifest.compile}
    return tuple(KernelRow(k.index, k.name, dict(k.config), k.act_format, k.weight_layout, k.source,
                           objects.get(k.source), sum(r.kernel == k.index for r in routes))
                 for k in build.manifest.kernels)


def summarize(build_dir: Path) -> BuildSummary:
    """The plan summary, the route table and the kernel list of a build."""
    return _summary(_open(build_dir))


def _summary(build: _Build) -> BuildSummary:
    m, plan = build.manifest, build.plan
    routes = _route_rows(build)
    totals = tuple(PointSpeedup(p.phase, p.m, p.weight, p.speedup) for p in plan.totals.predictions)
    return BuildSummary(str(build.path), m.gpu, m.arch, m.model, m.apex4gen, m.nvcc, m.cutlass, plan.totals.speedup,
                        totals, _layer_rows(plan), routes, _kernel_rows(build, routes),
                        plan.unserved_summary() if plan.unserved() else None)


# ---------------------------------------------------------------------------------------------- one kernel


def find_kernel(kernels: tuple[KernelRow, ...], wanted: str) -> KernelRow:
    """By full name, index, or a prefix of the name (``apex4gen_`` may be left out)."""
    for k in kernels:
        if k.name == wanted:
            return k
    if wanted.isdigit():
        if int(wanted) < len(kernels):
            return kernels[int(wanted)]
        raise KernelNotFound(f"kernel index {wanted} is out of range: the build has {len(kernels)} kernels "
                             f"(0-{len(kernels) - 1}); `apex4gen inspect BUILD` lists them")
    matches = [k for k in kernels if k.name.startswith(wanted) or k.name.startswith(_NAME_PREFIX + wanted)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise KernelNotFound(f"no kernel of this build is named {wanted!r} or starts so; `apex4gen inspect BUILD` "
                             "lists them (select by name, name prefix or index)")
    listed = ", ".join(f"{k.index}: {k.name}" for k in matches[:3]) + (", ..." if len(matches) > 3 else "")
    raise KernelNotFound(f"{wanted!r} matches {len(matches)} kernels ({listed}); give more of the name or the index")


def _dynamic_shared_bytes(config: dict) -> int | None:
    """The family's shared-memory count for this config (what the launcher requests); None for a family this
    apex4gen version does not know."""
    try:
        cfg = KernelConfig(**{**config, "granularity": Granularity.parse(config["granularity"])})
        return family_of(cfg).smem_bytes(cfg)
    except (TypeError, ValueError, KeyError, Apex4genError):
        return None


def _included_headers(build_dir: Path, source: Path) -> tuple[str, ...]:
    """The build's own headers a source includes, directly or through each other (the kernel bodies live in
    runtime/kernels/*.cuh): relative to the build folder, in the order first met."""
    include_dirs = (build_dir / "runtime",)
    found: list[str] = []
    pending = [source]
    while pending:
        current = pending.pop(0)
        for name in _LOCAL_INCLUDE.findall(current.read_text()):
            for base in (current.parent, *include_dirs):
                header = (base / name).resolve()
                if header.is_file() and header.is_relative_to(build_dir.resolve()):
                    relative = str(header.relative_to(build_dir.resolve()))
                    if relative not in found:
                        found.append(relative)
                        pending.append(header)
                    break
    return tuple(found)


def _sass(build: _Build, kernel: KernelRow) -> tuple[ObjectReport | None, str | None]:
    if kernel.object is None:
        return None, f"{manifests.NAME} names no object file for {kernel.source}; rebuild the build"
    try:
        return read_object(build.path / kernel.object), None
    except SassUnavailable as err:
        return None, str(err)


def _spills(report: ObjectReport) -> Spills:
    local = max((r.local for r in report.resources), default=0)
    return Spills(local, report.total("STL"), report.total("LDL"))


def kernel_report(build_dir: Path, wanted: str) -> KernelReport:
    """Source, compile command, resources and SASS instruction mix of one kernel of a build."""
    build = _open(build_dir)
    summary = _summary(build)
    kernel = find_kernel(summary.kernels, wanted)
    source = build.path / kernel.source
    if not source.is_file():
        raise LoadError(f"{source} is missing (the build folder is incomplete); rebuild it with "
                        f"`{manifests.rebuild_command(build.path)}`")
    command = next((c.command for c in build.manifest.compile if c.source == kernel.source), ())
    report, unavailable = _sass(build, kernel)
    names = ([f.function for f in report.functions] + [r.function for r in report.resources]) if report else []
    return KernelReport(
        kernel, tuple(r for r in summary.routes if r.kernel == kernel.index), source.read_text(),
        _included_headers(build.path, source), command,
        _dynamic_shared_bytes(kernel.config), report, demangle(sorted(set(names))),
        report.mix() if report else {}, report.evidence(kernel.config["path"]) if report else None,
        _spills(report) if report else None, unavailable)


# ---------------------------------------------------------------------------------------------- output


def command_line(command: tuple[str, ...]) -> str:
    return shlex.join(command)


def to_json(record) -> str:
    """A report as JSON: every field of the records, tuples as lists."""
    data = dataclasses.asdict(record)
    if isinstance(record, KernelReport):
        data["spills"] = None if record.spills is None else {**data["spills"], "none": record.spills.none}
    return json.dumps(data, indent=2)
