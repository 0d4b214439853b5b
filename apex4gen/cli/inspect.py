"""``apex4gen inspect BUILD_DIR [KERNEL]``: print what :mod:`apex4gen.inspect` reads from a build."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.measure import Measurement
from rich.syntax import Syntax
from rich.table import Table

from .. import inspection
from ..granularity import Granularity
from ..kernels import KernelConfig
from ..sass import MIX_OPCODES

_MIN_WIDTH = 120   # rich falls back to 80 columns off a terminal, which would wrap every row
_CONFIG_COLUMNS = ("family", "arch", "path", "granularity", "tile", "warps", "stages", "split_k", "scheduler",
                   "act_bits", "out_dtype")


def _console(*renderables) -> Console:
    """A console as wide as the terminal, and at least as wide as the widest table needs: rows are never
    squeezed or wrapped, so the view reads the same piped into a pager or a file."""
    width = max(Console().width, _MIN_WIDTH)
    probe = Console(width=width)
    needed = [Measurement.get(probe, probe.options.update(width=10_000), r).maximum for r in renderables]
    return Console(width=max([width, *needed]))


def _m_range(route: inspection.RouteRow) -> str:
    if route.m_max is None:
        return f"{route.m_min}+"
    return str(route.m_max) if route.m_min == route.m_max else f"{route.m_min}-{route.m_max}"


def _problem(route: inspection.RouteRow) -> str:
    acts = "" if route.act_bits == 4 else f" a{route.act_bits}"
    return f"{route.n} x {route.k} {Granularity.of_size(route.group, route.k).name}{acts} {route.dtype}"


def _field_order(config: dict) -> list[str]:
    """KernelConfig's own field order (the manifest sorts keys), then any field it does not have."""
    known = [f.name for f in dataclasses.fields(KernelConfig)]
    return [key for key in known if key in config] + sorted(set(config) - set(known))


def _config_cells(config: dict) -> list[str]:
    """Every field of a kernel config; tile and warp shapes as one cell each."""
    shaped = {"act_bits": 4, **config, "tile": f"{config['tile_m']}x{config['tile_n']}x{config['tile_k']}",
              "warps": f"{config['warps_m']}x{config['warps_n']}"}
    return [str(shaped[c]) for c in _CONFIG_COLUMNS]


# ---------------------------------------------------------------------------------------------- the summary


def _layer_table(summary: inspection.BuildSummary) -> Table:
    table = Table(title=f"plan: {summary.model} on {summary.gpu} (predicted speedup over FP16)")
    for name in ("layer", "N x K", "granularity", "acts", "path", "weighted"):
        table.add_column(name, justify="right" if name in ("N x K", "weighted") else "left")
    for p in summary.points:
        table.add_column(f"{p.phase} M={p.m}", justify="right")
    for row in summary.layers:
        table.add_row(row.name, f"{row.n} x {row.k}", row.granularity, f"{row.act_bits}-bit", row.path,
                      f"{row.speedup:.2f}x",
                      *[f"{p.speedup:.2f}x" for p in row.points])
    table.add_section()
    table.add_row("all layers", "", "", "", f"{summary.speedup:.2f}x", *[f"{p.speedup:.2f}x" for p in summary.points])
    return table


def _route_table(summary: inspection.BuildSummary) -> Table:
    table = Table(title="routes: problem x M bucket -> kernel")
    for name in ("problem (N x K granularity dtype)", "layers", "M", "kernel"):
        table.add_column(name)
    previous = None
    for r in summary.routes:
        first = _problem(r) != previous
        if first and previous is not None:
            table.add_section()
        table.add_row(_problem(r) if first else "", ", ".join(r.layers) if first else "", _m_range(r),
                      f"{r.kernel}: {r.kernel_name}")
        previous = _problem(r)
    return table


def _kernel_table(summary: inspection.BuildSummary) -> Table:
    table = Table(title="kernels (config fields)")
    for name in ("#", *_CONFIG_COLUMNS, "activations", "weights", "routes"):
        table.add_column(name)
    for k in summary.kernels:
        table.add_row(str(k.index), *_config_cells(k.config), k.act_format, k.weight_layout, str(k.routes))
    return table


def _print_summary(summary: inspection.BuildSummary) -> None:
    tables = (_layer_table(summary), _route_table(summary), _kernel_table(summary))
    console = _console(*tables)
    console.print(f"{summary.build_dir}: {summary.model} for {summary.gpu} ({summary.arch}); apex4gen "
                  f"{summary.apex4gen}, nvcc {summary.nvcc}, CUTLASS {summary.cutlass}", soft_wrap=True)
    for table in tables:
        console.print(table)
    if summary.unserved:
        console.print(f"without a kernel (the library refuses these): {summary.unserved}", soft_wrap=True,
                      highlight=False)
    console.print("kernel names (`apex4gen inspect BUILD KERNEL` takes a name, a name prefix or an index):")
    for k in summary.kernels:
        console.print(f"  {k.index}: {k.name}", soft_wrap=True, highlight=False)


# ---------------------------------------------------------------------------------------------- one kernel


def _resource_table(report: inspection.KernelReport) -> Table:
    table = Table(title="resources per device function (cuobjdump --dump-resource-usage)")
    for name in ("function", "registers", "static shared B", "local B", "stack B"):
        table.add_column(name, justify="left" if name == "function" else "right")
    for r in report.sass.resources:
        table.add_row(_short(report.demangled.get(r.function, r.function)), str(r.registers), str(r.shared_static),
                      str(r.local), str(r.stack))
    return table


def _mix_table(report: inspection.KernelReport) -> Table:
    table = Table(title="SASS instruction mix (static counts, cuobjdump -sass)")
    table.add_column("function")
    for op in (*MIX_OPCODES, "all"):
        table.add_column(op, justify="right")
    for f in report.sass.functions:
        table.add_row(_short(report.demangled.get(f.function, f.function)),
                      *[str(f.count(op)) for op in MIX_OPCODES], str(f.instructions))
    if len(report.sass.functions) > 1:
        table.add_section()
        table.add_row("all", *[str(report.mix[op]) for op in MIX_OPCODES],
                      str(sum(f.instructions for f in report.sass.functions)))
    return table


_NAME_WIDTH = 60


def _short(function: str) -> str:
    """A device function's C++ name without template arguments and parameters (a CUTLASS kernel's full name
    runs to kilobytes; --json has it whole)."""
    out, depth = [], 0
    for ch in function.replace("(anonymous namespace)::", ""):
        if ch in "<(":
            if depth == 0:
                out.append("<…>" if ch == "<" else "")
            depth += 1
        elif ch in ">)" and depth:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    short = "".join(out)
    # a name nothing demangled (no c++filt on the machine) has no brackets to drop: cut it instead
    return short if len(short) <= _NAME_WIDTH else short[:_NAME_WIDTH - 1] + "…"


def _evidence_line(report: inspection.KernelReport) -> str:
    ev = report.evidence
    if ev.ok:
        found = ", ".join(f"{n} {variant}" for variant, n in ev.found.items())
        return f"tensor cores: the {ev.path} path its name claims, in the SASS: {found}"
    return (f"tensor cores: NO {ev.expected} in the SASS: this kernel does not compute on the {ev.path} path its "
            "name claims")


def _spill_line(spills: inspection.Spills) -> str:
    if spills.none:
        return "spills: none (no local memory, no LDL/STL)"
    return (f"spills: {spills.local_bytes} B local memory per thread, {spills.stores} STL, {spills.loads} LDL "
            "(register spills or stack arrays: each is a trip to memory)")


def _print_kernel_head(console: Console, report: inspection.KernelReport) -> None:
    k = report.kernel
    console.print(f"kernel {k.index}: {k.name}", soft_wrap=True, highlight=False)
    console.print("config: " + " ".join(f"{key}={k.config[key]}" for key in _field_order(k.config)), soft_wrap=True)
    console.print(f"activations {k.act_format}, weight layout {k.weight_layout}; dynamic shared memory "
                  f"{report.dynamic_shared_bytes if report.dynamic_shared_bytes is not None else '?'} B")
    for problem, routes in _routes_by_problem(report.routes).items():
        ranges = ", ".join(_m_range(r) for r in routes)
        console.print(f"serves {problem} at M {ranges} ({', '.join(routes[0].layers)})", soft_wrap=True)


def _routes_by_problem(routes: tuple[inspection.RouteRow, ...]) -> dict[str, list[inspection.RouteRow]]:
    """Per problem, the kernel's M buckets with adjacent ones joined (65-256 and 257-1024 read 65-1024)."""
    out: dict[str, list[inspection.RouteRow]] = {}
    for r in routes:
        joined = out.setdefault(_problem(r), [])
        if joined and joined[-1].m_max is not None and joined[-1].m_max + 1 == r.m_min:
            joined[-1] = dataclasses.replace(joined[-1], m_max=r.m_max)
        else:
            joined.append(r)
    return out


def _print_kernel(console: Console, report: inspection.KernelReport, tables: tuple[Table, ...]) -> None:
    _print_kernel_head(console, report)
    if report.unavailable:
        console.print(f"no resources or SASS: {report.unavailable}", soft_wrap=True, highlight=False)
    else:
        for table in tables:
            console.print(table)
        console.print(_evidence_line(report), soft_wrap=True, highlight=False)
        console.print(_spill_line(report.spills), highlight=False)
    console.print("compile command (run in the build folder):", highlight=False)
    console.print(inspection.command_line(report.compile_command), soft_wrap=True, highlight=False, markup=False)
    if report.headers:
        console.print(f"includes (in the build folder): {', '.join(report.headers)}", soft_wrap=True, highlight=False)
    console.print(f"source: {report.kernel.source}", highlight=False)
    console.print(Syntax(report.source_text, "cpp", line_numbers=True, word_wrap=False), soft_wrap=True)


def _paged(console: Console, use_pager: bool):
    """On a terminal the kernel view goes through the pager with its colours (as git does); piped, it prints."""
    if use_pager and sys.stdout.isatty():
        os.environ.setdefault("LESS", "FRX")  # less: keep colours, quit if it fits one screen (git's default)
        return console.pager(styles=True)
    return contextlib.nullcontext()


@click.command("inspect")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.argument("kernel", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the view as JSON.")
@click.option("--raw", is_flag=True, help="Print only KERNEL's generated source, as written (to save or pipe).")
@click.option("--no-pager", is_flag=True, help="Print the kernel view instead of paging it on a terminal.")
def inspect_cmd(build_dir: Path, kernel: str | None, as_json: bool, raw: bool, no_pager: bool) -> None:
    """Show a build: the plan summary, routes and kernels; with KERNEL (a name, name prefix or index) its source,
    compile command, resources and SASS instruction mix. Reads the folder only: no GPU needed."""
    if kernel is None:
        if raw:
            raise click.UsageError("--raw prints one kernel's source: give KERNEL")
        summary = inspection.summarize(build_dir)
        if as_json:
            click.echo(inspection.to_json(summary))
        else:
            _print_summary(summary)
        return
    report = inspection.kernel_report(build_dir, kernel)
    if raw:
        click.echo(report.source_text, nl=False)
    elif as_json:
        click.echo(inspection.to_json(report))
    else:
        tables = () if report.unavailable else (_resource_table(report), _mix_table(report))
        console = _console(*tables)
        with _paged(console, not no_pager):
            _print_kernel(console, report, tables)


COMMANDS = [inspect_cmd]
