"""Build: render a plan's kernels into a build directory and compile them with ninja into one shared library.

Layout of a build directory (``generated/<gpu>-<model>/`` by default)::

    plan.yaml            the plan the build was made from
    src/*.cu             rendered kernels + dispatch.cu (generated; banner on every file)
    runtime/             hand-written runtime sources every build links (copied from the package)
    include/apex4gen.h   the C ABI header, for other engines
    build.ninja, obj/    the compile; object names carry the hash of source + command + toolchain
    lib/libapex4gen.so   the product: C ABI (dispatch, kernels, activation quantization)
    manifest.json        written last, only after a successful build: kernels, routes, files, flags (a rebuild
                         keeps the previous one aside as .manifest.json.previous until it succeeds)

The PyTorch ops (``torch.ops.apex4gen.*``) load ``lib/libapex4gen.so`` through :mod:`apex4gen.loader`, so one
binary serves PyTorch and other engines alike.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .emit import render_kernel, render_template, sha256_text
from .files import write_if_different
from .errors import Apex4genError, BuildError
from .kernels import KernelConfig, family_of
from .kernels import legality
from .kernels.cpp_names import ACT_FORMAT_ENUM, SM_NUMBER
from .paths import runtime_dir
from . import toolchain

MANIFEST = "manifest.json"
_MANIFEST_ASIDE = ".manifest.json.previous"  # a rebuild's old manifest until it succeeds
_OBJECT_NAME = re.compile(r".+-[0-9a-f]{16}\.o")
LIBRARY = "lib/libapex4gen.so"
INT_MAX = 2**31 - 1
RUNTIME_SOURCES = ("quantize.cu",)
# The C ABI and the kernel headers the rendered sources include (paths under runtime/); the object cache key
# hashes them all.
RUNTIME_HEADERS = ("apex4gen.h", *sorted(f"kernels/{p.name}" for p in (runtime_dir() / "kernels").glob("*.cuh")))


@dataclass(frozen=True)
class Route:
    """Problem (N, K, group, dtype) and M bucket -> kernel index, as dispatch.cu and the loader read it."""

    n: int
    k: int
    group: int          # the group size the ABI receives: K for per-channel
    dtype: str
    m_max: int
    kernel: int


@dataclass(frozen=True)
class CompileUnit:
    source: Path        # relative to the build directory
    obj: Path
    command: tuple[str, ...]
    label: str          # what a failure names: the kernel or the runtime file
    key: str            # sha256 of what is compiled: names the object here and in the shared cache


@dataclass(frozen=True)
class BuildResult:
    build_dir: Path
    library: Path | None
    kernels: tuple[str, ...]
    compiled: int        # compile units ninja ran this time (0 for a no-op rebuild)
    emitted_changed: int  # rendered files whose bytes changed


def routes_of(plan, kernels: list[KernelConfig]) -> list[Route]:
    index = {cfg: i for i, cfg in enumerate(kernels)}
    routes = []
    for gemm in plan.gemms:
        for bucket in gemm.buckets:
            if bucket.kernel is None:
                continue
            group = gemm.group or gemm.k
            m_max = INT_MAX if bucket.m_max is None else int(bucket.m_max)
            routes.append(Route(gemm.n, gemm.k, group, gemm.out_dtype, m_max, index[bucket.kernel]))
    return sorted(routes, key=lambda r: (r.n, r.k, r.group, r.dtype, r.m_max))


def check_plan_legal(plan, gpu) -> None:
    """A plan file may be hand-edited: every routed kernel is re-checked in the one legality module."""
    if plan.gpu != gpu.name:
        raise BuildError(f"the plan was made for {plan.gpu}, not {gpu.name}: build it with --gpu {plan.gpu}, or "
                         f"plan for {gpu.name} (apex4gen plan --gpu {gpu.name} ...)")
    for gemm in plan.gemms:
        for bucket in gemm.buckets:
            if bucket.kernel is not None:
                legality.check(bucket.kernel, gpu, gemm)


def plan_arch(kernels: list[KernelConfig], gpu) -> str:
    archs = {cfg.arch for cfg in kernels} or {gpu.kernel_arch}
    if len(archs) != 1:
        raise BuildError(f"a build targets one architecture; the plan mixes {sorted(archs)}")
    return archs.pop()


def render_sources(plan, kernels: list[KernelConfig], arch: str, build_dir: Path,
                   nvcc_version: str | None) -> tuple[list[Path], int]:
    """Write src/, runtime/ and include/; remove rendered kernels the plan no longer has."""
    written = []
    for cfg in kernels:
        written.append(write_if_different(build_dir / "src" / f"{cfg.procedural_name()}.cu",
                                          render_kernel(cfg, nvcc_version)))
    routes = routes_of(plan, kernels)
    context = {
        "kernels": [{"name": c.procedural_name(), "act_format": ACT_FORMAT_ENUM[family_of(c).act_format]}
                    for c in kernels],
        "routes": [{**r.__dict__, "dtype": "APEX4GEN_F16" if r.dtype == "f16" else "APEX4GEN_BF16"}
                   for r in routes],
        "sm_number": SM_NUMBER[arch],
    }
    plan_hash = sha256_text(plan.to_yaml())
    written.append(write_if_different(build_dir / "src" / "dispatch.cu",
                                      render_template("dispatch.cu.jinja", context, inputs={"plan": plan_hash})))
    for name in (*RUNTIME_SOURCES, *RUNTIME_HEADERS):
        written.append(write_if_different(build_dir / "runtime" / name, (runtime_dir() / name).read_text()))
    written.append(write_if_different(build_dir / "include" / "apex4gen.h", (runtime_dir() / "apex4gen.h").read_text()))
    _remove_stale_sources(build_dir / "src", {w.path.name for w in written})
    return [w.path for w in written], sum(w.changed for w in written)


def _remove_stale_sources(src_dir: Path, keep: set[str]) -> None:
    for path in sorted(src_dir.glob("*.cu")):
        if path.name not in keep and path.read_text().startswith("// Generated by apex4gen."):
            path.unlink()


def compile_units(build_dir: Path, kernels: list[KernelConfig], arch: str) -> list[CompileUnit]:
    """Commands use paths relative to the build directory (ninja runs there), so the same kernel compiles to
    the same command, and the same cache key, in every build."""
    flags = toolchain.nvcc_flags(arch, [*toolchain.cutlass_include_dirs(), Path("runtime")])
    nvcc = toolchain.nvcc_path()
    headers = "".join((build_dir / "runtime" / name).read_text() for name in RUNTIME_HEADERS)
    sources = [(Path("src") / f"{c.procedural_name()}.cu", c.procedural_name()) for c in kernels]
    sources += [(Path("src") / "dispatch.cu", "dispatch"),
                *[(Path("runtime") / name, f"runtime/{name}") for name in RUNTIME_SOURCES]]
    units = []
    for source, label in sources:
        command = [nvcc, *flags, "-c", str(source)]
        key = _cache_key((build_dir / source).read_text() + headers, command)
        obj = Path("obj") / f"{source.stem}-{key[:16]}.o"
        units.append(CompileUnit(source, obj, (*command, "-o", str(obj)), label, key))
    return units


# nvcc reads these from the environment as if they were on its command line (and the host compiler it runs)
_NVCC_ENVIRONMENT = ("NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_CCBIN")


def _cache_key(compiled_text: str, command: list[str]) -> str:
    """Hash of what is compiled: source and runtime headers, the full command (with nvcc's environment flags),
    the toolchain versions."""
    h = hashlib.sha256()
    environment = "\0".join(f"{name}={os.environ.get(name, '')}" for name in _NVCC_ENVIRONMENT)
    for part in (compiled_text, "\0".join(command), environment, toolchain.nvcc_version(),
                 toolchain.cutlass_version()):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()


def object_cache_dir() -> Path | None:
    """Shared object cache (``APEX4GEN_CACHE_DIR``; empty disables it)."""
    configured = os.environ.get("APEX4GEN_CACHE_DIR")
    if configured is not None:
        return Path(configured) if configured else None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "apex4gen" / "objects"


def _unit_command(unit: CompileUnit, cache: Path | None) -> list[str]:
    if cache is None:
        return list(unit.command)
    wrapper = Path(__file__).with_name("objcache.py")
    return [sys.executable, str(wrapper), str(cache), unit.key, str(unit.obj), "--", *unit.command]


def write_ninja(build_dir: Path, units: list[CompileUnit], arch: str) -> Path:
    lines = [
        "# Generated by apex4gen. Object names carry the hash of source, command and toolchain.",
        "ninja_required_version = 1.10",
        "rule nvcc",
        "  command = $cmd",
        "  description = $label",
        "rule link",
        "  command = $cmd",
        "  description = link $out",
    ]
    cache = object_cache_dir()
    for u in units:
        lines += [f"build {u.obj}: nvcc {u.source}", f"  cmd = {_shell_join(_unit_command(u, cache))}",
                  f"  label = {u.label}"]
    objs = " ".join(str(u.obj) for u in units)
    link = [toolchain.nvcc_path(), "-shared", *toolchain.gencode_flags(arch, embed_ptx=not arch.endswith("a")),
            *[str(u.obj) for u in units], "-o", LIBRARY, "-lcudart"]
    lines += [f"build {LIBRARY}: link {objs}", f"  cmd = {_shell_join(link)}", f"default {LIBRARY}", ""]
    return write_if_different(build_dir / "build.ninja", "\n".join(lines)).path


def _shell_join(args) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def run_ninja(build_dir: Path, units: list[CompileUnit], jobs: int | None, progress: bool) -> int:
    """Run ninja with a progress bar; returns how many compile/link steps ran. A failure names the kernel."""
    env = {**os.environ, "NINJA_STATUS": "[%f/%t] "}
    cmd = [toolchain.ninja_path(), "-C", str(build_dir)]
    if jobs:
        cmd += ["-j", str(jobs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output, steps = _follow_ninja(proc, progress)
    if proc.wait() != 0:
        raise BuildError(_failure_line(output, units))
    return steps


def _follow_ninja(proc, progress: bool) -> tuple[list[str], int]:
    status = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")
    output: list[str] = []
    steps = 0
    bar = _progress_bar() if progress else None
    task = None
    with bar or contextlib.nullcontext():
        for line in proc.stdout:
            output.append(line.rstrip("\n"))
            m = status.match(line)
            if m is None:
                continue
            steps += 1
            if bar is not None:
                if task is None:
                    task = bar.add_task("compiling", total=int(m.group(2)))
                bar.update(task, completed=int(m.group(1)) - 1, description=m.group(3)[:60])
        if bar is not None and task is not None:
            bar.update(task, completed=bar.tasks[0].total)
    return output, steps


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


def _failure_line(output: list[str], units: list[CompileUnit]) -> str:
    """Print nvcc's own error text to stderr, return one line naming what failed."""
    failed = [_failed_output(line) for line in output if line.startswith("FAILED: ")]
    by_obj = {str(u.obj): u.label for u in units}
    errors = [line for line in output if "error" in line.lower() and not line.startswith("FAILED")]
    sys.stderr.write("\n".join(errors[-40:] or output[-40:]) + "\n")
    labels = ", ".join(by_obj.get(f, f) for f in failed) or "the build"
    return f"compiling {labels} failed (nvcc's errors above); fix the template or report the kernel config"


def _failed_output(line: str) -> str:
    """``FAILED: obj/x.o`` (ninja < 1.12) or ``FAILED: [code=1] obj/x.o``: the first output named."""
    words = [w for w in line[len("FAILED: "):].split() if not w.startswith("[code=")]
    return words[0] if words else ""


def write_manifest(build_dir: Path, plan, kernels: list[KernelConfig], routes: list[Route], arch: str,
                   units: list[CompileUnit], gpu) -> Path:
    manifest = {
        "apex4gen": __version__,
        "cutlass": toolchain.cutlass_version(),
        "nvcc": toolchain.nvcc_version(),
        "gpu": gpu.name,
        "arch": arch,
        "sm": SM_NUMBER[arch],
        "ptx_embedded": not arch.endswith("a"),
        "model": plan.model,
        "out_dtype": plan.out_dtype,
        "plan_sha256": sha256_text(plan.to_yaml()),
        "library": LIBRARY,
        "kernels": [
            {"index": i, "name": c.procedural_name(), "config": c.to_dict(),
             "act_format": family_of(c).act_format, "weight_layout": family_of(c).weight_layout,
             "source": f"src/{c.procedural_name()}.cu"}
            for i, c in enumerate(kernels)
        ],
        "routes": [r.__dict__ for r in routes],
        "compile": [{"source": str(u.source), "object": str(u.obj), "command": list(u.command)} for u in units],
    }
    _settle_manifest(build_dir, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return build_dir / MANIFEST


def _set_manifest_aside(build_dir: Path) -> None:
    """A build that fails must not look loadable: its manifest waits aside until the build succeeds."""
    if (build_dir / MANIFEST).exists():
        os.replace(build_dir / MANIFEST, build_dir / _MANIFEST_ASIDE)


def _settle_manifest(build_dir: Path, text: str) -> None:
    """The new manifest in place; an unchanged one goes back as it was (no-op builds keep its mtime)."""
    aside = build_dir / _MANIFEST_ASIDE
    if aside.exists() and aside.read_text() == text:
        os.replace(aside, build_dir / MANIFEST)
        return
    write_if_different(build_dir / MANIFEST, text)
    aside.unlink(missing_ok=True)


def check_build_dir(build_dir: Path, force: bool) -> None:
    """Refuse to write into a directory that holds something other than an apex4gen build."""
    if not build_dir.exists() or force:
        return
    if not build_dir.is_dir():
        raise Apex4genError(f"{build_dir} exists and is not a directory; choose another --out")
    ours = {"plan.yaml", MANIFEST, _MANIFEST_ASIDE, "src", "runtime", "include", "obj", "lib", "build.ninja",
            ".ninja_log", ".ninja_deps"}
    present = {p.name for p in build_dir.iterdir()}
    foreign = sorted(present - ours)
    if present and not foreign and not present & {"plan.yaml", MANIFEST, _MANIFEST_ASIDE}:
        foreign = sorted(present)  # our folder names, but no build ever wrote here
    if foreign:
        raise Apex4genError(f"{build_dir} holds files apex4gen did not write ({', '.join(foreign[:3])}); "
                            "choose another --out or pass --force")


def build(plan, gpu, build_dir: Path, emit_only: bool = False, jobs: int | None = None,
          progress: bool = True, force: bool = False) -> BuildResult:
    """Render, then (unless ``emit_only``) compile a plan's kernels into ``build_dir``."""
    build_dir = Path(build_dir).absolute()  # ninja runs in build_dir: every path in a command is absolute
    check_build_dir(build_dir, force)
    check_plan_legal(plan, gpu)
    kernels = list(plan.kernels())
    arch = plan_arch(kernels, gpu)
    nvcc_version = None if emit_only else toolchain.nvcc_version()
    build_dir.mkdir(parents=True, exist_ok=True)
    _set_manifest_aside(build_dir)
    plan_changed = write_if_different(build_dir / "plan.yaml", plan.to_yaml()).changed
    _, changed = render_sources(plan, kernels, arch, build_dir, nvcc_version)
    names = tuple(c.procedural_name() for c in kernels)
    if emit_only:
        if not plan_changed and not changed and (build_dir / _MANIFEST_ASIDE).exists():
            os.replace(build_dir / _MANIFEST_ASIDE, build_dir / MANIFEST)  # the built library still matches
        return BuildResult(build_dir, None, names, 0, changed)
    units = compile_units(build_dir, kernels, arch)
    write_ninja(build_dir, units, arch)
    (build_dir / "lib").mkdir(exist_ok=True)
    steps = run_ninja(build_dir, units, jobs, progress)
    _remove_stale_objects(build_dir, units)
    write_manifest(build_dir, plan, kernels, routes_of(plan, kernels), arch, units, gpu)
    return BuildResult(build_dir, build_dir / LIBRARY, names, steps, changed)


def _remove_stale_objects(build_dir: Path, units: list[CompileUnit]) -> None:
    """Objects of earlier builds (named <source>-<16 hex of the cache key>.o, as compile_units names them)."""
    keep = {u.obj.name for u in units}
    for path in (build_dir / "obj").glob("*.o"):
        if path.name not in keep and _OBJECT_NAME.fullmatch(path.name):
            path.unlink()


def default_build_dir(gpu_name: str, model_name: str, root: Path | None = None) -> Path:
    return (root or Path("generated")) / f"{gpu_name}-{model_name}"
